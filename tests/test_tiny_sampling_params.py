"""Issue 17: tiny but valid sampling parameters (temperature 1e-300 or 1e-39, top_p 1e-46) decode
greedily / keep the top token, in the library and the CLI: no NaN, no <pad> garbage."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diversed.cli import main
from diversed.engine import GenerationConfig
from diversed.generation import MethodSpec, generate
from diversed.sampling import MIN_TEMPERATURE, SamplingParams, logits_to_probs

from .test_cli import run, tiny_args

TINY = [SamplingParams(1e-300), SamplingParams(1e-39), SamplingParams(1.0, top_p=1e-46), SamplingParams(1e-39, top_p=1e-46)]
SPECS = [MethodSpec("ar"), MethodSpec("exact"), MethodSpec("static", weight=0.5), MethodSpec("lenient", lenience=0.5), MethodSpec("typical")]


def finite(value) -> bool:
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.parametrize("params", TINY, ids=lambda p: f"T{p.temperature:g}-p{p.top_p:g}")
def test_probabilities_stay_finite_in_float32(params):
    logits = torch.randn(3, 50) * 20
    probs = logits_to_probs(logits, params)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(-1), torch.ones(3))


def test_temperatures_below_the_floor_are_greedy():
    assert SamplingParams(MIN_TEMPERATURE / 2).greedy and SamplingParams(1e-300).greedy and SamplingParams(0).greedy
    assert not SamplingParams(MIN_TEMPERATURE).greedy


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
@pytest.mark.parametrize("params", TINY, ids=lambda p: f"T{p.temperature:g}-p{p.top_p:g}")
def test_library_generates_the_greedy_text(tiny_pair, spec, params):
    config = GenerationConfig(max_new_tokens=12, draft_length=3, sampling=params, seed=0)
    result = generate(tiny_pair, "hello", spec, config, raw=True)
    greedy = generate(tiny_pair, "hello", spec, GenerationConfig(max_new_tokens=12, draft_length=3, sampling=SamplingParams(0, top_p=params.top_p), seed=0), raw=True)
    assert finite(list(result.metrics.to_dict().values()))
    assert tiny_pair.tokenizer.pad_token_id not in result.token_ids
    assert len(result.token_ids) == 12 and result.text
    if params.temperature < MIN_TEMPERATURE:
        assert result.token_ids == greedy.token_ids


def test_cli_with_a_tiny_temperature(capsys, tiny_model_dirs):
    code, out, err = run(capsys, "generate", "hi", *tiny_args(tiny_model_dirs), "--max-new-tokens", "8", "--temperature", "1e-39", "--top-p", "1e-46", "--json")
    assert code == 0, err
    data = json.loads(out)  # strict JSON: NaN would not parse back as a number
    assert finite(list(data["metrics"].values())) and len(data["token_ids"]) == 8
    code, greedy_out, _ = run(capsys, "generate", "hi", *tiny_args(tiny_model_dirs), "--max-new-tokens", "8", "--temperature", "0", "--json")
    assert json.loads(greedy_out)["token_ids"] == data["token_ids"]
