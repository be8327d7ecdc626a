#!/usr/bin/env bash
# Sets up (scripts/bootstrap.sh) and runs the test suite; arguments go to pytest.
#   bash scripts/test.sh                        # the whole suite
#   bash scripts/test.sh -q tests/unit -k tiny  # a part of it
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
