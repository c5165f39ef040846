"""The book in a real browser (headless Debian chromium via python playwright).

(a) the built book, served on localhost with every non-local request aborted: the plotly
    figure renders, moving its slider changes the plotted data, MathJax typesets, no
    request leaves the machine, and a screenshot is saved to test-artifacts/;
(b) JupyterLab running a chapter with live widgets (DEQLITE_LIVE=1): moving the ipywidgets
    slider recomputes and redraws the plotly FigureWidget.

Skipped with a reason when chromium or the built book is missing (failed instead in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from conftest import PYTHON, ROOT, free_port, wait_for_http

pytestmark = [pytest.mark.browser]

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def guard_network(page) -> list[str]:
    """Abort every request that would leave the machine; return the list of those seen."""
    blocked: list[str] = []

    def route(r):
        url = urlparse(r.request.url)
        if url.scheme in ("data", "blob", "file", "about") or url.hostname in LOCAL_HOSTS:
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return blocked


def trace_paths(page, index: int) -> str:
    """The SVG path data drawn for the traces of the index-th plotly figure on the page."""
    return page.evaluate(
        """(i) => { const gd = document.querySelectorAll('.js-plotly-plot')[i];
                   return Array.from(gd.querySelectorAll('.scatterlayer path.js-line'))
                               .map(p => p.getAttribute('d')).join('|'); }""",
        index,
    )


def figure_data(page, index: int) -> str:
    return page.evaluate(
        """(i) => JSON.stringify(document.querySelectorAll('.js-plotly-plot')[i].data
                                  .map(t => [t.x, t.y]))""",
        index,
    )


def test_intro_page_offline(browser, book_server, artifacts):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    blocked = guard_network(page)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{book_server}/book/intro.html", wait_until="load")

    # the figure renders (plotly.js served locally, figure drawn from the baked JSON)
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=20_000)
    n_figs = page.evaluate("document.querySelectorAll('.js-plotly-plot').length")
    assert n_figs >= 1
    with_slider = page.evaluate(
        """() => Array.from(document.querySelectorAll('.js-plotly-plot'))
                     .findIndex(gd => (gd.layout.sliders || []).length > 0)""")
    assert with_slider >= 0, "no plotly figure with a slider on the intro page"
    fig = page.locator(".js-plotly-plot").nth(with_slider)
    fig.scroll_into_view_if_needed()

    # moving the slider (a click on its rail, as a reader would) changes the plotted data
    before_data, before_svg = figure_data(page, with_slider), trace_paths(page, with_slider)
    active_before = page.evaluate(f"document.querySelectorAll('.js-plotly-plot')[{with_slider}].layout.sliders[0].active")
    errors_before_slider = list(errors)
    rail = fig.locator(".slider-rail-touch-rect").first
    box = rail.bounding_box()
    assert box is not None, "the slider rail is not visible"
    page.mouse.click(box["x"] + 0.92 * box["width"], box["y"] + box["height"] / 2)
    page.wait_for_function(
        f"""(before) => JSON.stringify(document.querySelectorAll('.js-plotly-plot')[{with_slider}].data
                                        .map(t => [t.x, t.y])) !== before""",
        arg=before_data, timeout=10_000)
    page.wait_for_timeout(300)
    after_data, after_svg = figure_data(page, with_slider), trace_paths(page, with_slider)
    active_after = page.evaluate(f"document.querySelectorAll('.js-plotly-plot')[{with_slider}].layout.sliders[0].active")
    assert active_after != active_before, "the slider did not move"
    assert after_data != before_data, "moving the slider did not change the figure's data"
    assert after_svg != before_svg, "moving the slider did not change what is drawn"

    # MathJax (vendored) typeset the maths
    page.wait_for_selector("mjx-container", timeout=20_000)

    fig.screenshot(path=str(artifacts / "intro-figure.png"))
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts / "intro.png"))
    page.close()

    assert not blocked, f"requests tried to leave the machine: {blocked}"
    assert not errors_before_slider, f"JavaScript errors on the page: {errors_before_slider}"
    # plotly's slider starts an animation on mouse-down and another on mouse-up; the first
    # one's promise is rejected with `undefined` and nobody catches it. That is harmless.
    real = [e for e in errors[len(errors_before_slider):] if e != "undefined"]
    assert not real, f"JavaScript errors after moving the slider: {real}"


def test_every_page_offline(browser, book_server):
    """No page of the book loads anything from outside the machine."""
    html = sorted(p.relative_to(ROOT / "_build" / "html") for p in (ROOT / "_build" / "html").rglob("*.html"))
    page = browser.new_page()
    blocked = guard_network(page)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    for rel in html:
        page.goto(f"{book_server}/{rel.as_posix()}", wait_until="load")
    page.wait_for_timeout(500)
    page.close()
    assert not blocked, f"requests tried to leave the machine: {blocked}"
    assert not errors, f"JavaScript errors: {errors}"


@pytest.mark.slow
def test_jupyterlab_live_slider(browser, tmp_path, artifacts):
    """A chapter in JupyterLab: moving the live ipywidgets slider redraws the figure."""
    work = tmp_path / "lab"
    work.mkdir()
    shutil.copy(ROOT / "book" / "intro.ipynb", work / "intro.ipynb")
    port, token = free_port(), "deqlite-test"
    settings = tmp_path / "lab-settings"
    # render every cell (no windowing: outputs scrolled away stay in the DOM); no news pop-up
    for ext, name, value in (("@jupyterlab/notebook-extension", "tracker", {"windowingMode": "none"}),
                             ("@jupyterlab/apputils-extension", "notification", {"fetchNews": "false"})):
        (settings / ext).mkdir(parents=True, exist_ok=True)
        (settings / ext / f"{name}.jupyterlab-settings").write_text(json.dumps(value))
    env = {**os.environ, "DEQLITE_LIVE": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws")}
    cmd = [PYTHON, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
           f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--ServerApp.disable_check_xsrf=True"]
    log = open(tmp_path / "lab.log", "w")
    lab = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/api/status?token={token}", timeout=60, proc=lab)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        blocked = guard_network(page)
        page.goto(f"{base}/lab/tree/intro.ipynb?token={token}", wait_until="load")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        # wait for the kernel, then Run > Run All Cells through the command palette
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], "
                               ".jp-KernelStatus-success, .jp-Toolbar-kernelStatus", timeout=60_000)
        page.wait_for_timeout(3000)
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        # the live explorer: an ipywidgets slider above a plotly FigureWidget
        slider = page.locator(".jp-OutputArea .noUi-handle").first
        try:
            slider.wait_for(state="attached", timeout=120_000)
        except Exception as exc:
            page.screenshot(path=str(artifacts / "jupyterlab-failure.png"), full_page=True)
            outputs = page.evaluate("""() => Array.from(document.querySelectorAll('.jp-OutputArea-output'))
                                         .map(o => o.innerText.slice(0, 300))""")
            raise AssertionError(f"no live slider appeared; cell outputs: {outputs}") from exc
        slider.scroll_into_view_if_needed()
        fig_sel = ".jp-OutputArea .js-plotly-plot"
        page.wait_for_selector(f"{fig_sel} .main-svg", timeout=60_000)
        page.wait_for_timeout(500)
        before = page.evaluate(f"""() => Array.from(document.querySelector('{fig_sel}')
                                    .querySelectorAll('.scatterlayer path.js-line'))
                                    .map(p => p.getAttribute('d')).join('|')""")
        slider.focus()
        for _ in range(4):
            page.keyboard.press("ArrowRight")
        page.wait_for_function(
            f"""(before) => Array.from(document.querySelector('{fig_sel}')
                               .querySelectorAll('.scatterlayer path.js-line'))
                               .map(p => p.getAttribute('d')).join('|') !== before""",
            arg=before, timeout=60_000)
        page.screenshot(path=str(artifacts / "jupyterlab-live.png"))
        page.close()
        assert not blocked, f"JupyterLab page tried to reach: {blocked}"
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
        log.close()
