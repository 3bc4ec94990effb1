"""Issue 40: a cold `generate` on llama.cpp loads only what it uses. The draft's weights load at
its first forward (a run whose rounds are all N = 0 never loads them), and the draft's
tokenizer is not loaded when its vocabulary files are the target's; a draft with another
vocabulary is still refused."""

from __future__ import annotations

import pytest

import diversed.runners.llamacpp as llamacpp
from diversed.draft_length import AdaptiveDraftLength, verify_costs_from_seconds
from diversed.engine import GenerationConfig
from diversed.errors import PairMismatchError
from diversed.generation import MethodSpec, generate, start_generation
from diversed.models import load_pair
from diversed.sampling import SamplingParams
from diversed.testing import build_tiny_gguf, build_tiny_model

GREEDY_N2 = GenerationConfig(4, 2, SamplingParams(temperature=0), seed=0)


@pytest.fixture
def tokenizer_loads(monkeypatch) -> list:
    loads: list = []
    real = llamacpp.load_gguf_tokenizer
    monkeypatch.setattr(llamacpp, "load_gguf_tokenizer", lambda path: loads.append(path) or real(path))
    return loads


def test_the_draft_loads_at_its_first_forward_and_brings_no_tokenizer(tiny_gguf_paths, tokenizer_loads, tiny_gguf_pair):
    pair = load_pair(*map(str, tiny_gguf_paths), backend="llama.cpp")
    assert tokenizer_loads == [tiny_gguf_paths[0]]  # the target's only: the files beside the draft are the same
    assert not pair.draft.loaded
    assert pair.signature() == tiny_gguf_pair.signature()  # the facts from the draft's header are llama.cpp's
    assert pair.vocab_size == tiny_gguf_pair.vocab_size and not pair.draft.loaded

    generation = start_generation(pair, "Hello", MethodSpec("exact"), GREEDY_N2, raw=True)
    assert not pair.draft.loaded  # the proposer's runner borrows its context at the first forward
    for _ in generation:
        pass
    assert pair.draft.loaded and generation.metrics.drafted > 0
    eager = generate(tiny_gguf_pair, "Hello", MethodSpec("exact"), GREEDY_N2, raw=True)
    assert generation.result.token_ids == eager.token_ids  # a lazily loaded draft drafts as an eager one


def test_a_run_that_never_drafts_never_loads_the_draft(tiny_gguf_paths):
    pair = load_pair(*map(str, tiny_gguf_paths), backend="llama.cpp")
    generation = start_generation(pair, "Hello", MethodSpec("exact"), GREEDY_N2, raw=True)
    # A draft step as dear as ten target steps: no draft length can pay, so every round is N = 0.
    generation.policy = AdaptiveDraftLength(verify_costs_from_seconds(1.0, 10.0, [1.0] * 3), 2)
    for _ in generation:
        pass
    assert generation.metrics.drafted == 0 and generation.metrics.new_tokens == 4
    assert not pair.draft.loaded


def test_a_draft_with_another_vocabulary_is_still_refused(tiny_gguf_paths, tmp_path, tokenizer_loads):
    odd = build_tiny_model(tmp_path / "odd", seed=5, alphabet="xyz")
    (tmp_path / "gguf").mkdir()
    odd_gguf = build_tiny_gguf(odd, tmp_path / "gguf" / "odd.gguf")
    with pytest.raises(PairMismatchError, match="different vocabularies"):
        load_pair(str(tiny_gguf_paths[0]), str(odd_gguf), backend="llama.cpp")
    assert tokenizer_loads == [tiny_gguf_paths[0], odd_gguf]
