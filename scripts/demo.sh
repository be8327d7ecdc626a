#!/usr/bin/env bash
# Sets up (scripts/bootstrap.sh) and runs the main job: `sparkgrid demo`, the whole stack on
# this machine (a private Redis, a local Ray cluster, two workers on the shipped model pair, the
# scheduler), what the shipped model is, a few real requests streamed to the terminal, a burst
# of requests with how the router shared it out and why, a cost report, and a clean stop.
# Arguments go to `sparkgrid demo` (e.g. --workers 3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/sparkgrid demo "$@"
