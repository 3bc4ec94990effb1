"""Streaming decodes text incrementally: the same text as decoding all tokens at once, in linear work."""

from __future__ import annotations

import dataclasses
import random

from diversed.engine import GenerationConfig
from diversed.generation import IncrementalText, MethodSpec, start_generation


def byte_level_tokenizer():
    """A byte-level BPE tokenizer with few merges, so multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["hello world, héllo wörld, naïve café 日本語 🙂 " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


class CountingTokenizer:
    """Counts how many token ids all decode calls together were given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def test_incremental_text_equals_one_shot_decoding_at_every_step():
    tokenizer = byte_level_tokenizer()
    text = "naïve café: 日本語 and 🙂, héllo wörld! " * 30
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 300 and tokenizer.decode(ids) == text
    counting = CountingTokenizer(tokenizer)
    incremental, rng, at = IncrementalText(counting), random.Random(0), 0
    while at < len(ids):
        step = rng.randint(1, 4)
        current = incremental.extend(ids[at : at + step])
        at += step
        assert current == tokenizer.decode(ids[:at], skip_special_tokens=True)
    assert incremental.text == text
    assert counting.decoded <= 6 * len(ids)  # linear: each id is decoded a bounded number of times


def test_streaming_a_long_generation_gives_the_one_shot_text(tiny_pair):
    config = GenerationConfig(max_new_tokens=400, draft_length=4, seed=3, ignore_eos=True)
    generation = start_generation(tiny_pair, "a long one", MethodSpec("static", weight=0.7), config)
    deltas = list(generation)
    result = generation.result
    assert len(result.token_ids) == 400 and len(deltas) > 10
    assert "".join(deltas) == result.text == tiny_pair.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_stop_strings_still_cut_a_long_stream(tiny_pair):
    config = GenerationConfig(max_new_tokens=300, draft_length=3, seed=5, ignore_eos=True)
    full = start_generation(tiny_pair, "stop late", MethodSpec("exact"), config)
    full_text = "".join(full)
    assert len(full_text) > 100
    at = len(full_text) * 3 // 4  # late in the stream, many rounds in
    stop = full_text[at : at + 3]
    cut = start_generation(tiny_pair, "stop late", MethodSpec("exact"), dataclasses.replace(config, stop=(stop,)))
    streamed = "".join(cut)
    assert streamed == cut.result.text == full_text[: full_text.find(stop)] and cut.result.finish_reason == "stop"
