"""The `--device cuda` path, on the tiny real pair: skipped where no CUDA GPU is present.

CI has no GPU, so these run only on a machine that has one (`pytest tests/test_cuda.py`). They
check what differs on a GPU: models, head, sampling generators and acceptance uniforms all on
the device (a CPU tensor or generator anywhere fails loudly), greedy losslessness, the engine's
output distribution against exact enumeration, and head training.
"""

from __future__ import annotations

import pytest
import torch

from diversed.cli import main
from diversed.engine import GenerationConfig
from diversed.generation import MethodSpec, generate
from diversed.head import load_head
from diversed.models import load_pair
from diversed.sampling import SamplingParams

from .test_cli import tiny_args
from .test_engine import hf_greedy
from .test_engine_statistics import (
    ROUNDS,
    VERIFIERS,
    chi_square_pvalue,
    load_small_vocab_pair,
    simulate,
    theory,
)
from .test_train import one_minus_w_by_lambda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_pair(tiny_model_dirs):
    target, draft = tiny_model_dirs
    return load_pair(str(target), str(draft), dtype="float32", device="cuda")


@pytest.fixture(scope="module")
def small_vocab_cuda_pair(tmp_path_factory):
    return load_small_vocab_pair(tmp_path_factory.mktemp("small-vocab-cuda"), device="cuda")


def test_pair_is_on_the_gpu(cuda_pair):
    assert cuda_pair.device.type == "cuda"
    assert all(p.device.type == "cuda" for m in (cuda_pair.target, cuda_pair.draft) for p in m.parameters())


@pytest.mark.parametrize("draft_length", [1, 3, 5])
def test_exact_greedy_equals_target_greedy_on_cuda(cuda_pair, draft_length):
    prompt = cuda_pair.tokenizer("Hello, world", add_special_tokens=False).input_ids
    config = GenerationConfig(max_new_tokens=60, draft_length=draft_length, sampling=SamplingParams(temperature=0.0), ignore_eos=True)
    ours = generate(cuda_pair, prompt, MethodSpec("exact"), config)
    assert ours.token_ids == hf_greedy(cuda_pair.target, prompt, 60)
    assert ours.metrics.accepted < ours.metrics.drafted  # rejections happened: rollback on the GPU was exercised


@pytest.mark.parametrize("method", ["ar", "exact", "static", "lenient", "cascade", "typical"])
def test_every_method_samples_reproducibly_on_cuda(cuda_pair, method):
    config = GenerationConfig(max_new_tokens=24, draft_length=5, seed=7, ignore_eos=True)
    first = generate(cuda_pair, "count", MethodSpec(method), config)
    again = generate(cuda_pair, "count", MethodSpec(method), config)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 24


@pytest.mark.parametrize("name", ["exact", "static-0.5", "diversed"])
def test_engine_matches_theory_on_cuda(small_vocab_cuda_pair, name):
    """The CPU suite's exact-enumeration chi-square test, with every tensor on the GPU."""
    verifier = VERIFIERS[name](small_vocab_cuda_pair)
    expected, k_probs = theory(small_vocab_cuda_pair, verifier)
    observed, k_counts, _ = simulate(small_vocab_cuda_pair, verifier, ROUNDS)
    assert chi_square_pvalue(observed, expected, ROUNDS) > 1e-4
    assert chi_square_pvalue(dict(enumerate(k_counts)), dict(enumerate(k_probs)), ROUNDS) > 1e-4


def test_training_on_cuda_lowers_w_with_lambda_and_the_head_loads_anywhere(cuda_pair, tmp_path):
    one_minus_w = one_minus_w_by_lambda(cuda_pair, tmp_path)  # trains on the GPU (asserts the head's device)
    assert one_minus_w[10.0] > one_minus_w[0.0] + 0.02, one_minus_w
    saved = tmp_path / "lam10.0" / "head"
    assert load_head(saved, cuda_pair.signature()).linear.weight.device.type == "cpu"  # saved heads are device-free
    result = generate(cuda_pair, "hello", MethodSpec("diversed", head=str(saved)), GenerationConfig(max_new_tokens=8, seed=0))
    assert result.metrics.drafted > 0


def test_cli_generate_on_cuda(capsys, tiny_model_dirs):
    code = main(["generate", "hello", *tiny_args(tiny_model_dirs), "--device", "cuda", "--method", "static", "--max-new-tokens", "6", "--seed", "0"])
    _, err = capsys.readouterr()
    assert code == 0, err
