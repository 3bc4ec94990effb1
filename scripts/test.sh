#!/usr/bin/env bash
# The test command: make sure everything is installed (idempotent, fast when it is), then run
# the suite. Tests marked `slow` load the real default pair; CI runs only the `ci`-marked
# representative subset of them. Run everything with: scripts/test.sh -m ""
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
exec .venv/bin/python -m pytest -m "not slow or ci" "$@"
