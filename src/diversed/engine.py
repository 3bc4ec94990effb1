"""The speculative-decoding engine: rounds, KV caches, stopping, metrics (docs/method.md §2).

One round:
1. the proposer drafts N tokens x_1..x_N ~ q (a draft model, KV-cached, or prompt lookup);
2. the target runs once over [last committed token] + x_1..x_N (KV-cached) -> p_1..p_{N+1};
3. the verifier accepts a prefix x_1..x_k; at the first rejection a *recovered* token is drawn
   from its residual, and if all N are accepted a *bonus* token is drawn from p_{N+1};
4. both caches are rolled back to the committed tokens.

Steps 1-3 stay on the models' device: the round reads what it decided (the accepted count,
the next token, the bias, the drafted tokens) in one host read, so a GPU is waited for once
per round (docs/performance.md, "On a GPU").

N = 0 is a plain target step. N comes from a draft-length policy (fixed, or `auto`:
`draft_length.py`) that sees only earlier rounds.

Invariant between rounds: `committed` holds prompt + emitted tokens; the target's cache
holds all but the last committed token (the *pending* token, fed at the start of the next
round); the draft's cache holds a prefix of the committed tokens and catches up when it
drafts. The engine never looks inside a verifier, a runner or a proposer: it asks a verifier
for its tables (`verifiers.py`), a runner to feed or roll back (`runners/`), a proposer for a
draft (`proposers.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .draft_length import DraftLengthPolicy, FixedDraftLength
from .errors import UserInputError
from .metrics import Metrics
from .proposers import Proposer, get_proposer, point_masses
from .runners import ModelRunner
from .runners.base import token_tensor
from .sampling import SamplingParams, choose, logits_to_probs, sample, total_variation
from .verifiers import Exact, Verifier

AUTO = "auto"


@dataclass(frozen=True)
class GenerationConfig:
    """Everything about one generation except the method."""

    max_new_tokens: int = 128
    draft_length: int | str = 5  # N, or "auto" (cost-aware, up to max_draft_length; draft_length.py)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer; see `generate`)
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    # Stop drafting early once the draft's probability of its own token falls below this
    # (Hugging Face's assistant_confidence_threshold). The stopping rule depends on the draft
    # alone, so every verifier keeps its guarantee; 0 always drafts N.
    draft_confidence: float = 0.0
    max_draft_length: int = 8  # N_max for draft_length="auto"
    proposer: str = "model"  # where drafts come from: a registered proposer kind (proposers.PROPOSERS)
    # Once a response's estimated bias reaches this, the rest is verified exactly (None: no budget).
    bias_budget: float | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserInputError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.draft_length != AUTO and not (isinstance(self.draft_length, int) and self.draft_length >= 1):
            raise UserInputError(f"the draft length N must be >= 1 or 'auto', got {self.draft_length!r} (--draft-length)")
        if not 1 <= self.max_draft_length <= 64:
            raise UserInputError(f"the maximum draft length must be in [1, 64], got {self.max_draft_length}")
        if not 0 <= self.draft_confidence < 1:
            raise UserInputError(f"the draft confidence threshold must be in [0, 1), got {self.draft_confidence}")
        get_proposer(self.proposer)  # an unknown name is a one-line error here, before anything loads
        if self.bias_budget is not None and not self.bias_budget >= 0:
            raise UserInputError(f"the bias budget must be >= 0, got {self.bias_budget} (--bias-budget)")

    @property
    def longest_draft(self) -> int:
        """The most tokens one round may draft."""
        return self.max_draft_length if self.draft_length == AUTO else int(self.draft_length)


@dataclass
class RoundOutcome:
    """What one round committed: the tokens and how many drafted tokens were accepted."""

    tokens: list[int]
    drafted: int
    accepted: int


def verify_block(
    verifier: Verifier,
    p: torch.Tensor,
    q: torch.Tensor,
    drafted: torch.Tensor,
    target_hidden: torch.Tensor | None,
    draft_hidden: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify n drafted tokens. p: [n+1, V] (last row for the bonus), q: [n, V], drafted: [n].

    -> 0-dim tensors on p's device, never read here (the round reads them once): the number
    accepted k, the recovered or bonus token, and the estimated bias over emitted positions.
    """
    n = drafted.shape[0]
    p_block = p[:n]  # [n, V]
    if verifier.needs_hidden_states:
        ctx = verifier.context(draft_hidden, target_hidden[:n])
    else:
        ctx = verifier.context(None, None)
    tables = verifier.tables(p_block, q, ctx)  # acceptance, residual, emitted: each [n, V], computed once
    if params.greedy:
        accepted = verifier.greedy_accept(p_block, q, drafted, ctx)  # [n] bool
    else:
        accept_drafted = tables.acceptance.gather(-1, drafted.unsqueeze(-1)).squeeze(-1)  # [n]
        accepted = torch.rand(n, generator=generator, device=p.device) < accept_drafted  # [n] bool
    k = accepted.long().cumprod(0).sum()  # []: the accepted prefix
    rejected = k < n  # []: a recovered token ends the round, else a bonus token from p_{N+1}
    row = k.clamp_max(n - 1).reshape(1)  # [1]: the first rejected position (if any)
    # One draw from the row the outcome needs, chosen on the device: the same single uniform
    # the recovered or the bonus token would take, so seeded outputs do not change.
    if params.greedy:
        recovered = verifier.greedy_recovery(p_block, q, ctx).index_select(0, row)[0]
        next_token = torch.where(rejected, recovered, p[n].argmax(-1))
    else:
        next_token = sample(torch.where(rejected, tables.residual.index_select(0, row)[0], p[n]), generator)
    emitted = torch.arange(n, device=p.device) <= k  # [n]: the accepted positions and the recovered one
    bias = (total_variation(tables.emitted, p_block) * emitted).sum()
    return k, next_token, bias


@dataclass
class RoundClock:
    """Seconds spent drafting and in target forwards; the rest of a round is 'other'.

    `forwards[k]` also keeps the seconds of each round's k-token target forward (prompt
    prefills aside): what calibration measures as v(k), so cached costs can be checked
    against what generation took (`calibration.correct_costs`).
    """

    draft: float = 0.0
    target: float = 0.0
    forwards: dict[int, list[float]] = field(default_factory=dict)

    def target_forward(self, tokens: int, seconds: float) -> None:
        self.target += seconds
        self.forwards.setdefault(tokens, []).append(seconds)


def speculative_round(
    target: ModelRunner,
    proposer: Proposer,
    verifier: Verifier,
    committed: list[int],
    n: int,
    params: SamplingParams,
    generator: torch.Generator | None,
    metrics: Metrics,
    clock: RoundClock | None = None,
) -> RoundOutcome:
    """Run one round and roll both caches back to the new committed length."""
    clock = clock if clock is not None else RoundClock()
    started = time.perf_counter()
    proposal = proposer.propose(committed, n, params, generator)
    drafted_at = time.perf_counter()
    clock.draft += drafted_at - started
    n = len(proposal)
    drafted = proposal.tokens  # [n], on the device
    pending = token_tensor(committed[target.length :], target.device)  # the pending token
    logits, target_hidden = target.feed(torch.cat([pending, drafted.to(target.device)]), n + 1)  # [n+1, V], [n+1, H_t] | None
    clock.target_forward(n + 1, time.perf_counter() - drafted_at)
    p = logits_to_probs(logits, params)  # [n+1, V]
    if n == 0:  # nothing drafted (prompt lookup found no match): a plain target step
        k, next_token, bias = p.new_zeros((), dtype=torch.long), choose(p[0], params, generator), p.new_zeros(())
    else:
        q = proposal.probs if proposal.probs is not None else point_masses(drafted, p.shape[-1]).to(p.device)  # [n, V]
        k, next_token, bias = verify_block(verifier, p, q, drafted.to(p.device), target_hidden, proposal.hidden, params, generator)
    # The round's one host sync: everything it decided, read together (ids are exact in float64).
    summary = torch.cat([torch.stack([k, next_token]).double(), bias.double().reshape(1), drafted.to(p.device).double()])
    k_host, token_host, bias_host, *drafted_host = summary.tolist()
    k = int(k_host)
    tokens = [int(t) for t in drafted_host[:k]] + [int(token_host)]
    metrics.record_round(drafted=n, accepted=k, bias=bias_host)
    new_length = len(committed) + len(tokens) - 1  # everything but the new pending token
    target.rollback(new_length)
    proposer.rollback(new_length)
    return RoundOutcome(tokens, n, k)


def autoregressive_step(
    target: ModelRunner,
    committed: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
    metrics: Metrics,
    clock: RoundClock | None = None,
) -> RoundOutcome:
    """One target-only step (the `ar` baseline, or N = 0), counted as a round with nothing drafted."""
    started = time.perf_counter()
    fed = committed[target.length :]
    logits, _ = target.feed(fed, 1)
    if clock is not None:
        clock.target_forward(len(fed), time.perf_counter() - started)
    token = int(choose(logits_to_probs(logits[0], params), params, generator))
    metrics.record_round(drafted=0, accepted=0, bias=0.0)
    return RoundOutcome([token], 0, 0)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """The sampling generator, on the device the probabilities live on."""
    if seed is not None and not -(1 << 63) <= seed < (1 << 64):  # what torch.Generator.manual_seed takes
        raise UserInputError(f"the seed must be in [-2**63, 2**64), got {'a number' if abs(seed) > 1 << 80 else seed}")
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@torch.inference_mode()
def decode(
    target: ModelRunner,
    proposer: Proposer | None,
    prompt_ids: list[int],
    verifier: Verifier | None,
    config: GenerationConfig,
    *,
    eos_token_ids: set[int] = frozenset(),
    metrics: Metrics | None = None,
    policy: DraftLengthPolicy | None = None,
    clock: RoundClock | None = None,
) -> Iterator[list[int]]:
    """Yield the new tokens each round commits, until EOS or `max_new_tokens`.

    `verifier=None` decodes autoregressively with the target alone. `policy` picks N each
    round (default: the fixed `config.draft_length`). `metrics` (if given) is updated in
    place as rounds complete; `new_tokens`, `seconds` and the time split are set at the end.
    `clock` (if given) receives the time split and each round's target forward.
    EOS ends generation and is not yielded.
    """
    if not prompt_ids:
        raise UserInputError("the prompt encodes to no tokens: this model's tokenizer dropped all of its characters")
    if verifier is not None and proposer is None:
        raise UserInputError("speculative methods need a draft model or a proposer (--draft)")
    if policy is None:
        if config.draft_length == AUTO:
            raise UserInputError("draft length 'auto' needs measured step costs (use generation.start_generation)")
        policy = FixedDraftLength(int(config.draft_length))
    metrics = metrics if metrics is not None else Metrics()
    started = time.perf_counter()
    clock = clock if clock is not None else RoundClock()
    params = config.sampling
    generator = make_generator(config.seed, target.device)
    committed = list(prompt_ids)
    # Prefill everything but the pending last prompt token; no logits are needed yet.
    if len(committed) > 1:
        prefill_started = time.perf_counter()
        target.feed(committed[:-1], 0)
        clock.target += time.perf_counter() - prefill_started
        if verifier is not None:
            prefill_started = time.perf_counter()
            proposer.prefill(committed[:-1])
            clock.draft += time.perf_counter() - prefill_started
    produced = 0
    active = verifier
    try:
        while produced < config.max_new_tokens:
            remaining = config.max_new_tokens - produced
            if config.bias_budget is not None and active is not None and metrics.estimated_bias >= config.bias_budget:
                active = Exact()  # the budget is spent: the rest follows p exactly
            n = policy.choose(remaining) if active is not None else 0
            if n == 0:
                outcome = autoregressive_step(target, committed, params, generator, metrics, clock)
            else:
                outcome = speculative_round(target, proposer, active, committed, n, params, generator, metrics, clock)
                policy.observe(outcome.drafted, outcome.accepted)
            tokens = outcome.tokens[:remaining]
            eos_at = None if config.ignore_eos else next((i for i, t in enumerate(tokens) if t in eos_token_ids), None)
            if eos_at is not None:
                tokens = tokens[:eos_at]
            committed.extend(tokens)
            produced += len(tokens)
            _stamp(metrics, produced, started, clock)
            if tokens:
                yield tokens
            if eos_at is not None:
                return
    finally:
        _stamp(metrics, produced, started, clock)


def _stamp(metrics: Metrics, produced: int, started: float, clock: RoundClock) -> None:
    metrics.new_tokens = produced
    metrics.seconds = time.perf_counter() - started
    metrics.draft_seconds = clock.draft
    metrics.target_seconds = clock.target
