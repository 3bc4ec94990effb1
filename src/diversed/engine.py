"""The speculative-decoding engine: rounds, KV caches, stopping, metrics (SPEC §2).

One round:
1. the draft proposes N tokens x_1..x_N ~ q autoregressively (KV-cached);
2. the target runs once over [last committed token] + x_1..x_N (KV-cached) -> p_1..p_{N+1};
3. the verifier accepts a prefix x_1..x_k; at the first rejection a *recovered* token is drawn
   from its residual, and if all N are accepted a *bonus* token is drawn from p_{N+1};
4. both caches are rolled back to the committed tokens.

Invariant between rounds: `committed` holds prompt + emitted tokens; the target's cache
holds all but the last committed token (the *pending* token, fed at the start of the next
round); the draft's cache holds a prefix of the committed tokens and catches up when it
drafts. The engine never looks inside a verifier: it asks for an acceptance table, a
residual, or the greedy rule (see `verifiers.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .errors import UserInputError
from .metrics import Metrics
from .sampling import SamplingParams, choose, logits_to_probs, sample, total_variation
from .verifiers import Verifier, emitted_distribution


@dataclass(frozen=True)
class GenerationConfig:
    """Everything about one generation except the method."""

    max_new_tokens: int = 128
    draft_length: int = 5
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer; see `generate`)
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    # Stop drafting early once the draft's probability of its own token falls below this
    # (Hugging Face's assistant_confidence_threshold). The stopping rule depends on the draft
    # alone, so every verifier keeps its guarantee; 0 always drafts N.
    draft_confidence: float = 0.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserInputError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.draft_length < 1:
            raise UserInputError(f"the draft length N must be >= 1, got {self.draft_length} (--draft-length)")
        if not 0 <= self.draft_confidence < 1:
            raise UserInputError(f"the draft confidence threshold must be in [0, 1), got {self.draft_confidence}")


class CachedModel:
    """A causal LM, its KV cache and how many tokens that cache holds."""

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

    def feed(self, tokens: list[int] | torch.Tensor, num_logits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `tokens` to the cache; logits and last-layer hidden states of the last `num_logits` positions.

        -> logits [num_logits, V] (float32), hidden [num_logits, H].
        """
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.device).reshape(1, -1)  # [1, T]
        hidden = self.body(input_ids=ids, cache=self.cache, use_cache=True).last_hidden_state[0]  # [T, H]
        if num_logits == 0:
            return hidden.new_zeros(0, self.vocab_size).float(), hidden[:0]
        last = hidden[-num_logits:]  # [num_logits, H]
        return self.lm_head(last)[:, : self.vocab_size].float(), last

    def rollback(self, length: int) -> None:
        """Drop cached positions beyond `length`."""
        extra = self.length - length
        if extra > 0:
            self.cache.crop(-extra)


@dataclass
class RoundOutcome:
    """What one round committed: the tokens and how many drafted tokens were accepted."""

    tokens: list[int]
    drafted: int
    accepted: int


def draft_block(
    draft: CachedModel,
    committed: list[int],
    n: int,
    params: SamplingParams,
    generator: torch.Generator | None,
    confidence: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draft up to n tokens (fewer when `confidence` stops it).

    -> drafted [n'], q [n', V] (what each was drawn from), draft hidden [n', H_d].
    """
    drafted, qs, hiddens = [], [], []
    pending: list[int] | torch.Tensor = committed[draft.length :]  # >= 1 token: the pending one
    for _ in range(n):
        logits, hidden = draft.feed(pending, 1)  # [1, V], [1, H_d]
        q = logits_to_probs(logits[0], params)  # [V]
        token = choose(q, params, generator)  # []
        drafted.append(token)
        qs.append(q)
        hiddens.append(hidden[0])
        if q[token] < confidence:
            break
        pending = token.reshape(1)
    return torch.stack(drafted), torch.stack(qs), torch.stack(hiddens)


def verify_block(
    verifier: Verifier,
    p: torch.Tensor,
    q: torch.Tensor,
    drafted: torch.Tensor,
    target_hidden: torch.Tensor,
    draft_hidden: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int, float]:
    """Verify n drafted tokens. p: [n+1, V] (last row for the bonus), q: [n, V], drafted: [n].

    -> (number accepted k, the recovered or bonus token, estimated bias over emitted positions).
    """
    n = drafted.shape[0]
    p_block = p[:n]  # [n, V]
    if verifier.needs_hidden_states:
        ctx = verifier.context(draft_hidden, target_hidden[:n])
    else:
        ctx = verifier.context(None, None)
    # Both tables serve twice: for the decision/recovery and for the bias of emitted positions.
    acceptance = verifier.acceptance(p_block, q, ctx)  # [n, V]
    residual = verifier.residual(p_block, q, ctx)  # [n, V]
    if params.greedy:
        accepted = verifier.greedy_accept(p_block, q, drafted, ctx)  # [n] bool
    else:
        accept_drafted = acceptance.gather(-1, drafted.unsqueeze(-1)).squeeze(-1)  # [n]
        accepted = torch.rand(n, generator=generator, device=p.device) < accept_drafted  # [n] bool
    rejected = (~accepted).nonzero()
    k = int(rejected[0]) if rejected.numel() else n
    if k < n:
        if params.greedy:
            next_token = int(verifier.greedy_recovery(p_block, q, ctx)[k])
        else:
            next_token = int(sample(residual[k], generator))  # recovered token
    else:
        next_token = int(choose(p[n], params, generator))  # bonus token from p_{N+1}
    m = min(k + 1, n)  # emitted positions: the accepted ones and the recovered one
    bias = float(total_variation(emitted_distribution(q[:m], acceptance[:m], residual[:m]), p_block[:m]).sum())
    return k, next_token, bias


def speculative_round(
    target: CachedModel,
    draft: CachedModel,
    verifier: Verifier,
    committed: list[int],
    n: int,
    params: SamplingParams,
    generator: torch.Generator | None,
    metrics: Metrics,
    confidence: float = 0.0,
) -> RoundOutcome:
    """Run one round (SPEC §2) and roll both caches back to the new committed length."""
    drafted, q, draft_hidden = draft_block(draft, committed, n, params, generator, confidence)
    n = drafted.shape[0]
    block = committed[target.length :] + drafted.tolist()  # [pending] + x_1..x_n
    logits, target_hidden = target.feed(block, n + 1)  # [n+1, V], [n+1, H_t]
    p = logits_to_probs(logits, params)  # [n+1, V]
    k, next_token, bias = verify_block(verifier, p, q, drafted, target_hidden, draft_hidden, params, generator)
    tokens = drafted[:k].tolist() + [next_token]
    metrics.record_round(drafted=n, accepted=k, bias=bias)
    new_length = len(committed) + len(tokens) - 1  # everything but the new pending token
    target.rollback(new_length)
    draft.rollback(min(draft.length, new_length))
    return RoundOutcome(tokens, n, k)


def autoregressive_step(
    target: CachedModel, committed: list[int], params: SamplingParams, generator: torch.Generator | None, metrics: Metrics
) -> RoundOutcome:
    """One target-only step (the `ar` baseline), counted as a round with nothing drafted."""
    logits, _ = target.feed(committed[target.length :], 1)
    token = int(choose(logits_to_probs(logits[0], params), params, generator))
    metrics.rounds += 1
    return RoundOutcome([token], 0, 0)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """The sampling generator, on the device the probabilities live on."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@torch.inference_mode()
def decode(
    target_model: Any,
    draft_model: Any | None,
    prompt_ids: list[int],
    verifier: Verifier | None,
    config: GenerationConfig,
    *,
    vocab_size: int,
    eos_token_ids: set[int] = frozenset(),
    metrics: Metrics | None = None,
) -> Iterator[list[int]]:
    """Yield the new tokens each round commits, until EOS or `max_new_tokens`.

    `verifier=None` decodes autoregressively with the target alone. `metrics` (if given) is
    updated in place as rounds complete; `new_tokens` and `seconds` are set at the end.
    EOS ends generation and is not yielded.
    """
    if not prompt_ids:
        raise UserInputError("the prompt is empty")
    metrics = metrics if metrics is not None else Metrics()
    started = time.perf_counter()
    params = config.sampling
    target = CachedModel(target_model, vocab_size)
    generator = make_generator(config.seed, target.device)
    draft = CachedModel(draft_model, vocab_size) if verifier is not None else None
    if verifier is not None and draft_model is None:
        raise UserInputError("speculative methods need a draft model")
    committed = list(prompt_ids)
    # Prefill everything but the pending last prompt token; no logits are needed yet.
    if len(committed) > 1:
        target.feed(committed[:-1], 0)
        if draft is not None:
            draft.feed(committed[:-1], 0)
    produced = 0
    try:
        while produced < config.max_new_tokens:
            remaining = config.max_new_tokens - produced
            if draft is None:
                outcome = autoregressive_step(target, committed, params, generator, metrics)
            else:
                # Never draft past the budget: a round emits at most n + 1 tokens.
                n = max(1, min(config.draft_length, remaining - 1))
                outcome = speculative_round(target, draft, verifier, committed, n, params, generator, metrics, config.draft_confidence)
            tokens = outcome.tokens[:remaining]
            eos_at = None if config.ignore_eos else next((i for i, t in enumerate(tokens) if t in eos_token_ids), None)
            if eos_at is not None:
                tokens = tokens[:eos_at]
            committed.extend(tokens)
            produced += len(tokens)
            metrics.new_tokens = produced
            metrics.seconds = time.perf_counter() - started
            if tokens:
                yield tokens
            if eos_at is not None:
                return
    finally:
        metrics.new_tokens = produced
        metrics.seconds = time.perf_counter() - started
