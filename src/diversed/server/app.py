"""The ASGI app serving one pair (`create_app`): a `GenerationService` and its routes."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any, AsyncIterator

from ..errors import DiversedError
from ..models import ModelPair
from . import limits
from .api_errors import ApiError
from .limits import ClientAborted, require_json
from .scheduler import ClientDisconnected, Job, drain, unless_disconnected
from .schemas import CHAT, COMPLETIONS, ServerSettings, Flavor, as_api_error, sse, usage
from .service import GenerationService, resolve_default_spec
from .telemetry import ENDPOINTS, RequestMetricsMiddleware

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from starlette.responses import Response

log = logging.getLogger("diversed.server")

WARM_LINE = "warmed up"  # printed once start-up work is done, before the port opens
MAX_BODY_BYTES = 8 << 20  # far above any prompt that fits a context window; stops memory abuse early

__all__ = ["create_app", "resolve_default_spec"]


def create_app(pair: ModelPair, settings: ServerSettings = ServerSettings(), batch_pair: ModelPair | None = None) -> FastAPI:
    """The ASGI app serving `pair`. Fails fast (UserInputError...) on a bad default method.

    `batch_pair` (a backend that decodes batches; `pair` itself when its backend does) lets
    concurrent requests decode together (server/batching.py), up to `settings.max_batch`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    service = GenerationService(pair, settings, batch_pair)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # uvicorn binds the port only after this startup: nothing (not even /health) is
        # answered until the first request would find everything warm.
        service.start()
        try:
            # The preparation process first: its spawn competes for the CPU, and llama.cpp's
            # spinning threads slow down many times under competing load.
            await service.worker.ready()
            print("warming up (step costs, the models' first forwards)...", file=sys.stderr, flush=True)
            seconds = await asyncio.to_thread(service.warm_up)
            print(f"{WARM_LINE} in {seconds:.1f} s", file=sys.stderr, flush=True)
            yield
        finally:
            service.close()

    app = FastAPI(title="diversed", summary="OpenAI-compatible relaxed speculative decoding", lifespan=lifespan)
    app.add_middleware(RequestMetricsMiddleware, telemetry=service.telemetry)
    app.state.service = service
    app.state.settings, app.state.default_spec, app.state.scheduler, app.state.telemetry = (
        settings, service.default_spec, service.scheduler, service.telemetry)
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI-style body with its status (ApiError)."""
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

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


def _add_routes(app: FastAPI, service: GenerationService) -> None:
    """The OpenAI-compatible endpoints, plus health and metrics."""
    from fastapi.responses import JSONResponse, Response

    # Starlette-style routes: FastAPI would resolve the `Request` annotation in this module's
    # globals, where fastapi is deliberately not imported.
    async def completions(request: Request) -> Response:
        return await _generate(request, service, COMPLETIONS)

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, service, CHAT)

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [service.model_entry()]})

    async def health(_: Request) -> Response:
        return JSONResponse(service.health())

    async def metrics(_: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.telemetry.registry), media_type=CONTENT_TYPE_LATEST)

    for path, endpoint, method in zip(ENDPOINTS, (completions, chat_completions, models, health, metrics), ("POST", "POST", "GET", "GET", "GET")):
        app.add_route(path, endpoint, methods=[method])


async def _generate(request: Request, service: GenerationService, flavor: Flavor) -> Response:
    """A completion or chat completion: a JSON answer, or an event stream."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    require_json(request)
    raw = await limits.read_body(request, MAX_BODY_BYTES, service.settings.body_timeout)
    try:
        prepared, generation = await unless_disconnected(request, service.prepare(raw, flavor))
    except ClientDisconnected:
        return Response(status_code=499)
    job = service.queue(prepared, generation)  # not inside unless_disconnected: a job queued there could be left behind
    header = service.response_header(flavor)
    handed_off = False  # once streaming, _stream_events owns the job
    try:
        if prepared.stream:
            # Wait for the first delta before answering, so that anything failing before
            # the first token (queue wait, timeout, a prompt too long) gets a real status.
            first = await unless_disconnected(request, job.next_delta())
            handed_off = True
            return StreamingResponse(_stream_events(job, flavor, header, first), media_type="text/event-stream")
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


async def _stream_events(job: Job, flavor: Flavor, header: dict[str, Any], first: str | None) -> AsyncIterator[str]:
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
