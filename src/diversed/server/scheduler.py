"""One generation at a time: the scheduler, a request's job, and waiting on a client that may leave.

One model instance, one generation at a time on a single worker thread (the event loop never
runs the model), at most `queue_size` requests waiting behind it (more get 429), a deadline per
request, and a client that goes away cancels its generation at the next round. Where requests
may decode together, the batch worker (batching.py) runs the models instead, and each job's
thread only relays its deltas.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from ..generation import Generation, GenerationResult
from .batching import ServedGeneration
from .schemas import QueueFullError, RequestTimeoutError

if TYPE_CHECKING:
    from fastapi import Request

DISCONNECT_POLL_S = 0.25  # how often a request still waiting for the model checks its client
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its response started."""



class Scheduler:
    """One generation at a time on one worker thread, at most `queue_size` waiting behind it.

    With `relays`, every admitted job gets a thread of its own that only relays: the batch
    worker (batching.py) decodes them, alone or together."""

    def __init__(self, queue_size: int, relays: bool = False):
        self._capacity = queue_size + 1
        self._executor = ThreadPoolExecutor(max_workers=self._capacity if relays else 1, thread_name_prefix="diversed-generate")
        self._in_flight = 0
        self._cancels: set[threading.Event] = set()
        self._lock = threading.Lock()  # done-callbacks run on the worker thread

    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished: the running one plus those waiting."""
        return self._in_flight

    @property
    def capacity(self) -> int:
        return self._capacity

    def submit(self, work: Callable[[], T], cancel: threading.Event) -> "Future[T]":
        with self._lock:
            if self._in_flight >= self._capacity:
                raise QueueFullError(f"the server is busy ({self._in_flight} requests in flight, queue size {self._capacity - 1}); retry shortly")
            self._in_flight += 1
            self._cancels.add(cancel)
        future = self._executor.submit(work)
        future.add_done_callback(lambda _: self._release(cancel))
        return future

    def _release(self, cancel: threading.Event) -> None:
        with self._lock:
            self._in_flight -= 1
            self._cancels.discard(cancel)

    def shutdown(self) -> None:
        with self._lock:
            for cancel in self._cancels:
                cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


_END = object()


class Job:
    """One request's generation, run by the scheduler, its text deltas read from the event loop.

    The worker checks `cancel` and the deadline after every round that releases text, so a
    client that leaves or a request that times out frees the model within one round.
    """

    def __init__(self, scheduler: Scheduler, generation: Generation | ServedGeneration, timeout: float, on_finish: Callable[[Job], None]):
        self.generation = generation
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        # A batched generation watches the same flag and deadline while it waits for the batch worker.
        self.cancel = generation.cancel if isinstance(generation, ServedGeneration) else threading.Event()
        if isinstance(generation, ServedGeneration):
            generation.deadline = self.deadline
        self._on_finish = on_finish
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._future = scheduler.submit(self._work, self.cancel)
        self._future.add_done_callback(lambda _: self._put(_END))

    def _put(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._events.put_nowait, item)

    def _work(self) -> GenerationResult | None:
        """Runs on the worker thread. None when cancelled or out of time."""
        self.started_at = time.monotonic()
        deltas = iter(self.generation)
        try:
            if self.cancel.is_set():
                return None  # the client left while queued but after the worker picked the job up
            for delta in deltas:
                self._put(delta)
                if self.cancel.is_set() or time.monotonic() > self.deadline:
                    return None
            return self.generation.result
        finally:
            deltas.close()  # type: ignore[attr-defined]
            self._on_finish(self)

    async def next_delta(self) -> str | None:
        """The next text delta, or None once the generation is complete (see `result`)."""
        try:
            item = await asyncio.wait_for(self._events.get(), max(self.deadline - time.monotonic(), 0))
        except TimeoutError:
            raise self._timeout_error() from None
        if item is not _END:
            return item
        if self._future.result() is None:  # re-raises the worker's exception, if any
            raise self._timeout_error()
        return None

    @property
    def result(self) -> GenerationResult:
        result = self._future.result()
        assert result is not None, "result read before the generation completed"
        return result

    def close(self) -> None:
        """Stop the generation if it still runs, or drop it if it has not started."""
        self.cancel.set()
        self._future.cancel()

    def _timeout_error(self) -> RequestTimeoutError:
        return RequestTimeoutError(f"the request did not finish within {self.timeout:g} s (the server's --request-timeout)")


async def drain(job: Job) -> None:
    while await job.next_delta() is not None:
        pass


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, abandoning it (and raising ClientDisconnected) if the client leaves."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected
    finally:
        task.cancel()


