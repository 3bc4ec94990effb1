"""Proposers: where drafted tokens come from (one seam beside the round, as Hugging Face's
`CandidateGenerator` and llama.cpp's `common/speculative` have).

A proposer drafts up to n tokens after the committed ones and, after the round, hears how
many were committed (`rollback`, the feedback hook). Each kind of proposer is one registered
object (`ProposerKind`, `PROPOSERS` below) that says whether it needs a draft model, what a
draft step costs and which method suits it by default, and makes the proposer for a pair.
Two are built in, chosen by `--draft`:

- `model`: a small draft model (a runner), tokens sampled from its processed distribution q.
- `ngram`: prompt lookup (vLLM's ngram proposer, Hugging Face's `prompt_lookup_num_tokens`):
  the continuation of the longest recent n-gram match in prompt + output. Its q is a point
  mass at each drafted token (`probs is None`); the verifiers see it as one-hot rows, which
  is exact: `exact` accepts x with p(x), the static mixture becomes w p + (1 - w) delta_x.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Sequence

import torch

from .errors import UserInputError
from .runners import ModelRunner
from .runners.base import token_tensor
from .sampling import SamplingParams, choose, logits_to_probs


@dataclass
class Proposal:
    """What one proposer call drafted."""

    tokens: torch.Tensor  # [n'] drafted token ids (n' <= n; 0 when nothing matched)
    probs: torch.Tensor | None  # [n', V] the distributions they were drawn from; None: point masses
    hidden: torch.Tensor | None  # [n', H_d] draft last-layer hidden states (model proposer only)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class Proposer(Protocol):
    def prefill(self, tokens: Sequence[int]) -> None:
        """Before the first round: the prompt but its last token."""

    def propose(self, committed: Sequence[int], n: int, params: SamplingParams, generator: torch.Generator | None) -> Proposal:
        """Draft up to n tokens after `committed` (prompt + emitted tokens)."""

    def rollback(self, length: int) -> None:
        """Feedback after a round: the first `length` committed tokens are final."""


class ModelProposer:
    """A draft model drafting autoregressively through its runner (KV-cached)."""

    def __init__(self, runner: ModelRunner, vocab_size: int, confidence: float = 0.0):
        self.runner = runner
        self.vocab_size = vocab_size
        # Stop drafting early once the draft's probability of its own token falls below this
        # (Hugging Face's assistant_confidence_threshold); depends on the draft alone, so
        # every verifier keeps its guarantee.
        self.confidence = confidence

    def prefill(self, tokens: Sequence[int]) -> None:
        pass  # lazy: the first `propose` feeds the whole context, so rounds of N = 0 never pay for it

    def propose(self, committed, n, params, generator):
        drafted, qs, hiddens = [], [], []
        pending: Sequence[int] | torch.Tensor = committed[self.runner.length :]  # >= 1 token: the pending one
        for _ in range(n):
            logits, hidden = self.runner.feed(pending, 1)  # [1, V], [1, H_d] | None
            q = logits_to_probs(logits[0, : self.vocab_size], params)  # [V]
            token = choose(q, params, generator)  # []
            drafted.append(token)
            qs.append(q)
            if hidden is not None:
                hiddens.append(hidden[0])
            # Checked only when asked: reading q[token] syncs an accelerator every step.
            if self.confidence > 0 and q[token] < self.confidence:
                break
            pending = token.reshape(1)
        if not drafted:
            return Proposal(torch.zeros(0, dtype=torch.long), None, None)
        return Proposal(torch.stack(drafted), torch.stack(qs), torch.stack(hiddens) if hiddens else None)

    def rollback(self, length: int) -> None:
        self.runner.rollback(min(self.runner.length, length))


class NgramProposer:
    """Prompt lookup: find the longest suffix n-gram (max_ngram down to min_ngram) that also
    occurs earlier in the context, and propose the tokens that followed its latest occurrence."""

    def __init__(self, min_ngram: int = 1, max_ngram: int = 3, device: torch.device | str = "cpu"):
        if not 1 <= min_ngram <= max_ngram:
            raise UserInputError(f"n-gram sizes must satisfy 1 <= min <= max, got {min_ngram}, {max_ngram}")
        self.min_ngram, self.max_ngram, self.device = min_ngram, max_ngram, device

    def prefill(self, tokens: Sequence[int]) -> None:
        pass  # stateless: it reads the committed tokens every round

    def propose(self, committed, n, params, generator):
        continuation = lookup_continuation(list(committed), n, self.min_ngram, self.max_ngram)
        return Proposal(token_tensor(continuation, torch.device(self.device)), None, None)

    def rollback(self, length: int) -> None:
        pass  # stateless: it reads the committed tokens every round


def lookup_continuation(context: list[int], n: int, min_ngram: int, max_ngram: int) -> list[int]:
    """Up to n tokens following the latest earlier occurrence of the longest matching suffix."""
    for size in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        suffix = context[-size:]
        # Latest occurrence first: recent text predicts the continuation best.
        for start in range(len(context) - size - 1, -1, -1):
            if context[start : start + size] == suffix:
                follow = context[start + size : start + size + n]
                if follow:
                    return follow
    return []


def point_masses(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """One-hot rows: the draft distribution of a deterministic proposer. [n] -> [n, V] float32."""
    return torch.nn.functional.one_hot(tokens, vocab_size).to(torch.float32)


class ProposerKind(ABC):
    """One kind of proposer, as the registry names it: what it needs and what it costs.

    `pair` arguments are `models.ModelPair`s (typed loosely: this module sits below models.py).
    """

    name: ClassVar[str]
    #: True when drafting runs the pair's draft model (the pair must load one).
    needs_draft_model: ClassVar[bool]
    #: The method used when the user names none (a spec string) and one sentence saying why.
    default_method: ClassVar[str]
    default_reason: ClassVar[str]

    @abstractmethod
    def make(self, pair: Any, draft_confidence: float) -> Proposer:
        """A proposer drafting for this pair."""

    @abstractmethod
    def draft_seconds(self, measured: float | None) -> float:
        """c, the cost of one draft step, from the measured draft-model step (None: not measured)."""

    @abstractmethod
    def missing_hidden_states(self, pair: Any) -> str | None:
        """Why its proposals carry no draft hidden states (completing "needs ..."), or None when they do."""


class DraftModelProposer(ProposerKind):
    name: ClassVar[str] = "model"
    needs_draft_model: ClassVar[bool] = True
    # Issue 23's written rule (docs/results/confirmatory/PLAN.md): the default is lossless unless
    # the confirmatory run shows a relaxed method non-inferior to exact on every task; none was.
    default_method: ClassVar[str] = "exact"
    default_reason: ClassVar[str] = ("no relaxed method was shown to keep quality within 0.05 of exact on every task "
                                     "(docs/results/confirmatory/results.md); using --method exact, which is lossless")

    def make(self, pair, draft_confidence):
        return ModelProposer(pair.runner("draft"), pair.vocab_size, draft_confidence)

    def draft_seconds(self, measured):
        return measured if measured is not None else 0.0

    def missing_hidden_states(self, pair):
        if pair.draft is None or pair.backend.returns_hidden_states:
            return None
        return f"hidden states, which the {pair.backend.name} backend does not return"


class PromptLookupProposer(ProposerKind):
    name: ClassVar[str] = "ngram"
    needs_draft_model: ClassVar[bool] = False
    # Issue 23's rule over the static weights alone: point-mass drafts (max q = 1) pass the
    # cascade's confidence rule and the KL gate's wholesale.
    default_method: ClassVar[str] = "exact"
    default_reason: ClassVar[str] = ("no static weight was shown to keep quality within 0.05 of exact on every task "
                                     "(docs/results/confirmatory/results.md); using --method exact, which is lossless")

    def make(self, pair, draft_confidence):
        return NgramProposer(device=pair.device)

    def draft_seconds(self, measured):
        return 0.0  # a lookup in the committed tokens: nothing runs

    def missing_hidden_states(self, pair):
        return "the draft model's hidden states; prompt-lookup drafting (--draft ngram) has none"


DRAFT_MODEL = DraftModelProposer()
#: Every proposer kind by name: `--draft NAME` picks one that needs no draft model; any other
#: `--draft` value is a draft model's spec.
PROPOSERS: dict[str, ProposerKind] = {kind.name: kind for kind in (DRAFT_MODEL, PromptLookupProposer())}


def get_proposer(name: str) -> ProposerKind:
    if name not in PROPOSERS:
        raise UserInputError(f"unknown proposer {name!r}; choose one of {', '.join(PROPOSERS)} (--draft)")
    return PROPOSERS[name]


def proposer_for_draft(draft: str | None) -> ProposerKind:
    """The proposer a `--draft` value names: a model-free proposer by its name, else the draft model."""
    kind = PROPOSERS.get(draft) if draft is not None else None
    return kind if kind is not None and not kind.needs_draft_model else DRAFT_MODEL
