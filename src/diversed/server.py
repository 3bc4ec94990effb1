"""`diversed serve`: an OpenAI-compatible HTTP server over one loaded draft/target pair.

    diversed serve --port 8000                       # the embedded default pair
    curl http://127.0.0.1:8000/v1/completions -d '{"prompt": "def f(", "max_tokens": 16}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, /health, /metrics (Prometheus). Requests choose their
verification method through the extension field `speculative` (see docs/server.md); the
response `usage` carries the docs/method.md §6 metrics next to the OpenAI token counts.

Concurrency model: one model instance, one generation at a time on a single worker thread
(the event loop never runs the model), at most `queue_size` requests waiting behind it (more
get 429), a deadline per request, and a client that goes away cancels its generation at the
next round. fastapi, uvicorn and prometheus-client are imported inside functions so that
`register_cli` (called on every `diversed` invocation) stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import re
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import GenerationConfig
from .errors import DiversedError, UserInputError
from . import server_limits
from .generation import Generation, GenerationResult, MethodSpec, build_verifier, default_method, start_generation
from .head import HeadMismatchError, shipped_head_names
from .metrics import Metrics
from .models import ModelPair
from .sampling import SamplingParams
from .server_limits import MAX_PROMPT_BYTES, ClientAborted, check_prompt_size, finite, reject_knobs_without_method, require_json
from .verifiers import METHODS

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from starlette.responses import Response

log = logging.getLogger("diversed.server")

MAX_BODY_BYTES = 8 << 20  # far above any prompt that fits a context window; stops memory abuse early
DISCONNECT_POLL_S = 0.25  # how often a request still waiting for the model checks its client
RETRY_AFTER_S = 1
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
T = TypeVar("T")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServerSettings:
    """Server-side defaults and limits. A request may override defaults within the limits."""

    default_spec: MethodSpec | None = None  # None: `default_method(pair)` (or `ar` without a draft)
    defaults: GenerationConfig = GenerationConfig()  # max tokens, draft length, sampling, seed
    max_tokens_limit: int = 2048
    max_draft_length: int = 16
    allowed_methods: tuple[str, ...] = METHODS
    queue_size: int = 16  # requests that may wait while one generates
    request_timeout: float = 600.0  # seconds from arrival to the last token, queueing included
    model_name: str | None = None  # the id clients pass as `model`; default: the target's name
    max_prompt_bytes: int = MAX_PROMPT_BYTES  # larger prompts get a 413 before tokenisation
    body_timeout: float = server_limits.BODY_TIMEOUT_S  # seconds for the whole body to arrive (then 408)

    def __post_init__(self) -> None:
        checks = (
            (self.max_tokens_limit >= 1, f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}"),
            (self.max_draft_length >= 1, f"--max-draft-length must be >= 1, got {self.max_draft_length}"),
            (
                self.defaults.draft_length == "auto" or self.defaults.draft_length <= self.max_draft_length,
                f"--draft-length {self.defaults.draft_length} exceeds --max-draft-length {self.max_draft_length}",
            ),
            (self.queue_size >= 0, f"--queue-size must be >= 0, got {self.queue_size}"),
            (self.request_timeout > 0, f"--request-timeout must be > 0, got {self.request_timeout}"),
            (self.max_prompt_bytes >= 1, f"--max-prompt-bytes must be >= 1, got {self.max_prompt_bytes}"),
            (self.body_timeout > 0, f"--body-timeout must be > 0, got {self.body_timeout}"),
            (bool(self.allowed_methods), "--allowed-methods is empty"),
        )
        for ok, message in checks:
            if not ok:
                raise UserInputError(message)
        unknown = [m for m in self.allowed_methods if m not in METHODS]
        if unknown:
            raise UserInputError(f"unknown method(s) in --allowed-methods: {', '.join(unknown)}; choose from {', '.join(METHODS)}")


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # Strict: "5" is not a number and true is not 1; NaN/inf never reach the sampler.
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class SpeculativeOptions(BaseModel):
    """The `speculative` extension field: a method and its knobs (unknown keys are errors)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    method: str | None = None
    weight: float | None = None
    draft_length: int | str | None = None  # N, or "auto"
    bias_budget: float | None = None
    head: str | None = None
    lenience: float | None = None
    rule: str | None = None
    threshold: float | None = None  # klgate / entgate
    low_weight: float | None = None  # klgate / entgate


class _GenerationBody(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI, but vLLM and most OpenAI-compatible servers accept it
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    speculative: SpeculativeOptions | None = None

    def token_budget(self) -> int | None:
        return self.max_tokens


class CompletionBody(_GenerationBody):
    prompt: str | list[str]


class _ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_ContentPart]

    def as_template_message(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        role = "system" if self.role == "developer" else self.role
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": role, "content": content}


class ChatBody(_GenerationBody):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens in chat

    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_FIELD_NAMES = frozenset().union(*(m.model_fields for m in (CompletionBody, ChatBody, SpeculativeOptions, _Message, _ContentPart)))

# OpenAI fields this server cannot honour: rejected unless they hold their neutral value.
_UNSUPPORTED_FIELDS = {
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error with its HTTP status and OpenAI-style body {"error": {message, type, param, code}}."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, param: str | None = None, code: str | None = None, error_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status or self.status
        self.param = param
        self.code = code or self.code
        self.type = error_type or self.type

    @property
    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class QueueFullError(ApiError):
    status, type, code = 429, "rate_limit_error", "queue_full"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class RequestTimeoutError(ApiError):
    status, type, code = 504, "timeout_error", "timeout"


class ClientDisconnected(Exception):
    """The client went away before its response started."""


def as_api_error(exc: BaseException) -> ApiError:
    """Every failure as an ApiError: user errors are 400s, anything else a logged 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DiversedError):
        return ApiError(str(exc))
    log.error("unexpected error while serving a request", exc_info=exc)
    return ApiError("internal server error", status=500, error_type="server_error")


def _validation_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return ApiError(f"the body is not valid JSON: {first['msg']}", code="invalid_json")
    loc = first["loc"]
    if first["type"] != "extra_forbidden":  # drop pydantic's union-member tags ('str', 'list[str]')
        loc = tuple(p for p in loc if isinstance(p, int) or p in _FIELD_NAMES)
    param = ".".join(map(str, loc)) or None
    return ApiError(f"{param or 'body'}: {first['msg']}", param=param, code="invalid_type" if first["type"].endswith("_type") else None)


_FLAG = re.compile(r"--([a-z][a-z-]*)")


def _cli_error_to_api(exc: UserInputError) -> ApiError:
    """Method errors come from the CLI's validators: name the request field, not the flag."""

    def field(flag: str) -> str:
        return "speculative." + flag.replace("-", "_")

    flags = _FLAG.findall(str(exc))
    message = _FLAG.sub(lambda m: field(m.group(1)), str(exc))
    return ApiError(message, param=field(flags[0]) if flags else "speculative")


# --------------------------------------------------------------------------- request -> generation


def parse_body(raw: bytes, model: type[T]) -> T:
    try:
        body = model.model_validate_json(raw)  # type: ignore[attr-defined]
    except ValidationError as exc:
        raise _validation_error(exc) from None
    for name, value in (body.model_extra or {}).items():
        if name in _UNSUPPORTED_FIELDS and value not in _UNSUPPORTED_FIELDS[name]:
            raise ApiError(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if body.n not in (None, 1):
        raise ApiError(f"n must be 1 (one completion per request), got {body.n}", param="n")
    return body


def resolve_spec(options: SpeculativeOptions | None, default: MethodSpec, settings: ServerSettings) -> MethodSpec:
    """The request's method: the server default unless `speculative` names a method or a knob."""
    from .cli import method_spec_from_args  # the CLI's validator, so both fronts accept the same specs

    if options is None:
        return default
    reject_knobs_without_method(options)
    knobs = SimpleNamespace(method=options.method, weight=options.weight, head=options.head, lenience=options.lenience, rule=options.rule,
                            threshold=options.threshold, low_weight=options.low_weight)
    if knobs.method is not None and knobs.method not in METHODS:
        raise ApiError(f"unknown speculative.method {knobs.method!r}; choose one of {', '.join(settings.allowed_methods)}", param="speculative.method")
    if knobs.method == "diversed" and knobs.head is None and default.method == "diversed":
        knobs.head = default.head
    if knobs.head is not None and knobs.head not in _allowed_heads(default):
        raise ApiError(
            f"speculative.head {knobs.head!r} is not available; this server offers: {', '.join(_allowed_heads(default)) or 'none'}",
            param="speculative.head",
        )
    try:
        spec = method_spec_from_args(knobs)
    except UserInputError as exc:
        raise _cli_error_to_api(exc) from None
    spec = spec or default
    if spec.method not in settings.allowed_methods:
        raise ApiError(
            f"speculative.method {spec.method!r} is not enabled on this server; allowed: {', '.join(settings.allowed_methods)}",
            param="speculative.method",
        )
    return spec


def _allowed_heads(default: MethodSpec) -> list[str]:
    # Clients name heads; they never get to point the server at arbitrary files.
    heads = shipped_head_names()
    if default.head and default.head not in heads:
        heads.append(default.head)
    return heads


def request_config(body: _GenerationBody, settings: ServerSettings) -> GenerationConfig:
    """The request's GenerationConfig: its fields over the server defaults, within the limits."""
    defaults = settings.defaults
    max_tokens = body.token_budget()
    if max_tokens is None:
        max_tokens = min(defaults.max_new_tokens, settings.max_tokens_limit)
    if not 1 <= max_tokens <= settings.max_tokens_limit:
        raise ApiError(f"max_tokens must be between 1 and {settings.max_tokens_limit}, got {max_tokens}", param="max_tokens")
    options = body.speculative or SpeculativeOptions()
    draft_length = defaults.draft_length if options.draft_length is None else options.draft_length
    if draft_length != "auto" and not (isinstance(draft_length, int) and 1 <= draft_length <= settings.max_draft_length):
        raise ApiError(
            f"speculative.draft_length must be \"auto\" or between 1 and {settings.max_draft_length}, got {draft_length!r}",
            param="speculative.draft_length",
        )
    sampling = SamplingParams(
        defaults.sampling.temperature if body.temperature is None else body.temperature,
        defaults.sampling.top_k if body.top_k is None else body.top_k,
        defaults.sampling.top_p if body.top_p is None else body.top_p,
    )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    seed = defaults.seed if body.seed is None else body.seed
    if seed is not None and not -(1 << 63) <= seed < (1 << 64):  # what torch.Generator.manual_seed takes
        raise ApiError(f"seed must be a 64-bit integer, got {seed}", param="seed")
    # replace(): fields a request cannot set keep the server's defaults.
    bias_budget = defaults.bias_budget if options.bias_budget is None else options.bias_budget
    if bias_budget is not None and not bias_budget >= 0:
        raise ApiError(f"speculative.bias_budget must be >= 0, got {bias_budget}", param="speculative.bias_budget")
    return dataclasses.replace(
        defaults, max_new_tokens=max_tokens, draft_length=draft_length, sampling=sampling, seed=seed, stop=tuple(s for s in stop if s),
        bias_budget=bias_budget,
    )


# --------------------------------------------------------------------------- scheduling


class Scheduler:
    """One generation at a time on one worker thread, at most `queue_size` waiting behind it."""

    def __init__(self, queue_size: int):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diversed-generate")
        self._capacity = queue_size + 1
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

    def __init__(self, scheduler: Scheduler, generation: Generation, timeout: float, on_finish: Callable[[Job], None]):
        self.generation = generation
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.queued_at = time.monotonic()
        self.started_at: float | None = None
        self.cancel = threading.Event()
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


async def _drain(job: Job) -> None:
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


# --------------------------------------------------------------------------- response shapes


@dataclass(frozen=True)
class _Flavor:
    """What differs between /v1/completions and /v1/chat/completions."""

    id_prefix: str
    object: str
    chunk_object: str
    body: type[_GenerationBody]
    chat: bool

    def prompt(self, body: Any) -> tuple[str | list[dict[str, str]], bool]:
        """(prompt for start_generation, raw). Completions are fed as-is; chat uses the template."""
        if self.chat:
            return [m.as_template_message() for m in body.messages], False
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(f"prompt must be one string (batched prompts are not supported), got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        return prompt, True

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


COMPLETIONS = _Flavor("cmpl", "text_completion", "text_completion", CompletionBody, chat=False)
CHAT = _Flavor("chatcmpl", "chat.completion", "chat.completion.chunk", ChatBody, chat=True)


def usage(prompt_tokens: int, metrics: Metrics) -> dict[str, Any]:
    """OpenAI token counts plus every docs/method.md §6 metric of the generation."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": metrics.new_tokens,
        "total_tokens": prompt_tokens + metrics.new_tokens,
        **finite(metrics.to_dict()),
    }


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# --------------------------------------------------------------------------- telemetry


class Telemetry:
    """Prometheus metrics in a registry of the app's own, so several apps can coexist."""

    def __init__(self, scheduler: Scheduler):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        by_method = ["method"]
        self.requests = Counter("diversed_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry)
        self.latency = Histogram(
            "diversed_request_latency_seconds", "Request latency until the last byte, by endpoint", ["endpoint"], registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.queue_wait = Histogram(
            "diversed_queue_wait_seconds", "Time a generation waited for the model", registry=registry,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.generation_seconds = Histogram(
            "diversed_generation_seconds", "Time the model spent on one generation", by_method, registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.prompt_tokens = Counter("diversed_prompt_tokens", "Prompt tokens of started generations", by_method, registry=registry)
        self.generated = Counter("diversed_generated_tokens", "Tokens generated", by_method, registry=registry)
        self.drafted = Counter("diversed_drafted_tokens", "Draft tokens proposed (docs/method.md §6 drafted)", by_method, registry=registry)
        self.accepted = Counter("diversed_accepted_tokens", "Draft tokens accepted (docs/method.md §6 accepted)", by_method, registry=registry)
        self.rounds = Counter("diversed_rounds", "Target verification rounds (docs/method.md §6 rounds)", by_method, registry=registry)
        in_flight = Gauge("diversed_requests_in_flight", "Generations running or waiting for the model", registry=registry)
        in_flight.set_function(lambda: scheduler.in_flight)

    def record_job(self, job: Job, method: str) -> None:
        """Called on the worker thread when a generation ends, however it ended."""
        metrics = job.generation.metrics
        if job.started_at is not None:
            self.queue_wait.observe(job.started_at - job.queued_at)
        self.generation_seconds.labels(method).observe(metrics.seconds)
        self.prompt_tokens.labels(method).inc(len(job.generation.prompt_ids))
        self.generated.labels(method).inc(metrics.new_tokens)
        self.drafted.labels(method).inc(metrics.drafted)
        self.accepted.labels(method).inc(metrics.accepted)
        self.rounds.labels(method).inc(metrics.rounds)

    def record_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"  # bounded label values
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)


class _RequestMetricsMiddleware:
    """Pure ASGI (unlike BaseHTTPMiddleware it leaves streaming and cancellation alone)."""

    def __init__(self, app: Any, telemetry: Telemetry):
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client sees if the app raises before responding
        started = time.perf_counter()

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.telemetry.record_request(scope["path"], status, time.perf_counter() - started)


# --------------------------------------------------------------------------- the app


def resolve_default_spec(pair: ModelPair, settings: ServerSettings) -> MethodSpec:
    """The configured method, else `default_method(pair)`; `ar` when no draft is loaded."""
    spec = settings.default_spec
    if spec is None:
        spec = default_method(pair)[0] if pair.draft is not None else MethodSpec("ar")
    if spec.method not in settings.allowed_methods:
        raise UserInputError(f"the default method {spec.label} is not in --allowed-methods ({', '.join(settings.allowed_methods)}); pass --method")
    return spec


def create_app(pair: ModelPair, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The ASGI app serving `pair`. Fails fast (UserInputError...) on a bad default method."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    default_spec = resolve_default_spec(pair, settings)
    verifier_for = functools.lru_cache(maxsize=64)(functools.partial(build_verifier, pair))
    verifier_for(default_spec)  # a bad or mismatched default head fails at startup, not per request
    model_name = settings.model_name or pair.target_name
    scheduler = Scheduler(settings.queue_size)
    telemetry = Telemetry(scheduler)
    preparers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="diversed-prepare")  # bounded: tokenising is CPU work

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.shutdown()
        preparers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="diversed", summary="OpenAI-compatible relaxed speculative decoding", lifespan=lifespan)
    app.add_middleware(_RequestMetricsMiddleware, telemetry=telemetry)
    app.state.settings, app.state.default_spec, app.state.scheduler, app.state.telemetry = settings, default_spec, scheduler, telemetry

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(DiversedError)
    async def _user_error(_: Request, exc: DiversedError) -> JSONResponse:
        return error_response(as_api_error(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(str(exc.detail), status=exc.status_code, code=code))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(as_api_error(exc))

    @app.exception_handler(ClientAborted)
    async def _client_aborted(request: Request, _: ClientAborted) -> Response:
        log.info("client left while sending its body to %s", request.url.path)
        return Response(status_code=499)  # counted once as 499; nobody reads it

    async def read_body(request: Request) -> bytes:
        require_json(request)
        return await server_limits.read_body(request, MAX_BODY_BYTES, settings.body_timeout)

    def prepare(prompt: Any, spec: MethodSpec, config: GenerationConfig, raw: bool) -> Generation:
        """Tokenisation, chat template and head loading: run on a preparation thread, off the loop."""
        try:
            verifier = verifier_for(spec)
        except HeadMismatchError:
            # The message would show the server's files: name the field instead.
            raise ApiError(f"speculative.head {spec.head!r} was trained for another model pair", param="speculative.head") from None
        return start_generation(pair, prompt, spec, config, raw=raw, verifier=verifier)

    async def start_job(body: _GenerationBody, flavor: _Flavor) -> Job:
        if body.model is not None and body.model != model_name:
            raise ApiError(f"the model {body.model!r} does not exist; this server serves {model_name!r}", status=404, param="model", code="model_not_found")
        prompt, raw = flavor.prompt(body)
        check_prompt_size(prompt, settings.max_prompt_bytes)
        spec = resolve_spec(body.speculative, default_spec, settings)
        config = request_config(body, settings)
        generation = await asyncio.get_running_loop().run_in_executor(preparers, prepare, prompt, spec, config, raw)
        return Job(scheduler, generation, settings.request_timeout, lambda job: telemetry.record_job(job, spec.method))

    async def serve(request: Request, flavor: _Flavor) -> Response:
        body = parse_body(await read_body(request), flavor.body)
        job = await start_job(body, flavor)
        header = {"id": f"{flavor.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        handed_off = False  # once streaming, stream_events owns the job
        try:
            if body.stream:
                # Wait for the first delta before answering, so that anything failing before
                # the first token (queue wait, timeout, a prompt too long) gets a real status.
                first = await unless_disconnected(request, job.next_delta())
                handed_off = True
                return StreamingResponse(stream_events(job, flavor, header, first), media_type="text/event-stream")
            await unless_disconnected(request, _drain(job))
        except ClientDisconnected:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            if not handed_off:
                job.close()
        result = job.result
        return JSONResponse({
            **header, "object": flavor.object, "method": result.method,
            "choices": [flavor.choice(result.text, result.finish_reason)],
            "usage": usage(len(job.generation.prompt_ids), result.metrics),
        })

    async def stream_events(job: Job, flavor: _Flavor, header: dict[str, Any], first: str | None) -> AsyncIterator[str]:
        chunk = {**header, "object": flavor.chunk_object}
        try:
            if flavor.chat:
                yield sse({**chunk, "choices": [flavor.delta("", role=True)]})
            delta = first
            while delta is not None:
                yield sse({**chunk, "choices": [flavor.delta(delta)]})
                delta = await job.next_delta()
            result = job.result
            yield sse({
                **chunk, "method": result.method,
                "choices": [flavor.delta(None, result.finish_reason)],
                "usage": usage(len(job.generation.prompt_ids), result.metrics),
            })
        except Exception as exc:  # the status line is gone: report in-band, as OpenAI does
            yield sse(as_api_error(exc).body())
        finally:
            job.close()  # also reached when the client disconnects mid-stream (cancellation)
        yield sse("[DONE]")

    # Starlette-style routes: FastAPI would resolve the `Request` annotation in this module's
    # globals, where fastapi is deliberately not imported.
    async def completions(request: Request) -> Response:
        return await serve(request, COMPLETIONS)

    async def chat_completions(request: Request) -> Response:
        return await serve(request, CHAT)

    async def models(_: Request) -> Response:
        entry = {
            "id": model_name, "object": "model", "created": 0, "owned_by": "diversed",
            "draft": pair.draft_name, "context_window": pair.context_window, "default_method": default_spec.label,
        }
        return JSONResponse({"object": "list", "data": [entry]})

    async def health(_: Request) -> Response:
        return JSONResponse({
            "status": "ok", "model": model_name, "draft": pair.draft_name, "default_method": default_spec.label,
            "allowed_methods": list(settings.allowed_methods), "in_flight": scheduler.in_flight, "capacity": scheduler.capacity,
        })

    async def metrics(_: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    for path, endpoint, method in zip(ENDPOINTS, (completions, chat_completions, models, health, metrics), ("POST", "POST", "GET", "GET", "GET")):
        app.add_route(path, endpoint, methods=[method])
    return app


# --------------------------------------------------------------------------- CLI


def _method_list(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(METHODS)}, got {text!r}")
    return methods


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `diversed serve` (called by diversed.cli)."""
    from .cli import add_method_args, add_model_args, add_sampling_args

    parser = subparsers.add_parser("serve", help="serve an OpenAI-compatible HTTP API (completions, chat, metrics)")
    add_model_args(parser)
    add_method_args(parser)
    add_sampling_args(parser)  # server-side defaults for requests that leave a field out
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; the API has no authentication)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--max-tokens-limit", type=int, default=ServerSettings.max_tokens_limit, help="largest max_tokens a request may ask for")
    group.add_argument("--max-draft-length", type=int, default=ServerSettings.max_draft_length, help="largest speculative.draft_length")
    group.add_argument("--allowed-methods", type=_method_list, default=METHODS, help=f"comma-separated (default: all of {','.join(METHODS)})")
    group.add_argument("--queue-size", type=int, default=ServerSettings.queue_size, help="requests that may wait for the model; more get 429")
    group.add_argument("--request-timeout", type=float, default=ServerSettings.request_timeout, help="seconds per request, queueing included")
    group.add_argument("--max-prompt-bytes", type=int, default=ServerSettings.max_prompt_bytes, help="larger prompts get a 413 before tokenising (default 1 MiB)")
    group.add_argument("--max-connections", type=int, default=server_limits.MAX_CONNECTIONS, help="open connections; beyond that uvicorn answers 503")
    group.add_argument("--header-timeout", type=float, default=server_limits.HEADER_TIMEOUT_S, help="seconds for a request's headers to arrive")
    group.add_argument("--body-timeout", type=float, default=server_limits.BODY_TIMEOUT_S, help="seconds for a request's body to arrive (then 408)")
    group.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(handler=cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Validated settings, before any model loads."""
    from .cli import config_from_args, method_spec_from_args

    return ServerSettings(
        default_spec=method_spec_from_args(args),
        # The largest draft a request may ask for is also N_max for draft_length "auto".
        defaults=dataclasses.replace(config_from_args(args), max_draft_length=args.max_draft_length),
        max_tokens_limit=args.max_tokens_limit,
        max_draft_length=args.max_draft_length,
        allowed_methods=args.allowed_methods,
        queue_size=args.queue_size,
        request_timeout=args.request_timeout,
        max_prompt_bytes=args.max_prompt_bytes,
        body_timeout=args.body_timeout,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .cli import pair_from_args

    settings = settings_from_args(args)
    pair = pair_from_args(args, needs_draft=any(method != "ar" for method in settings.allowed_methods))
    app = create_app(pair, settings)
    print(
        f"serving {settings.model_name or pair.target_name} (draft {pair.draft_name}) on http://{args.host}:{args.port}/v1, "
        f"default method {app.state.default_spec.label}, backend {pair.backend} ({pair.backend_reason})",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5, **server_limits.uvicorn_limits(args.max_connections, args.header_timeout))
    return 0


__all__ = ["ServerSettings", "create_app", "register_cli", "cmd_serve", "settings_from_args", "ApiError"]
