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
    python benchmarks/static_line.py --rows runs/gsm8k/rows.jsonl   # every method off the line, one table

`exact` is the line's w = 1 point. The table's last column checks issue 15's bar: above the
line with an interval that excludes 0, acceptance at least 15 points above exact's, and
quality inside exact's 95% interval.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections import defaultdict
from pathlib import Path

from diversed.evaluate import load_rows, mean_ci
from diversed.methods import static_line_weight
from diversed.metrics import Metrics
from diversed.verifiers import Exact


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


def place(method_rows: dict[str, dict], by_method: dict[str, dict[str, dict]], statics: dict[str, float]) -> dict:
    """The method against the line: its acceptance, the bracketing weights, paired differences."""
    method_acceptance = acceptance(method_rows)
    low, high = bracketing_weights(method_acceptance, statics)
    t = (method_acceptance - statics[low]) / (statics[high] - statics[low])  # 0 at `low`, 1 at `high`
    examples = sorted(set(method_rows) & set(by_method[low]) & set(by_method[high]))
    differences = [
        method_rows[i]["score"] - ((1 - t) * by_method[low][i]["score"] + t * by_method[high][i]["score"])
        for i in examples
    ]
    ci_low, ci_high = mean_ci(differences)
    return {"acceptance": method_acceptance, "low": low, "high": high, "n": len(examples),
            "difference": sum(differences) / len(differences), "ci": (ci_low, ci_high), "differences": differences,
            "quality": sum(method_rows[i]["score"] for i in examples) / len(examples),
            "quality_ci": mean_ci([method_rows[i]["score"] for i in examples])}


def target_check(placed: dict, exact: dict | None) -> str:
    """Issue 15's bar: above the line (interval > 0), acceptance 15 points over exact, quality in exact's interval."""
    if exact is None:
        return "no exact rows"
    above = placed["ci"][0] > 0
    gain = placed["acceptance"] - exact["acceptance"]
    inside = exact["quality_ci"][0] <= placed["quality"] <= exact["quality_ci"][1]
    parts = ["above the line" if above else "not above the line", f"{gain * 100:+.1f} pts acceptance vs exact",
             "quality inside exact's interval" if inside else "quality outside exact's interval"]
    return ("MEETS: " if above and gain >= 0.15 and inside else "") + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", required=True, help="rows.jsonl of a `diversed eval` run with at least two static weights")
    parser.add_argument("--method", action="append", help="a method label to place, e.g. diversed:gsm8k (repeatable; default: every method off the line)")
    args = parser.parse_args(argv)

    by_method: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in load_rows(Path(args.rows)):
        by_method[row["method"]][row["example_id"]] = row
    statics = {label: acceptance(rows) for label, rows in by_method.items() if static_line_weight(label) is not None}
    if len(statics) < 2:
        sys.exit(f"error: {args.rows} needs rows of at least two static weights (exact counts as w = 1)")
    methods = args.method or sorted(label for label in by_method if label not in statics and acceptance(by_method[label]) == acceptance(by_method[label]))
    for label in methods:
        if label not in by_method:
            sys.exit(f"error: no rows for {label!r} in {args.rows} (methods: {', '.join(sorted(by_method))})")
    exact = place(by_method[Exact.name], by_method, statics) if Exact.name in by_method else None
    line = ", ".join(f"{label} {statics[label]:.1%}" for label in sorted(statics, key=statics.get))
    print(f"static line (acceptance): {line}\n")
    print("| method | n | acceptance | quality (95% CI) | minus the line (95% CI) | bracket | issue 15 bar |")
    print("|---|---|---|---|---|---|---|")
    placements = {label: place(by_method[label], by_method, statics) for label in methods}
    for label, placed in placements.items():
        print(f"| {label} | {placed['n']} | {placed['acceptance']:.1%} | {placed['quality']:.3f} ({placed['quality_ci'][0]:.3f}–{placed['quality_ci'][1]:.3f}) "
              f"| {placed['difference']:+.3f} ({placed['ci'][0]:+.3f} to {placed['ci'][1]:+.3f}) | {placed['low']}–{placed['high']} | {target_check(placed, exact)} |")
    if len(methods) == 1:
        placed = placements[methods[0]]
        print(f"\n{methods[0]}: acceptance {placed['acceptance']:.1%}; static line through {placed['low']} ({statics[placed['low']]:.1%}) and {placed['high']} ({statics[placed['high']]:.1%})")
        print(f"n = {placed['n']} examples; quality minus the line: {placed['difference']:+.3f} (95% CI {placed['ci'][0]:+.3f} to {placed['ci'][1]:+.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
