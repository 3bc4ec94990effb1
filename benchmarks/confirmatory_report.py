"""Issue 23's results.md: the tables benchmarks/confirmatory.py's analysis fills, in the plan's order."""

from __future__ import annotations


def markdown(result: dict, plan: dict) -> str:
    lines = ["# Confirmatory evaluation: results", "", "Written by `benchmarks/confirmatory.py` from the rows in this folder; the plan is PLAN.md.", "",
             *provenance_lines(result["provenance"]),
             "## Coverage", "", "| task | planned cells | filled | examples still missing |", "|---|---|---|---|"]
    for task, c in result["coverage"].items():
        lines.append(f"| {task} | {c['planned']} | {c['filled']} | {len(c['missing_examples'])} |")
    if not result["complete"]:
        lines += ["", "Not every planned cell is filled: by the plan, no primary statistic is shown yet.",
                  f"The rule therefore sees no non-inferior method, and the default is `{result['default']}`.", ""]
        return "\n".join(lines)
    if result["needs_rescoring"]:
        lines += ["", f"Every planned cell is filled, but the rows of {', '.join(result['needs_rescoring'])} are not yet rescored with the final sandbox, "
                  "which the plan requires before the analysis: run `python benchmarks/confirmatory.py --rescore`. "
                  f"Until then no primary statistic is shown, and the default is `{result['default']}`.", ""]
        return "\n".join(lines)
    lines += rescoring_lines(result["rescoring"])
    lines += ["", f"## H1: {plan['h1_method']} against the static line (paired, one-sided t; Holm over {len(result['tasks'])})", "",
              "| task | n | acceptance | bracket | minus the line | 95% CI (bootstrap) | p | p (Holm) | verdict | detectable at 80% | n for the observed effect |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, r in result["tasks"].items():
        h = r["h1"]
        lines.append(f"| {task} | {h['n']} | {h['acceptance']:.1%} | {h['low']}–{h['high']} | {h['mean']:+.3f} | {h['ci_95'][0]:+.3f} to {h['ci_95'][1]:+.3f} "
                     f"| {h['p']:.4f} | {h['p_holm']:.4f} | {h['verdict']} | {h['detectable']:.3f} | {h['n_needed_for_observed'] or '–'} |")
    overall = result["h1_overall"]
    lines += ["", f"Overall, H1 is **{overall}**." if overall != "per task" else
              "Overall, H1 is decided per task: " + "; ".join(f"{t} {r['h1']['verdict']}" for t, r in result["tasks"].items()) + "."]
    lines += ["", f"## H2: non-inferiority to exact (margin {plan['non_inferiority_margin']}; one-sided t; Holm over {len(plan['relaxed']) * len(result['tasks'])})", "",
              "| method | " + " | ".join(f"{t}: acceptance, minus exact (lower 95%), p Holm" for t in result["tasks"]) + " | non-inferior everywhere |",
              "|---|" + "---|" * (len(result["tasks"]) + 1)]
    for m in plan["relaxed"]:
        cells = [f"{r['h2'][m]['acceptance']:.1%}, {r['h2'][m]['mean']:+.3f} ({r['h2'][m]['lower_95']:+.3f}), {r['h2'][m]['p_holm']:.3f}{' ✓' if r['h2'][m]['non_inferior'] else ''}"
                 for r in result["tasks"].values()]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {'yes' if all(result['non_inferiority'][m].values()) else 'no'} |")
    margin = plan["non_inferiority_margin"]
    lines += ["", "Power of each H2 test (at the strictest Holm step): the true difference from exact at which it passes 80% of the time, "
              "and the examples that would give 80% power at the observed difference (– where that difference is at or below the margin).", "",
              "| method | " + " | ".join(f"{t}: passes at ≥, n to decide" for t in result["tasks"]) + " |", "|---|" + "---|" * len(result["tasks"])]
    for m in plan["relaxed"]:
        lines.append(f"| {m} | " + " | ".join(f"{r['h2'][m]['detectable'] - margin:+.3f}, {r['h2'][m]['n_needed_for_observed'] or '–'}"
                                              for r in result["tasks"].values()) + " |")
    lines += ["", f"## The default by the written rule: `{result['default']}`", ""]
    lines += secondary_lines(result["secondary"], plan) + exploratory_lines(result["exploratory"], plan)
    return "\n".join(lines)


def provenance_lines(facts: dict) -> list[str]:
    if not facts["plan_commits"]:
        return ["(No git history here: the plan's commits cannot be shown.)", ""]
    precedes = {True: "yes", False: "**no**", None: "no rows committed yet"}[facts["plan_precedes_rows"]]
    return [f"Plan commits (PLAN.md, plan.json), oldest first: {', '.join(facts['plan_commits'])}. "
            f"First commit of rows: {facts['first_rows_commit'] or '–'}. Every plan commit precedes every row: {precedes}.", ""]


def interval(figures: dict) -> str:
    return f"{figures['mean']:+.3f} ({figures['ci_95'][0]:+.3f} to {figures['ci_95'][1]:+.3f})"


def rescoring_lines(records: dict) -> list[str]:
    lines = ["", "## Rescoring with the final sandbox (the plan's step before the analysis)", "",
             "| task | sandbox of commit | rows | scores changed |", "|---|---|---|---|"]
    lines += [f"| {task} | {r['sandbox_commit']} | {r['rows']} | {len(r['changed'])} |" for task, r in records.items()]
    changed = [(task, c) for task, r in records.items() for c in r["changed"]]
    if changed:
        lines += ["", *(f"- {task} {c['example_id']} `{c['method']}`: {c['old']:g} → {c['new']:g} ({c['reason'][:100]})" for task, c in changed[:40])]
    if len(changed) > 40:
        lines.append(f"- … and {len(changed) - 40} more (results.json lists them all)")
    return lines


def secondary_lines(figures: dict, plan: dict) -> list[str]:
    if not figures:
        return []
    lines = ["## Secondary figures (outside the Holm families; p unadjusted)", "",
             f"| task, examples | n | {plan['h1_method']} minus the line (95% CI), p | " + " | ".join(f"{m} minus exact (95% CI)" for m in plan["relaxed"]) + " |",
             "|---|---|---|" + "---|" * len(plan["relaxed"])]
    for task, parts in figures.items():
        for part, r in parts.items():
            lines.append(f"| {task}, {part} | {r['n']} | {interval(r['h1'])}, {r['h1']['p']:.3f} | " + " | ".join(interval(r["h2"][m]) for m in plan["relaxed"]) + " |")
    return lines + [""]


def exploratory_lines(figures: dict, plan: dict) -> list[str]:
    lines = ["## Exploratory (beyond the plan: no verdicts)", ""]
    if figures["arms"]:
        lines += ["| arm | task | examples | acceptance | quality | minus exact (95% CI) | minus the line (bracket; 95% CI) |", "|---|---|---|---|---|---|---|"]
        for method, f in figures["arms"].items():
            if "quality" not in f:
                lines.append(f"| {method} | {f['task']} | {f['examples']} of {f['planned']} | – | – | – | – |")
                continue
            line = f["minus_line"]
            lines.append(f"| {method} | {f['task']} | {f['examples']} | {f['acceptance']:.1%} | {f['quality']:.3f} | {interval(f['minus_exact'])} "
                         f"| {line['low']}–{line['high']}; {interval(line)} |")
        lines.append("")
    for task, f in figures["tasks"].items():
        if "h2" not in f:
            lines += [f"{task}: {f['examples']} of {f['planned']} examples have every planned arm; no figures yet.", ""]
            continue
        lines += [f"{task} ({f['examples']} examples): {plan['h1_method']} minus the static line {interval(f['h1'])}.", "",
                  "| method | acceptance | quality | minus exact (95% CI) |", "|---|---|---|---|"]
        lines += [f"| {m} | {f['h2'][m]['acceptance']:.1%} | {f['quality'][m]:.3f} | {interval(f['h2'][m])} |" for m in plan["relaxed"]]
        lines.append("")
    return lines
