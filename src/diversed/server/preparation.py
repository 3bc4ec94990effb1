"""From a received body to what the scheduler queues: parse and validate it, check the model
and limits, render the chat template and tokenise (issue 26).

`prepare_request` does all of it, the same code wherever it runs. A small body runs it on a
thread of the server; a large one in `PrepareWorker`, a process of its own, so that parsing
megabytes of JSON or tokenising a long prompt never holds the server's GIL, and so that work
that overruns its deadline, or whose client left, can be stopped: the process is terminated
and a new one spawned.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
from dataclasses import dataclass
from multiprocessing.pool import Pool
from typing import Any, Callable

from ..engine import GenerationConfig
from ..errors import DiversedError
from ..generation import MethodSpec, encode_prompt
from .api_errors import ApiError
from .limits import check_prompt_size
from .schemas import Flavor, ServerSettings, as_api_error, parse_body, request_config, resolve_spec

log = logging.getLogger("diversed.server")

# Bodies up to this size are prepared on a thread of the server: their work is bounded by their
# size, a trip to the process would cost them more than it saves, and they never wait behind a
# large body there. Larger ones go to the process.
IN_PROCESS_BODY_BYTES = 64 << 10


@dataclass(frozen=True)
class PrepareContext:
    """What preparing a request needs of the server: picklable, for the preparation process."""

    settings: ServerSettings
    default_spec: MethodSpec
    model_name: str
    tokenizer: Any
    context_window: int


@dataclass(frozen=True)
class Prepared:
    """A request ready to queue: small, whatever the size of its body."""

    stream: bool
    spec: MethodSpec
    config: GenerationConfig
    prompt_ids: list[int]


def prepare_request(raw: bytes, flavor: Flavor, context: PrepareContext) -> Prepared:
    """Parse and check `raw` and tokenise its prompt. ApiError for anything the client got wrong."""
    settings = context.settings
    body = parse_body(raw, flavor.body)
    if body.model is not None and body.model != context.model_name:
        shown = body.model if len(body.model) <= 100 else body.model[:100] + "…"  # never echo an unbounded name
        raise ApiError(f"the model {shown!r} does not exist; this server serves {context.model_name!r}", status=404, param="model", code="model_not_found")
    prompt, raw_prompt = flavor.prompt(body)
    check_prompt_size(prompt, settings.max_prompt_bytes)
    spec = resolve_spec(body.speculative, context.default_spec, settings)
    config = request_config(body, settings)
    try:
        prompt_ids = encode_prompt(context, prompt, raw_prompt)  # a PromptEncoder: no models in this process
    except DiversedError as exc:  # as an ApiError: it keeps its status and field across processes
        raise as_api_error(exc) from None
    if not prompt_ids:
        raise ApiError("the prompt is empty", param="prompt")
    return Prepared(body.stream, spec, config, prompt_ids)


# --------------------------------------------------------------------------- the process

_context: PrepareContext | None = None  # in the preparation process: set once by its initializer


def _install(pickled: bytes) -> None:
    global _context
    _context = pickle.loads(pickled)


def _prepare_installed(raw: bytes, flavor: Flavor) -> Prepared:
    assert _context is not None, "the preparation process runs _install first"
    return prepare_request(raw, flavor, _context)


class PrepareWorker:
    """One spawned process that prepares large bodies, one at a time; replaced whenever a
    preparation is abandoned (its deadline passed or its client left), which stops that work."""

    def __init__(self, context: PrepareContext, on_restart: Callable[[], None] = lambda: None):
        # Pickled once, here: pickling a tokenizer holds the GIL, and a respawn while serving must not.
        self._initargs = (pickle.dumps(context),)
        self._on_restart = on_restart
        self._lock = asyncio.Lock()
        self._pool: asyncio.Future[Pool] | None = None

    def start(self) -> None:
        """Spawn the process; it imports the server's modules and loads the tokenizer meanwhile."""
        if self._pool is None:
            self._pool = asyncio.ensure_future(asyncio.to_thread(self._spawn, None))

    async def ready(self) -> None:
        """Once the process can take work (a large first body then waits for no spawn)."""
        self.start()
        assert self._pool is not None
        await asyncio.shield(self._pool)

    def _spawn(self, old: Pool | None) -> Pool:
        """On a thread: stop `old`, then start a process and wait until it can take work."""
        if old is not None:
            old.terminate()
        # spawn, not fork: the server holds model threads and a large heap a fork would inherit.
        pool = multiprocessing.get_context("spawn").Pool(1, initializer=_install, initargs=self._initargs)
        pool.apply(os.getpid)  # returns once the initializer has run
        return pool

    async def prepare(self, raw: bytes, flavor: Flavor) -> Prepared:
        """`prepare_request` in the process. Cancelling this (a deadline, a client gone) stops the work."""
        self.start()
        assert self._pool is not None
        async with self._lock:  # one at a time: stopping the process must stop nobody else's work
            # Shielded: a request that stops waiting for the process must not cancel its spawn.
            pool = await asyncio.shield(self._pool)
            result = _submit(pool, raw, flavor)
            try:
                return await result
            except asyncio.CancelledError:
                log.warning("stopping the preparation process: a request ran past --prepare-timeout or its client left")
                self._on_restart()
                self._pool = asyncio.ensure_future(asyncio.to_thread(self._spawn, pool))
                raise

    def close(self) -> None:
        pool = self._pool
        if pool is not None and pool.done() and not pool.cancelled() and pool.exception() is None:
            pool.result().terminate()
        elif pool is not None:
            pool.cancel()  # a spawn under way finishes on its thread; the process is a daemon of this one


def _submit(pool: Pool, raw: bytes, flavor: Flavor) -> asyncio.Future[Prepared]:
    """`_prepare_installed` on `pool`, as a future of the running loop."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[Prepared] = loop.create_future()

    def settle(outcome: Any) -> None:  # on the pool's result thread
        def apply() -> None:
            if result.done():  # the request stopped waiting
                return
            if isinstance(outcome, BaseException):
                result.set_exception(outcome)
            else:
                result.set_result(outcome)

        try:
            loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    pool.apply_async(_prepare_installed, (raw, flavor), callback=settle, error_callback=settle)
    return result
