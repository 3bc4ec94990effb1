"""Issue 23's confirmatory analysis, exactly as docs/results/confirmatory/PLAN.md fixes it.

Reads the plan (plan.json beside PLAN.md) and each task's `rows.jsonl`, and writes:

- `results.md`: the plan's commits against the first rows', coverage of the planned cells,
  the placement table against the static line (H1), the non-inferiority table against
  `exact` (H2), Holm-adjusted, the power each test had, the default chosen by the written
  rule, and then the secondary (HumanEval's seen and all problems) and exploratory figures;
- `results.json`: the same figures; its `non_inferiority` table is what
  tests/test_default_rule.py checks the code's default against;
- `pareto-TASK.png`: quality against acceptance over each task's primary examples.

While any planned cell is missing, only the coverage is written (the plan allows no interim
look at the primary statistics) and the rule sees no passing method. The plan rescores every
pass@1 row with the final sandbox before the analysis: once the cells are filled, `--rescore`
does that (and records it in TASK/rescored.json), and the analysis waits for it.

    DIVERSED_DATA_DIR=../shared/data python benchmarks/confirmatory.py [--rescore --jobs 2]
    python benchmarks/confirmatory.py --planning docs/results/gsm8k-issue15-100 ...   # power from earlier rows
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from statistics import NormalDist

from scipy import stats

from diversed.evaluate import ROWS_FILE, SETTINGS_FILE, EvalSettings, load_rows, mean_ci, plot_eval, read_settings, summarize
from diversed.methods import static_line_weight
from diversed.run_files import atomic_write_text
from diversed.tasks import get_task
from confirmatory_report import markdown
from rescore import rescore_folder
from static_line import acceptance, place

FOLDER = Path(__file__).resolve().parents[1] / "docs" / "results" / "confirmatory"
RESCORED_FILE = "rescored.json"
Z = NormalDist()


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1)."""
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, key in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p_values[key]))
        adjusted[key] = running
    return adjusted


def one_sided_t(differences: list[float], null: float) -> dict:
    """Paired one-sided t-test of H0: mean <= null against mean > null, with the 95% lower bound."""
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1)) if n > 1 else float("nan")
    se = sd / math.sqrt(n)
    if se == 0:  # every difference equal: the sign decides
        p = 0.0 if mean > null else 1.0
    else:
        p = float(stats.t.sf((mean - null) / se, n - 1))
    return {"n": n, "mean": mean, "sd": sd, "p": p, "lower_95": mean - float(stats.t.ppf(0.95, n - 1)) * se,
            "upper_95": mean + float(stats.t.ppf(0.95, n - 1)) * se, "ci_95": mean_ci(differences)}


def detectable(sd: float, n: int, alpha: float, power: float) -> float:
    """Smallest true effect (beyond the null) a one-sided level-alpha test detects with `power`."""
    return (Z.inv_cdf(1 - alpha) + Z.inv_cdf(power)) * sd / math.sqrt(n)


def needed_n(sd: float, effect: float, alpha: float, power: float) -> int | None:
    """Examples a one-sided level-alpha test needs to detect `effect` with `power` (None for effect <= 0)."""
    if effect <= 0 or not sd == sd:
        return None
    return math.ceil(((Z.inv_cdf(1 - alpha) + Z.inv_cdf(power)) * sd / effect) ** 2)


def rule_default(non_inferior: dict[str, dict[str, bool]], acceptances: dict[str, dict[str, float]], tasks: list[str],
                 static_only: bool = False) -> str:
    """The written rule: of the methods non-inferior on every task, the highest mean acceptance;
    else static:0.9 if it passes; else exact. `static_only` (prompt-lookup drafts) considers
    the static arms alone."""
    passing = [m for m, by_task in non_inferior.items() if tasks and all(by_task.get(t, False) for t in tasks)
               and (not static_only or static_line_weight(m) is not None)]
    if passing:
        return max(passing, key=lambda m: sum(acceptances[m][t] for t in tasks) / len(tasks))
    return "static:0.9" if all(non_inferior.get("static:0.9", {}).get(t, False) for t in tasks) and tasks else "exact"


def by_method(rows: list[dict], ids: set[str] | None) -> dict[str, dict[str, dict]]:
    grouped: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if ids is None or row["example_id"] in ids:
            grouped[row["method"]][row["example_id"]] = row
    return grouped


def analyse_task(grouped: dict[str, dict[str, dict]], plan: dict) -> dict:
    """H1 placement and H2 non-inferiority statistics of one task (unadjusted p-values)."""
    statics = {label: acceptance(grouped[label]) for label in plan["static_line"]}
    placed = place(grouped[plan["h1_method"]], grouped, statics)
    h1 = one_sided_t(placed["differences"], 0.0) | {k: placed[k] for k in ("acceptance", "low", "high", "quality")}
    reference = grouped[plan["reference"]]
    h2 = {}
    for label in plan["relaxed"]:
        common = sorted(set(grouped[label]) & set(reference))
        differences = [grouped[label][i]["score"] - reference[i]["score"] for i in common]
        h2[label] = one_sided_t(differences, -plan["non_inferiority_margin"]) | {"acceptance": acceptance(grouped[label])}
    quality = {label: sum(r["score"] for r in rows.values()) / len(rows) for label, rows in grouped.items() if rows}
    return {"line": statics, "h1": h1, "h2": h2, "quality": quality,
            "acceptance": {label: acceptance(rows) for label, rows in grouped.items()}}


def planned_examples(task_name: str, spec: dict, data_dir: str | None, primary: bool) -> list:
    """A task's planned examples: all of them, or the primary ones (all, where the plan names no primary part)."""
    offset, n = (spec.get("primary_offset", spec["offset"]), spec.get("primary_n", spec["n"])) if primary else (spec["offset"], spec["n"])
    return get_task(task_name).load("test", n, data_dir, offset=offset)


def planned_ids(task_name: str, spec: dict, data_dir: str | None, primary: bool) -> list[str]:
    return [example.id for example in planned_examples(task_name, spec, data_dir, primary)]


def git(folder: Path, *args: str) -> list[str]:
    """Lines of a git command run in `folder` (none where git or the history is missing)."""
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in done.stdout.splitlines() if line]


def provenance(folder: Path, plan: dict) -> dict:
    """The plan's commits and the first commit of any rows, oldest first (issue 23: the plan precedes every row)."""
    plan_commits = git(folder, "log", "--reverse", "--format=%h %cI", "--", "PLAN.md", "plan.json")
    rows_commits = git(folder, "log", "--reverse", "--format=%h %cI", "--", *(f"{t}/{ROWS_FILE}" for t in plan["tasks"]))
    first_rows = rows_commits[0] if rows_commits else None
    when = lambda line: datetime.fromisoformat(line.split()[1])  # noqa: E731
    precedes = None if not plan_commits or first_rows is None else max(map(when, plan_commits)) < when(first_rows)
    return {"plan_commits": plan_commits, "first_rows_commit": first_rows, "plan_precedes_rows": precedes}


def rows_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_tasks(plan: dict) -> list[str]:
    """The planned tasks scored by running code (the sandbox's verdict), which the plan rescores."""
    return [t for t in plan["tasks"] if hasattr(get_task(t), "run_checks")]


def rescore_planned(plan: dict, folder: Path, data_dir: str | None, jobs: int) -> None:
    """The plan's rescoring: every pass@1 row scored again by today's sandbox, recorded in TASK/rescored.json."""
    for task_name in code_tasks(plan):
        task_folder = folder / task_name
        rows, changed = rescore_folder(task_folder, data_dir, jobs, write=True)
        commit = git(folder, "rev-parse", "--short", "HEAD")
        record = {"sandbox_commit": commit[0] if commit else None, "rows": len(rows), "rows_sha256": rows_digest(task_folder / ROWS_FILE),
                  "changed": [{"example_id": e, "method": m, "old": old, "new": new, "reason": why} for e, m, old, new, why in changed]}
        atomic_write_text(task_folder / RESCORED_FILE, json.dumps(record, indent=1) + "\n")
        print(f"{task_name}: rescored {len(rows)} rows, {len(changed)} changed", file=sys.stderr)


def rescoring(plan: dict, folder: Path) -> tuple[dict, list[str]]:
    """(the rescoring records, tasks whose rows changed since their rescoring or never were rescored)."""
    records, stale = {}, []
    for task_name in code_tasks(plan):
        path = folder / task_name / RESCORED_FILE
        record = json.loads(path.read_text()) if path.is_file() else None
        if record is None or record["rows_sha256"] != rows_digest(folder / task_name / ROWS_FILE):
            stale.append(task_name)
        else:
            records[task_name] = record
    return records, stale


def coverage(plan: dict, rows_root: Path, data_dir: str | None) -> dict[str, dict]:
    """Planned (example, method) cells per task and how many are filled."""
    report = {}
    for task_name, spec in plan["tasks"].items():
        ids = planned_ids(task_name, spec, data_dir, primary=False)
        methods = [plan["reference"], *plan["relaxed"]]
        path = rows_root / task_name / "rows.jsonl"
        rows = load_rows(path) if path.is_file() else []
        have = {(row["example_id"], row["method"]) for row in rows}
        missing = [(i, m) for i in ids for m in methods if (i, m) not in have]
        report[task_name] = {"planned": len(ids) * len(methods), "filled": len(ids) * len(methods) - len(missing),
                             "missing_examples": sorted({i for i, _ in missing})}
    return report


def analyse(plan: dict, rows_root: Path, data_dir: str | None) -> dict:
    cover = coverage(plan, rows_root, data_dir)
    result: dict = {"provenance": provenance(rows_root, plan), "coverage": cover,
                    "complete": all(not c["missing_examples"] for c in cover.values())}
    tasks = list(plan["tasks"])
    if result["complete"]:
        result["rescoring"], result["needs_rescoring"] = rescoring(plan, rows_root)
    if not result["complete"] or result["needs_rescoring"]:
        result["non_inferiority"] = {}
        result["default"] = rule_default({}, {}, tasks)
        return result
    per_task = {}
    for task_name, spec in plan["tasks"].items():
        ids = set(planned_ids(task_name, spec, data_dir, primary=True))
        per_task[task_name] = analyse_task(by_method(load_rows(rows_root / task_name / "rows.jsonl"), ids), plan)
    alpha = plan["alpha"]
    h1_adjusted = holm({t: per_task[t]["h1"]["p"] for t in tasks})
    h2_adjusted = holm({f"{m}|{t}": per_task[t]["h2"][m]["p"] for t in tasks for m in plan["relaxed"]})
    for t in tasks:
        h1 = per_task[t]["h1"]
        h1["p_holm"] = h1_adjusted[t]
        h1["verdict"] = ("confirmed" if h1["p_holm"] < alpha else
                         "refuted" if h1["upper_95"] < plan["h1_smallest_effect_of_interest"] else "undecided")
        h1["detectable"] = detectable(h1["sd"], h1["n"], alpha / len(tasks), plan["power"])
        h1["n_needed_for_observed"] = needed_n(h1["sd"], h1["mean"], alpha / len(tasks), plan["power"])
        for m in plan["relaxed"]:
            h2 = per_task[t]["h2"][m]
            h2["p_holm"] = h2_adjusted[f"{m}|{t}"]
            h2["non_inferior"] = h2["p_holm"] < alpha
            # Margin plus this: the true difference from exact at which the test passes 80% of the
            # time; both figures at the strictest Holm step, so they never flatter the design.
            h2["detectable"] = detectable(h2["sd"], h2["n"], alpha / len(h2_adjusted), plan["power"])
            h2["n_needed_for_observed"] = needed_n(h2["sd"], h2["mean"] + plan["non_inferiority_margin"], alpha / len(h2_adjusted), plan["power"])
    non_inferior = {m: {t: per_task[t]["h2"][m]["non_inferior"] for t in tasks} for m in plan["relaxed"]}
    acceptances = {m: {t: per_task[t]["h2"][m]["acceptance"] for t in tasks} for m in plan["relaxed"]}
    verdicts = {per_task[t]["h1"]["verdict"] for t in tasks}
    result |= {"tasks": per_task, "h1_overall": verdicts.pop() if len(verdicts) == 1 else "per task",
               "non_inferiority": non_inferior, "acceptance": acceptances,
               "default": rule_default(non_inferior, acceptances, tasks),
               "secondary": secondary(plan, rows_root, data_dir), "exploratory": exploratory(plan, rows_root, data_dir)}
    return result


def secondary(plan: dict, rows_root: Path, data_dir: str | None) -> dict:
    """Tasks whose primary examples are a part of the run (HumanEval): the seen part and the whole, unadjusted."""
    figures = {}
    for task_name, spec in plan["tasks"].items():
        everything = planned_ids(task_name, spec, data_dir, primary=False)
        primary = set(planned_ids(task_name, spec, data_dir, primary=True))
        if set(everything) == primary:
            continue
        rows = load_rows(rows_root / task_name / ROWS_FILE)
        parts = {"seen before": {i for i in everything if i not in primary}, "all": set(everything)}
        figures[task_name] = {part: analyse_task(by_method(rows, ids), plan) | {"n": len(ids)} for part, ids in parts.items()}
    return figures


def exploratory(plan: dict, rows_root: Path, data_dir: str | None) -> dict:
    """Arms and tasks beyond the plan: figures without verdicts, once every example of theirs has rows."""
    figures: dict = {"arms": {}, "tasks": {}}
    for task_name, methods in plan.get("exploratory_methods", {}).items():
        ids = set(planned_ids(task_name, plan["tasks"][task_name], data_dir, primary=True))
        grouped = by_method(load_rows(rows_root / task_name / ROWS_FILE), ids)
        statics = {label: acceptance(grouped[label]) for label in plan["static_line"]}
        for method in methods:
            have = len(grouped.get(method, {}))
            figure = {"task": task_name, "examples": have, "planned": len(ids)}
            if have == len(ids):
                vs_exact = [grouped[method][i]["score"] - grouped[plan["reference"]][i]["score"] for i in ids]
                placed = place(grouped[method], grouped, statics)
                figure |= {"acceptance": placed["acceptance"], "quality": placed["quality"], "minus_exact": one_sided_t(vs_exact, 0.0),
                           "minus_line": one_sided_t(placed["differences"], 0.0) | {k: placed[k] for k in ("low", "high")}}
            figures["arms"][method] = figure
    for task_name, spec in plan.get("exploratory_tasks", {}).items():
        path = rows_root / task_name / ROWS_FILE
        ids = set(planned_ids(task_name, spec, data_dir, primary=True))
        grouped = by_method(load_rows(path) if path.is_file() else [], ids)
        have = min(len(grouped.get(m, {})) for m in [plan["reference"], *plan["relaxed"]])
        figures["tasks"][task_name] = {"examples": have, "planned": len(ids)} | (analyse_task(grouped, plan) if have == len(ids) else {})
    return figures


def plotted_methods(plan: dict, task_name: str, rows: list[dict], ids: set[str]) -> list[str]:
    """The planned arms, and the exploratory ones that have a row for every primary example.

    A partial arm's rows are the examples that finished first (the shorter answers), so its
    point would not be comparable with the others'.
    """
    grouped = by_method(rows, ids)
    finished = [m for m in plan.get("exploratory_methods", {}).get(task_name, []) if len(grouped.get(m, {})) == len(ids)]
    return [plan["reference"], *plan["relaxed"], *finished]


def pareto_plots(plan: dict, rows_root: Path, data_dir: str | None) -> None:
    """pareto-TASK.png: quality against acceptance on each task's primary examples (finished exploratory arms included)."""
    for task_name, spec in [*plan["tasks"].items(), *plan.get("exploratory_tasks", {}).items()]:
        path = rows_root / task_name / ROWS_FILE
        if not path.is_file():
            continue
        examples = planned_examples(task_name, spec, data_dir, primary=True)
        rows = load_rows(path)
        labels = plotted_methods(plan, task_name, rows, {example.id for example in examples})
        settings = EvalSettings(**read_settings(rows_root / task_name / SETTINGS_FILE))
        plot_eval(summarize(get_task(task_name), examples, labels, rows, settings), rows_root / f"pareto-{task_name}.png")


def planning(folders: list[str], plan: dict) -> None:
    """Power for the planned n from paired SDs in earlier (exploratory) runs."""
    for folder in folders:
        grouped = by_method(load_rows(Path(folder) / "rows.jsonl"), None)
        task = json.loads((Path(folder) / "settings.json").read_text())["task"]
        n = plan["tasks"][task]["primary_n"]
        k2 = len(plan["relaxed"]) * len(plan["tasks"])
        statics = {label: acceptance(rows) for label, rows in grouped.items() if static_line_weight(label) is not None and label in plan["static_line"]}
        if plan["h1_method"] in grouped:
            placed = place(grouped[plan["h1_method"]], grouped, statics)
            sd = one_sided_t(placed["differences"], 0)["sd"]
            print(f"{folder}: H1 sd {sd:.3f} (n {placed['n']}): detectable at n={n}: +{detectable(sd, n, plan['alpha'] / 3, plan['power']):.3f}")
        for m in plan["relaxed"]:
            common = sorted(set(grouped.get(m, {})) & set(grouped["exact"]))
            if len(common) > 1:
                sd = one_sided_t([grouped[m][i]["score"] - grouped["exact"][i]["score"] for i in common], 0)["sd"]
                print(f"{folder}: H2 {m} sd {sd:.3f} (n {len(common)}): passes at n={n} with 80% power when the true difference is at least "
                      f"{-plan['non_inferiority_margin'] + detectable(sd, n, plan['alpha'] / k2, plan['power']):+.3f} (strictest Holm step) "
                      f"or {-plan['non_inferiority_margin'] + detectable(sd, n, plan['alpha'], plan['power']):+.3f} (most lenient); "
                      f"n for 80% power at a true difference of 0: {needed_n(sd, plan['non_inferiority_margin'], plan['alpha'] / k2, plan['power'])} "
                      f"(strictest) to {needed_n(sd, plan['non_inferiority_margin'], plan['alpha'], plan['power'])} (most lenient)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(FOLDER), help="the confirmatory folder: plan.json, and one subfolder of rows per task")
    parser.add_argument("--data-dir", help="task data (default: $DIVERSED_DATA_DIR)")
    parser.add_argument("--planning", nargs="+", metavar="FOLDER", help="only print power from these earlier eval folders")
    parser.add_argument("--rescore", action="store_true", help="first rescore every pass@1 row with today's sandbox (once every planned cell is filled)")
    parser.add_argument("--jobs", type=int, default=1, help="programs --rescore runs at a time")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    plan = json.loads((folder / "plan.json").read_text())
    if args.planning:
        planning(args.planning, plan)
        return 0
    if args.rescore:
        if not all(not c["missing_examples"] for c in coverage(plan, folder, args.data_dir).values()):
            print("error: --rescore waits until every planned cell is filled (the plan rescores before the analysis)", file=sys.stderr)
            return 2
        rescore_planned(plan, folder, args.data_dir, args.jobs)
    result = analyse(plan, folder, args.data_dir)
    (folder / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / "results.md").write_text(markdown(result, plan) + "\n")
    if "tasks" in result:
        pareto_plots(plan, folder, args.data_dir)
    print(markdown(result, plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
