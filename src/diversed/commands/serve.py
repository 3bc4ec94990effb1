"""`diversed serve` (docs/server.md): thin over diversed.server."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from ..methods import METHODS, needs_draft
from ..server import limits
from ..server.schemas import ServerSettings
from .args import (add_method_args, add_model_args, add_sampling_args, config_from_args, draft_model_spec, method_spec_from_args,
                   pair_from_args)

if TYPE_CHECKING:
    from ..models import ModelPair


def _method_list(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(METHODS)}, got {text!r}")
    return methods


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `diversed serve` (called by diversed.cli)."""
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
    group.add_argument("--max-batch", type=int, default=ServerSettings.max_batch,
                       help="concurrent requests that may decode together, from the number at which that is measured to be "
                            "faster than one at a time (1: one at a time; docs/server.md)")
    group.add_argument("--request-timeout", type=float, default=ServerSettings.request_timeout, help="seconds per request, queueing included")
    group.add_argument("--max-prompt-bytes", type=int, default=ServerSettings.max_prompt_bytes, help="larger prompts get a 413 before tokenising (default 1 MiB)")
    group.add_argument("--max-connections", type=int, default=limits.MAX_CONNECTIONS, help="open connections; beyond that uvicorn answers 503")
    group.add_argument("--header-timeout", type=float, default=limits.HEADER_TIMEOUT_S, help="seconds for a request's headers to arrive")
    group.add_argument("--body-timeout", type=float, default=limits.BODY_TIMEOUT_S, help="seconds for a request's body to arrive (then 408)")
    group.add_argument("--prepare-timeout", type=float, default=limits.PREPARE_TIMEOUT_S,
                       help="seconds to parse and tokenise a received request (then 503, and the work is stopped)")
    group.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    group.add_argument("--engine", choices=("diversed", "vllm"), default="diversed",
                       help="diversed (default): this package's engine; vllm: vLLM's OpenAI server with the diversed plugin (docs/vllm.md)")
    parser.set_defaults(handler=cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Validated settings, before any model loads."""
    return ServerSettings(
        default_spec=method_spec_from_args(args),
        # The largest draft a request may ask for is also N_max for draft_length "auto".
        defaults=dataclasses.replace(config_from_args(args), max_draft_length=args.max_draft_length),
        max_tokens_limit=args.max_tokens_limit,
        max_draft_length=args.max_draft_length,
        allowed_methods=args.allowed_methods,
        queue_size=args.queue_size,
        max_batch=args.max_batch,
        request_timeout=args.request_timeout,
        max_prompt_bytes=args.max_prompt_bytes,
        body_timeout=args.body_timeout,
        prepare_timeout=args.prepare_timeout,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        return _serve_with_vllm(args)
    import uvicorn

    from ..server import create_app

    settings = settings_from_args(args)
    pair = pair_from_args(args, needs_draft=any(needs_draft(method) for method in settings.allowed_methods))
    app = create_app(pair, settings, batch_pair=_batch_pair(args, pair, settings))
    print(
        f"serving {settings.model_name or pair.target_name} (draft {pair.draft_name}) on http://{args.host}:{args.port}/v1, "
        f"default method {app.state.default_spec.label}, backend {pair.backend.name} ({pair.backend_reason})",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5, **limits.uvicorn_limits(args.max_connections, args.header_timeout))
    return 0


def _batch_pair(args: argparse.Namespace, pair: ModelPair, settings: ServerSettings) -> ModelPair | None:
    """The pair concurrent requests decode together on: `pair` itself when its backend decodes
    batches, else the same models loaded for torch (the faster batched dtype here), None where
    that cannot be (no draft, --max-batch 1, a model torch cannot load)."""
    if settings.max_batch < 2 or pair.draft is None:
        return None
    if pair.backend.can_batch:
        return pair
    from ..calibration import batched_dtype
    from ..errors import UserInputError
    from ..models import load_pair
    from ..runners import batch_backend

    dtype, why = batched_dtype(args.device)
    try:
        batch_pair = load_pair(args.target, draft_model_spec(args), dtype, device=args.device, backend=batch_backend(),
                               reason=f"batched requests ({why})")
    except (UserInputError, OSError, ValueError) as error:
        print(f"note: concurrent requests decode one at a time: the pair cannot load for {batch_backend().name} ({error})", file=sys.stderr)
        return None
    print(f"note: concurrent requests may decode together on {batch_backend().name}, {why}", file=sys.stderr)
    return batch_pair


def _serve_with_vllm(args: argparse.Namespace) -> int:
    from ..integrations.vllm.launch import serve

    spec = method_spec_from_args(args)
    return serve(target=args.target, draft=args.draft, method_label=spec.label if spec else "exact", host=args.host, port=args.port,
                 model_name=None, dtype=args.dtype)
