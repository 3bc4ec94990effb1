"""The llama.cpp runner on GGUF files the tests write themselves (the tiny pair as f32 GGUF):
the same logits and hidden states as torch, positional rollback, greedy losslessness, the
chi-square law through the runner, backend choice and its one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diversed.engine import GenerationConfig
from diversed.errors import UserInputError
from diversed.generation import MethodSpec, generate
from diversed.calibration import choose_backend
from diversed.models import load_pair
from diversed.runners import BACKENDS
from diversed.runners.hf import TORCH
from diversed.runners.llamacpp import LLAMA_CPP
from diversed.sampling import SamplingParams
from diversed.testing import build_tiny_gguf
from diversed.verifiers import Exact, StaticEnsemble

from .test_engine_statistics import ROUNDS, chi_square_pvalue, load_small_vocab_pair, simulate, theory

GREEDY = SamplingParams(temperature=0.0)


def test_logits_and_hidden_states_match_torch(tiny_gguf_pair, tiny_pair):
    ids = tiny_pair.tokenizer("Hello, world", add_special_tokens=False).input_ids
    ours, ours_hidden = tiny_gguf_pair.runner().feed(ids, len(ids) - 1)
    reference, reference_hidden = tiny_pair.runner().feed(ids, len(ids) - 1)
    torch.testing.assert_close(ours, reference, rtol=0, atol=5e-3)
    torch.testing.assert_close(ours_hidden, reference_hidden.float(), rtol=0, atol=5e-3)
    assert tiny_gguf_pair.vocab_size == tiny_pair.vocab_size and tiny_gguf_pair.eos_token_ids == tiny_pair.eos_token_ids


def test_rollback_is_positional(tiny_gguf_pair):
    ids = list(range(5, 25))
    runner = tiny_gguf_pair.runner()
    whole, _ = runner.feed(ids, 1)
    runner.rollback(7)
    assert runner.length == 7
    again, _ = runner.feed(ids[7:], 1)
    torch.testing.assert_close(again, whole, rtol=0, atol=1e-3)
    runner.rollback(30)  # beyond the cache: nothing to drop
    assert runner.length == len(ids)


@pytest.mark.parametrize("draft_length", [1, 3, 5, 8])
def test_exact_greedy_equals_ar_greedy(tiny_gguf_pair, draft_length):
    prompt = tiny_gguf_pair.tokenizer("Hello, world", add_special_tokens=False).input_ids
    config = GenerationConfig(max_new_tokens=60, draft_length=draft_length, sampling=GREEDY, ignore_eos=True)
    ours = generate(tiny_gguf_pair, prompt, MethodSpec("exact"), config)
    assert ours.token_ids == generate(tiny_gguf_pair, prompt, MethodSpec("ar"), config).token_ids
    assert ours.metrics.accepted < ours.metrics.drafted  # rejections happened, so rollback was exercised


def test_every_method_runs_on_llamacpp(tiny_gguf_pair, tmp_path):
    from diversed.head import EnsembleHead, HeadConfig

    head = EnsembleHead(HeadConfig(tiny_gguf_pair.signature())).save(tmp_path / "head")
    for spec in ("exact", "static:0.5", "lenient:0.5", "cascade:token:0.1", "typical", f"diversed:{head.with_suffix('')}"):
        result = generate(tiny_gguf_pair, "count", MethodSpec.parse(spec), GenerationConfig(max_new_tokens=12, draft_length=3, seed=0, ignore_eos=True))
        assert len(result.token_ids) == 12 and result.metrics.drafted > 0


@pytest.fixture(scope="module")
def small_vocab_gguf_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-vocab-gguf")
    torch_pair = load_small_vocab_pair(root)
    paths = []
    for name in ("t", "d"):
        (root / f"{name}-gguf").mkdir()
        paths.append(build_tiny_gguf(root / name, root / f"{name}-gguf" / f"{name}.gguf"))
    return load_pair(str(paths[0]), str(paths[1]), backend="llama.cpp")


@pytest.mark.parametrize("verifier", [Exact(), StaticEnsemble(0.5)], ids=["exact", "static-0.5"])
def test_llamacpp_engine_matches_theory(small_vocab_gguf_pair, verifier):
    """The chi-square law test of test_engine_statistics, every forward through llama.cpp."""
    expected, k_probs = theory(small_vocab_gguf_pair, verifier)
    observed, k_counts, _ = simulate(small_vocab_gguf_pair, verifier, ROUNDS)
    assert chi_square_pvalue(observed, expected, ROUNDS) > 1e-4
    assert chi_square_pvalue(dict(enumerate(k_counts)), dict(enumerate(k_probs)), ROUNDS) > 1e-4


def test_auto_backend_explains_its_choice(tiny_model_dirs, tiny_gguf_paths):
    backend, why = choose_backend(str(tiny_model_dirs[0]), str(tiny_model_dirs[1]), None, "cpu")
    assert backend is TORCH and "needs a GGUF" in why and why.startswith("auto: torch")
    backend, why = choose_backend(*map(str, tiny_gguf_paths), None, "cpu")
    assert backend in BACKENDS.values() and "measured target tokens/s" in why


def test_an_explicit_dtype_is_never_silently_ignored(tiny_gguf_paths):
    """--dtype sets torch weights: under auto it selects torch, saying so; with llama.cpp it is refused."""
    backend, why = choose_backend(*map(str, tiny_gguf_paths), "float32", "cpu")
    assert backend is TORCH and "--dtype float32" in why
    with pytest.raises(UserInputError, match="--dtype float32 does not apply to the llama.cpp backend"):
        choose_backend(*map(str, tiny_gguf_paths), "float32", "cpu", "llama.cpp")
    assert choose_backend(*map(str, tiny_gguf_paths), None, "cpu", "llama.cpp")[0] is LLAMA_CPP


def test_bad_backend_input_is_a_one_line_error(tiny_model_dirs, monkeypatch):
    with pytest.raises(UserInputError, match="unknown backend"):
        load_pair(str(tiny_model_dirs[0]), backend="vulkan")
    with pytest.raises(UserInputError, match="settled before a pair loads"):
        load_pair(str(tiny_model_dirs[0]), backend="auto")
    with pytest.raises(UserInputError, match="needs a GGUF"):
        load_pair(str(tiny_model_dirs[0]), str(tiny_model_dirs[1]), backend="llama.cpp")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(UserInputError, match="needs llama-cpp-python"):
        load_pair(str(tiny_model_dirs[0]), backend="llama.cpp")


def test_cli_backend_errors_exit_2_with_one_line(tiny_model_dirs):
    target, draft = map(str, tiny_model_dirs)
    for extra, needle in ((["--backend", "llama.cpp"], "needs a GGUF"), (["--backend", "onnx"], "invalid choice")):
        done = subprocess.run([sys.executable, "-m", "diversed.cli", "generate", "hi", "--target", target, "--draft", draft, *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and needle in done.stderr
        assert "Traceback" not in done.stderr


def test_json_output_names_the_backend(tiny_gguf_paths):
    target, draft = map(str, tiny_gguf_paths)
    done = subprocess.run([sys.executable, "-m", "diversed.cli", "generate", "hi", "--target", target, "--draft", draft, "--backend", "llama.cpp",
                           "--raw", "--max-new-tokens", "8", "--draft-length", "3", "--json", "--verbose"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import json

    out = json.loads(done.stdout)
    assert out["backend"] == "llama.cpp" and "draft length fixed N = 3" in done.stderr
