"""The runner protocol every backend implements, and how token ids reach a device."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch


class ModelRunner(Protocol):
    """One causal LM and its KV cache.

    Invariant: the cache holds exactly the first `length` tokens fed since creation (minus
    what `rollback` dropped); `feed` appends to it.
    """

    #: True when `feed` returns last-layer hidden states (the dynamic ensemble needs them).
    has_hidden_states: bool
    #: Where returned tensors live (probabilities, heads and sampling generators follow).
    device: torch.device

    @property
    def length(self) -> int:
        """Tokens in the cache."""

    def feed(self, tokens: Sequence[int] | torch.Tensor, num_logits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append `tokens` to the cache; outputs of the last `num_logits` positions.

        -> logits [num_logits, V] float32, hidden [num_logits, H] (None when the runner has no
        hidden states).
        """

    def rollback(self, length: int) -> None:
        """Drop cached positions at and beyond `length` (no-op when the cache is shorter)."""


def token_tensor(tokens: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token ids as a 1-D long tensor on `device`, without making the host wait for a GPU.

    A plain host-to-GPU copy synchronizes the host with the device; from pinned memory it is
    queued like a kernel, so a round keeps its single sync (the accepted count).
    """
    if isinstance(tokens, torch.Tensor):
        return tokens.reshape(-1).to(device=device, dtype=torch.long)
    ids = torch.tensor(list(tokens), dtype=torch.long)
    if device.type != "cuda":
        return ids.to(device)
    return ids.pin_memory().to(device, non_blocking=True)
