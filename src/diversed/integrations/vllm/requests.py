"""A vLLM request's method: `SamplingParams(extra_args={"speculative": {...}})`, checked like `diversed serve`'s.

The `speculative` object has the schema of our server's (server/schemas.py: one field per
registry knob, unknown keys refused) and goes through the same resolution (`resolve_spec`), so
an error names its field the same way (`speculative.weight`). vLLM can verify against methods
whose verification target is a distribution computed from p and q alone (`VLLM_METHODS`);
head- and hidden-state methods, and rules that are not a target (lenient, typical), are refused.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from pydantic import ValidationError

from ...errors import UserInputError
from ...guard import GUARD, GuardVocabulary, guard_given, named_strings, vocabulary_of
from ...methods import METHODS, VERIFIERS, MethodSpec, make_verifier
from ...server.schemas import ApiError, ServerSettings, SpeculativeOptions, resolve_spec
from ...verifiers import HEAD, HIDDEN_STATES, Exact, MixtureVerifier, Verifier

EXTRA_ARGS_KEY = "speculative"
DEFAULT_METHOD_ENV = "DIVERSED_VLLM_METHOD"  # the server-wide default (`diversed serve --engine vllm --method`)

# Methods with a verification target v(p, q): vLLM's speculative decoding can verify against them.
VLLM_METHODS: tuple[str, ...] = tuple(
    name for name, cls in VERIFIERS.items() if issubclass(cls, MixtureVerifier) and not cls.needs & {HIDDEN_STATES, HEAD}
)
_SETTINGS = ServerSettings(allowed_methods=VLLM_METHODS)
_FIELDS_VLLM_SETS = {
    "draft_length": "vLLM's --speculative-config num_speculative_tokens",
    "bias_budget": "nothing in vLLM (a bias budget needs diversed's own engine)",
}


class RequestError(ValueError):
    """A bad `speculative` object: the message and the field it names (speculative.weight)."""

    def __init__(self, message: str, field: str | None):
        super().__init__(message)
        self.field = field


def default_spec() -> MethodSpec:
    """The method of requests that name none: $DIVERSED_VLLM_METHOD (a spec string), else `exact`."""
    text = os.environ.get(DEFAULT_METHOD_ENV, "exact")
    try:
        spec = MethodSpec.parse(text)
    except UserInputError as exc:
        raise UserInputError(f"{DEFAULT_METHOD_ENV}={text!r}: {exc}") from None
    if spec.method not in VLLM_METHODS:
        raise UserInputError(f"{DEFAULT_METHOD_ENV}={text!r}: {_not_in_vllm(spec.method)}")
    return spec


def request_spec(extra_args: dict[str, Any] | None, default: MethodSpec) -> MethodSpec:
    """The method a request names in extra_args["speculative"], else `default`. RequestError if bad."""
    raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if raw is None:
        return default
    if not isinstance(raw, dict):
        raise RequestError(f"{EXTRA_ARGS_KEY} must be an object, got {type(raw).__name__}", EXTRA_ARGS_KEY)
    try:
        options = SpeculativeOptions.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join([EXTRA_ARGS_KEY, *map(str, first["loc"])])
        raise RequestError(f"{field}: {first['msg']}", field) from None
    for name, owner in _FIELDS_VLLM_SETS.items():
        if getattr(options, name) is not None:
            raise RequestError(f"{EXTRA_ARGS_KEY}.{name} is set by {owner}, not per request", f"{EXTRA_ARGS_KEY}.{name}")
    if options.method is not None and options.method in METHODS and options.method not in VLLM_METHODS:
        raise RequestError(f"{EXTRA_ARGS_KEY}.method {options.method!r}: {_not_in_vllm(options.method)}", f"{EXTRA_ARGS_KEY}.method")
    try:
        return resolve_spec(options, default, _SETTINGS)
    except ApiError as exc:
        raise RequestError(exc.message, exc.param) from None


def speculative_object(spec: MethodSpec) -> dict[str, Any]:
    """The request's `speculative` object that names `spec` (the inverse of `request_spec`)."""
    return {"method": spec.method, **spec.given()}


def uses_vllm_rule(spec: MethodSpec) -> bool:
    """Lossless verification against p is vLLM's own rejection sampler: nothing of ours runs."""
    return VERIFIERS.get(spec.method) is Exact


def check_usable(spec: MethodSpec, temperature: float, draft_probs_available: bool) -> None:
    """A relaxed method needs sampled drafts with their probabilities. RequestError if it cannot run."""
    if uses_vllm_rule(spec):
        return  # vLLM's own rule: it runs with any drafter and at any temperature
    if not draft_probs_available:
        raise RequestError(
            f"method {spec.label} needs the draft's probabilities: start vLLM with a draft model and "
            '"draft_sample_method": "probabilistic" in --speculative-config', f"{EXTRA_ARGS_KEY}.method")
    if temperature <= 0:
        raise RequestError(
            f"method {spec.label} needs temperature > 0 (at temperature 0 vLLM drafts greedily and keeps no draft "
            "probabilities); use exact, or a temperature", "temperature")


def guarded(spec: MethodSpec) -> bool:
    """Whether the request's method is guarded (a `guard` or `guard_tokens` knob)."""
    return guard_given(spec.given())


def stop_token_ids(tokenizer: Any, all_stop_token_ids: Iterable[int]) -> tuple[int, ...]:
    """What a guard watches as the request's stop tokens: vLLM's `SamplingParams.all_stop_token_ids`
    (the request's `stop_token_ids`, the EOS id and the generation config's EOS ids; vLLM adds the
    EOS ids there even with `ignore_eos`) and the tokenizer's EOS id. So with `ignore_eos` the guard
    still watches EOS: it then costs acceptance where EOS has mass and keeps the law exact there,
    the same positions our engine guards."""
    ids = set(all_stop_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    return tuple(sorted(ids))


def guard_vocabulary(tokenizer: Any, all_stop_token_ids: Iterable[int]) -> GuardVocabulary:
    """The request's `GuardVocabulary`: the worker's tokenizer and `stop_token_ids`."""
    return vocabulary_of(tokenizer, stop_token_ids(tokenizer, all_stop_token_ids))


def check_guardable(spec: MethodSpec, tokenizer: Any, stop_ids: Iterable[int]) -> None:
    """A guard reads vLLM's tokenizer and needs a token to watch. RequestError if it has neither.

    `stop_ids`: what the front end knows of the request's stop tokens before vLLM adds the EOS
    ids (its `stop_token_ids`, the generation config's EOS ids)."""
    if not guarded(spec):
        return
    field = f"{EXTRA_ARGS_KEY}.{GUARD.name}"
    if tokenizer is None:
        raise RequestError(f"{field}: the guard reads the tokenizer's stop tokens, and this vLLM runs without a tokenizer "
                           "(skip_tokenizer_init)", field)
    if not stop_token_ids(tokenizer, stop_ids) and not named_strings(spec.guard_tokens or ""):
        raise RequestError(f"{field}: the guard has no tokens to watch: this tokenizer names no EOS token and the request "
                           f"gives no stop_token_ids or {EXTRA_ARGS_KEY}.guard_tokens", field)


def verifier_for(spec: MethodSpec, vocabulary: GuardVocabulary | None = None) -> Verifier:
    """The request's verifier; `vocabulary` (the tokenizer and the request's stop token ids, vLLM's
    `SamplingParams.all_stop_token_ids`) is what a guard watches."""
    return make_verifier(spec.method, vocabulary=vocabulary, **spec.verifier_knobs())


def _not_in_vllm(method: str) -> str:
    why = "it needs hidden states or a head" if method in VERIFIERS and VERIFIERS[method].needs & {HIDDEN_STATES, HEAD} else "it is not a verification target v(p, q)"
    return f"vLLM cannot verify against {method} ({why}); choose one of {', '.join(VLLM_METHODS)}"
