"""The second confirmatory run's analysis, exactly as docs/results/confirmatory-2/PLAN.md fixes it.

    python benchmarks/confirmatory2.py            # progress only: rows per task, sample and arm
    python benchmarks/confirmatory2.py --final    # the analysis; refuses until every planned row exists

Progress mode shows counts and nothing else (no estimate is looked at before the run ends).
`--final` computes, per task and arm A in {G, S}: the mean over problems of each problem's mean
(over its samples, paired by seed) of score(A) - score(exact); a one-sided percentile bootstrap
over problems (clusters) of H0: difference <= -margin, Holm over the 4 hypotheses; pooled
acceptance; the within-problem correlation of the differences and the power at it; the default
by the written rule. It writes results.json and results.md beside the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import defaultdict
from pathlib import Path
from statistics import NormalDist

from confirmatory import holm

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "results" / "confirmatory-2"


def load(plan: dict) -> dict[str, dict[int, dict[str, dict[str, dict]]]]:
    """task -> sample k -> method -> example id -> row."""
    found: dict = {}
    for task, spec in plan["tasks"].items():
        found[task] = {}
        for k in range(spec["samples"]):
            rows = FOLDER / task / f"seed-{plan['seed_base'] + k}" / "rows.jsonl"
            by: dict[str, dict[str, dict]] = defaultdict(dict)
            for line in rows.read_text().splitlines() if rows.exists() else []:
                row = json.loads(line)
                by[row["method"]][row["example_id"]] = row
            found[task][k] = by
    return found


def arm_labels(plan: dict, task: str) -> dict[str, str]:
    return {"exact": plan["reference"], "G": plan["arms"]["G"][task], "S": plan["arms"]["S"][task]}


def progress(plan: dict, found: dict) -> tuple[int, int]:
    done = planned = 0
    for task, spec in plan["tasks"].items():
        for k, by in found[task].items():
            counts = {name: len(by.get(label, {})) for name, label in arm_labels(plan, task).items()}
            done += sum(counts.values())
            planned += 3 * spec["n"]
            if any(counts.values()):
                print(f"{task} sample {k} (seed {plan['seed_base'] + k}): " + ", ".join(f"{n} {c}/{spec['n']}" for n, c in counts.items()))
    print(f"{done} of {planned} planned rows")
    return done, planned


def differences(by_sample: dict[int, dict], reference: str, arm: str) -> dict[str, list[float]]:
    """example id -> score(arm) - score(reference) for each sample where both have the example."""
    out: dict[str, list[float]] = defaultdict(list)
    for by in by_sample.values():
        for example, row in by.get(arm, {}).items():
            if example in by.get(reference, {}):
                out[example].append(row["score"] - by[reference][example]["score"])
    return out


def bootstrap_p(problem_means: list[float], margin: float, resamples: int, seed: int) -> tuple[float, float]:
    """(estimate, P*(estimate* <= -margin)) over `resamples` resamples of problems."""
    rng = random.Random(seed)
    n = len(problem_means)
    estimate = sum(problem_means) / n
    below = sum(sum(rng.choice(problem_means) for _ in range(n)) / n <= -margin for _ in range(resamples))
    return estimate, below / resamples


def within_problem_correlation(by_problem: dict[str, list[float]]) -> float:
    """One-way random-effects intraclass correlation of the differences (0 when it cannot be estimated)."""
    groups = [values for values in by_problem.values() if len(values) > 1]
    if len(groups) < 2:
        return 0.0
    k = sum(len(g) for g in groups) / len(groups)
    grand = sum(sum(g) for g in groups) / sum(len(g) for g in groups)
    between = sum(len(g) * (sum(g) / len(g) - grand) ** 2 for g in groups) / (len(groups) - 1)
    within = sum((x - sum(g) / len(g)) ** 2 for g in groups for x in g) / sum(len(g) - 1 for g in groups)
    return max(0.0, (between - within) / (between + (k - 1) * within)) if between + (k - 1) * within > 0 else 0.0


def acceptance(by_sample: dict[int, dict], label: str) -> float:
    rows = [row for by in by_sample.values() for row in by.get(label, {}).values()]
    return sum(r["metrics"]["accepted"] for r in rows) / max(sum(r["metrics"]["drafted"] for r in rows), 1)


def analyse(plan: dict, found: dict) -> dict:
    margin, boot = plan["non_inferiority_margin"], plan["bootstrap"]
    z = NormalDist().inv_cdf(1 - plan["alpha"] / plan["holm_family"])
    cells, p_values = {}, {}
    for task, spec in plan["tasks"].items():
        labels = arm_labels(plan, task)
        for arm in ("G", "S"):
            by_problem = differences(found[task], labels["exact"], labels[arm])
            means = [sum(v) / len(v) for v in by_problem.values()]
            estimate, p = bootstrap_p(means, margin, boot["resamples"], boot["seed"])
            rho = within_problem_correlation(by_problem)
            discordance = sum(abs(x) for v in by_problem.values() for x in v) / sum(len(v) for v in by_problem.values())
            se = math.sqrt(discordance * (1 + (spec["samples"] - 1) * rho) / spec["samples"] / len(means))
            cells[f"{arm}:{task}"] = {
                "method": labels[arm], "problems": len(means), "difference": estimate, "p": p, "rho": rho,
                "acceptance": acceptance(found[task], labels[arm]), "exact_acceptance": acceptance(found[task], labels["exact"]),
                "power_at_rho": NormalDist().cdf(margin / se - z) if se > 0 else 1.0,
            }
            p_values[f"{arm}:{task}"] = p
    for key, adjusted in holm(p_values).items():
        cells[key]["holm_p"] = adjusted
        cells[key]["non_inferior"] = adjusted <= plan["alpha"]
    passing = [arm for arm in ("G", "S") if all(
        cells[f"{arm}:{t}"]["non_inferior"] and cells[f"{arm}:{t}"]["acceptance"] >= cells[f"{arm}:{t}"]["exact_acceptance"] + plan["acceptance_gain"]
        for t in plan["tasks"])]
    default = max(passing, key=lambda arm: sum(cells[f"{arm}:{t}"]["acceptance"] for t in plan["tasks"])) if passing else "exact"
    return {"cells": cells, "passing": passing, "default": default}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--final", action="store_true", help="run the analysis (every planned row must exist)")
    args = parser.parse_args()
    plan = json.loads((FOLDER / "plan.json").read_text())
    found = load(plan)
    done, planned = progress(plan, found)
    if not args.final:
        return 0
    if done < planned:
        print(f"error: {planned - done} planned rows are missing; the plan analyses the complete run only", file=sys.stderr)
        return 2
    result = analyse(plan, found)
    (FOLDER / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| arm | task | method | problems | difference | Holm p | non-inferior | acceptance (exact) | ρ | power at ρ |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, c in result["cells"].items():
        arm, task = key.split(":")
        lines.append(f"| {arm} | {task} | `{c['method']}` | {c['problems']} | {c['difference']:+.3f} | {c['holm_p']:.4f} | "
                     f"{'yes' if c['non_inferior'] else 'no'} | {c['acceptance']:.3f} ({c['exact_acceptance']:.3f}) | {c['rho']:.2f} | {c['power_at_rho']:.2f} |")
    lines.append(f"\nPassing the written rule: {', '.join(result['passing']) or 'none'}; the default: {result['default']}.")
    (FOLDER / "results.md").write_text("# Second confirmatory run: results\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
