"""Lockstep decoding: the engine's law of completions and round records, many sequences at once.

What a speculative method emits, and its round record (accepted / recovered / bonus tokens,
docs/method.md §6), depend only on p_t and q_t at the prefixes it emits: a round drafts
x_i ~ q_i and accepts it with probability a(x_i); the first rejection emits a **recovered**
token from the residual and ends the round (the draft tokens after it are never looked at);
after N **accepted** tokens the round emits a **bonus** token from p. So the same process can
be walked one token at a time: both models step once per emitted token, and each row (one
method on one prompt) plays its round: draft, accept or recover, bonus. Every token has the
same law as in `engine.decode`, and the counts in `Metrics` mean the same
(tests/test_lockstep.py enumerates the joint law of tokens and accept counts and checks
both against it). Greedy rows (T = 0) take the verifier's greedy rule, as the engine does.

What it buys: a batch of rows shares one forward pass per token (`ModelPair.batch`), rows
join and leave between steps (evaluation keeps the batch full, the server admits requests
as they come), and rows that share a prompt share its prefill. What it cannot say: a
method's decoding speed. Every token costs a step of both models, so a row's `seconds` is
its share of batch time (`_charge`).

Differences from the engine, all in the last round of a completion: a round that accepts EOS
ends there (the engine goes on verifying the draft tokens proposed after EOS, which can add
to that round's accepted count), and stop strings are looked for after every round, as the
engine does, so a round that runs past one is cut the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .draft_length import FixedDraftLength
from .engine import GenerationConfig, make_generator
from .errors import UserInputError
from .generation import GenerationResult, IncrementalText, first_stop
from .metrics import Metrics
from .models import ModelPair
from .proposers import DRAFT_MODEL, get_proposer
from .runners import Backend, batch_backend
from .runners.base import left_pad
from .sampling import choose, logits_to_probs, sample, total_variation
from .verifiers import Verifier


@dataclass(frozen=True)
class LockstepRow:
    """One generation to run: a prompt, its method's verifier (None: `ar`) and its seed."""

    key: Any  # the caller's name for the row, returned with its result
    prompt_ids: tuple[int, ...]
    verifier: Verifier | None
    method: str
    seed: int


def lockstep_refusal(backend: Backend, config: GenerationConfig, *, greedy_ok: bool = False) -> str | None:
    """Why lockstep decoding cannot run `config` on `backend` (one line), or None when it can: the
    engine's law is then the same, batched. Evaluation leaves out greedy rows (`greedy_ok`):
    they are deterministic, and one engine run says everything about them."""
    if not backend.can_batch:
        return (f"lockstep evaluation runs on a backend that decodes batches ({batch_backend().name}; this pair uses "
                f"{backend.name}); pass --backend {batch_backend().name}")
    if config.sampling.greedy and not greedy_ok:
        return "lockstep evaluation samples (temperature > 0); greedy methods are deterministic, evaluate them without --lockstep"
    if not isinstance(config.draft_length, int):
        return "lockstep evaluation needs a fixed --draft-length N (speed-driven 'auto' means nothing without timing)"
    if config.draft_confidence or get_proposer(config.proposer) is not DRAFT_MODEL or config.bias_budget is not None:
        return "lockstep evaluation supports the draft model proposer without --draft-confidence or --bias-budget"
    return None


@dataclass
class RowState:
    """A row mid-generation: its settings, tokens, text and the round it is in."""

    row: LockstepRow
    config: GenerationConfig  # its own: rows of one batch may differ in sampling, budget, stops and N
    generator: torch.Generator
    text: IncrementalText
    metrics: Metrics = field(default_factory=Metrics)  # its `seconds`: the row's share of batch time (`_charge`)
    ids: list[int] = field(default_factory=list)
    drafted: int = 0  # N of the round in progress; 0 between rounds
    accepted: int = 0  # tokens accepted so far in this round
    bias: float = 0.0  # this round's estimated bias so far
    finish_reason: str | None = None  # "stop", "length", or "left" (the caller took the row out)
    cut: int | None = None  # where a stop string begins in the text

    @property
    def context(self) -> tuple[int, ...]:
        """What the models have read: the prompt and the tokens emitted so far."""
        return self.row.prompt_ids + tuple(self.ids)

    def end_round(self) -> None:
        if self.drafted:
            self.metrics.record_round(self.drafted, self.accepted, self.bias)
        self.drafted = self.accepted = 0
        self.bias = 0.0

    def result(self) -> GenerationResult:
        self.metrics.new_tokens = len(self.ids)
        text = self.text.text if self.cut is None else self.text.text[: self.cut]
        return GenerationResult(text, list(self.ids), self.row.method, self.metrics, self.finish_reason or "length")


def new_state(pair: ModelPair, row: LockstepRow, config: GenerationConfig) -> RowState:
    return RowState(row, config, make_generator(row.seed), IncrementalText(pair.tokenizer))


class Batch:
    """The rows decoding together, each model's KV cache over them, and each row's next-token outputs.

    Caches are left-padded: `mask` [A, cached] marks each row's real positions (0 = padding)
    and `positions` [A, 1] each row's last position. A row joins with its context (prompt and
    any tokens already emitted: a generation started elsewhere can move in between rounds).
    """

    def __init__(self, pair: ModelPair):
        self.pair = pair
        self.eos = frozenset(pair.eos_token_ids)
        self.states: list[RowState] = []

    def join(self, states: Sequence[RowState]) -> None:
        """Prefill `states`' distinct contexts once each and append the rows to the batch (the time is theirs)."""
        started = time.perf_counter()
        self._join(states)
        _charge(states, time.perf_counter() - started)

    @torch.inference_mode()
    def _join(self, states: Sequence[RowState]) -> None:
        pair, device = self.pair, self.pair.device
        contexts = list(dict.fromkeys(state.context for state in states))  # distinct contexts, in order
        copies = torch.tensor([contexts.index(state.context) for state in states], device=device)  # [B] context of each row
        models = [pair.batch("target"), pair.batch("draft")]
        outputs, mask, positions = _prefill(models, contexts, device)  # (logits [P, V], hidden [P, H]) per model; [P, L] each
        for model in models:
            model.keep(copies)  # one cached copy of its context per row
        outputs = [(logits[copies], hidden[copies]) for logits, hidden in outputs]  # [B, V], [B, H]
        mask, positions = mask[copies], positions[copies][:, -1:]  # [B, L], [B, 1]
        if not self.states:
            self.models, self.outputs, self.mask, self.positions, self.states = models, outputs, mask, positions, list(states)
            return
        padding = int((self.mask.cumsum(-1) == 0).all(0).sum())  # leading positions no row attends to any more
        for mine, theirs in zip(self.models, models):
            mine.drop_front(padding)
            mine.absorb(theirs)
        self.mask = _join_masks(self.mask[:, padding:], mask)
        self.positions = torch.cat([self.positions, positions])
        self.outputs = [(torch.cat([a, c]), torch.cat([b, d])) for (a, b), (c, d) in zip(self.outputs, outputs)]
        self.states += states

    @torch.inference_mode()
    def step(self) -> Iterator[RowState]:
        """Every row emits one token; feed the continuing rows' tokens, then yield the rows that finished.

        Rows whose `finish_reason` a caller set (it took them out) leave before the step and are
        not yielded. Time is charged to the rows it served: the sampling to every row, the feed
        to the rows it continues.
        """
        if any(state.finish_reason for state in self.states):
            self._keep([state.finish_reason is None for state in self.states])
        if not self.states:
            return
        started = time.perf_counter()
        (target_logits, target_hidden), (draft_logits, draft_hidden) = self.outputs
        p, q = _probabilities(self.states, target_logits, draft_logits)  # [A, V] each
        tokens = _step(self.states, p, q, target_hidden, draft_hidden)  # [A]
        for state, token in zip(self.states, tokens):
            _commit(state, token, self.eos)
        _charge(self.states, time.perf_counter() - started)
        going = [state.finish_reason is None for state in self.states]
        finished = [state for state, on in zip(self.states, going) if not on]
        if not any(going):
            self.states = []
        else:
            started = time.perf_counter()
            tokens = [token for token, on in zip(tokens, going) if on]
            self._keep(going)
            self._feed(tokens)
            _charge(self.states, time.perf_counter() - started)
        yield from finished

    def _keep(self, keep: list[bool]) -> None:
        """Keep the rows marked True (their caches, masks, positions and outputs)."""
        if all(keep):
            return
        index = torch.tensor([i for i, on in enumerate(keep) if on], device=self.pair.device, dtype=torch.long)  # [A']
        self.states = [state for state, on in zip(self.states, keep) if on]
        if not self.states:
            return
        for model in self.models:
            model.keep(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.outputs = [(logits[index], hidden[index]) for logits, hidden in self.outputs]

    def _feed(self, tokens: list[int]) -> None:
        """Feed every row its new token (outputs for the next step)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.states), 1)], dim=-1)  # [A, cached + 1]
        self.positions = self.positions + 1  # [A, 1]
        step_ids = torch.tensor(tokens, device=self.pair.device)[:, None]  # [A, 1]
        self.outputs = [model.feed(step_ids, self.mask, self.positions) for model in self.models]


# Contexts that begin alike (a chat's system prompt, an evaluation's few-shot examples) prefill
# their common beginning once, when it is at least this long (shorter, the extra forward costs
# more than it saves).
MIN_SHARED_PREFIX = 8


def _prefill(models: list[Any], contexts: list[tuple[int, ...]], device: torch.device) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Feed each model the distinct `contexts` as one batch: their common beginning once (its cache
    then copied to every row), then the rest left-padded. -> outputs at each context's last
    token, and the cache's mask and positions, each [P, cached]."""
    shared = _shared_prefix(contexts)
    if len(contexts) < 2 or shared < MIN_SHARED_PREFIX:
        ids, mask, positions = left_pad(contexts, device)  # [P, L] each
        return [model.feed(ids, mask, positions) for model in models], mask, positions
    prefix = torch.tensor([contexts[0][:shared]], device=device)  # [1, S]
    for model in models:
        model.feed(prefix, torch.ones_like(prefix), torch.arange(shared, device=device)[None])
        model.keep(torch.zeros(len(contexts), dtype=torch.long, device=device))  # [P] copies of the prefix
    ids, rest_mask, rest_positions = left_pad([context[shared:] for context in contexts], device)  # [P, L - S] each
    mask = torch.cat([rest_mask.new_ones(len(contexts), shared), rest_mask], dim=-1)  # [P, L]: prefix, padding, the rest
    positions = torch.cat([torch.arange(shared, device=device).expand(len(contexts), shared), rest_positions + shared], dim=-1)  # [P, L]
    return [model.feed(ids, mask, positions[:, shared:]) for model in models], mask, positions


def _shared_prefix(contexts: list[tuple[int, ...]]) -> int:
    """The length of the contexts' common beginning, leaving every context at least one token of its own."""
    shortest = min(len(context) for context in contexts)
    length = 0
    while length < shortest - 1 and all(context[length] == contexts[0][length] for context in contexts):
        length += 1
    return length


def _charge(states: Sequence[RowState], seconds: float) -> None:
    """Split `seconds` of batch time evenly over the rows it served."""
    for state in states:
        state.metrics.seconds += seconds / len(states)


def _join_masks(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Masks [A, L1] and [B, L2] as one [A + B, max(L1, L2)], the shorter left-padded with 0."""
    length = max(first.shape[1], second.shape[1])
    pad = lambda mask: torch.nn.functional.pad(mask, (length - mask.shape[1], 0))  # noqa: E731
    return torch.cat([pad(first), pad(second)])


def _probabilities(states: list[RowState], target_logits: torch.Tensor, draft_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p and q [A, V] in float32, each row under its own sampling parameters (rows that share them together)."""
    groups: dict[Any, list[int]] = {}
    for i, state in enumerate(states):
        groups.setdefault(state.config.sampling, []).append(i)
    if len(groups) == 1:
        params = states[0].config.sampling
        return logits_to_probs(target_logits, params), logits_to_probs(draft_logits, params)
    p = torch.empty(target_logits.shape, dtype=torch.float32, device=target_logits.device)
    q = torch.empty(draft_logits.shape, dtype=torch.float32, device=draft_logits.device)
    for params, rows in groups.items():
        index = torch.tensor(rows, device=target_logits.device)
        p[index] = logits_to_probs(target_logits[index], params)
        q[index] = logits_to_probs(draft_logits[index], params)
    return p, q


def _step(states: list[RowState], p, q, target_hidden, draft_hidden) -> list[int]:
    """Each row's next token, its round advanced. p, q: [A, V]; hidden: [A, H_t], [A, H_d]."""
    tokens: list[int] = [0] * len(states)
    drafting: dict[tuple[int, bool], list[int]] = {}  # (id(verifier), greedy) -> rows at a drafted position
    for i, state in enumerate(states):
        verifier, params = state.row.verifier, state.config.sampling
        if verifier is not None and state.drafted == 0:  # a round starts
            state.drafted = FixedDraftLength(int(state.config.draft_length)).choose(state.config.max_new_tokens - len(state.ids))
        if verifier is None or state.accepted == state.drafted:
            # `ar`, or the bonus token after a fully accepted round: from p.
            tokens[i] = int(choose(p[i], params, state.generator))
            if verifier is None:
                state.metrics.record_round(drafted=0, accepted=0, bias=0.0)
            else:
                state.end_round()
        else:
            drafting.setdefault((id(verifier), params.greedy), []).append(i)
    for (_, greedy), rows in drafting.items():
        verifier = states[rows[0]].row.verifier
        index = torch.tensor(rows, device=p.device)  # [n]
        hidden = (draft_hidden[index], target_hidden[index]) if verifier.needs_hidden_states else (None, None)
        p_rows, q_rows, ctx = p[index], q[index], verifier.context(*hidden)
        tables = verifier.tables(p_rows, q_rows, ctx)  # each [n, V]
        emitted_bias = total_variation(tables.emitted, p_rows)  # [n]
        if greedy:  # the engine's greedy rule: the draft's argmax, accepted by the verifier's greedy test
            drafted = q_rows.argmax(-1)  # [n]
            accepted = verifier.greedy_accept(p_rows, q_rows, drafted, ctx).tolist()  # [n]
            recovered = verifier.greedy_recovery(p_rows, q_rows, ctx).tolist()  # [n]
        for j, i in enumerate(rows):
            state = states[i]
            state.bias += float(emitted_bias[j])
            if greedy:
                token, accept = int(drafted[j]), bool(accepted[j])
            else:
                token = int(sample(q[i], state.generator))  # the draft's token at this position
                accept = bool(torch.rand((), generator=state.generator, dtype=torch.float64, device=p.device) < tables.acceptance[j, token])
            if accept:
                tokens[i] = token
                state.accepted += 1
            else:
                tokens[i] = int(recovered[j]) if greedy else int(sample(tables.residual[j], state.generator))  # recovered token
                state.end_round()
    return tokens


def _commit(state: RowState, token: int, eos: frozenset[int]) -> None:
    """Append a token; decide whether the row is done (EOS, budget, or a stop string after a round)."""
    config = state.config
    if not config.ignore_eos and token in eos:
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


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserInputError(f"the lockstep batch size must be at least 1, not {batch_size}")
