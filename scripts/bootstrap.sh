#!/usr/bin/env bash
# Fresh-machine setup; safe to rerun. Creates .venv (if missing), installs torch first with
# an exact pin, then sparkgrid in editable mode with its worker (engine) and dev extras.
#
# SPARKGRID_TORCH_SPEC  the pip requirement for torch; default torch==2.13.0.
#   Why an exact pin and why first: where pip has a local CPU wheel of that version it takes
#   it, while a range (such as the one in pyproject.toml) could make pip download a multi-GB
#   CUDA build from the index instead.
#   On a GPU host either pick a CUDA build, e.g.
#     PIP_INDEX_URL=https://download.pytorch.org/whl/cu128 SPARKGRID_TORCH_SPEC=torch==2.13.0
#   or reuse the machine's own CUDA torch with SPARKGRID_TORCH_SPEC=system: .venv is then
#   created with --system-site-packages and torch is not installed (it must satisfy the range
#   in pyproject.toml). An existing .venv made without system site packages must be removed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

torch_spec=${SPARKGRID_TORCH_SPEC:-torch==2.13.0}
venv=.venv

if [[ ! -x $venv/bin/pip ]]; then
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "bootstrap: sparkgrid needs Python >= 3.11, but python3 is $(python3 -V 2>&1)" >&2
        exit 1
    fi
    if [[ $torch_spec == system ]]; then
        python3 -m venv --system-site-packages "$venv"
    else
        python3 -m venv "$venv"
    fi
fi

if [[ $torch_spec == system ]] && ! grep -q '^include-system-site-packages = true' "$venv/pyvenv.cfg"; then
    echo "bootstrap: SPARKGRID_TORCH_SPEC=system needs a .venv with system site packages;" \
        "this one has none: remove .venv and rerun" >&2
    exit 1
fi

pip_install=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [[ $torch_spec != system ]]; then
    "${pip_install[@]}" "$torch_spec"
fi
"${pip_install[@]}" -e '.[worker,dev]'

"$venv/bin/python" -c 'import torch; print(f"bootstrap: .venv ready (torch {torch.__version__})")' >&2
