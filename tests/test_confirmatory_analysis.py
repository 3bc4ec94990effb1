"""Issue 23's analysis (benchmarks/confirmatory.py) on made-up rows whose answers are known.

The rows are synthetic (scores and acceptance counts chosen by hand), so every verdict, Holm
step and the default the rule picks can be predicted; the examples are the real tasks' ids.
The rescoring step runs the real sandbox.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from scipy import stats

from diversed.metrics import Metrics
from diversed.tasks import get_task

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import confirmatory  # noqa: E402

ACCEPTANCE = {"exact": 0.50, "static:0.9": 0.60, "static:0.7": 0.70, "static:0.5": 0.80, "static:0.3": 0.90,
              "cascade:opt:0": 0.95, "cascade:opt:0.3": 0.75, "klgate:1": 0.65, "static:0.1": 0.97}
PLAN = {
    "tasks": {"humaneval": {"offset": 0, "n": 164, "primary_offset": 50, "primary_n": 114},
              "xsum": {"offset": 0, "n": 120}},
    "exploratory_methods": {"xsum": ["static:0.1"]},
    "exploratory_tasks": {},
    "reference": "exact",
    "static_line": ["exact", "static:0.9", "static:0.7", "static:0.5", "static:0.3"],
    "relaxed": ["static:0.9", "static:0.7", "static:0.5", "static:0.3", "cascade:opt:0", "cascade:opt:0.3", "klgate:1"],
    "h1_method": "cascade:opt:0.3",
    "alpha": 0.05, "non_inferiority_margin": 0.05, "h1_smallest_effect_of_interest": 0.03, "power": 0.8,
}


def row(example_id: str, method: str, score: float) -> dict:
    drafted = 100
    metrics = Metrics(drafted=drafted, accepted=round(ACCEPTANCE[method] * drafted), rounds=20, new_tokens=90)
    return {"example_id": example_id, "method": method, "seed": 0, "completion": "", "score": score,
            "finish_reason": "length", "metrics": metrics.to_dict(), "lockstep": True}


def write_task(folder, task_name: str, n: int, cascade_score) -> None:
    """Every arm scores like `exact` (odd-numbered examples solved), except cascade:opt:0, which
    solves nothing, and cascade:opt:0.3, scored by `cascade_score(index, exact's score)`."""
    ids = [example.id for example in get_task(task_name).load("test", n, None)]
    rows = []
    for index, example_id in enumerate(ids):
        base = float(index % 2)
        for method in ACCEPTANCE:
            score = {"cascade:opt:0": 0.0, "cascade:opt:0.3": cascade_score(index, base)}.get(method, base)
            rows.append(row(example_id, method, score))
    (folder / task_name).mkdir(parents=True, exist_ok=True)
    (folder / task_name / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"task": task_name, "split": "test", "target": "t", "draft": "d", "dtype": "float32", "temperature": 1.0,
                "top_k": 0, "top_p": 1.0, "draft_length": 5, "max_new_tokens": 64, "seed": 1}
    (folder / task_name / "settings.json").write_text(json.dumps(settings))


def mark_rescored(folder) -> None:
    """What --rescore records, for synthetic rows the sandbox would fail (the step itself is tested below)."""
    path = folder / "humaneval"
    record = {"sandbox_commit": "test", "rows": 0, "rows_sha256": confirmatory.rows_digest(path / "rows.jsonl"), "changed": []}
    (path / confirmatory.RESCORED_FILE).write_text(json.dumps(record))


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    write_task(tmp_path, "humaneval", 164, lambda index, base: 1.0)  # above the line by 1 - base
    return tmp_path


def test_holm_and_the_one_sided_test_match_their_definitions():
    assert confirmatory.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert confirmatory.holm({"a": 0.5, "b": 0.6}) == {"a": 1.0, "b": 1.0}
    values = [0.3, -0.1, 0.25, 0.0, 0.4, 0.1, -0.2, 0.05]
    ours = confirmatory.one_sided_t(values, -0.05)
    theirs = stats.ttest_1samp(values, -0.05, alternative="greater")
    assert ours["p"] == pytest.approx(theirs.pvalue)
    assert ours["lower_95"] == pytest.approx(theirs.confidence_interval(0.95).low)


@pytest.mark.parametrize("xsum_cascade, xsum_verdict", [
    (lambda index, base: base, "refuted"),  # on the line at every example
    (lambda index, base: 1 - base if index % 4 < 2 else base, "undecided"),  # on the line on average, noisily
])
def test_verdicts_holm_and_the_default_follow_the_plan(folder, xsum_cascade, xsum_verdict):
    write_task(folder, "xsum", 120, xsum_cascade)
    mark_rescored(folder)
    result = confirmatory.analyse(PLAN, folder, None)
    assert result["complete"] and not result["needs_rescoring"]
    humaneval, xsum = result["tasks"]["humaneval"], result["tasks"]["xsum"]
    # cascade:opt:0.3 (acceptance 0.75) sits halfway between static:0.7 and static:0.5.
    assert (humaneval["h1"]["low"], humaneval["h1"]["high"]) == ("static:0.7", "static:0.5")
    assert humaneval["h1"]["n"] == 114 and humaneval["h1"]["mean"] == pytest.approx(0.5)
    assert humaneval["h1"]["verdict"] == "confirmed"
    assert xsum["h1"]["verdict"] == xsum_verdict and xsum["h1"]["p_holm"] >= xsum["h1"]["p"]
    # cascade:opt:0 loses every solved example; the arms that score like exact pass.
    assert result["non_inferiority"]["cascade:opt:0"] == {"humaneval": False, "xsum": False}
    assert all(result["non_inferiority"][m] == {"humaneval": True, "xsum": True} for m in PLAN["relaxed"] if m.startswith("static"))
    # The most accepting arm that passes everywhere: static:0.3, not the failing cascade:opt:0.
    assert result["default"] == "static:0.3"
    assert set(result["secondary"]["humaneval"]) == {"seen before", "all"}
    assert result["secondary"]["humaneval"]["seen before"]["n"] == 50
    arm = result["exploratory"]["arms"]["static:0.1"]
    assert arm["examples"] == 120 and arm["minus_exact"]["mean"] == 0.0
    text = confirmatory.markdown(result, PLAN)
    assert result["h1_overall"] == "per task" and f"xsum {xsum_verdict}" in text
    for needle in ("## H1", "## H2", "`static:0.3`", "Power of each H2 test", "## Secondary", "## Exploratory", "## Rescoring"):
        assert needle in text


def test_no_statistic_before_every_cell_is_filled_and_rescored(folder):
    write_task(folder, "xsum", 120, lambda index, base: base)
    rows = (folder / "xsum" / "rows.jsonl").read_text().splitlines(keepends=True)
    last_exact = max(i for i, line in enumerate(rows) if json.loads(line)["method"] == "exact")
    (folder / "xsum" / "rows.jsonl").write_text("".join(rows[:last_exact] + rows[last_exact + 1:]))  # one planned cell missing
    mark_rescored(folder)
    partial = confirmatory.analyse(PLAN, folder, None)
    assert not partial["complete"] and "tasks" not in partial and partial["default"] == "exact"
    assert partial["coverage"]["xsum"]["missing_examples"] == [get_task("xsum").load("test", 120, None)[-1].id]
    assert "no primary statistic" in confirmatory.markdown(partial, PLAN)
    assert confirmatory.main(["--folder", str(folder), "--rescore"]) == 2  # rescoring waits too

    (folder / "xsum" / "rows.jsonl").write_text("".join(rows))
    with open(folder / "humaneval" / "rows.jsonl", "a") as out:  # rows changed after the rescoring
        out.write(json.dumps(row("HumanEval/0", "static:0.1", 1.0)) + "\n")
    stale = confirmatory.analyse(PLAN, folder, None)
    assert stale["complete"] and stale["needs_rescoring"] == ["humaneval"] and "tasks" not in stale
    assert "--rescore" in confirmatory.markdown(stale, PLAN)


def test_main_writes_results_and_the_primary_pareto_plots(folder):
    write_task(folder, "xsum", 120, lambda index, base: base)
    mark_rescored(folder)
    assert confirmatory.main(["--folder", str(folder)]) == 0
    result = json.loads((folder / "results.json").read_text())
    assert result["default"] == "static:0.3"
    assert (folder / "pareto-humaneval.png").stat().st_size > 0 and (folder / "pareto-xsum.png").stat().st_size > 0


def test_a_partial_exploratory_arm_stays_off_the_plot(folder):
    """Its rows are the examples that finished first, so its point is not comparable."""
    write_task(folder, "xsum", 120, lambda index, base: base)
    rows = [json.loads(line) for line in (folder / "xsum" / "rows.jsonl").read_text().splitlines()]
    ids = {r["example_id"] for r in rows}
    assert "static:0.1" in confirmatory.plotted_methods(PLAN, "xsum", rows, ids)
    first = next(i for i, r in enumerate(rows) if r["method"] == "static:0.1")
    partial = rows[:first] + rows[first + 1:]
    assert "static:0.1" not in confirmatory.plotted_methods(PLAN, "xsum", partial, ids)
    assert confirmatory.plotted_methods(PLAN, "xsum", partial, ids) == [PLAN["reference"], *PLAN["relaxed"]]


def test_rescoring_runs_the_sandbox_and_records_what_changed(tmp_path):
    """The real step: two HumanEval rows scored wrongly on purpose get the sandbox's verdicts."""
    plan = PLAN | {"tasks": {"humaneval": {"offset": 0, "n": 1}}, "exploratory_methods": {}}
    task = get_task("humaneval")
    example = task.load("test", 1, None)[0]
    rows = [row(example.id, "exact", 0.0) | {"completion": task.reference(example)},
            row(example.id, "static:0.9", 1.0) | {"completion": "```python\nimport os\nos._exit(0)\n```"}]
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(REPO / "docs" / "results" / "confirmatory" / "humaneval" / "settings.json", tmp_path / "humaneval")
    confirmatory.rescore_planned(plan, tmp_path, None, jobs=1)
    scores = {r["method"]: r["score"] for r in map(json.loads, (tmp_path / "humaneval" / "rows.jsonl").read_text().splitlines())}
    assert scores == {"exact": 1.0, "static:0.9": 0.0}
    record, stale = confirmatory.rescoring(plan, tmp_path)
    assert stale == [] and {(c["method"], c["old"], c["new"]) for c in record["humaneval"]["changed"]} == {("exact", 0.0, 1.0), ("static:0.9", 1.0, 0.0)}


def test_second_run_analysis_finds_the_non_inferior_arm_on_made_up_rows(tmp_path, monkeypatch):
    """Made-up rows: G scores as `exact` does on every problem and sample with more acceptance,
    S loses where exact is right on 3 problems in 10; G passes the written rule on both tasks, S does not; progress mode counts rows only."""
    import confirmatory2

    plan = {"seed_base": 7, "reference": "exact", "alpha": 0.05, "holm_family": 4, "non_inferiority_margin": 0.05, "acceptance_gain": 0.1,
            "bootstrap": {"resamples": 500, "seed": 1}, "arms": {"G": {"a": "g", "b": "g"}, "S": {"a": "s", "b": "s"}},
            "tasks": {"a": {"n": 40, "samples": 2}, "b": {"n": 40, "samples": 3}}}
    monkeypatch.setattr(confirmatory2, "FOLDER", tmp_path)
    for task, spec in plan["tasks"].items():
        for k in range(spec["samples"]):
            folder = tmp_path / task / f"seed-{7 + k}"
            folder.mkdir(parents=True)
            rows = []
            for i in range(spec["n"]):
                right = float((i + k) % 2)
                for method, score, accepted in (("exact", right, 6), ("g", right, 9), ("s", right if i % 10 >= 3 else 0.0, 9)):
                    rows.append({"example_id": f"{task}-{i}", "method": method, "score": score, "metrics": {"drafted": 10, "accepted": accepted}})
            (folder / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    found = confirmatory2.load(plan)
    assert confirmatory2.progress(plan, found) == (3 * (2 * 40 + 3 * 40), 3 * (2 * 40 + 3 * 40))
    result = confirmatory2.analyse(plan, found)
    assert result["passing"] == ["G"] and result["default"] == "G"
    assert all(result["cells"][f"G:{t}"]["non_inferior"] and result["cells"][f"G:{t}"]["difference"] == 0 for t in "ab")
    assert not any(result["cells"][f"S:{t}"]["non_inferior"] for t in "ab")
