#!/usr/bin/env bash
# Exploratory: what the guard costs in acceptance and buys in quality, on training splits only
# (GSM8K train, MBPP train ids), to choose the guarded arm of the second confirmatory run before
# its plan is written. Resumable: run it again and finished rows are kept. Usage, from the
# repository root:
#   DIVERSED_DATA_DIR=../shared/data nohup benchmarks/guard_selection.sh > runs/guard_selection.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/results/guard-selection
common=(--seed 20261207 --temperature 1 --draft-length 5 --backend torch)
part() { echo "== $(date -u +%FT%TZ) $*" >&2; diversed eval "$@" "${common[@]}"; }
part --task gsm8k --split train --n ${N_GSM8K:-60} --max-new-tokens 384 --out "$out/gsm8k" \
  --methods "exact,cascade:opt:0,cascade:opt:0:0.05:####,cascade:opt:0:0.05:#### <digits>"
part --task mbpp --split train --n ${N_MBPP:-60} --max-new-tokens 192 --out "$out/mbpp" \
  --methods "exact,cascade:opt:0,cascade:opt:0:0.05,static:0.5:0.05"
echo "all parts done" >&2
