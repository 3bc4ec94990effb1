"""Many requests at once: one worker thread decodes every admitted request, alone through the
engine or several together in lockstep (`diversed.lockstep`), whichever the measured costs say
gives more tokens per second.

A request alone runs through the engine round by round, exactly as without batching (single
clients keep their speed). Once enough requests are in flight that a lockstep batch beats
one-at-a-time decoding in aggregate (`BatchPlan.min_rows`, measured at start-up), the running
generation moves into the batch between two rounds (its context is prefilled there) and the
waiting ones join it; later requests join the running batch at the next step, finished ones
leave it. Each row keeps its own settings and seed, and its tokens the engine's law
(tests/test_lockstep.py). Requests the lockstep path cannot run (the n-gram proposer, a draft
confidence or a bias budget) run alone, when the batch is empty.
"""

from __future__ import annotations

import dataclasses
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

from ..engine import AUTO, GenerationConfig
from ..generation import Generation, GenerationResult, TextRelease
from ..lockstep import Batch, LockstepRow, RowState, lockstep_refusal, new_state
from ..metrics import Metrics
from ..models import ModelPair
from ..sampling import derived_seed
from ..verifiers import Verifier

POLL_S = 0.25  # how often a waiting relay checks its request's cancel flag and deadline
_END = object()


@dataclass(frozen=True)
class BatchPlan:
    """When lockstep batching pays: from `min_rows` requests in flight, up to `max_rows` together."""

    min_rows: int | None  # None: never (one at a time is faster at every batch size up to max_rows)
    max_rows: int
    measured: dict = field(default_factory=dict)  # what the decision came from (shown in /health)

    def batches(self, rows: int) -> bool:
        return self.min_rows is not None and rows >= self.min_rows


def plan_from_costs(solo_seconds: float, steps: tuple[float, float], joins: tuple[float, float], max_rows: int, tokens: int) -> BatchPlan:
    """The smallest batch whose aggregate tokens/s beats one request at a time, for requests of
    `tokens` tokens: B requests together take join(B) + tokens * step(B) (both linear in B between
    the sizes measured, 1 and `max_rows`); alone, each takes `solo_seconds`. None when no batch up
    to `max_rows` pays."""
    def at(costs: tuple[float, float], rows: int) -> float:
        return costs[0] + (costs[1] - costs[0]) * (rows - 1) / max(max_rows - 1, 1)

    min_rows = next((rows for rows in range(2, max_rows + 1)
                     if rows * tokens / (at(joins, rows) + tokens * at(steps, rows)) > tokens / solo_seconds), None)
    measured = {"tokens": tokens, "solo_seconds": round(solo_seconds, 3), "step_seconds": [round(x, 4) for x in steps],
                "join_seconds": [round(x, 4) for x in joins]}
    return BatchPlan(min_rows, max_rows, measured)


def batched_config(config: GenerationConfig, max_draft_length: int) -> GenerationConfig:
    """A request's settings in a lockstep batch: N = "auto" (chosen for speed, which in lockstep
    does not depend on N) becomes the engine's default fixed N."""
    if config.draft_length != AUTO:
        return config
    return dataclasses.replace(config, draft_length=min(GenerationConfig.draft_length, max_draft_length))


class ServedGeneration:
    """A request's generation as the server's job sees it: iterate for text deltas, then read
    `result` (None when it was cancelled or ran out of time). The worker thread decodes it; the
    iterating thread only relays, and stops the request when `cancel` is set or time is up."""

    def __init__(self, worker: BatchWorker, solo: Generation, seed: int | None):
        self.worker, self.solo = worker, solo
        self.prompt_ids, self.method = solo.prompt_ids, solo.method
        self.metrics: Metrics = solo.metrics
        self.seed = seed if seed is not None else secrets.randbits(63)
        self.cancel = threading.Event()
        self.deadline = float("inf")
        self.result: GenerationResult | None = None
        self.deltas: queue.SimpleQueue = queue.SimpleQueue()  # str, _END or an exception, from the worker
        self.release = TextRelease(solo.config.stop)
        self.state: RowState | None = None  # set while the request decodes in the batch
        self.batchable = False  # whether the lockstep path can run it (set by the worker at submission)

    def __iter__(self) -> Iterator[str]:
        self.worker.submit(self)
        try:
            while True:
                try:
                    item = self.deltas.get(timeout=POLL_S)
                except queue.Empty:
                    if self.cancel.is_set() or time.monotonic() > self.deadline:
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel.set()  # a no-op once finished; else the worker drops the request at its next step


@dataclass
class BatchWorker:
    """The one thread that runs models: requests alone through the engine, or together in a lockstep batch."""

    pair: ModelPair  # runs requests alone
    batch_pair: ModelPair  # runs lockstep batches (may be `pair` itself)
    plan: BatchPlan
    max_draft_length: int
    waiting: deque[ServedGeneration] = field(default_factory=deque)
    batched: list[ServedGeneration] = field(default_factory=list)
    moved: int = 0  # generations that started alone and moved into a batch
    peak: int = 0  # the most requests decoded together so far

    def __post_init__(self) -> None:
        self._wake = threading.Condition()
        self._closed = False
        self.batch = Batch(self.batch_pair)
        self._thread = threading.Thread(target=self._run, name="diversed-batch", daemon=True)
        self._thread.start()

    @property
    def rows(self) -> int:
        """Requests decoding in the lockstep batch now."""
        return len(self.batched)

    def submit(self, request: ServedGeneration) -> None:
        request.batchable = self.can_batch(request)  # decided once: the worker asks at every step
        with self._wake:
            self.waiting.append(request)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def can_batch(self, request: ServedGeneration) -> bool:
        config = batched_config(request.solo.config, self.max_draft_length)
        return lockstep_refusal(self.batch_pair.backend, config, greedy_ok=True) is None

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.waiting and not self.batched:
                    self._wake.wait()
                if self._closed:
                    return
            self._drop_gone()
            if self.batched:
                self._admit()
                self._step()
            elif self.waiting:
                self._start()

    def _drop_gone(self) -> None:
        """Requests whose client left (or whose time ran out) leave the queue and the batch."""
        with self._wake:
            for request in [r for r in self.waiting if r.cancel.is_set()]:
                self.waiting.remove(request)
                request.deltas.put(_END)
        for request in [r for r in self.batched if r.cancel.is_set()]:
            request.state.finish_reason = "left"
            self.batched.remove(request)
            request.deltas.put(_END)

    def _start(self) -> None:
        """The batch is empty: batch the waiting requests if that pays, else run the first alone."""
        with self._wake:
            eligible = [r for r in self.waiting if r.batchable]
        if self.plan.batches(len(eligible)):
            self._admit()
            self._step()
            return
        with self._wake:
            request = self.waiting.popleft()
        self._run_alone(request)

    def _admit(self) -> None:
        """Waiting requests the batch can run join it, as many as fit."""
        with self._wake:
            joining = [r for r in self.waiting if r.batchable][: self.plan.max_rows - len(self.batched)]
            for request in joining:
                self.waiting.remove(request)
        if joining:
            self._join([(request, None) for request in joining])

    def _join(self, joining: list[tuple[ServedGeneration, RowState | None]]) -> None:
        joined, states = [], []
        for request, state in joining:
            if state is None:
                row = LockstepRow(id(request), tuple(request.prompt_ids), request.solo.verifier, request.method, request.seed)
                try:
                    config = request.solo.fitted_config()  # a prompt that fills the context window fails here, alone
                except Exception as error:  # noqa: BLE001 - the request gets the error; the others join
                    request.deltas.put(error)
                    continue
                state = new_state(self.batch_pair, row, batched_config(config, self.max_draft_length))
                state.metrics = request.metrics
            request.state = state
            joined.append(request)
            states.append(state)
        if not states:
            return
        try:
            self.batch.join(states)
        except Exception as error:  # noqa: BLE001 - the requests get the error; the worker goes on
            for request in joined:
                request.deltas.put(error)
            return
        self.batched += joined
        self.peak = max(self.peak, len(self.batched))

    def _step(self) -> None:
        try:
            finished = {id(state) for state in self.batch.step()}
        except Exception as error:  # noqa: BLE001 - every request in the batch gets the error
            for request in self.batched:
                request.deltas.put(error)
            self.batched, self.batch = [], Batch(self.batch_pair)
            return
        for request in list(self.batched):
            state = request.state
            if id(state) in finished:
                result = state.result()
                for delta in request.release.final(result.text):
                    request.deltas.put(delta)
                request.result = result
                self.batched.remove(request)
                request.deltas.put(_END)
            else:
                for delta in request.release.safe(state.text.text):
                    request.deltas.put(delta)

    def _run_alone(self, request: ServedGeneration) -> None:
        """Through the engine, round by round; into the batch between rounds once batching pays."""
        solo = request.solo
        deltas = iter(solo)
        try:
            for delta in deltas:
                request.release.released += delta
                request.deltas.put(delta)
                if request.cancel.is_set():
                    break
                with self._wake:
                    others = sum(1 for r in self.waiting if r.batchable)
                if others and request.batchable and self.plan.batches(others + 1) and solo.text is not None:
                    deltas.close()  # between two rounds: the state moves into the batch
                    self.moved += 1
                    self._join([(request, self._moved_state(request))])
                    self._admit()
                    return
            else:
                request.result = solo.result
        except Exception as error:  # noqa: BLE001 - the request gets the error; the worker goes on
            request.deltas.put(error)
            return
        finally:
            deltas.close()
        request.deltas.put(_END)

    def _moved_state(self, request: ServedGeneration) -> RowState:
        """A solo generation's state, between rounds, as a lockstep row (a fresh random stream, seeded from its own)."""
        solo = request.solo
        emitted = list(solo.text.ids)
        row = LockstepRow(id(request), tuple(request.prompt_ids), solo.verifier, request.method,
                          derived_seed(request.seed, "batched", len(emitted), bits=63))
        state = new_state(self.batch_pair, row, batched_config(solo.fitted_config(), self.max_draft_length))
        state.text, state.ids, state.metrics = solo.text, emitted, request.metrics
        return state



MEASURED_TOKENS = 16  # tokens of the solo generation that measures one-at-a-time speed
MEASURED_STEPS = 4  # lockstep steps timed at each batch size (after one untimed)


def measure_plan(solo: Generation, batch_pair: ModelPair, max_rows: int, max_draft_length: int, tokens: int) -> BatchPlan:
    """Time `solo` (a generation of the server's default method) alone: its first text and then
    MEASURED_TOKENS tokens; and on `batch_pair`, at 1 and `max_rows` rows, the join of that many
    distinct prompts that begin alike (its prompt, then a few tokens of their own) and a lockstep
    step. The plan batches from the smallest size whose aggregate speed for requests of `tokens`
    tokens is higher (`plan_from_costs`)."""
    config = dataclasses.replace(solo.config, max_new_tokens=MEASURED_TOKENS, ignore_eos=True, stop=())
    solo = dataclasses.replace(solo, config=config, metrics=Metrics(), result=None, text=None)
    started = time.perf_counter()
    first = None
    for _ in solo:
        first = first or time.perf_counter() - started
    total = time.perf_counter() - started
    first = first or total
    solo_seconds = first + (tokens - 1) * (total - first) / max(len(solo.text.ids) - 1, 1)
    if max_rows < 2:
        return BatchPlan(None, max_rows, {"solo_seconds": round(solo_seconds, 3)})
    row_config = batched_config(dataclasses.replace(config, max_new_tokens=MEASURED_STEPS + 2), max_draft_length)
    prompt = tuple(solo.prompt_ids)
    steps, joins = [], []
    for rows in (1, max_rows):
        batch = Batch(batch_pair)
        states = [new_state(batch_pair, LockstepRow(i, prompt + prompt[-1:] * i, solo.verifier, solo.method, i), row_config)
                  for i in range(rows)]
        started = time.perf_counter()
        batch.join(states)
        list(batch.step())
        joins.append(time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(MEASURED_STEPS):
            list(batch.step())
        steps.append((time.perf_counter() - started) / MEASURED_STEPS)
    return plan_from_costs(solo_seconds, (steps[0], steps[1]), (joins[0], joins[1]), max_rows, tokens)
