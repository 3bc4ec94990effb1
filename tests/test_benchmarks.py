"""benchmarks/speed.py end to end on the tiny pair: every method runs, figures are consistent,
and Hugging Face's sampled verification is counted, not guessed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, FIXTURE_DATA, import_benchmark


METHODS = ["hf:ar", "hf:assisted", "hf:static:0.7", "ar", "exact", "static:0.7"]


def test_speed_benchmark_runs_every_method_and_counts_hf_acceptance(tiny_model_dirs, tmp_path):
    target, draft = tiny_model_dirs
    out = tmp_path / "speed.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "speed.py"), "--target", str(target), "--draft", str(draft),
        "--dtype", "float32", "--data-dir", str(FIXTURE_DATA), "--prompts", "3", "--max-new-tokens", "16",
        "--temperature", "1", "--methods", ",".join(METHODS), "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == METHODS
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    for method in ("hf:assisted", "hf:static:0.7", "exact", "static:0.7"):
        row = rows[method]
        assert row["approx"] == ""  # counted at T=1, for Hugging Face too
        assert 0 <= row["acceptance_rate"] <= 1
        assert 1 <= row["mean_accepted_length"] <= 6  # N = 5: at most 5 accepted + 1 per round
        assert row["efficiency"] > 0
        assert 1 <= row["drafted_per_round"] <= 5
    assert rows["ar"]["speedup_vs_ar"] == pytest.approx(1.0) and rows["hf:ar"]["speedup_vs_hf_ar"] == pytest.approx(1.0)
    assert rows["hf:ar"]["acceptance_rate"] is None and rows["ar"]["acceptance_rate"] is None


def test_hf_assisted_drafts_exactly_n_tokens(tiny_model_dirs):
    """transformers reads the draft length and confidence stop from the assistant's own
    generation_config; passing them to generate() alone left HF drafting up to 20 tokens."""
    speed = import_benchmark("speed")
    from diversed.generation import encode_prompt
    from diversed.models import load_pair

    pair = load_pair(str(tiny_model_dirs[0]), str(tiny_model_dirs[1]), dtype="float32")
    args = argparse.Namespace(max_new_tokens=24, temperature=1.0, draft_length=3, hf_confidence_stop=False, seed=0)
    for method in ("hf:assisted", "hf:static:0.7"):
        run = speed.run_hf(pair, encode_prompt(pair, "hello there"), method, args)
        assert run["longest_draft"] == 3 and run["drafted"] <= 3 * run["verified_rounds"]



def test_hf_verification_counter_restores_transformers():
    speed = import_benchmark("speed")
    import transformers.generation.utils as hf_utils

    original = hf_utils._speculative_sampling
    counter = speed.HFVerificationCounter()
    assert hf_utils._speculative_sampling is not original
    counter.close()
    assert hf_utils._speculative_sampling is original


def test_head_weights_report_on_the_tiny_pair(tiny_pair, tiny_model_dirs, tmp_path):
    """benchmarks/head_weights.py reads an eval run's rows and prints w against TV per token kind."""
    from diversed.head import EnsembleHead, HeadConfig

    EnsembleHead(HeadConfig(tiny_pair.signature())).save(tmp_path / "head")
    rows = [{"example_id": f"test-{i}", "method": "exact", "completion": "She has 16 - 3 = 13 eggs.\n#### 13"} for i in range(2)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    target, draft = tiny_model_dirs
    command = [
        sys.executable, str(REPO / "benchmarks" / "head_weights.py"), "--head", str(tmp_path / "head"), "--task", "gsm8k",
        "--rows", str(tmp_path / "rows.jsonl"), "--data-dir", str(FIXTURE_DATA), "--target", str(target), "--draft", str(draft),
        "--dtype", "float32",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "w: mean 0.500" in done.stdout  # a fresh head is w = 0.5 everywhere
    table = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {row[1].strip() for row in table} >= {"number", "operator", "word"}
    assert abs(sum(float(row[5].strip(" %")) for row in table) - 100) < 0.5  # bias shares add up


def test_rollouts_benchmark_prints_a_row_per_batch_shape(tiny_model_dirs):
    target, draft = tiny_model_dirs
    command = [
        sys.executable, str(REPO / "benchmarks" / "rollouts.py"), "--data-dir", str(FIXTURE_DATA), "--target", str(target),
        "--draft", str(draft), "--dtype", "float32", "--batch-sizes", "1,2", "--samples-per-prompt", "1,3", "--max-new-tokens", "4",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(int(r[1]), int(r[2]), int(r[3])) for r in rows] == [(1, 1, 1), (1, 3, 3), (2, 1, 2), (2, 3, 6)]
    assert all(0 < int(r[4]) <= 4 * int(r[3]) for r in rows)  # at most max_new_tokens per rollout


def _eval_row(example: int, method: str, score: float, accepted: int, drafted: int) -> dict:
    return {"example_id": f"test-{example}", "method": method, "score": score, "metrics": {"accepted": accepted, "drafted": drafted}}


def test_static_line_places_a_method_between_two_weights_and_pairs_by_example(tmp_path):
    """benchmarks/static_line.py: a method halfway between two static weights in acceptance, scoring
    exactly 0.25 above the average of their per-example scores, is reported as +0.250."""
    scores_high_w = [1.0, 0.0, 1.0, 1.0]
    scores_low_w = [0.0, 0.0, 1.0, 0.0]
    rows = []
    for i, (a, b) in enumerate(zip(scores_high_w, scores_low_w)):
        rows += [
            _eval_row(i, "static:0.9", a, 40, 100),  # acceptance 40%
            _eval_row(i, "static:0.5", b, 80, 100),  # acceptance 80%
            _eval_row(i, "static:0.1", 0.0, 95, 100),  # outside the bracket: not used
            _eval_row(i, "diversed:head", (a + b) / 2 + 0.25, 60, 100),  # halfway: t = 0.5
        ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = [sys.executable, str(REPO / "benchmarks" / "static_line.py"), "--rows", str(tmp_path / "rows.jsonl"), "--method", "diversed:head"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "through static:0.9 (40.0%) and static:0.5 (80.0%)" in done.stdout
    assert "n = 4 examples; quality minus the line: +0.250 (95% CI +0.250 to +0.250)" in done.stdout

    missing = subprocess.run([*command[:-1], "diversed:other"], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no rows for 'diversed:other'" in missing.stderr and "Traceback" not in missing.stderr


def test_gpu_costs_measures_both_torch_runners_on_a_tiny_cpu_config(tmp_path):
    """benchmarks/gpu_costs.py's smoke test: what a GPU session runs, on a CPU with a tiny pair."""
    out = tmp_path / "costs.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "gpu_costs.py"), "--device", "cpu", "--targets", "tiny", "--dtype", "float32",
        "--repeats", "2", "--tokens", "8", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["transformers"] and result["environment"]["torch"]
    entry = result["targets"]["tiny"]
    for runner in ("torch", "torch-static"):
        costs = entry[runner]
        assert len(costs["v"]) == 9 and costs["v"][0] == 1.0 and costs["c"] > 0
        assert set(costs["engine"]) == {"ar", "exact@1", "exact@4", "exact@8"}
        rows = costs["projection"]
        methods = {row["method"] for row in rows}
        assert {"exact", "static:0.9", "cascade:opt:0"} <= methods and any(m.startswith("diversed:") for m in methods)
        for row in rows:
            a, n = row["a"], row["policy_n"]
            # The i.i.d. acceptance reproduces the summary's accepted fraction at its N.
            assert sum(a ** i for i in range(1, row["n"] + 1)) / row["n"] == pytest.approx(row["rate"], abs=1e-6)
            assert 0 <= n <= 8
            expected = 1.0 if n == 0 else (1 - a ** (n + 1)) / ((1 - a) * (n * costs["c"] + costs["v"][n]))
            assert row["speedup"] == pytest.approx(expected)
            assert row["tokens_per_second"] == pytest.approx(expected / costs["seconds"]["target_step"])
            graphed_ar = entry["torch-static"]["seconds"]["target_step"]
            assert row["speedup_over_graphed_ar"] == pytest.approx(row["tokens_per_second"] * graphed_ar)
    assert f"| {rows[0]['source']} | exact |" in done.stdout  # the table names where each acceptance came from
