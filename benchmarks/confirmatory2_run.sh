#!/usr/bin/env bash
# The second confirmatory run, in the order docs/results/confirmatory-2/PLAN.md fixes; each part
# resumes where it stopped (finished rows are never generated again), so run this again in each
# session until it prints "all parts done". The arms come from plan.json (written by
# benchmarks/confirmatory2_arms.py --write before the first row). Usage, from the repository root:
#   DIVERSED_DATA_DIR=../shared/data nohup benchmarks/confirmatory2_run.sh > runs/confirmatory2.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/results/confirmatory-2
plan=$out/plan.json
parts=$(mktemp)
python3 - "$plan" <<'PY' > "$parts"
import json, sys
plan = json.load(open(sys.argv[1]))
arms = plan["arms"]
assert arms, "no arms in plan.json yet: run benchmarks/confirmatory2_arms.py --write first"
tasks = plan["tasks"]
order = [("mbpp", 0), ("gsm8k", 0), ("mbpp", 1), ("gsm8k", 1)] + [("mbpp", k) for k in range(2, tasks["mbpp"]["samples"])]
for task, k in order:
    t = tasks[task]
    methods = ",".join([plan["reference"], arms["G"][task], arms["S"][task]])
    print("\t".join([task, str(t["offset"]), str(t["n"]), str(t["max_new_tokens"]), str(plan["seed_base"] + k), methods]))
PY
while IFS=$'\t' read -r task offset n tokens seed methods; do
  echo "== $(date -u +%FT%TZ) $task seed $seed" >&2
  diversed eval --task "$task" --offset "$offset" --n "$n" --max-new-tokens "$tokens" --methods "$methods" --seed "$seed" \
    --temperature 1 --draft-length 5 --backend torch --out "$out/$task/seed-$seed" < /dev/null
done < "$parts"
echo "all parts done" >&2
