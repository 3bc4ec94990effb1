"""The embedded default pair (Qwen2.5-Coder 1.5B target / 0.5B draft), for real.

Marked slow (minutes on CPU); the `ci`-marked ones are the representative subset CI runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from diversed.engine import GenerationConfig, speculative_round
from diversed.proposers import ModelProposer
from diversed.runners.hf import TorchRunner
from diversed.generation import MethodSpec, default_method, encode_prompt, generate
from diversed.metrics import Metrics
from diversed.models import load_pair
from diversed.sampling import SamplingParams
from diversed.verifiers import StaticEnsemble

from .test_engine import hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
]


@pytest.fixture(scope="module")
def pair_fp32():
    return load_pair(dtype="float32", backend="torch")


@pytest.mark.ci
@pytest.mark.parametrize("prompt_index, draft_length", [(0, 5), (1, 3)])
def test_exact_greedy_equals_target_greedy_fp32(pair_fp32, prompt_index, draft_length):
    prompt = encode_prompt(pair_fp32, PROMPTS[prompt_index])
    config = GenerationConfig(max_new_tokens=24, draft_length=draft_length, sampling=SamplingParams(0.0), ignore_eos=True)
    ours = generate(pair_fp32, prompt, MethodSpec("exact"), config)
    assert ours.token_ids == hf_greedy(pair_fp32.target, prompt, 24)
    assert ours.metrics.rounds < 24  # speculation actually emitted several tokens per round


@pytest.fixture(scope="module")
def pair_llamacpp():
    return load_pair(backend="llama.cpp")


# Largest logit gap between the two candidates at a divergence that counts as a near-tie: batched
# and single-token Q4_K decodes differ by a few hundredths to a few tenths of a logit
# (docs/performance.md, "Greedy decoding on quantised kernels").
NEAR_TIE = 0.3


@pytest.mark.ci
@pytest.mark.parametrize("prompt_index, draft_length", [(0, 5), (1, 3)])
def test_llamacpp_exact_greedy_equals_ar_greedy_up_to_near_ties(pair_llamacpp, prompt_index, draft_length):
    """Token for token, except that quantised kernels may resolve a near-tie differently in a
    batched verification than in a one-token step: then the two tokens are the AR step's top
    two and their logits differ by less than NEAR_TIE. Anything else is a real bug."""
    prompt = encode_prompt(pair_llamacpp, PROMPTS[prompt_index])
    config = GenerationConfig(max_new_tokens=32, draft_length=draft_length, sampling=SamplingParams(0.0), ignore_eos=True)
    ar = generate(pair_llamacpp, prompt, MethodSpec("ar"), config).token_ids
    exact = generate(pair_llamacpp, prompt, MethodSpec("exact"), config)
    assert exact.metrics.rounds < 32  # speculation emitted several tokens per round
    diverged = next((i for i, (a, b) in enumerate(zip(ar, exact.token_ids)) if a != b), None)
    if diverged is None:
        assert exact.token_ids == ar
        return
    runner = pair_llamacpp.runner()  # replay the AR decode: prefill, then one token at a time
    runner.feed(prompt[:-1], 0)
    for token in [prompt[-1]] + ar[:diverged]:
        logits, _ = runner.feed([token], 1)
    top = logits[0].topk(2)
    assert set(top.indices.tolist()) == {ar[diverged], exact.token_ids[diverged]}
    assert float(top.values[0] - top.values[1]) < NEAR_TIE


@pytest.mark.parametrize("prompt_index, draft_length", [(0, 2), (1, 6)])
def test_exact_greedy_more_cases(pair_fp32, prompt_index, draft_length):
    prompt = encode_prompt(pair_fp32, PROMPTS[prompt_index])
    config = GenerationConfig(max_new_tokens=32, draft_length=draft_length, sampling=SamplingParams(0.0), ignore_eos=True)
    assert generate(pair_fp32, prompt, MethodSpec("exact"), config).token_ids == hf_greedy(pair_fp32.target, prompt, 32)


@pytest.mark.ci
def test_kv_rollback_on_the_real_pair(pair_fp32):
    generator = torch.Generator().manual_seed(0)
    target = TorchRunner(pair_fp32.target, pair_fp32.vocab_size)
    draft = TorchRunner(pair_fp32.draft, pair_fp32.vocab_size)
    committed = encode_prompt(pair_fp32, PROMPTS[0])
    metrics = Metrics()
    with torch.inference_mode():
        target.feed(committed[:-1], 0)
        draft.feed(committed[:-1], 0)
        for _ in range(4):
            outcome = speculative_round(target, ModelProposer(draft, pair_fp32.vocab_size), StaticEnsemble(0.5), committed, 5, SamplingParams(1.5), generator, metrics)
            committed = committed + outcome.tokens
        assert metrics.accepted < metrics.drafted  # some rejection was rolled back
        for cached in (target, draft):
            cached_logits, _ = cached.feed(committed[cached.length :], 1)
            fresh_logits, _ = TorchRunner(cached.model, pair_fp32.vocab_size).feed(committed, 1)
            torch.testing.assert_close(cached_logits, fresh_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.ci
def test_cli_generate_json_on_the_default_pair():
    """The README's main command, as a user runs it (auto backend, auto draft length), and the
    same with a fixed N, which must speculate."""
    command = [sys.executable, "-m", "diversed.cli", "generate", "Say hello in French.", "--max-new-tokens", "16", "--seed", "0", "--json"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["text"].strip() and len(data["token_ids"]) <= 16
    assert data["backend"] in ("torch", "llama.cpp") and data["backend_reason"].startswith("auto:")
    assert data["metrics"]["rounds"] >= 1 and data["metrics"]["other_seconds"] >= 0
    fixed = subprocess.run([*command, "--draft-length", "5"], capture_output=True, text=True, timeout=900, env=env)
    assert fixed.returncode == 0, fixed.stderr
    metrics = json.loads(fixed.stdout)["metrics"]
    assert metrics["drafted"] > 0 and 0 <= metrics["acceptance_rate"] <= 1


@pytest.mark.ci
def test_shipped_heads_fit_the_default_pair_and_decode(pair_fp32):
    """Every head in the package loads for the embedded pair (`--head NAME`) and drives decoding."""
    from diversed.head import load_head, shipped_head_names

    names = shipped_head_names()
    assert names, "the package ships at least one trained head"
    for name in names:
        head = load_head(name, pair_fp32.signature())
        assert head.config.extra["task"] and head.config.extra["training"]["steps"] > 0
        result = generate(pair_fp32, PROMPTS[1], MethodSpec("diversed", head=name), GenerationConfig(max_new_tokens=8, draft_length=5, seed=0))
        assert 0 < len(result.token_ids) <= 8 and result.metrics.drafted > 0
    # Task heads are opt-in: none is the default method until one helps across tasks (docs/heads.md).
    assert default_method(pair_fp32)[0] == MethodSpec("exact")  # issue 23's rule (tests/test_default_rule.py)
