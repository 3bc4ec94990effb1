"""Is a method above the static line? A paired test on the rows of one evaluation run.

The issue's bar for a head is a better quality/acceptance point than every static weight:
it should sit above the line through the static sweep on `pareto.png`. Comparing a head's
confidence interval with the static points' intervals wastes most of the data, because most
of the spread in quality is between examples (some problems are easy for every method). This
script pairs by example instead. It places the method on the line between the two static
weights whose pooled acceptance rates bracket its own (the two nearest, extrapolating, when
none does), interpolates their per-example scores at the method's acceptance, and reports
the mean per-example difference with a bootstrap interval (`evaluate.mean_ci`). A positive
interval is evidence of a per-position gain; an interval around 0 means "on the line".

    python benchmarks/static_line.py --rows docs/results/xsum-50/rows.jsonl --method diversed:gsm8k
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections import defaultdict
from pathlib import Path

from diversed.evaluate import load_rows, mean_ci
from diversed.generation import MethodSpec
from diversed.metrics import Metrics


def acceptance(rows: dict[str, dict]) -> float:
    """Pooled acceptance rate over the rows, pooled as `diversed eval`'s summary pools it."""
    pooled = functools.reduce(Metrics.merge, (Metrics.from_dict(row["metrics"]) for row in rows.values()), Metrics())
    return pooled.acceptance_rate if pooled.acceptance_rate is not None else float("nan")


def bracketing_weights(method_acceptance: float, static_acceptance: dict[str, float]) -> tuple[str, str]:
    """The two static labels whose acceptance brackets `method_acceptance` (else the two nearest)."""
    ordered = sorted(static_acceptance, key=static_acceptance.get)
    for low, high in zip(ordered, ordered[1:]):
        if static_acceptance[low] <= method_acceptance <= static_acceptance[high]:
            return low, high
    nearest = sorted(ordered, key=lambda label: abs(static_acceptance[label] - method_acceptance))[:2]
    return tuple(sorted(nearest, key=static_acceptance.get))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", required=True, help="rows.jsonl of a `diversed eval` run with at least two static weights")
    parser.add_argument("--method", required=True, help="the method label to place, e.g. diversed:gsm8k")
    args = parser.parse_args(argv)

    by_method: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in load_rows(Path(args.rows)):
        by_method[row["method"]][row["example_id"]] = row
    statics = {label: acceptance(rows) for label, rows in by_method.items() if MethodSpec.parse(label).method == "static"}
    if args.method not in by_method:
        sys.exit(f"error: no rows for {args.method!r} in {args.rows} (methods: {', '.join(sorted(by_method))})")
    if len(statics) < 2:
        sys.exit(f"error: {args.rows} needs rows of at least two static weights")

    method_acceptance = acceptance(by_method[args.method])
    low, high = bracketing_weights(method_acceptance, statics)
    t = (method_acceptance - statics[low]) / (statics[high] - statics[low])  # 0 at `low`, 1 at `high`
    examples = sorted(set(by_method[args.method]) & set(by_method[low]) & set(by_method[high]))
    differences = [
        by_method[args.method][i]["score"] - ((1 - t) * by_method[low][i]["score"] + t * by_method[high][i]["score"])
        for i in examples
    ]
    ci_low, ci_high = mean_ci(differences)
    mean = sum(differences) / len(differences)
    print(f"{args.method}: acceptance {method_acceptance:.1%}; static line through {low} ({statics[low]:.1%}) and {high} ({statics[high]:.1%})")
    print(f"n = {len(examples)} examples; quality minus the line: {mean:+.3f} (95% CI {ci_low:+.3f} to {ci_high:+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
