"""What every backend provides: a runner protocol, the facts of a loaded model, and the
backend object that loads models and makes runners over them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Sequence

import torch


class ModelRunner(Protocol):
    """One causal LM and its KV cache.

    Invariant: the cache holds exactly the first `length` tokens fed since creation (minus
    what `rollback` dropped); `feed` appends to it.
    """

    #: Where returned tensors live (probabilities, heads and sampling generators follow).
    device: torch.device

    @property
    def length(self) -> int:
        """Tokens in the cache."""

    def feed(self, tokens: Sequence[int] | torch.Tensor, num_logits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append `tokens` to the cache; outputs of the last `num_logits` positions.

        -> logits [num_logits, V] float32, hidden [num_logits, H] (None where its backend's
        `returns_hidden_states` is False).
        """

    def rollback(self, length: int) -> None:
        """Drop cached positions at and beyond `length` (no-op when the cache is shorter)."""


@dataclass(frozen=True)
class ModelFacts:
    """What the engine and the text layer need to know of a loaded model, whatever its backend."""

    vocab_rows: int  # rows of the LM head (logits per position)
    hidden_size: int
    context_window: int
    eos_token_ids: frozenset[int]
    device: torch.device
    weights: str  # what the step costs depend on: a torch dtype ("bfloat16") or "gguf"


class Backend(ABC):
    """One way of running models: how they load, what they are, and the runners over them.

    A backend is one object in its runner module, named in the registry (runners/__init__.py);
    everything above reaches models through it and never branches on its name. docs/backends.md
    walks through adding one.
    """

    name: ClassVar[str]
    #: True when `batch(model, vocab_size)` decodes a left-padded batch (lockstep evaluation,
    #: training rollouts); such a backend also returns autograd-ready hidden states.
    can_batch: ClassVar[bool] = False
    #: True when its runners' `feed` returns last-layer hidden states (the dynamic ensemble and
    #: a judge fitted on them need the draft's).
    returns_hidden_states: ClassVar[bool] = True

    @abstractmethod
    def unavailable(self, target: str, draft: str | None, device: torch.device) -> str | None:
        """Why this backend cannot run this pair here (one line), or None when it can."""

    @abstractmethod
    def load(self, spec: str, dtype: str, device: str) -> tuple[Any, Any, str]:
        """(model, tokenizer, display name) for a model spec; one-line errors for what it cannot load."""

    def load_draft(self, spec: str, target_spec: str, dtype: str, device: str) -> tuple[Any, Any | None, str]:
        """(model, tokenizer or None, display name) of a pair's draft. A tokenizer of None means the
        backend found the draft's vocabulary identical to the target's (`models.load_pair` then skips
        the comparison); by default the draft loads like any model."""
        return self.load(spec, dtype, device)

    @abstractmethod
    def facts(self, model: Any) -> ModelFacts:
        """The facts of a model this backend loaded."""

    @abstractmethod
    def runner(self, model: Any, vocab_size: int, longest_feed: int | None = None) -> ModelRunner:
        """A fresh runner (empty KV cache) over a model this backend loaded.

        `longest_feed`: the most tokens one feed after the prompt will carry (a verify: the
        longest draft + 1), for runners whose shapes are fixed in advance; None: unknown.
        """

    @abstractmethod
    def version(self) -> str:
        """The library and version whose kernels run the models (step costs are cached per version)."""

    @abstractmethod
    def weights_label(self, dtype: str) -> str:
        """What the models' weights will be for a requested torch dtype (the step-cost key)."""

    def offered_by_auto(self, device: torch.device) -> bool:
        """Whether `--backend auto` measures this backend on `device` (every backend, by default)."""
        return True

    def settle(self, model: Any, name: str, reason: str) -> tuple["Backend", str]:
        """(backend, why) to run a model this backend loaded: itself, or another it falls back to."""
        return self, reason

    def batch(self, model: Any, vocab_size: int) -> Any:
        """A batched decoder over the model (only when `can_batch`)."""
        raise NotImplementedError(f"the {self.name} backend does not decode batches")

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


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
