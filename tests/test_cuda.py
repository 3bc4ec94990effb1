"""The `--device cuda` path, on the tiny real pair: skipped where no CUDA GPU is present.

CI has no GPU, so these run only on a machine that has one (`pytest tests/test_cuda.py`). They
check what differs on a GPU: models, head, sampling generators and acceptance uniforms all on
the device (a CPU tensor or generator anywhere fails loudly), greedy losslessness, the engine's
output distribution against exact enumeration, and head training. `--backend auto` on a GPU is
the static-cache runner with CUDA graphs (`torch-static`), so these run through it; the eager
runner is checked against it, and a round must synchronize the host with the GPU once.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from diversed.calibration import choose_backend
from diversed.engine import speculative_round
from diversed.metrics import Metrics
from diversed.proposers import ModelProposer
from diversed.runners.hf import TorchRunner
from diversed.runners.static_cache import StaticCacheRunner

from diversed.cli import main
from diversed.engine import GenerationConfig
from diversed.generation import MethodSpec, generate
from diversed.head import load_head
from diversed.models import load_pair
from diversed.sampling import SamplingParams

from .test_cli import tiny_args
from .test_engine import hf_greedy
from .test_static_runner import ROUND_VERIFIERS, exercise
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
    return load_pair(str(target), str(draft), dtype="float32", device="cuda", backend="torch-static")


@pytest.fixture(scope="module")
def eager_cuda_pair(tiny_model_dirs):
    target, draft = tiny_model_dirs
    return load_pair(str(target), str(draft), dtype="float32", device="cuda", backend="torch")


@pytest.fixture(scope="module", params=["torch", "torch-static"])
def small_vocab_cuda_pair(request, tmp_path_factory):
    return load_small_vocab_pair(tmp_path_factory.mktemp("small-vocab-cuda"), device="cuda", backend=request.param)


def test_auto_measures_the_static_runner_with_cuda_graphs(cuda_pair, tiny_model_dirs):
    from diversed.runners.static_cache import TORCH_STATIC

    assert TORCH_STATIC.offered_by_auto(torch.device("cuda"))  # triton is there to compile graphs
    backend, reason = choose_backend(str(tiny_model_dirs[0]), str(tiny_model_dirs[1]), "float32", "cuda")
    assert backend.name in ("torch", "torch-static") and "torch-static" in reason, reason
    runner = cuda_pair.runner("target")
    assert isinstance(runner, StaticCacheRunner) and runner.graphed.compile_mode == "reduce-overhead"


@pytest.mark.parametrize("role", ["target", "draft"])
def test_graphed_runner_equals_the_eager_runner_on_cuda(cuda_pair, role):
    model = cuda_pair.target if role == "target" else cuda_pair.draft
    with torch.inference_mode():
        exercise(TorchRunner(model, cuda_pair.vocab_size), cuda_pair.runner(role))


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("name", ["exact", "static", "diversed", "cascade"])
def test_a_round_synchronizes_once_on_cuda(cuda_pair, name, temperature):
    """torch's sync debug mode warns at every host-device synchronization: one per round."""
    target, draft = cuda_pair.runner("target"), cuda_pair.runner("draft")
    proposer, verifier = ModelProposer(draft, cuda_pair.vocab_size), ROUND_VERIFIERS[name](cuda_pair)
    params = SamplingParams(temperature=temperature)
    committed, metrics, rounds = list(range(5, 25)), Metrics(), 20
    generator = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for runner in (target, draft):  # capture every block shape before counting
            for size in (1, 2, 5):
                runner.feed(committed[:size], size)
                runner.rollback(0)
        target.feed(committed[:-1], 0)
        for _ in range(3):
            committed += speculative_round(target, proposer, verifier, committed, 4, params, generator, metrics).tokens
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(rounds):
                    committed += speculative_round(target, proposer, verifier, committed, 4, params, generator, metrics).tokens
            finally:
                torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == rounds, [str(w.message)[:200] for w in syncs[:5]]


def test_exact_greedy_equals_target_greedy_with_the_eager_runner_on_cuda(eager_cuda_pair):
    prompt = eager_cuda_pair.tokenizer("Hello, world", add_special_tokens=False).input_ids
    config = GenerationConfig(max_new_tokens=60, draft_length=4, sampling=SamplingParams(temperature=0.0), ignore_eos=True)
    assert generate(eager_cuda_pair, prompt, MethodSpec("exact"), config).token_ids == hf_greedy(eager_cuda_pair.target, prompt, 60)


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
