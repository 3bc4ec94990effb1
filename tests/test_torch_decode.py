"""diversed's torch decoding kernels (runners/torch_decode.py) compute what transformers' own do.

The packed grouped-query attention and the in-place KV cache change speed only: through every
operation a batch goes through (prefill, steps with and without padding, rows leaving, copied
and joining, leading positions dropped; a single runner's rollbacks), logits and hidden states
equal those of transformers' SDPA dispatch with its `DynamicCache`. Packed weights multiply as
the plain layers do, and a model loaded with them computes the logits of one loaded without.
"""

from __future__ import annotations

import pytest
import torch

from diversed.runners import torch_decode
from diversed.runners.base import left_pad
from diversed.runners.hf import TorchBatch, TorchRunner, load_model

CLOSE = dict(rtol=1e-5, atol=1e-5)


def test_models_load_on_the_packed_attention(tiny_pair):
    assert tiny_pair.target.config._attn_implementation == torch_decode.PACKED_SDPA
    assert tiny_pair.target.config.num_key_value_heads < tiny_pair.target.config.num_attention_heads  # the packed path runs


@torch.inference_mode()
def _batch_trace(model, vocab_size: int, prompts: list[list[int]], joining: list[int]) -> list[torch.Tensor]:
    """Outputs of a scripted batch: prefill, steps, a row leaving and one copied, a join, steps."""
    generator = torch.Generator().manual_seed(0)
    batch = TorchBatch(model, vocab_size)
    ids, mask, positions = left_pad(prompts, "cpu")
    outputs = list(batch.feed(ids, mask, positions))
    positions = positions[:, -1:]

    def step():
        nonlocal mask, positions
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1)
        positions = positions + 1
        tokens = torch.randint(1, vocab_size, (len(mask), 1), generator=generator)
        outputs.extend(batch.feed(tokens, mask, positions))

    for _ in range(3):
        step()
    rows = torch.tensor([2, 0, 0])  # row 1 leaves, row 0 is copied
    batch.keep(rows)
    mask, positions = mask[rows], positions[rows]
    step()
    other = TorchBatch(model, vocab_size)
    join_ids, join_mask, join_positions = left_pad([joining], "cpu")
    outputs.extend(other.feed(join_ids, join_mask, join_positions))
    width = max(mask.shape[1], join_mask.shape[1])
    pad = lambda m: torch.nn.functional.pad(m, (width - m.shape[1], 0))  # noqa: E731
    unused = int((pad(mask).cumsum(-1) == 0).all(0).sum())
    batch.absorb(other)
    batch.drop_front(unused)
    mask = torch.cat([pad(mask), pad(join_mask)])[:, unused:]
    positions = torch.cat([positions, join_positions[:, -1:]])
    for _ in range(70):  # past a buffer's spare room, so the cache grows at least once
        step()
    return outputs


@pytest.mark.parametrize("prompts", [[[3, 4, 5, 6], [3, 4, 5, 6], [7, 8, 9, 3]], [[3, 4, 5, 6, 7], [8, 9], [5, 6, 7]]],
                         ids=["no padding", "padding"])
def test_a_batch_decodes_as_on_transformers_own_kernels(tiny_pair, prompts):
    model, vocab = tiny_pair.target, tiny_pair.vocab_size
    ours = _batch_trace(model, vocab, prompts, joining=[4, 5, 6, 7, 8, 9, 3, 4])
    with torch_decode.transformers_kernels(model):
        theirs = _batch_trace(model, vocab, prompts, joining=[4, 5, 6, 7, 8, 9, 3, 4])
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, **CLOSE)


@torch.inference_mode()
def test_a_runner_rolls_back_in_place_and_decodes_as_a_fresh_one(tiny_pair):
    model, vocab = tiny_pair.target, tiny_pair.vocab_size
    runner = TorchRunner(model, vocab)
    runner.feed([3, 4, 5, 6, 7], 1)
    runner.feed([8, 9, 3], 3)
    runner.rollback(6)  # keep one of the three verified tokens
    assert runner.length == 6
    logits, hidden = runner.feed([5, 4], 2)
    with torch_decode.transformers_kernels(model):
        fresh = TorchRunner(model, vocab)
        expected_logits, expected_hidden = fresh.feed([3, 4, 5, 6, 7, 8, 5, 4], 2)
    torch.testing.assert_close(logits, expected_logits, **CLOSE)
    torch.testing.assert_close(hidden, expected_hidden, **CLOSE)


def test_crop_takes_the_negative_count_as_transformers_does():
    layer = torch_decode.GrowingLayer()
    layer.update(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4))
    layer.crop(-2)
    assert layer.get_seq_length() == 3 and layer.keys.shape == (1, 2, 3, 4)
    with pytest.raises(ValueError):
        layer.crop(2)


needs_packing = pytest.mark.skipif(not torch_decode._packable(), reason="this torch build has no oneDNN weight packing")


@needs_packing
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_multiplies_as_the_plain_one(dtype, bias):
    linear = torch.nn.Linear(48, 80, bias=bias, dtype=dtype).requires_grad_(False)
    packed = torch_decode.PackedLinear(linear)
    for shape in [(1, 48), (7, 48), (3, 5, 48)]:
        inputs = torch.randn(shape).to(dtype)
        with torch.inference_mode():
            torch.testing.assert_close(packed(inputs), linear(inputs))


@needs_packing
def test_a_model_loads_with_packed_weights_and_computes_the_plain_models_logits(tiny_model_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch_decode, "packing_pays", lambda dtype: True)  # the packed path, whatever this CPU measured
    target, _ = tiny_model_dirs
    packed, _, _ = load_model(str(target), "float32")
    kinds = {type(module) for module in packed.modules()}
    assert torch_decode.PackedLinear in kinds and torch.nn.Linear not in kinds  # every product, the LM head's included
    plain = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(ids).logits, plain(ids).logits, **CLOSE)
    runner = TorchRunner(packed, packed.get_output_embeddings().out_features)
    with torch.inference_mode():
        logits, _ = runner.feed([3, 4, 5], 1)
        torch.testing.assert_close(logits[0], plain(torch.tensor([[3, 4, 5]])).logits[0, -1], **CLOSE)


def test_packing_is_decided_once_per_dtype_and_never_for_others():
    assert torch_decode.packing_pays(torch.float16) is False
    decided = torch_decode.packing_pays(torch.bfloat16)
    assert isinstance(decided, bool) and torch_decode.packing_pays(torch.bfloat16) is decided
