"""`diversed serve`: an OpenAI-compatible HTTP server over one loaded draft/target pair.

    diversed serve --port 8000                       # the embedded default pair
    curl http://127.0.0.1:8000/v1/completions -d '{"prompt": "def f(", "max_tokens": 16}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events), GET /v1/models, /health, /metrics (Prometheus). Requests choose their
verification method through the extension field `speculative` (see docs/server.md); the
response `usage` carries the docs/method.md §6 metrics next to the OpenAI token counts.

The package: schemas.py (settings, request and response shapes, errors, request -> generation),
scheduler.py (one generation at a time, per-request jobs), app.py (the ASGI app and its
telemetry), limits.py (what keeps one client from stalling the server), preparation.py (body to
queued request, under a deadline, large bodies in a process of their own). The command is
diversed/commands/serve.py. fastapi, uvicorn and prometheus-client are imported inside
functions so that registering the command (on every `diversed` invocation) stays cheap.
"""


from .app import create_app, resolve_default_spec
from .schemas import ApiError, ServerSettings

__all__ = ["ServerSettings", "create_app", "resolve_default_spec", "ApiError"]
