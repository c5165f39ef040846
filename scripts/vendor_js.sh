#!/usr/bin/env bash
# Refresh the vendored MathJax and require.js (see book-tools/deqlite_book/static/deqlite/vendor/VENDOR.md).
set -euo pipefail
MATHJAX=${MATHJAX:-mathjax@3.2.2}
REQUIREJS=${REQUIREJS:-requirejs@2.3.7}
here=$(cd "$(dirname "$0")/.." && pwd)
dest="$here/book-tools/deqlite_book/static/deqlite/vendor"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack "$MATHJAX" "$REQUIREJS" >/dev/null
mkdir mj rq
tar xzf mathjax-*.tgz -C mj && tar xzf requirejs-*.tgz -C rq
rm -rf "$dest/mathjax" "$dest/requirejs"
mkdir -p "$dest/mathjax/es5/output/chtml/fonts" "$dest/mathjax/es5/input/tex" "$dest/requirejs"
cp mj/package/es5/tex-chtml.js "$dest/mathjax/es5/"
cp -r mj/package/es5/output/chtml/fonts/woff-v2 "$dest/mathjax/es5/output/chtml/fonts/"
cp -r mj/package/es5/input/tex/extensions "$dest/mathjax/es5/input/tex/"
cp mj/package/LICENSE "$dest/mathjax/"
cp rq/package/require.js rq/package/README.md "$dest/requirejs/"
echo "vendored $MATHJAX and $REQUIREJS into $dest"
