"""Lockstep evaluation: the engine's law of completions and round records, many at once.

What a speculative method emits, and its round record (accepted / recovered / bonus tokens,
docs/method.md §6), depend only on p_t and q_t at the prefixes it emits: a round drafts
x_i ~ q_i and accepts it with probability a(x_i); the first rejection emits a **recovered**
token from the residual and ends the round (the draft tokens after it are never looked at);
after N **accepted** tokens the round emits a **bonus** token from p. So the same process can
be walked one token at a time: both models step once per emitted token, and each row (one
method on one prompt) plays its round: draft, accept or recover, bonus. Every token has the
same law as in `engine.decode`, and the counts in `Metrics` mean the same
(tests/test_lockstep.py enumerates the joint law of tokens and accept counts and checks
both against it).

What it buys: a batch of rows shares one forward pass per token (`ModelPair.batch`),
waiting rows take the places of finished ones (the batch stays full), and the rows of one
prompt share its prefill, so an evaluation of many methods runs several
times faster on a CPU than generation by generation. What it cannot say: speed. Every token
costs a step of both models, so a row's `seconds` is its share of batch time (what the row
cost the evaluation, `_charge`), not a method's decoding speed; eval rows say `lockstep: true`
and summaries leave their speeds empty.

Differences from the engine, all in the last round of a completion: a round that accepts EOS
ends there (the engine goes on verifying the draft tokens proposed after EOS, which can add
to that round's accepted count), and stop strings are looked for after every round, as the
engine does, so a round that runs past one is cut the same way.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from ..draft_length import FixedDraftLength
from ..engine import GenerationConfig, make_generator
from ..errors import UserInputError
from ..generation import GenerationResult, IncrementalText, first_stop
from ..metrics import Metrics
from ..models import ModelPair
from ..proposers import DRAFT_MODEL, get_proposer
from ..runners import Backend, batch_backend
from ..runners.base import left_pad
from ..sampling import logits_to_probs, sample, total_variation
from ..verifiers import Verifier


@dataclass(frozen=True)
class LockstepRow:
    """One generation to run: a prompt, its method's verifier (None: `ar`) and its seed."""

    key: Any  # the caller's name for the row, returned with its result
    prompt_ids: tuple[int, ...]
    verifier: Verifier | None
    method: str
    seed: int


@dataclass
class _RowState:
    """A row mid-generation: its tokens, its text and the round it is in."""

    row: LockstepRow
    generator: torch.Generator
    text: IncrementalText
    metrics: Metrics = field(default_factory=Metrics)  # its `seconds`: the row's share of batch time (`_charge`)
    ids: list[int] = field(default_factory=list)
    drafted: int = 0  # N of the round in progress; 0 between rounds
    accepted: int = 0  # tokens accepted so far in this round
    bias: float = 0.0  # this round's estimated bias so far
    finish_reason: str | None = None
    cut: int | None = None  # where a stop string begins in the text

    def end_round(self) -> None:
        if self.drafted:
            self.metrics.record_round(self.drafted, self.accepted, self.bias)
        self.drafted = self.accepted = 0
        self.bias = 0.0


DEFAULT_BATCH = 64  # rows a step; docs/performance.md ("Lockstep batches") has the measurement behind it


def lockstep_refusal(backend: Backend, config: GenerationConfig) -> str | None:
    """Why lockstep evaluation cannot run `config` on `backend` (one line), or None when it can: the
    engine's law is then the same, batched."""
    if not backend.can_batch:
        return (f"lockstep evaluation runs on a backend that decodes batches ({batch_backend().name}; this pair uses "
                f"{backend.name}); pass --backend {batch_backend().name}")
    if config.sampling.greedy:
        return "lockstep evaluation samples (temperature > 0); greedy methods are deterministic, evaluate them without --lockstep"
    if not isinstance(config.draft_length, int):
        return "lockstep evaluation needs a fixed --draft-length N (speed-driven 'auto' means nothing without timing)"
    if config.draft_confidence or get_proposer(config.proposer) is not DRAFT_MODEL or config.bias_budget is not None:
        return "lockstep evaluation supports the draft model proposer without --draft-confidence or --bias-budget"
    return None


def check_lockstep(pair: ModelPair, config: GenerationConfig) -> None:
    """Refuse what lockstep evaluation cannot do, with one line each."""
    refusal = lockstep_refusal(pair.backend, config)
    if refusal is not None:
        raise UserInputError(refusal)


def lockstep_generate(
    pair: ModelPair, rows: Sequence[LockstepRow], config: GenerationConfig, *, batch_size: int = DEFAULT_BATCH
) -> Iterator[tuple[LockstepRow, GenerationResult]]:
    """Generate every row, up to `batch_size` rows at once; yield (row, result) as each finishes.

    Rows join in the order given, and as rows finish, waiting rows take their places, so the
    batch stays nearly full (a CPU's matrix products cost less per row in a fuller batch). Rows
    that share a prompt should be adjacent: they join together, prefill their prompt once and
    copy its cache. `config.seed` is ignored; each row brings its own, so the rows beside it
    change a row's rounding, never its law.
    """
    check_lockstep(pair, config)
    if batch_size < 1:
        raise UserInputError(f"the lockstep batch size must be at least 1, not {batch_size}")
    waiting = deque(rows)
    # Each join copies the whole cache once, so wait until a few places are free.
    refill_at = max(1, batch_size // 8)
    batch = _Batch(pair, config)
    while waiting or batch.states:
        free = batch_size - len(batch.states)
        joining = _take(waiting, free, into_empty=not batch.states) if waiting and free >= min(refill_at, len(waiting)) else []
        if joining:
            batch.join(joining)
        yield from batch.step()


def _take(waiting: deque[LockstepRow], free: int, *, into_empty: bool) -> list[LockstepRow]:
    """The waiting rows that join now: whole runs of adjacent rows that share a prompt, as many
    as fit in `free` places (so a prompt is prefilled once, not once per join); into an empty
    batch, the first `free` rows however they split."""
    taken: list[LockstepRow] = []
    while waiting:
        run = 1
        while run < len(waiting) and waiting[run].prompt_ids == waiting[0].prompt_ids:
            run += 1
        if len(taken) + run > free:
            break
        taken += [waiting.popleft() for _ in range(run)]
    if not taken and into_empty:
        taken = [waiting.popleft() for _ in range(min(free, len(waiting)))]
    return taken


class _Batch:
    """The rows decoding together, each model's KV cache over them, and each row's next-token outputs.

    Caches are left-padded: `mask` [A, cached] marks each row's real positions (0 = padding)
    and `positions` [A, 1] each row's last position.
    """

    def __init__(self, pair: ModelPair, config: GenerationConfig):
        self.pair, self.config = pair, config
        self.eos = set() if config.ignore_eos else set(pair.eos_token_ids)
        self.policy = FixedDraftLength(int(config.draft_length))
        self.states: list[_RowState] = []

    def join(self, rows: Sequence[LockstepRow]) -> None:
        """Prefill `rows`' distinct prompts once each and append the rows to the batch (the time is theirs)."""
        started = time.perf_counter()
        states = self._join(rows)
        _charge(states, time.perf_counter() - started)

    @torch.inference_mode()
    def _join(self, rows: Sequence[LockstepRow]) -> list[_RowState]:
        pair, device = self.pair, self.pair.device
        prompts = list(dict.fromkeys(row.prompt_ids for row in rows))  # distinct prompts, in order
        ids, mask, positions = left_pad(prompts, device)  # [P, L] each
        copies = torch.tensor([prompts.index(row.prompt_ids) for row in rows], device=device)  # [B] prompt of each row
        models = [pair.batch("target"), pair.batch("draft")]
        outputs = [model.feed(ids, mask, positions) for model in models]  # prefill: (logits [P, V], hidden [P, H]) per model
        for model in models:
            model.keep(copies)  # one cached copy of its prompt per row
        outputs = [(logits[copies], hidden[copies]) for logits, hidden in outputs]  # [B, V], [B, H]
        mask, positions = mask[copies], positions[copies][:, -1:]  # [B, L], [B, 1]
        states = [_RowState(row, make_generator(row.seed), IncrementalText(pair.tokenizer)) for row in rows]
        if not self.states:
            self.models, self.outputs, self.mask, self.positions, self.states = models, outputs, mask, positions, states
            return states
        padding = int((self.mask.cumsum(-1) == 0).all(0).sum())  # leading positions no row attends to any more
        for mine, theirs in zip(self.models, models):
            mine.drop_front(padding)
            mine.absorb(theirs)
        self.mask = _join_masks(self.mask[:, padding:], mask)
        self.positions = torch.cat([self.positions, positions])
        self.outputs = [(torch.cat([a, c]), torch.cat([b, d])) for (a, b), (c, d) in zip(self.outputs, outputs)]
        self.states += states
        return states

    @torch.inference_mode()
    def step(self) -> Iterator[tuple[LockstepRow, GenerationResult]]:
        """Every row emits one token; feed the continuing rows' tokens, then yield the rows that finished.

        Time is charged to the rows it served: the sampling to every row, the feed to the rows it continues.
        """
        started = time.perf_counter()
        params, config = self.config.sampling, self.config
        (target_logits, target_hidden), (draft_logits, draft_hidden) = self.outputs
        p = logits_to_probs(target_logits, params)  # [A, V]
        q = logits_to_probs(draft_logits, params)  # [A, V]
        tokens = _step(self.states, p, q, target_hidden, draft_hidden, self.policy, config)  # [A]
        for state, token in zip(self.states, tokens):
            _commit(state, token, self.eos, config)
        _charge(self.states, time.perf_counter() - started)
        finished = [state.finish_reason is not None for state in self.states]
        results = [(state.row, _result(state, config)) for state, done in zip(self.states, finished) if done]
        if all(finished):
            self.states = []
        else:
            started = time.perf_counter()
            self._feed(tokens, finished)
            _charge(self.states, time.perf_counter() - started)
        yield from results

    def _feed(self, tokens: list[int], finished: list[bool]) -> None:
        """Drop the finished rows and feed the others their new tokens (outputs for the next step)."""
        if any(finished):  # finished rows leave the batch
            keep = torch.tensor([i for i, done in enumerate(finished) if not done], device=self.pair.device)  # [A']
            for model in self.models:
                model.keep(keep)
            self.states = [state for state, done in zip(self.states, finished) if not done]
            tokens, self.mask, self.positions = [tokens[i] for i in keep.tolist()], self.mask[keep], self.positions[keep]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.states), 1)], dim=-1)  # [A, cached + 1]
        self.positions = self.positions + 1  # [A, 1]
        step_ids = torch.tensor(tokens, device=self.pair.device)[:, None]  # [A, 1]
        self.outputs = [model.feed(step_ids, self.mask, self.positions) for model in self.models]


def _charge(states: Sequence[_RowState], seconds: float) -> None:
    """Split `seconds` of batch time evenly over the rows it served."""
    for state in states:
        state.metrics.seconds += seconds / len(states)


def _join_masks(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Masks [A, L1] and [B, L2] as one [A + B, max(L1, L2)], the shorter left-padded with 0."""
    length = max(first.shape[1], second.shape[1])
    pad = lambda mask: torch.nn.functional.pad(mask, (length - mask.shape[1], 0))  # noqa: E731
    return torch.cat([pad(first), pad(second)])


def _step(states: list[_RowState], p, q, target_hidden, draft_hidden, policy: FixedDraftLength, config: GenerationConfig) -> list[int]:
    """Each row's next token, its round advanced. p, q: [A, V]; hidden: [A, H_t], [A, H_d]."""
    params = config.sampling
    tokens: list[int] = [0] * len(states)
    drafting: dict[int, list[int]] = {}  # id(verifier) -> rows at a drafted position
    for i, state in enumerate(states):
        verifier = state.row.verifier
        if verifier is not None and state.drafted == 0:  # a round starts
            state.drafted = policy.choose(config.max_new_tokens - len(state.ids))
        if verifier is None or state.accepted == state.drafted:
            # `ar`, or the bonus token after a fully accepted round: from p.
            tokens[i] = int(sample(p[i], state.generator))
            if verifier is None:
                state.metrics.record_round(drafted=0, accepted=0, bias=0.0)
            else:
                state.end_round()
        else:
            drafting.setdefault(id(verifier), []).append(i)
    for rows in drafting.values():
        verifier = states[rows[0]].row.verifier
        index = torch.tensor(rows, device=p.device)  # [n]
        hidden = (draft_hidden[index], target_hidden[index]) if verifier.needs_hidden_states else (None, None)
        tables = verifier.tables(p[index], q[index], verifier.context(*hidden))  # each [n, V]
        emitted_bias = total_variation(tables.emitted, p[index])  # [n]
        for j, i in enumerate(rows):
            state = states[i]
            drafted = int(sample(q[i], state.generator))  # the draft's token at this position
            accept = torch.rand((), generator=state.generator, dtype=torch.float64, device=p.device) < tables.acceptance[j, drafted]
            state.bias += float(emitted_bias[j])
            if accept:
                tokens[i] = drafted
                state.accepted += 1
            else:
                tokens[i] = int(sample(tables.residual[j], state.generator))  # recovered token
                state.end_round()
    return tokens


def _commit(state: _RowState, token: int, eos: set[int], config: GenerationConfig) -> None:
    """Append a token; decide whether the row is done (EOS, budget, or a stop string after a round)."""
    if token in eos:
        state.end_round()  # an accepted EOS ends its round
        state.finish_reason = "stop"
        return
    state.ids.append(token)
    state.text.extend([token])
    if state.drafted == 0:  # a round just ended: look for stop strings, as the engine does per round
        state.cut = first_stop(state.text.text, config.stop)
        if state.cut is not None:
            state.finish_reason = "stop"
            return
    if len(state.ids) >= config.max_new_tokens:
        state.end_round()
        state.cut = first_stop(state.text.text, config.stop)
        state.finish_reason = "stop" if state.cut is not None else "length"


def _result(state: _RowState, config: GenerationConfig) -> GenerationResult:
    state.metrics.new_tokens = len(state.ids)
    text = state.text.text if state.cut is None else state.text.text[: state.cut]
    return GenerationResult(text, list(state.ids), state.row.method, state.metrics, state.finish_reason)
