"""`diversed eval` and `diversed pareto` end to end on the tiny pair (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diversed import cli
from diversed.evaluate import ROWS_FILE, example_seed, mean_ci, verified_positions
from diversed.generation import encode_prompt
from diversed.metrics import Metrics
from diversed.sampling import SamplingParams, logits_to_probs
from diversed.tasks import get_task

from .conftest import SHARED_DATA

FIXTURES = Path(__file__).parent / "fixtures"
METHODS = ["ar", "exact", "static:0.5", "static:0.9"]
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"benchmark data folder {SHARED_DATA} is absent")


def eval_args(tiny_model_dirs, out: Path, *extra: str, task: str = "gsm8k", data_dir: Path = SHARED_DATA, methods=METHODS, n: int = 2,
              sequential: bool = True) -> list[str]:
    """`diversed eval` on the tiny pair; `sequential`: one timed generation at a time (else eval's default, lockstep)."""
    target, draft = tiny_model_dirs
    return [
        "eval", "--task", task, "--methods", ",".join(methods), "--n", str(n), "--max-new-tokens", "12",
        "--temperature", "1", "--draft-length", "3", "--out", str(out), "--data-dir", str(data_dir),
        "--target", str(target), "--draft", str(draft), "--dtype", "float32", *(["--sequential"] if sequential else []), *extra,
    ]


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / ROWS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def gsm8k_run(tiny_model_dirs, tmp_path_factory):
    """One finished eval run; tests that modify it work on a copy."""
    out = tmp_path_factory.mktemp("eval") / "gsm8k"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest does for each test; this fixture runs before it
    try:
        assert cli.main(eval_args(tiny_model_dirs, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@needs_shared_data
def test_eval_writes_one_row_per_example_and_method(gsm8k_run):
    rows = read_rows(gsm8k_run)
    assert [(r["example_id"], r["method"]) for r in rows] == [(f"test-{i}", m) for i in range(2) for m in METHODS]
    metric_names = set(Metrics().to_dict())
    for row in rows:
        assert set(row) >= {"example_id", "method", "completion", "score", "metrics", "seed", "finish_reason"}
        assert set(row["metrics"]) == metric_names
        assert row["score"] in (0.0, 1.0)
        assert row["seed"] == example_seed(0, row["example_id"])  # same seed for every method
        assert 1 <= row["metrics"]["new_tokens"] <= 12
        assert (row["metrics"]["acceptance_rate"] is None) == (row["method"] == "ar")


@needs_shared_data
def test_eval_summary_table_and_plot(gsm8k_run):
    summary = json.loads((gsm8k_run / "summary.json").read_text())
    assert summary["task"] == "gsm8k" and summary["metric"] == "accuracy" and summary["n_examples"] == 2
    by_method = {m["method"]: m for m in summary["methods"]}
    assert list(by_method) == METHODS
    rows = read_rows(gsm8k_run)
    for label, m in by_method.items():
        mine = [r for r in rows if r["method"] == label]
        pooled = Metrics()
        for r in mine:
            pooled = pooled.merge(Metrics.from_dict(r["metrics"]))
        assert m["n"] == 2
        assert m["quality"] == pytest.approx(sum(r["score"] for r in mine) / 2)
        assert m["quality_ci95"][0] <= m["quality"] <= m["quality_ci95"][1]
        assert m["acceptance_rate"] == pooled.acceptance_rate  # pooled, not a mean of ratios
        assert m["mean_accepted_length"] == pooled.mean_accepted_length
        assert m["tokens_per_second"] == pytest.approx(pooled.tokens_per_second)
        assert m["estimated_bias"] == pytest.approx(pooled.estimated_bias / 2)
        ar_seconds = sum(r["metrics"]["seconds"] for r in rows if r["method"] == "ar")
        assert m["speedup"] == pytest.approx(ar_seconds / pooled.seconds)
    assert by_method["ar"]["speedup"] == pytest.approx(1.0)
    assert by_method["exact"]["estimated_bias"] == pytest.approx(0.0, abs=1e-6)  # lossless
    assert by_method["static:0.5"]["estimated_bias"] > 0
    assert summary["cost_ratio"] > 0 and by_method["exact"]["ideal_speedup"] > 0
    table = (gsm8k_run / "summary.md").read_text()
    for label in METHODS:
        assert f"| {label} |" in table
    assert (gsm8k_run / "pareto.png").stat().st_size > 1000


@needs_shared_data
@pytest.mark.parametrize("untimed", [{"lockstep": True}, {"engine": "vllm 0.32.0"}], ids=["lockstep", "another engine"])
def test_summary_times_methods_on_their_timed_rows_only(gsm8k_run, untimed):
    """A method with untimed rows added (lockstep rows, or rows of another engine: seconds 0)
    keeps the tokens/s of its timed rows; a row without a bias estimate makes the bias unknown."""
    from diversed.evaluate.settings import EvalSettings
    from diversed.evaluate.summary import summarize, summary_markdown

    rows = read_rows(gsm8k_run)
    timed = next(r for r in rows if r["method"] == "exact" and r["example_id"] == "test-0")
    other = next(r for r in rows if r["method"] == "exact" and r["example_id"] == "test-1")
    unknown_bias = {"estimated_bias": None} if "engine" in untimed else {}
    other.update(untimed, metrics={**other["metrics"], "seconds": 0.0, "target_seconds": 0.0, "draft_seconds": 0.0, **unknown_bias})
    task = get_task("gsm8k")
    examples = task.load("test", 2, SHARED_DATA)
    settings = EvalSettings(**json.loads((gsm8k_run / "settings.json").read_text()))
    summary = summarize(task, examples, ["exact"], rows, settings)
    exact = summary["methods"][0]
    assert exact["n"] == 2 and exact["timed_n"] == 1
    assert exact["tokens_per_second"] == pytest.approx(timed["metrics"]["new_tokens"] / timed["metrics"]["seconds"])
    assert exact["seconds_per_example"] == pytest.approx(timed["metrics"]["seconds"])
    assert "over the timed rows only" in summary_markdown(summary) and "exact (1 of 2)" in summary_markdown(summary)
    assert (exact["estimated_bias"] is None) == bool(unknown_bias) and (exact["bias_per_position"] is None) == bool(unknown_bias)


@needs_shared_data
def test_eval_resumes_without_redoing_finished_rows(gsm8k_run, tiny_model_dirs, tmp_path):
    out = copy_run(gsm8k_run, tmp_path)
    before = (out / ROWS_FILE).read_text()
    assert cli.main(eval_args(tiny_model_dirs, out)) == 0
    assert (out / ROWS_FILE).read_text() == before  # nothing to do: no new rows

    lines = before.splitlines(keepends=True)
    half = len(lines) // 2
    # Interrupted mid-write: half the rows and a cut-off line.
    (out / ROWS_FILE).write_text("".join(lines[:half]) + lines[half][:25])
    assert cli.main(eval_args(tiny_model_dirs, out)) == 0
    after = (out / ROWS_FILE).read_text().splitlines(keepends=True)
    assert after[:half] == lines[:half]  # kept rows untouched
    assert len(after) == len(lines)  # only the missing rows were added
    # Same per-example seeds: the recomputed rows reproduce the original completions.
    original = {(r["example_id"], r["method"]): r["completion"] for r in map(json.loads, lines)}
    redone = {(r["example_id"], r["method"]): r["completion"] for r in map(json.loads, after)}
    assert redone == original


@needs_shared_data
def test_eval_adds_methods_and_examples_to_a_run(gsm8k_run, tiny_model_dirs, tmp_path):
    out = copy_run(gsm8k_run, tmp_path)
    assert cli.main(eval_args(tiny_model_dirs, out, methods=["ar", "static:0.7"], n=3)) == 0
    rows = read_rows(out)
    assert len(rows) == len(METHODS) * 2 + 1 + 3  # static:0.7 on 3 examples, ar on the new one
    summary = json.loads((out / "summary.json").read_text())
    assert [m["method"] for m in summary["methods"]] == ["ar", "static:0.7"]
    assert all(m["n"] == 3 for m in summary["methods"])


@needs_shared_data
def test_eval_refuses_to_mix_settings(gsm8k_run, tiny_model_dirs, tmp_path, capsys):
    out = copy_run(gsm8k_run, tmp_path)
    assert cli.main(eval_args(tiny_model_dirs, out, "--temperature", "0.5")) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "temperature" in error
    assert len(read_rows(out)) == len(METHODS) * 2


def test_eval_on_cnn_dailymail_fixture(tiny_model_dirs, tmp_path):
    out = tmp_path / "cnn"
    args = eval_args(tiny_model_dirs, out, task="cnn_dailymail", data_dir=FIXTURES, methods=["ar", "static:0.7"], n=2)
    assert cli.main(args) == 0
    rows = read_rows(out)
    assert len(rows) == 4
    assert all(0.0 <= r["score"] <= 100.0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "rouge2" and (out / "pareto.png").is_file()


def test_eval_user_errors_exit_2(tiny_model_dirs, tmp_path, capsys):
    fixture = dict(task="cnn_dailymail", data_dir=FIXTURES)  # needs no shared benchmark data
    assert cli.main(eval_args(tiny_model_dirs, tmp_path / "a", methods=["ar", "fast"], **fixture)) == 2
    assert "unknown method 'fast'" in capsys.readouterr().err
    assert cli.main(eval_args(tiny_model_dirs, tmp_path / "b", data_dir=tmp_path)) == 2
    assert "gsm8k_test.jsonl" in capsys.readouterr().err
    assert cli.main(eval_args(tiny_model_dirs, tmp_path / "c", methods=["ar", "ar"], **fixture)) == 2
    assert "twice" in capsys.readouterr().err


@needs_shared_data
def test_pareto_front_is_w_tv_and_one_minus_w_tv(gsm8k_run, tiny_model_dirs, tiny_pair, tmp_path):
    out = copy_run(gsm8k_run, tmp_path)  # holds an eval summary: its points go on the plot
    target, draft = tiny_model_dirs
    weights = [0.0, 0.25, 0.5, 0.75, 1.0]
    args = ["pareto", "--task", "gsm8k", "--n", "2", "--weights", ",".join(map(str, weights)), "--temperature", "0.8",
            "--out", str(out), "--data-dir", str(SHARED_DATA), "--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    assert cli.main(args) == 0
    front = json.loads((out / "front.json").read_text())
    assert (out / "front.png").stat().st_size > 1000

    # Independently: teacher-force prompt + reference through each model, TV per position.
    task = get_task("gsm8k")
    params = SamplingParams(temperature=0.8)
    tvs = []
    for example in task.load("test", n=2, data_dir=SHARED_DATA):
        prompt = encode_prompt(tiny_pair, task.prompt(example))
        reference = tiny_pair.tokenizer(task.reference(example), add_special_tokens=False).input_ids
        ids = torch.tensor([(prompt + reference)[: tiny_pair.context_window]])
        with torch.no_grad():
            p = logits_to_probs(tiny_pair.target(ids).logits[0, len(prompt) - 1 : -1], params)
            q = logits_to_probs(tiny_pair.draft(ids).logits[0, len(prompt) - 1 : -1], params)
        tvs.append(0.5 * (p - q).abs().sum(-1))
    mean_tv = float(torch.cat(tvs).mean())
    assert front["positions"] == sum(len(t) for t in tvs)
    assert front["mean_tv"] == pytest.approx(mean_tv, rel=1e-4)
    assert [point["w"] for point in front["front"]] == weights
    for point in front["front"]:
        assert point["rejection"] == pytest.approx(point["w"] * mean_tv, rel=1e-4, abs=1e-9)
        assert point["bias"] == pytest.approx((1 - point["w"]) * mean_tv, rel=1e-4, abs=1e-9)
        assert point["rejection"] + point["bias"] == pytest.approx(front["mean_tv"])


def test_pareto_rejects_bad_weights(tiny_model_dirs, tmp_path, capsys):
    target, draft = tiny_model_dirs
    args = ["pareto", "--task", "wmt16", "--weights", "0.5,1.5", "--out", str(tmp_path), "--data-dir", str(FIXTURES),
            "--target", str(target), "--draft", str(draft)]
    assert cli.main(args) == 2
    assert "--weights" in capsys.readouterr().err


def test_verified_positions_and_ci():
    metrics = Metrics()
    metrics.record_round(drafted=3, accepted=3, bias=0.0)  # all accepted: 3 positions decided
    metrics.record_round(drafted=3, accepted=1, bias=0.0)  # accept, reject: 2 positions
    metrics.record_round(drafted=3, accepted=0, bias=0.0)  # reject at once: 1 position
    assert verified_positions(metrics) == (6, 2)
    assert verified_positions(Metrics(rounds=4, new_tokens=4)) == (0, 0)  # ar
    low, high = mean_ci([0.0, 1.0] * 50)
    assert low < 0.5 < high and high - low < 0.3
    assert mean_ci([1.0]) == (1.0, 1.0)


@needs_shared_data
def test_prompts_too_long_for_the_context_are_skipped_for_every_method(tiny_pair):
    from diversed.evaluate import encodable_examples

    task = get_task("gsm8k")
    examples = task.load("test", n=6, data_dir=SHARED_DATA)
    # The tiny models have 2048 positions; with the three shots test-4's prompt is 1084
    # characters (= tokens), the others at most 929.
    kept, skipped = encodable_examples(tiny_pair, task, examples, raw=False, room=1000)
    assert skipped == ["test-4"]
    assert [e.id for e, _ in kept] == [e.id for e in examples if e.id != "test-4"]
    assert all(len(ids) + 1000 <= tiny_pair.context_window for _, ids in kept)
