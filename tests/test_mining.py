"""`diversed mine` on the tiny pair: records, labels recomputed independently, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diversed import cli, mining
from diversed.evaluate import teacher_forced
from diversed.mining import FEATURES, TOKEN_CLASSES, load_positions, outcome_flipped, token_class
from diversed.sampling import SamplingParams, total_variation
from diversed.tasks import get_task

from .conftest import FIXTURE_DATA



def mine_args(tiny_model_dirs, out: Path, *extra: str, n: int = 2) -> list[str]:
    target, draft = tiny_model_dirs
    return [
        "mine", "--task", "gsm8k", "--n", str(n), "--max-new-tokens", "10", "--max-counterfactuals", "2",
        "--out", str(out), "--data-dir", str(FIXTURE_DATA), "--target", str(target), "--draft", str(draft),
        "--dtype", "float32", *extra,
    ]  # fmt: skip


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / mining.RECORDS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def mined(tiny_model_dirs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mine") / "gsm8k"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(mine_args(tiny_model_dirs, out, "--control")) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_one_record_per_problem_with_every_field(mined):
    records = read_records(mined)
    assert [r["id"] for r in records] == ["train-0", "train-1"]
    for r in records:
        T = r["positions"]
        assert T == len(r["completion_ids"]) > 0
        assert set(r["features"]) == set(FEATURES) and all(len(v) == T for v in r["features"].values())
        assert len(r["token_class"]) == T and np.asarray(r["target_projection"]).shape == (T, mining.PROJECTION_DIMS)
        assert set(r["likelihood"]["position"]) <= set(r["mismatches"]["position"])
        assert len(r["counterfactuals"]["position"]) == min(2, len(r["mismatches"]["position"]))
        assert set(r["counterfactuals"]["position"]) <= set(r["likelihood"]["position"])  # compared at the same positions
        assert len(r["counterfactuals"]["flip_vs_control"]) == len(r["counterfactuals"]["position"])
    cost = json.loads((mined / mining.COST_FILE).read_text())
    assert cost["problems"] == 2 and cost["tokens"] == sum(r["positions"] for r in records)
    assert cost["counterfactual_labels"] == sum(len(r["counterfactuals"]["position"]) for r in records)
    assert cost["seconds_generation"] > 0 and cost["seconds_per_likelihood_label"] > 0


def test_features_and_labels_match_an_independent_recomputation(mined, tiny_pair):
    record = read_records(mined)[0]
    task = get_task("gsm8k")
    example = task.load("train", 1, FIXTURE_DATA)[0]
    from diversed.generation import encode_prompt

    prompt = encode_prompt(tiny_pair, task.prompt(example), False)
    completion = record["completion_ids"]
    _, (p, q) = teacher_forced(tiny_pair, prompt, completion, SamplingParams(1.0))
    assert np.allclose(record["features"]["tv"], total_variation(p, q).numpy(), atol=1e-5)
    mismatches = [t for t in range(len(completion)) if int(q[t].argmax()) != completion[t]]
    assert record["mismatches"]["position"] == mismatches
    # Likelihood label at one mismatch: the suffix's log-likelihood after d_t minus before.
    t = record["likelihood"]["position"][0]
    d = int(q[t].argmax())
    _, (p_sub, _) = teacher_forced(tiny_pair, prompt, completion[:t] + [d] + completion[t + 1 :], SamplingParams())
    suffix = torch.tensor(completion[t + 1 :])
    rows = torch.arange(t + 1, len(completion))
    expected = float((p_sub[rows, suffix].log() - p[rows, suffix].log()).sum())
    assert record["likelihood"]["ll_delta"][0] == pytest.approx(expected, abs=1e-3)


def test_load_positions_flattens_records(mined):
    arrays = load_positions(mined)
    P = sum(r["positions"] for r in read_records(mined))
    assert arrays["features"].shape == (P, len(FEATURES))
    assert arrays["target_projection"].shape == (P, mining.PROJECTION_DIMS)
    assert arrays["problem"].shape == (P,) and arrays["problem_ids"] == ["train-0", "train-1"]
    labelled = ~np.isnan(arrays["ll_delta"])
    assert arrays["mismatch"][labelled].all()
    assert (~np.isnan(arrays["cf_flip"])).sum() == (~np.isnan(arrays["cf_flip_vs_control"])).sum() > 0


def test_resume_after_a_crash_keeps_one_record_per_problem(tiny_model_dirs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = mining.mine_problem
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-problem
        return real(*args, **kwargs)

    monkeypatch.setattr(mining, "mine_problem", crash_on_second)
    assert cli.main(mine_args(tiny_model_dirs, out, n=3)) == 130
    assert [r["id"] for r in read_records(out)] == ["train-0"]
    with open(out / mining.RECORDS_FILE, "a") as f:
        f.write('{"id": "train-1", "positi')  # a line cut off by the kill
    monkeypatch.setattr(mining, "mine_problem", real)
    assert cli.main(mine_args(tiny_model_dirs, out, n=3)) == 0
    assert [r["id"] for r in read_records(out)] == ["train-0", "train-1", "train-2"]
    assert json.loads((out / mining.COST_FILE).read_text())["problems"] == 3
    assert cli.main(mine_args(tiny_model_dirs, out, n=3)) == 0  # nothing left to do
    assert len(read_records(out)) == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-counterfactuals", "-1"], "max-counterfactuals"),
        (["--max-likelihood-labels", "-2"], "max-likelihood-labels"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_bad_options_are_one_line_errors(capsys, tiny_model_dirs, tmp_path, extra, message):
    assert cli.main(mine_args(tiny_model_dirs, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_other_settings_refuse_to_resume(capsys, mined, tiny_model_dirs):
    assert cli.main(mine_args(tiny_model_dirs, mined, "--temperature", "0.5")) == 2
    assert "other settings" in capsys.readouterr().err


def test_token_classes():
    names = [TOKEN_CLASSES[token_class(text)] for text in ("12", " 3.5", " +", "=", " foo", "bar_1", "\n", " ", "é!", "#")]
    assert names == ["digit", "digit", "operator", "operator", "identifier", "identifier", "whitespace", "whitespace", "other", "other"]


def test_outcome_flips():
    gsm8k, xsum = get_task("gsm8k"), get_task("xsum")
    assert outcome_flipped(gsm8k, 1.0, 0.0) and outcome_flipped(gsm8k, 0.0, 1.0) and not outcome_flipped(gsm8k, 1.0, 1.0)
    assert outcome_flipped(xsum, 20.0, 10.0) and not outcome_flipped(xsum, 20.0, 18.0) and not outcome_flipped(xsum, 10.0, 30.0)
