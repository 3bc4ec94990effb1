"""The torch runner: a Hugging Face causal LM and its DynamicCache."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import token_tensor


class TorchRunner:
    """A transformers causal LM, its KV cache and how many tokens that cache holds."""

    has_hidden_states = True

    def __init__(self, model: Any, vocab_size: int):
        from transformers import DynamicCache

        self.model = model
        self.vocab_size = vocab_size
        self.cache = DynamicCache(config=model.config)
        self.body = model.base_model  # the decoder stack without the LM head
        self.lm_head = model.get_output_embeddings()
        self.device = next(model.parameters()).device

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def feed(self, tokens: Sequence[int] | torch.Tensor, num_logits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits [num_logits, V] (float32), hidden [num_logits, H]."""
        ids = token_tensor(tokens, self.device).reshape(1, -1)  # [1, T]
        before = self.length
        hidden = self.body(input_ids=ids, cache=self.cache, use_cache=True).last_hidden_state[0]  # [T, H]
        if self.length != before + ids.shape[1]:
            # A transformers version that does not take `cache=` drops it silently and every
            # step then runs without its context: refuse rather than decode wrongly.
            from ..errors import ModelLoadError
            from transformers import __version__

            raise ModelLoadError(f"transformers {__version__} did not use the KV cache; diversed needs the pinned transformers (pyproject.toml)")
        if num_logits == 0:
            return hidden.new_zeros(0, self.vocab_size).float(), hidden[:0]
        last = hidden[-num_logits:]  # [num_logits, H]
        return self.lm_head(last)[:, : self.vocab_size].float(), last

    def rollback(self, length: int) -> None:
        extra = self.length - length
        if extra > 0:
            self.cache.crop(-extra)


class TorchBatch:
    """A causal LM decoding a left-padded batch with one KV cache; rows can leave the batch or be copied.

    Batched decoding for training rollouts and lockstep evaluation (torch only).
    """

    def __init__(self, model: Any, vocab_size: int):
        from transformers import DynamicCache

        self.body = model.base_model  # the decoder stack without the LM head
        self.lm_head = model.get_output_embeddings()
        self.cache = DynamicCache(config=model.config)
        self.vocab_size = vocab_size

    def feed(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, positions: [A, L] appended to the cache; mask: [A, cached + L] (0 = padding).

        -> logits [A, V] (float32) and last-layer hidden states [A, H] at each row's last position.
        """
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True)
        last = out.last_hidden_state[:, -1]  # [A, H]
        return self.lm_head(last)[:, : self.vocab_size].float(), last

    @staticmethod
    def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompts as one left-padded batch: ids, mask (0 = padding), positions, each [B, L].

        Positions count from each prompt's first real token, so padding changes nothing.
        """
        longest = max(len(ids) for ids in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)  # [B, L] (id 0 under the mask)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)  # [B, L]
        for b, prompt_ids in enumerate(prompts):
            ids[b, longest - len(prompt_ids) :] = torch.tensor(list(prompt_ids))
            mask[b, longest - len(prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, L]
        return ids.to(device), mask.to(device), positions.to(device)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the cached rows `rows` [A'], in that order (an index may repeat: the row is copied)."""
        self.cache.batch_select_indices(rows)

    def repeat(self, repeats: int) -> None:
        """Copy every cached row `repeats` times, copies next to each other: [A] -> [A * repeats]."""
        self.cache.batch_repeat_interleave(repeats)
