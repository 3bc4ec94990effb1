"""The hooks that put our verifiers into vLLM 0.32.0 (installed by `register()`; docs/vllm.md).

Four seams, each a thin wrapper around the vLLM function it names:

1. `InputProcessor._validate_params` (front end): a request's `speculative` object is checked
   before it reaches the engine, so a bad one is a ValueError offline and a 400 in the server.
2. `ChatCompletionRequest/CompletionRequest.to_sampling_params` (OpenAI server): the body's
   `speculative` object becomes `extra_args["speculative"]`.
3. `GPUModelRunner._sample` (worker; vLLM's CPU runner inherits it): the batch's verifiers, in
   batch order, one per request, for the step's rejection sampling. A guarded request's verifier
   reads the worker's tokenizer (loaded once per process) and the request's stop token ids.
4. `rejection_sampler.rejection_sample` (worker): requests with a relaxed method are verified by
   `verification.verify_batch`; `exact` and greedy requests keep vLLM's own kernels.

On vLLM's CPU build `expand_batch_to_tokens` is also replaced: its C++ stand-in converts the
float output buffer to int64 and never copies it back, so per-token temperatures (and top-k,
top-p) are uninitialised memory and T > 0 speculative sampling is wrong (docs/vllm.md).
"""

from __future__ import annotations

import contextvars
import logging
from collections import OrderedDict
from typing import Any

import torch

from . import requests
from .verification import BatchLayout, verify_batch

log = logging.getLogger("diversed.vllm")

# The current step's verifiers, set by the model runner's _sample around the rejection sampler.
_BATCH_VERIFIERS: contextvars.ContextVar[list | None] = contextvars.ContextVar("diversed_batch_verifiers", default=None)
_INSTALLED = False
_VERIFIER_ATTRIBUTE = "_diversed_verifier"  # cached on vLLM's per-request state
# This worker process's verifiers by (method, stop ids of a guarded one): requests alike share one
# object (one group in verify_batch, one guarded token set). Bounded: stop ids come from requests.
_VERIFIERS: OrderedDict[tuple, Any] = OrderedDict()
_MAX_VERIFIERS = 256
_TOKENIZERS: dict[tuple, Any] = {}  # the worker's tokenizer, by model config, loaded on the first guarded request


def install() -> None:
    """Install every hook once per process (vLLM may call its plugins more than once)."""
    global _INSTALLED
    if _INSTALLED:
        return
    default = requests.default_spec()  # a bad $DIVERSED_VLLM_METHOD fails at startup, in one line
    _hook_validation(default)
    _hook_openai_requests()
    _hook_model_runner(default)
    _hook_rejection_sample()
    _fix_cpu_expand()
    _INSTALLED = True
    log.info("diversed: relaxed verification installed (default method %s)", default.label)


def installed() -> bool:
    """Whether this process's vLLM runs our hooks (vLLM logs and goes on when a plugin fails to load)."""
    return _INSTALLED


def draft_probs_available(speculative_config: Any) -> bool:
    """True when vLLM's drafter keeps the draft distribution q (what relaxed methods verify with)."""
    return (
        speculative_config is not None
        and getattr(speculative_config, "draft_sample_method", None) == "probabilistic"
        and getattr(speculative_config, "rejection_sample_method", "standard") == "standard"
    )


def _hook_validation(default) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params

    def _validate_params(self, params, supported_tasks):
        result = original(self, params, supported_tasks)
        if isinstance(params, SamplingParams):
            try:
                spec = requests.request_spec(params.extra_args, default)
                if requests.guarded(spec):
                    requests.check_guardable(spec, self.tokenizer, _front_end_stop_ids(params, self.generation_config_fields))
                if self.speculative_config is not None:
                    requests.check_usable(spec, params.temperature, draft_probs_available(self.speculative_config))
                elif not requests.uses_vllm_rule(spec):
                    raise requests.RequestError(f"method {spec.label} needs speculative decoding: start vLLM with "
                                                "--speculative-config", f"{requests.EXTRA_ARGS_KEY}.method")
            except requests.RequestError as exc:
                raise VLLMValidationError(str(exc), parameter=exc.field) from None
        return result

    InputProcessor._validate_params = _validate_params


def _front_end_stop_ids(params, generation_config: dict | None) -> set[int]:
    """The stop ids vLLM will put in `all_stop_token_ids`, less the tokenizer's EOS id (added after validation)."""
    ids = set(params.stop_token_ids or ())
    eos = (generation_config or {}).get("eos_token_id")
    ids.update([eos] if isinstance(eos, int) else eos or ())
    return ids


def _hook_openai_requests() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for request_class in (ChatCompletionRequest, CompletionRequest):
        request_class.to_sampling_params = _carrying_speculative(request_class.to_sampling_params)


def _carrying_speculative(original):
    def to_sampling_params(self, *args, **kwargs):
        params = original(self, *args, **kwargs)
        speculative = (self.model_extra or {}).get(requests.EXTRA_ARGS_KEY)
        if speculative is not None:
            params.extra_args = {**(params.extra_args or {}), requests.EXTRA_ARGS_KEY: speculative}
        return params

    return to_sampling_params


def _hook_model_runner(default) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._sample

    def _sample(self, logits, spec_decode_metadata):
        if spec_decode_metadata is None:
            return original(self, logits, spec_decode_metadata)
        verifiers = [_request_verifier(self, self.requests[req_id], default) for req_id in self.input_batch.req_ids]
        token = _BATCH_VERIFIERS.set(verifiers)
        try:
            return original(self, logits, spec_decode_metadata)
        finally:
            _BATCH_VERIFIERS.reset(token)

    GPUModelRunner._sample = _sample


def _request_verifier(runner, state, default):
    """The request's verifier (None for exact: vLLM's own rule), resolved once per request."""
    if not hasattr(state, _VERIFIER_ATTRIBUTE):
        params = state.sampling_params
        spec = requests.request_spec(params.extra_args if params is not None else None, default)  # checked by the front end
        setattr(state, _VERIFIER_ATTRIBUTE, None if requests.uses_vllm_rule(spec) else _verifier(runner, spec, params))
    return getattr(state, _VERIFIER_ATTRIBUTE)


def _verifier(runner, spec, params):
    """The verifier of `spec`; a guarded one watches the worker's tokenizer and the request's stop ids."""
    vocabulary = None
    if requests.guarded(spec):
        stop_ids = params.all_stop_token_ids if params is not None else ()
        vocabulary = requests.guard_vocabulary(_tokenizer(runner.model_config), stop_ids)
    key = (spec, vocabulary.stop_token_ids if vocabulary is not None else None)
    verifier = _VERIFIERS.get(key)
    if verifier is None:
        verifier = _VERIFIERS[key] = requests.verifier_for(spec, vocabulary)  # guard.py caches the token set
        if len(_VERIFIERS) > _MAX_VERIFIERS:
            _VERIFIERS.popitem(last=False)
    _VERIFIERS.move_to_end(key)
    return verifier


def _tokenizer(model_config):
    """vLLM's tokenizer of the served model, loaded once per worker process (the front end loads its own)."""
    key = (model_config.tokenizer, model_config.tokenizer_revision, model_config.tokenizer_mode)
    if key not in _TOKENIZERS:
        from vllm.tokenizers import cached_tokenizer_from_config

        tokenizer = cached_tokenizer_from_config(model_config)
        if tokenizer is None:  # skip_tokenizer_init: the front end refuses guarded requests then
            raise RuntimeError("a guarded request reached a vLLM worker that runs without a tokenizer")
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


def built_verifiers() -> list:
    """The verifiers this worker process has built for relaxed requests (the law test reads them)."""
    return list(_VERIFIERS.values())


def _hook_rejection_sample() -> None:
    from vllm.v1.sample import rejection_sampler

    original = rejection_sampler.rejection_sample

    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, target_logits,
                         bonus_token_ids, sampling_metadata, **kwargs):
        verifiers = _BATCH_VERIFIERS.get()
        if verifiers is None or draft_probs is None or sampling_metadata.all_greedy:
            return original(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, target_logits,
                            bonus_token_ids, sampling_metadata, **kwargs)
        greedy = (sampling_metadata.temperature == 0).tolist() if sampling_metadata.temperature is not None else []
        ours = [None if greedy and greedy[i] else verifier for i, verifier in enumerate(verifiers[:len(num_draft_tokens)])]
        if all(verifier is None for verifier in ours):
            return original(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, target_logits,
                            bonus_token_ids, sampling_metadata, **kwargs)
        # vLLM's kernels fill the rows of exact and greedy requests; ours overwrite the rest.
        target_probs = target_logits.softmax(dim=-1, dtype=torch.float32)
        if any(verifier is None for verifier in ours):
            output = original(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs, target_logits,
                              bonus_token_ids, sampling_metadata, **kwargs)
        else:
            output = torch.full((len(num_draft_tokens), max_spec_len + 1), rejection_sampler.PLACEHOLDER_TOKEN_ID,
                                dtype=torch.int32, device=target_logits.device)
        uniforms = rejection_sampler.generate_uniform_probs(draft_token_ids.shape[0], num_draft_tokens, sampling_metadata.generators,
                                                            target_logits.device)
        return verify_batch(ours, draft_token_ids, BatchLayout(list(num_draft_tokens)), max_spec_len, draft_probs, target_probs,
                            bonus_token_ids, uniforms, sampling_metadata.generators, output)

    rejection_sampler.rejection_sample = rejection_sample


def _fix_cpu_expand() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # the Triton kernel is right; only the CPU build's C++ stand-in loses its output
    from vllm.v1.sample import rejection_sampler

    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens


def expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int, replace_from: int = 0, replace_to: int = 0) -> torch.Tensor:
    """vLLM's expand_batch_to_tokens in torch: x[i] repeated n_i times, replace_from -> replace_to. [B] -> [num_tokens]."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())  # [B]
    expanded = torch.repeat_interleave(torch.where(x == replace_from, torch.full_like(x, replace_to), x), counts.to(x.device))
    return expanded[:num_tokens] if expanded.shape[0] >= num_tokens else torch.cat([expanded, x.new_zeros(num_tokens - expanded.shape[0])])
