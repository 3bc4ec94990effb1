"""What a request and a response look like: settings, request bodies, errors, request -> generation.

The `speculative` extension field is built from the method registry (methods.py): one field per
knob, validated by the same code as the CLI's flags; errors name the field (`speculative.weight`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..engine import GenerationConfig
from ..errors import DiversedError, UserInputError
from ..generation import MethodSpec, check_spec
from ..head import shipped_head_names
from ..methods import METHODS, head_kind, knob_owners, spec_from_knobs
from ..metrics import Metrics
from ..sampling import SamplingParams
from . import limits
from .api_errors import ApiError
from .limits import MAX_PROMPT_BYTES, finite

log = logging.getLogger("diversed.server")

RETRY_AFTER_S = 1
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
    max_batch: int = 16  # requests that may decode together (batching.py); 1: one at a time
    request_timeout: float = 600.0  # seconds from arrival to the last token, queueing included
    model_name: str | None = None  # the id clients pass as `model`; default: the target's name
    max_prompt_bytes: int = MAX_PROMPT_BYTES  # larger prompts get a 413 before tokenisation
    body_timeout: float = limits.BODY_TIMEOUT_S  # seconds for the whole body to arrive (then 408)
    prepare_timeout: float = limits.PREPARE_TIMEOUT_S  # seconds to parse, check and tokenise a received body (then 503)

    def __post_init__(self) -> None:
        checks = (
            (self.max_tokens_limit >= 1, f"--max-tokens-limit must be >= 1, got {self.max_tokens_limit}"),
            (self.max_draft_length >= 1, f"--max-draft-length must be >= 1, got {self.max_draft_length}"),
            (
                self.defaults.draft_length == "auto" or self.defaults.draft_length <= self.max_draft_length,
                f"--draft-length {self.defaults.draft_length} exceeds --max-draft-length {self.max_draft_length}",
            ),
            (self.queue_size >= 0, f"--queue-size must be >= 0, got {self.queue_size}"),
            (self.max_batch >= 1, f"--max-batch must be >= 1, got {self.max_batch}"),
            (self.request_timeout > 0, f"--request-timeout must be > 0, got {self.request_timeout}"),
            (self.max_prompt_bytes >= 1, f"--max-prompt-bytes must be >= 1, got {self.max_prompt_bytes}"),
            (self.body_timeout > 0, f"--body-timeout must be > 0, got {self.body_timeout}"),
            (self.prepare_timeout > 0, f"--prepare-timeout must be > 0, got {self.prepare_timeout}"),
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


def _speculative_options() -> type[BaseModel]:
    """The `speculative` extension field: a method, its knobs (one field per registry knob), N and a bias budget.

    Unknown keys are errors, so a misspelt knob never silently runs the default.
    """
    fields: dict[str, Any] = {"method": (str | None, None), "draft_length": (int | str | None, None), "bias_budget": (float | None, None)}
    for name, owners in knob_owners().items():
        fields[name] = (owners[0][1].type | None, None)
    config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    return create_model("SpeculativeOptions", __config__=config, **fields)


SpeculativeOptions = _speculative_options()


class GenerationBody(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI, but vLLM and most OpenAI-compatible servers accept it
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    speculative: SpeculativeOptions | None = None  # type: ignore[valid-type]

    def token_budget(self) -> int | None:
        return self.max_tokens


class CompletionBody(GenerationBody):
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


class ChatBody(GenerationBody):
    messages: list[_Message] = Field(min_length=1, max_length=limits.MAX_MESSAGES)
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


class QueueFullError(ApiError):
    status, type, code = 429, "rate_limit_error", "queue_full"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class RequestTimeoutError(ApiError):
    status, type, code = 504, "timeout_error", "timeout"


class PrepareTimeoutError(ApiError):
    """The body arrived but could not be parsed, checked and tokenised in time (the work is stopped)."""

    status, type, code = 503, "timeout_error", "prepare_timeout"


def field_name(param: str) -> str:
    """How the server names a method-spec parameter: weight -> speculative.weight."""
    return f"speculative.{param}"


def as_api_error(exc: BaseException) -> ApiError:
    """Every failure as an ApiError: user errors are 400s naming their field, anything else a logged 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DiversedError):
        return ApiError(exc.render(field_name), param=field_name(exc.param) if exc.param else None)
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


def resolve_spec(options: Any, default: MethodSpec, settings: ServerSettings) -> MethodSpec:
    """The request's method: the server default unless `speculative` names a method or a knob."""
    if options is None:
        return default
    knobs = {name: getattr(options, name) for name in knob_owners()}
    if options.method is not None and options.method not in METHODS:
        raise ApiError(f"unknown speculative.method {options.method!r}; choose one of {', '.join(settings.allowed_methods)}", param="speculative.method")
    if options.method == default.method and knobs["head"] is None and head_kind(default.method) is not None:
        knobs["head"] = default.head  # the same head method as the server's: its head unless another is named
    if knobs["head"] is not None and knobs["head"] not in _allowed_heads(default):
        raise ApiError(
            f"speculative.head {knobs['head']!r} is not available; this server offers: {', '.join(_allowed_heads(default)) or 'none'}",
            param="speculative.head",
        )
    try:
        spec = spec_from_knobs(options.method, knobs)
        if spec is not None:
            check_spec(spec)
    except UserInputError as exc:
        raise ApiError(exc.render(field_name), param=field_name(exc.param) if exc.param else "speculative") from None
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


def request_config(body: GenerationBody, settings: ServerSettings) -> GenerationConfig:
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


# --------------------------------------------------------------------------- response shapes


@dataclass(frozen=True)
class Flavor:
    """What differs between /v1/completions and /v1/chat/completions."""

    id_prefix: str
    object: str
    chunk_object: str
    body: type[GenerationBody]
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


COMPLETIONS = Flavor("cmpl", "text_completion", "text_completion", CompletionBody, chat=False)
CHAT = Flavor("chatcmpl", "chat.completion", "chat.completion.chunk", ChatBody, chat=True)


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


