"""What keeps one request or one client from stalling or crashing `diversed serve` (issue 17).

- Body and prompt limits, checked before any tokenisation: the body streams in under a read
  timeout, the prompt's UTF-8 size is bounded by `--max-prompt-bytes`, a chat has at most
  MAX_MESSAGES messages. Preparing a request (preparation.py) has a deadline of its own.
- Only `Content-Type: application/json` bodies (a browser cannot send those cross-site
  without a CORS preflight, which this server never grants).
- Connection-level limits for uvicorn: a header-read timeout (uvicorn has none for a fresh
  connection), keep-alive and concurrency limits, a bounded header size, and a log filter so a
  file-descriptor shortage logs a line per second instead of a flood.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import time
from typing import TYPE_CHECKING, Any

from .api_errors import ApiError

if TYPE_CHECKING:
    from starlette.requests import Request

MAX_PROMPT_BYTES = 1 << 20  # a context window of text is far less; tokenising more only costs time
# Chat messages per request: far more than any conversation a context window holds. Rendering the
# chat template is linear but not interruptible, so the count is what bounds that work.
MAX_MESSAGES = 4096
BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this
# From a received body to its generation queued: parsing, the chat template, tokenising. Any
# prompt within the limits takes a small fraction of this; waiting behind other large requests
# for the preparation process counts too.
PREPARE_TIMEOUT_S = 30.0
HEADER_TIMEOUT_S = 10.0  # request line and headers must arrive within this
KEEP_ALIVE_S = 5
MAX_CONNECTIONS = 512  # beyond this uvicorn answers 503 at once
MAX_HEADER_BYTES = 64 << 10
ABORTED = 499  # nginx's "client closed request"

log = logging.getLogger("diversed.server")


class ClientAborted(Exception):
    """The client went away while sending its body."""


def api_error(message: str, status: int, code: str, param: str | None = None) -> Exception:
    return ApiError(message, status=status, code=code, param=param)


def require_json(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise api_error(f"the body must be sent as Content-Type: application/json, got {media_type or 'none'}", 415, "unsupported_media_type")


async def read_body(request: Request, max_bytes: int, timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The body, within `max_bytes` (413) and `timeout` (408); ClientAborted if the client leaves."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise api_error(f"the request body exceeds {max_bytes} bytes", 413, "body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise api_error(f"the request body exceeds {max_bytes} bytes", 413, "body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise api_error(f"the request body did not arrive within {timeout:g} s", 408, "body_timeout") from None
    except ClientDisconnect:
        raise ClientAborted from None
    return b"".join(chunks)


def check_prompt_size(prompt: str | list[dict[str, str]], max_bytes: int) -> None:
    """413 for a prompt (or all chat contents together) over `max_bytes` of UTF-8, before tokenising."""
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    size = sum(len(text.encode("utf-8", errors="surrogatepass")) for text in texts)
    if size > max_bytes:
        raise api_error(f"the prompt is {size} bytes; this server takes at most {max_bytes} (--max-prompt-bytes)", 413, "prompt_too_large", "prompt")


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a float becomes null (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- uvicorn


def guarded_h11_protocol(header_timeout: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol plus a deadline for each request's line and headers.

    uvicorn only times out idle keep-alive connections, and any byte cancels that: a client
    sending a header a minute would hold its connection for ever.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _waiting_since_cycle: Any = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not None and self.cycle is not self._waiting_since_cycle:
                self._cancel_header_timer()  # the headers are complete: the body has its own timeout

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()  # the next request on this connection gets the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._waiting_since_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class OncePerSecond(logging.Filter):
    """Lets a repeated message (asyncio's accept errors when file descriptors run out) through once a second."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < 1.0:
            return False
        self._last[key] = now
        return True


def raise_open_file_limit() -> int:
    """Use the hard limit on open files (many hosts start with a soft 1024). -> the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def uvicorn_limits(max_connections: int, header_timeout: float = HEADER_TIMEOUT_S) -> dict[str, Any]:
    """uvicorn.run keyword arguments: timeouts, a connection limit within the fd limit, header size."""
    if max_connections < 1 or header_timeout <= 0:
        from ..errors import UserInputError

        raise UserInputError(f"--max-connections must be >= 1 and --header-timeout > 0, got {max_connections} and {header_timeout:g}")
    open_files = raise_open_file_limit()
    # Leave room for the model's files, logs and the sockets uvicorn must still accept and refuse.
    connections = max(1, min(max_connections, open_files // 2))
    logging.getLogger("asyncio").addFilter(OncePerSecond())
    return {
        "http": guarded_h11_protocol(header_timeout),
        "timeout_keep_alive": KEEP_ALIVE_S,
        "limit_concurrency": connections,
        "backlog": min(2048, connections * 2),
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
    }
