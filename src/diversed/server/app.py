"""The ASGI app serving one pair (`create_app`), and its Prometheus telemetry."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, AsyncIterator

from ..errors import DiversedError, UserInputError
from ..generation import Generation, MethodSpec, build_verifier, default_method, start_generation
from ..engine import GenerationConfig
from ..head import HeadMismatchError
from ..models import ModelPair
from . import limits
from .limits import ClientAborted, check_prompt_size, require_json
from .scheduler import ClientDisconnected, Job, Scheduler, drain, unless_disconnected
from .schemas import (CHAT, COMPLETIONS, ApiError, ServerSettings, Flavor, GenerationBody, as_api_error, parse_body, request_config,
                      resolve_spec, sse, usage)

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from starlette.responses import Response

log = logging.getLogger("diversed.server")

MAX_BODY_BYTES = 8 << 20  # far above any prompt that fits a context window; stops memory abuse early
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


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
        return await limits.read_body(request, MAX_BODY_BYTES, settings.body_timeout)

    def prepare(prompt: Any, spec: MethodSpec, config: GenerationConfig, raw: bool) -> Generation:
        """Tokenisation, chat template and head loading: run on a preparation thread, off the loop."""
        try:
            verifier = verifier_for(spec)
        except HeadMismatchError:
            # The message would show the server's files: name the field instead.
            raise ApiError(f"speculative.head {spec.head!r} was trained for another model pair", param="speculative.head") from None
        return start_generation(pair, prompt, spec, config, raw=raw, verifier=verifier)

    async def start_job(body: GenerationBody, flavor: Flavor) -> Job:
        if body.model is not None and body.model != model_name:
            shown = body.model if len(body.model) <= 100 else body.model[:100] + "…"  # never echo an unbounded name
            raise ApiError(f"the model {shown!r} does not exist; this server serves {model_name!r}", status=404, param="model", code="model_not_found")
        prompt, raw = flavor.prompt(body)
        check_prompt_size(prompt, settings.max_prompt_bytes)
        spec = resolve_spec(body.speculative, default_spec, settings)
        config = request_config(body, settings)
        generation = await asyncio.get_running_loop().run_in_executor(preparers, prepare, prompt, spec, config, raw)
        return Job(scheduler, generation, settings.request_timeout, lambda job: telemetry.record_job(job, spec.method))

    async def serve(request: Request, flavor: Flavor) -> Response:
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
            await unless_disconnected(request, drain(job))
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

    async def stream_events(job: Job, flavor: Flavor, header: dict[str, Any], first: str | None) -> AsyncIterator[str]:
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


