"""Engine behaviour on the tiny real pair: greedy losslessness, KV rollback, stopping, seeds."""

from __future__ import annotations

import pytest
import torch

from diversed.engine import GenerationConfig, speculative_round
from diversed.proposers import ModelProposer
from diversed.runners.hf import TorchRunner
from diversed.errors import UserInputError
from diversed.generation import Generation, MethodSpec, build_verifier, generate, start_generation
from diversed.metrics import Metrics
from diversed.sampling import SamplingParams
from diversed.verifiers import Exact, StaticEnsemble

GREEDY = SamplingParams(temperature=0.0)


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """The target's own greedy decoding, by Hugging Face (no EOS stop)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, top_k=None, top_p=None, temperature=None, pad_token_id=0,
    )
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("draft_length", [1, 2, 3, 5, 8])
def test_exact_greedy_equals_target_greedy(tiny_pair, draft_length):
    prompt = tiny_pair.tokenizer("Hello, world", add_special_tokens=False).input_ids
    config = GenerationConfig(max_new_tokens=60, draft_length=draft_length, sampling=GREEDY, ignore_eos=True)
    ours = generate(tiny_pair, prompt, MethodSpec("exact"), config)
    assert ours.token_ids == hf_greedy(tiny_pair.target, prompt, 60)
    assert ours.metrics.accepted < ours.metrics.drafted  # rejections happened, so rollback was exercised
    assert generate(tiny_pair, prompt, MethodSpec("ar"), config).token_ids == ours.token_ids


def test_kv_caches_hold_exactly_the_committed_tokens(tiny_pair):
    """After every round (rejections included) the cached next-token logits equal a fresh forward."""
    generator = torch.Generator().manual_seed(0)
    target = TorchRunner(tiny_pair.target, tiny_pair.vocab_size)
    draft = TorchRunner(tiny_pair.draft, tiny_pair.vocab_size)
    committed = tiny_pair.tokenizer("abc", add_special_tokens=False).input_ids
    metrics = Metrics()
    with torch.inference_mode():
        target.feed(committed[:-1], 0)
        draft.feed(committed[:-1], 0)
        for _ in range(25):
            outcome = speculative_round(target, ModelProposer(draft, tiny_pair.vocab_size), StaticEnsemble(0.6), committed, 4, SamplingParams(), generator, metrics)
            committed = committed + outcome.tokens
            assert target.length == len(committed) - 1
            assert draft.length <= len(committed) - 1
            for cached in (target, draft):
                before = cached.length
                cached_logits, _ = cached.feed(committed[before:], 1)
                fresh_logits, _ = TorchRunner(cached.model, tiny_pair.vocab_size).feed(committed, 1)
                torch.testing.assert_close(cached_logits, fresh_logits, rtol=1e-4, atol=1e-4)
                cached.rollback(before)
    assert 0 < metrics.accepted < metrics.drafted


def test_seed_makes_sampling_reproducible(tiny_pair):
    config = GenerationConfig(max_new_tokens=40, seed=123, ignore_eos=True)
    first = generate(tiny_pair, "seeded", MethodSpec("static", weight=0.5), config)
    again = generate(tiny_pair, "seeded", MethodSpec("static", weight=0.5), config)
    other = generate(tiny_pair, "seeded", MethodSpec("static", weight=0.5), GenerationConfig(max_new_tokens=40, seed=124, ignore_eos=True))
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


@pytest.mark.parametrize("method", ["ar", "exact", "static", "lenient", "cascade", "typical"])
def test_every_method_respects_max_new_tokens(tiny_pair, method):
    config = GenerationConfig(max_new_tokens=13, draft_length=5, seed=0, ignore_eos=True)
    result = generate(tiny_pair, "count", MethodSpec(method), config)
    assert len(result.token_ids) == 13 and result.metrics.new_tokens == 13
    assert result.finish_reason == "length"
    if method != "ar":
        m = result.metrics
        assert m.drafted == sum(m.drafted_per_position) and m.accepted == sum(m.accepted_per_position)
        assert m.mean_accepted_length == pytest.approx(1 + m.accepted / m.rounds)


def test_eos_stops_generation_and_is_not_emitted(tiny_pair):
    eos = tiny_pair.tokenizer.eos_token_id
    prompt = tiny_pair.tokenizer("x", add_special_tokens=False).input_ids
    reference = generate(tiny_pair, prompt, MethodSpec("exact"), GenerationConfig(max_new_tokens=30, sampling=GREEDY, ignore_eos=True))
    # Make the 8th greedy token the EOS: the run must stop right before it.
    stop_id = reference.token_ids[7]
    tiny_pair.target.generation_config.eos_token_id = [eos, stop_id]
    try:
        stopped = generate(tiny_pair, prompt, MethodSpec("exact"), GenerationConfig(max_new_tokens=30, sampling=GREEDY))
    finally:
        tiny_pair.target.generation_config.eos_token_id = eos
    first = reference.token_ids.index(stop_id)
    assert stopped.token_ids == reference.token_ids[:first]
    assert stopped.finish_reason == "stop"


def test_stop_strings_cut_the_text(tiny_pair):
    full = generate(tiny_pair, "stop", MethodSpec("exact"), GenerationConfig(max_new_tokens=40, sampling=GREEDY, ignore_eos=True))
    stop = full.text[10:12]
    cut = generate(tiny_pair, "stop", MethodSpec("exact"), GenerationConfig(max_new_tokens=40, sampling=GREEDY, ignore_eos=True, stop=(stop,)))
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"


def test_streamed_text_equals_final_text(tiny_pair):
    generation = start_generation(tiny_pair, "stream me", MethodSpec("static"), GenerationConfig(max_new_tokens=50, seed=1))
    assert isinstance(generation, Generation)
    deltas = list(generation)
    assert len(deltas) > 1 and "".join(deltas) == generation.result.text


def test_diversed_with_untrained_head_runs_end_to_end(tiny_pair, tmp_path):
    from diversed.head import EnsembleHead, HeadConfig

    path = EnsembleHead(HeadConfig(tiny_pair.signature())).save(tmp_path / "head")
    result = generate(tiny_pair, "dyn", MethodSpec("diversed", head=str(path)), GenerationConfig(max_new_tokens=30, seed=0, ignore_eos=True))
    static = generate(tiny_pair, "dyn", MethodSpec("static", weight=0.5), GenerationConfig(max_new_tokens=30, seed=0, ignore_eos=True))
    # An untrained head outputs w = 0.5 everywhere: exactly the static ensemble at w = 0.5.
    assert result.token_ids == static.token_ids
    assert result.metrics.estimated_bias == pytest.approx(static.metrics.estimated_bias, rel=1e-4)


def test_estimated_bias_is_zero_for_exact_and_positive_for_static(tiny_pair):
    config = GenerationConfig(max_new_tokens=30, seed=0, ignore_eos=True)
    assert generate(tiny_pair, "b", MethodSpec("exact"), config).metrics.estimated_bias == pytest.approx(0, abs=1e-4)
    assert generate(tiny_pair, "b", MethodSpec("static", weight=0.5), config).metrics.estimated_bias > 0.1


def test_prompt_longer_than_context_window_is_a_user_error(tiny_pair):
    with pytest.raises(UserInputError, match="context window"):
        generate(tiny_pair, "a" * (tiny_pair.context_window + 5), MethodSpec("exact"))


def test_empty_prompt_is_a_user_error(tiny_pair):
    with pytest.raises(UserInputError, match="empty"):
        generate(tiny_pair, "   ", MethodSpec("exact"))


def test_build_verifier_needs_a_draft_for_speculative_methods(tiny_model_dirs):
    from diversed.models import load_pair

    target_only = load_pair(str(tiny_model_dirs[0]), dtype="float32", with_draft=False)
    assert build_verifier(target_only, MethodSpec("ar")) is None
    with pytest.raises(UserInputError, match="draft"):
        build_verifier(target_only, MethodSpec("exact"))
    assert isinstance(build_verifier(target_only.__class__(target_only.target, target_only.target, target_only.tokenizer, "t", "t"), MethodSpec("exact")), Exact)
