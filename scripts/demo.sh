#!/usr/bin/env bash
# Sets up (scripts/bootstrap.sh) and runs the main job: for now a small generation run of the
# DSpark engine on locally built tiny models. Arguments go to `sparkgrid engine`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/sparkgrid engine "$@"
