"""Step costs that stay true: a calibration taken under load is corrected by the forwards the
engine times during one generation, and the correction is saved for later runs; a busy moment
now (forwards slower than the cache) changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diversed import calibration
from diversed.runners import torch_decode
from diversed.calibration import TOLERANCE, corrected_entry
from diversed.engine import GenerationConfig
from diversed.generation import MethodSpec, generate

QUIET = {"target_step": 0.030, "draft_step": 0.010, "verify": [0.030, 0.050, 0.070, 0.090]}


def inflated(entry: dict, factor: float) -> dict:
    return {"target_step": entry["target_step"] * factor, "draft_step": entry["draft_step"] * factor,
            "verify": [seconds * factor for seconds in entry["verify"]], "machine": "a busy machine"}


def test_a_slower_cache_is_corrected_by_observed_forwards():
    loaded = inflated(QUIET, 5.0)
    fixed = corrected_entry(loaded, {1: [0.031, 0.030, 0.029, 0.030]})
    assert fixed is not None and fixed["target_step"] == pytest.approx(0.030)
    # Sizes not observed, and the draft step, keep the calibration's ratios at the observed scale.
    assert fixed["verify"] == pytest.approx(QUIET["verify"]) and fixed["draft_step"] == pytest.approx(QUIET["draft_step"])
    assert fixed["machine"] == "a busy machine" and fixed["corrected"]


def test_each_observed_size_takes_its_own_median():
    loaded = inflated(QUIET, 4.0)
    fixed = corrected_entry(loaded, {1: [0.03] * 6, 3: [0.08] * 3})
    assert fixed["verify"] == pytest.approx([0.030, 0.050, 0.080, 0.090])
    # A longer forward never costs less: an observed v(k) above v(k + 1) is capped.
    fixed = corrected_entry(loaded, {1: [0.03] * 6, 3: [0.5] * 3})
    assert fixed["verify"][2] == pytest.approx(0.090) and fixed["verify"] == sorted(fixed["verify"])


@pytest.mark.parametrize("forwards", [
    {1: [0.030, 0.031, 0.032]},  # agrees with the cache
    {1: [0.030 * TOLERANCE * 0.99] * 3},  # within the tolerance
    {1: [0.30] * 5},  # slower than the cache: a busy moment now, not a bad calibration
    {1: [0.001, 0.001]},  # too few forwards to trust
    {12: [0.001] * 5},  # a size the cache does not hold
])
def test_agreement_busy_moments_and_thin_evidence_change_nothing(forwards):
    assert corrected_entry(QUIET, forwards) is None


def _seed(key: str, entry: dict) -> None:
    calibration._write_cache(key, entry)


def test_one_generate_corrects_a_calibration_taken_under_load(tiny_pair, capsys):
    """The real engine and cache: costs seeded 20 times too slow are corrected within one
    generate, and saved."""
    config = GenerationConfig(max_new_tokens=24, draft_length="auto", seed=0, ignore_eos=True)
    generate(tiny_pair, "warm", MethodSpec("exact"), config)  # calibrates (once per session)
    key = calibration._pair_key(tiny_pair)
    measured = calibration._read_cache()[key]
    _seed(key, inflated(measured, 20.0))
    generate(tiny_pair, "count to ten", MethodSpec("exact"), config)
    assert "corrected the cached step costs" in capsys.readouterr().err
    fixed = calibration._read_cache()[key]
    assert fixed["target_step"] < measured["target_step"] * 20 / TOLERANCE
    assert fixed["draft_step"] < measured["draft_step"] * 20 / TOLERANCE


def test_ar_on_an_unmeasured_pair_writes_nothing(tiny_pair):
    before = calibration._read_cache()
    generate(tiny_pair, "hi", MethodSpec("ar"), GenerationConfig(max_new_tokens=6, seed=0, ignore_eos=True))
    assert calibration._read_cache().keys() == before.keys()


@pytest.mark.slow
@pytest.mark.ci
def test_cli_generate_corrects_an_inflated_llamacpp_calibration(tmp_path):
    """The issue's case on the embedded pair: a llama.cpp calibration taken under load (here:
    the measured costs times 5) is corrected by one `diversed generate`, and saved."""
    pytest.importorskip("llama_cpp")
    env = {**os.environ, "DIVERSED_CALIBRATION": str(tmp_path / "calibration.json"), "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "diversed.cli", "generate", "hi", "--backend", "llama.cpp", "--max-new-tokens", "8", "--seed", "0"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr
    cache = json.loads((tmp_path / "calibration.json").read_text())
    [(key, measured)] = [(k, v) for k, v in cache.items() if "|llama.cpp|" in k]
    (tmp_path / "calibration.json").write_text(json.dumps({key: inflated(measured, 5.0)}))
    second = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0 and "corrected the cached step costs" in second.stderr, second.stderr
    fixed = json.loads((tmp_path / "calibration.json").read_text())[key]
    assert fixed["target_step"] < measured["target_step"] * 5 / TOLERANCE


def test_the_batched_dtype_is_measured_once_and_cached(tmp_path, monkeypatch):
    """Batched evaluation's weights: the dtype whose batched matrix product ran faster here, kept per machine."""
    monkeypatch.setenv("DIVERSED_CALIBRATION", str(tmp_path / "calibration.json"))
    dtype, why = calibration.batched_dtype()
    assert dtype in ("bfloat16", "float32") and "GFLOP/s" in why
    entry = next(value for key, value in json.loads((tmp_path / "calibration.json").read_text()).items() if key.startswith("batched-dtype-2|"))
    assert entry["dtype"] == dtype and entry["gflops"][dtype] == max(entry["gflops"].values())

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(torch_decode, "fastest_linear", no_measuring)
    assert calibration.batched_dtype() == (dtype, why)
