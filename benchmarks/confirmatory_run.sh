#!/usr/bin/env bash
# Issue 23's confirmatory runs, in the order docs/results/confirmatory/PLAN.md fixes; each part
# resumes where it stopped (finished rows are never generated again), so run this again in each
# session until it prints "all parts done". Usage, from the repository root:
#   DIVERSED_DATA_DIR=../shared/data nohup benchmarks/confirmatory_run.sh > runs/confirmatory.log 2>&1 &
# BATCH (default 64, the fastest in benchmarks/lockstep.py's table on the 2-core AVX2 machine of
# part 5; see runs.md) is the lockstep batch size; it changes rounding only, never the law.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/results/confirmatory
batch=${BATCH:-64}
common=(--seed 20261203 --temperature 1 --draft-length 5 --backend torch --dtype float32 --lockstep "$batch")
planned=exact,static:0.9,static:0.7,static:0.5,static:0.3,cascade:opt:0,cascade:opt:0.3,klgate:1
judge=judge:docs/results/gsm8k-issue15/judge-gsm8k-flip.json:0.5
part() { echo "== $(date -u +%FT%TZ) $*" >&2; diversed eval "$@" "${common[@]}"; }
part --task mbpp --offset 50 --n 300 --max-new-tokens 192 --methods "$planned" --out "$out/mbpp"
part --task humaneval --n 164 --max-new-tokens 256 --methods "$planned" --out "$out/humaneval"
part --task gsm8k --offset 100 --n 300 --max-new-tokens 384 --methods "$planned" --out "$out/gsm8k"
# Exploratory, after every planned cell: the judge arm on GSM8K, then XSum.
part --task gsm8k --offset 100 --n 300 --max-new-tokens 384 --methods "$planned,$judge" --out "$out/gsm8k"
part --task xsum --offset 50 --n 200 --max-new-tokens 64 --methods "$planned" --out "$out/xsum"
echo "all parts done" >&2
