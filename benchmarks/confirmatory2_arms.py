"""The arms of the second confirmatory run, by the rule its PLAN.md fixes, from the guard-selection rows.

    python benchmarks/confirmatory2_arms.py [--write]

G (the guarded arm): `cascade:opt:0:0.05` with the stop tokens; on GSM8K also `####`, and also
`<digits>` if the selection run's `<digits>` variant is at least as accurate as the `####`-only one
over the GSM8K problems where both have a row. S (the static weight of G's acceptance): per task,
linear interpolation of the first confirmatory run's static line (pooled acceptance against w) at
G's pooled acceptance in the selection rows, rounded to 0.05 within [0.3, 0.9]. `--write` stores
the arms in docs/results/confirmatory-2/plan.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "docs" / "results"
MARKER_ONLY = "cascade:opt:0:0.05:####"
WITH_DIGITS = "cascade:opt:0:0.05:#### <digits>"
MBPP_GUARDED = "cascade:opt:0:0.05"
STATIC_LINE = {1.0: "exact", 0.9: "static:0.9", 0.7: "static:0.7", 0.5: "static:0.5", 0.3: "static:0.3"}


def rows_by_method(path: Path) -> dict[str, dict[str, dict]]:
    by: dict[str, dict[str, dict]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by[row["method"]][row["example_id"]] = row
    return by


def acceptance(rows: dict[str, dict]) -> float:
    drafted = sum(row["metrics"]["drafted"] for row in rows.values())
    return sum(row["metrics"]["accepted"] for row in rows.values()) / drafted


def static_weight(task: str, target_acceptance: float) -> float:
    """w on the first run's static line of `task` whose pooled acceptance is `target_acceptance`."""
    rows = rows_by_method(ROOT / "confirmatory" / task / "rows.jsonl")
    line = sorted((acceptance(rows[label]), weight) for weight, label in STATIC_LINE.items())  # acceptance rises as w falls
    for (low_acc, low_w), (high_acc, high_w) in zip(line, line[1:]):
        if low_acc <= target_acceptance <= high_acc:
            w = low_w + (high_w - low_w) * (target_acceptance - low_acc) / (high_acc - low_acc)
            break
    else:
        w = line[0][1] if target_acceptance < line[0][0] else line[-1][1]
    return min(0.9, max(0.3, round(w * 20) / 20))


def arms() -> dict:
    gsm8k = rows_by_method(ROOT / "guard-selection" / "gsm8k" / "rows.jsonl")
    mbpp = rows_by_method(ROOT / "guard-selection" / "mbpp" / "rows.jsonl")
    both = sorted(set(gsm8k[MARKER_ONLY]) & set(gsm8k[WITH_DIGITS]))
    accuracy = {label: sum(gsm8k[label][i]["score"] for i in both) / len(both) for label in (MARKER_ONLY, WITH_DIGITS)}
    guarded = {"gsm8k": WITH_DIGITS if accuracy[WITH_DIGITS] >= accuracy[MARKER_ONLY] else MARKER_ONLY, "mbpp": MBPP_GUARDED}
    chosen_acceptance = {"gsm8k": acceptance(gsm8k[guarded["gsm8k"]]), "mbpp": acceptance(mbpp[guarded["mbpp"]])}
    static = {task: f"static:{static_weight(task, chosen_acceptance[task]):g}" for task in guarded}
    return {
        "G": guarded, "S": static,
        "evidence": {"gsm8k_problems_compared": len(both), "gsm8k_accuracy": accuracy, "guarded_acceptance": chosen_acceptance,
                     "rows": {"gsm8k": {m: len(r) for m, r in gsm8k.items()}, "mbpp": {m: len(r) for m, r in mbpp.items()}}},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="store the arms in confirmatory-2/plan.json")
    args = parser.parse_args()
    chosen = arms()
    print(json.dumps(chosen, indent=1))
    if args.write:
        path = ROOT / "confirmatory-2" / "plan.json"
        plan = json.loads(path.read_text())
        plan["arms"] = {"reference": "exact", "G": chosen["G"], "S": chosen["S"]}
        plan["arm_evidence"] = chosen["evidence"]
        path.write_text(json.dumps(plan, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
