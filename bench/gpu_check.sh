#!/usr/bin/env bash
# The checks to run on a lent GPU host (one H200), in under 15 minutes: set up, the lossless
# tests on CUDA, then the engine benchmark in bfloat16 on the shipped pair
# (bench/results/gpu_engine_pair.json) and on random Qwen3-0.6B- and 4B-shaped targets at
# c = 1..64 (gpu_engine_0.6b.json, gpu_engine_4b.json).
# Every check runs even if an earlier one fails; the exit status is nonzero if any did.
#
# Torch: SPARKGRID_TORCH_SPEC, if set, is used as is (see scripts/bootstrap.sh). If not set and
# the system python3 already imports a torch that sees CUDA, that torch is reused
# (SPARKGRID_TORCH_SPEC=system: .venv is created with --system-site-packages, no download);
# otherwise torch==2.13.0 is installed from the configured index (PyPI's Linux wheels are
# CUDA builds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

nvidia-smi -L

if [[ -z ${SPARKGRID_TORCH_SPEC:-} ]]; then
    if python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        export SPARKGRID_TORCH_SPEC=system
    else
        export SPARKGRID_TORCH_SPEC=torch==2.13.0
    fi
fi
echo "gpu_check: SPARKGRID_TORCH_SPEC=$SPARKGRID_TORCH_SPEC"

timeout 180 bash scripts/bootstrap.sh
if ! .venv/bin/python -c 'import sys, torch; print("torch", torch.__version__, "cuda", torch.version.cuda); sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: the .venv's torch sees no CUDA device; set SPARKGRID_TORCH_SPEC to a CUDA build" >&2
    exit 1
fi

status=0
# the lossless tests on CUDA: paged attention there is the torch reference path (the native
# kernel is the CPU's), greedy equality and the statistical tests
timeout 150 .venv/bin/python -m pytest -q tests/integration/test_lossless.py tests/integration/test_engine_behaviour.py::test_engine_serves_in_bfloat16_on_the_chosen_device --device cuda || status=1
mkdir -p bench/results
# the shipped pair: the policies side by side at concurrency 1, 4 and 16 (issue 3's figures)
timeout 150 .venv/bin/python bench/engine.py --device cuda --dtype bfloat16 --repeats 2 --waves 2 \
    --target worker/models/stdlib-pair/target --draft worker/models/stdlib-pair/dspark \
    --out bench/results/gpu_engine_pair.json || status=1
# random targets of Qwen3-0.6B and Qwen3-4B shapes (random drafts: speculation costs there;
# the figures show the attention path and the step under load), c = 1..64
for size in 0.6b 4b; do
    timeout 200 .venv/bin/python bench/engine.py --device cuda --dtype bfloat16 --random-size "$size" \
        --concurrency 1,4,16,32,64 --num-prompts 16 --max-tokens 32 --repeats 1 --waves 1 \
        --out "bench/results/gpu_engine_$size.json" || status=1
done
exit "$status"
