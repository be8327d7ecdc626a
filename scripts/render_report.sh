#!/usr/bin/env bash
# Renders an HTML cost report (`sparkgrid report --format html --out FILE`) to a PNG with
# headless Chromium, at 1400 x 2200 pixels (the top of a long page).
#   bash scripts/render_report.sh report.html report.png
# Exits 2 with how to install Chromium when it is missing, or when the arguments are wrong.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 HTML PNG" >&2
    exit 2
fi
html=$1
png=$2
if [[ ! -f "$html" ]]; then
    echo "error: HTML: no such file: $html" >&2
    exit 2
fi
browser=""
for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        browser=$name
        break
    fi
done
if [[ -z "$browser" ]]; then
    echo "error: headless Chromium is needed and was not found on PATH." >&2
    echo "  Debian/Ubuntu: sudo apt-get install -y chromium   (Ubuntu may name it chromium-browser)" >&2
    echo "  macOS:         brew install --cask chromium" >&2
    exit 2
fi
html_abs=$(cd "$(dirname "$html")" && pwd)/$(basename "$html")
png_abs=$(cd "$(dirname "$png")" && pwd)/$(basename "$png")
# A private profile, so a running browser of the user's is neither reused nor touched.
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --disable-gpu --no-sandbox --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$png_abs" --window-size=1400,2200 "file://$html_abs" 2>/dev/null
if [[ ! -s "$png_abs" ]]; then
    echo "error: $browser wrote no screenshot to $png" >&2
    exit 1
fi
echo "wrote $png"
