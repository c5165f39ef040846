# Two commands on a fresh clone (see README.md):
#   make book   set up .venv, build the book into _build/html
#   make test   set up .venv, build the book (fails on any cell error or warning), run pytest
# torch is installed FIRST so that pip never resolves it to a multi-GB CUDA build;
# override with e.g.  TORCH_SPEC="torch==2.5.1" make test   (or TORCH_SPEC=torch for the newest).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= book,test
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.deqlite-setup-stamp
# -W: warnings are errors, -n: nitpicky references, --keep-going: report them all.
# Notebooks are executed with a cache (_build/.jupyter_cache): unchanged chapters are not re-run.
BUILD_CMD  := $(BIN)/jupyter-book build --all -W -n --keep-going .
PYTEST_ARGS ?=

.PHONY: help setup book test test-fast lint build dist clean clean-cache sync-chapters

help:
	@echo "make book   - set up .venv and build the book (open _build/html/index.html)"
	@echo "make test   - set up .venv, build the book and run every test"
	@echo "make test-fast - unit tests only (no book, no browser)"
	@echo "make lint   - ruff over the library, tests, benchmarks and tools (part of make test)"
	@echo "make sync-chapters - pair .md/.ipynb chapters and refresh their install cell"
	@echo "make dist   - build the library's wheel and sdist into dist/ and check their metadata"

setup: $(STAMP)

# The book machinery is its own distribution (book-tools/, deqlite-book): `pip install deqlite`
# installs the library alone, the book's environment gets both.
$(STAMP): pyproject.toml book-tools/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]" -e ./book-tools
	@touch $(STAMP)

# jupyter-cache keys a chapter on its own code only: when deqlite's source changes, drop
# the cache so every chapter runs again against the new library.
SRC_HASH = $(shell find deqlite -name '*.py' -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-40)

build: setup
	@mkdir -p _build
	@if [ -d _build/.jupyter_cache ] && [ "$$(cat _build/.deqlite-src-hash 2>/dev/null)" != "$(SRC_HASH)" ]; then \
		echo "deqlite changed: clearing the notebook execution cache"; rm -rf _build/.jupyter_cache; fi
	$(BUILD_CMD)
	@echo "$(SRC_HASH)" > _build/.deqlite-src-hash

book: build
	@echo
	@echo "Book built. Open file://$(CURDIR)/_build/html/index.html"
	@echo "(or serve it: $(BIN)/python -m http.server -d _build/html 8000)"

# The build and pytest both run even when the build fails (so one run reports everything);
# the target fails when either failed.
test: setup
	@lint=0; $(MAKE) --no-print-directory lint || lint=$$?; \
	build=0; $(MAKE) --no-print-directory build || build=$$?; \
	$(BIN)/python -m pytest $(PYTEST_ARGS); tests=$$?; \
	if [ $$lint -ne 0 ]; then echo "make test: ruff FAILED (see above; rules in pyproject.toml)"; fi; \
	if [ $$build -ne 0 ]; then echo "make test: the book build FAILED (see the warnings above)"; fi; \
	if [ $$lint -ne 0 ] || [ $$build -ne 0 ] || [ $$tests -ne 0 ]; then exit 1; fi

lint: setup
	$(BIN)/python -m ruff check .

test-fast: setup
	$(BIN)/python -m pytest -m "not book and not browser and not colab" $(PYTEST_ARGS)

# The library's wheel + sdist (python -m build) and a metadata check (twine check --strict).
dist: setup
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python -m twine check --strict dist/*
	@ls -l dist

sync-chapters: setup
	$(BIN)/python scripts/sync_chapters.py

clean:
	rm -rf _build test-artifacts dist

clean-cache:
	rm -rf _build/.jupyter_cache
