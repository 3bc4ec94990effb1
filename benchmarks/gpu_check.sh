#!/usr/bin/env bash
# Issue 24's GPU measurement in one command, for an H200 or similar (about 8 minutes):
#
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# 1. benchmarks/gpu_costs.py on the embedded pair's architectures (random weights), both torch
#    runners: step costs, c, v(k), engine rounds, projections (the issue's targets);
# 2. tests/test_cuda.py (the static runner with CUDA graphs, the one-sync round, the laws);
# 3. gpu_costs.py on Qwen2.5-32B, 7B and 14B targets with the 0.5B draft, as far as time allows.
# Every stage writes under $OUT as it goes, so a stage cut short still leaves what it measured.
# Needs Python with CUDA torch, triton, transformers (pyproject.toml's pin), scipy and pytest.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name())" > "$OUT/versions.txt" 2>&1
"$PY" -c "import triton; print('triton', triton.__version__)" >> "$OUT/versions.txt" 2>&1

timeout 220 "$PY" -u benchmarks/gpu_costs.py --device cuda --targets Qwen2.5-Coder-1.5B --json "$OUT/costs-pair.json" \
    > "$OUT/costs-pair.md" 2> "$OUT/costs-pair.log"
echo "costs-pair: exit $?" >> "$OUT/status.txt"

timeout 120 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider > "$OUT/test_cuda.txt" 2>&1
echo "test_cuda: exit $?" >> "$OUT/status.txt"

timeout 150 "$PY" -u benchmarks/gpu_costs.py --device cuda --targets Qwen2.5-32B,Qwen2.5-7B,Qwen2.5-14B --tokens 0 --repeats 5 \
    --budget-seconds 100 --json "$OUT/costs-large.json" > "$OUT/costs-large.md" 2> "$OUT/costs-large.log"
echo "costs-large: exit $?" >> "$OUT/status.txt"
cat "$OUT/status.txt"
