"""The torch runner: a Hugging Face causal LM and its DynamicCache."""

from __future__ import annotations

from typing import Any, Sequence

import torch


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
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(1, -1)  # [1, T]
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
