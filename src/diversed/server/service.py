"""What a server does for one pair, without HTTP: the default method, verifiers (cached per
spec), preparing requests off the event loop under a deadline (preparation.py), the scheduler
and telemetry (app.py adds the routes)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import UserInputError
from ..engine import AUTO
from ..generation import Generation, MethodSpec, build_verifier, default_method, make_policy, start_generation
from ..head import HeadMismatchError
from ..methods import AR
from ..models import ModelPair
from ..proposers import get_proposer
from .api_errors import ApiError
from .batching import BatchPlan, BatchWorker, ServedGeneration, measure_plan
from .preparation import IN_PROCESS_BODY_BYTES, PrepareContext, Prepared, PrepareWorker, prepare_request
from .scheduler import Job, Scheduler
from .schemas import CHAT, COMPLETIONS, Flavor, PrepareTimeoutError, ServerSettings
from .telemetry import Telemetry


def resolve_default_spec(pair: ModelPair, settings: ServerSettings) -> MethodSpec:
    """The configured method, else `default_method(pair)`; `ar` when no draft is loaded."""
    spec = settings.default_spec
    if spec is None:
        spec = default_method(pair)[0] if pair.draft is not None else MethodSpec(AR)
    if spec.method not in settings.allowed_methods:
        raise UserInputError(f"the default method {spec.label} is not in --allowed-methods ({', '.join(settings.allowed_methods)}); pass --method")
    return spec


# The warm-up generation (`GenerationService.warm_up`): a short prompt, a few tokens, and a
# draft length that makes the draft run and the target verify more than one token.
WARM_UP_PROMPT = "Hello"
WARM_UP_TOKENS = 4
WARM_UP_DRAFT_LENGTH = 2
LOSSLESS = "exact"  # what warms the draft when the default method is `ar`


class GenerationService:
    """One pair served. Fails fast (UserInputError...) on a bad default method or head."""

    def __init__(self, pair: ModelPair, settings: ServerSettings, batch_pair: ModelPair | None = None):
        self.pair, self.settings = pair, settings
        self.default_spec = resolve_default_spec(pair, settings)
        self.verifier_for = functools.lru_cache(maxsize=64)(functools.partial(build_verifier, pair))
        self.verifier_for(self.default_spec)  # a bad or mismatched default head fails at startup, not per request
        self.model_name = settings.model_name or pair.target_name
        # Batching needs a pair that decodes batches, with its draft; until warm_up measures
        # when it pays (BatchPlan), the worker runs every request alone.
        batching = batch_pair is not None and batch_pair.draft is not None and settings.max_batch > 1
        self.batcher = BatchWorker(pair, batch_pair, BatchPlan(None, settings.max_batch), settings.max_draft_length) if batching else None
        self.scheduler = Scheduler(settings.queue_size, relays=batching)
        self.telemetry = Telemetry(self.scheduler)
        self.preparers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="diversed-prepare")  # bounded: tokenising is CPU work
        self.context = PrepareContext(settings, self.default_spec, self.model_name, pair.tokenizer, pair.context_window)
        self.worker = PrepareWorker(self.context, on_restart=self.telemetry.prepare_restarts.inc)

    def start(self) -> None:
        """Called once the event loop runs: spawn the preparation process."""
        self.worker.start()

    def warm_up(self) -> float:
        """Pay now, before the server reports ready, what its first request would pay: the
        step costs `draft_length: "auto"` needs (measured once per machine and cached, but
        a fresh cache, or one without N_max = --max-draft-length, is measured here), the
        runners' first forwards (contexts allocated, weights paged in), the draft's first use,
        the chat template's compilation and the detokenizer. One short generation through the
        request path (prepare_request, the verifier, start_generation), at a fixed draft
        length so that the draft runs even where `auto` would choose plain target steps. Where
        requests may decode together, then the measurement of when that pays (`measure_plan`).
        Returns its seconds (also `diversed_warmup_seconds`)."""
        started = time.perf_counter()
        settings, pair = self.settings, self.pair
        flavor = CHAT if getattr(pair.tokenizer, "chat_template", None) else COMPLETIONS
        body: dict[str, Any] = {"max_tokens": min(WARM_UP_TOKENS, settings.max_tokens_limit), "seed": 0}
        body.update({"messages": [{"role": "user", "content": WARM_UP_PROMPT}]} if flavor.chat else {"prompt": WARM_UP_PROMPT})
        prepared = prepare_request(json.dumps(body).encode(), flavor, self.context)
        spec, config = self._warm_up_spec(), prepared.config
        if spec.method != AR:
            # Any request may ask for "auto", whatever the server's default draft length.
            make_policy(pair, dataclasses.replace(config, draft_length=AUTO))
            config = dataclasses.replace(config, draft_length=min(WARM_UP_DRAFT_LENGTH, settings.max_draft_length))
        for _ in self._start_generation(dataclasses.replace(prepared, spec=spec, config=config)):
            pass
        if self.batcher is not None:
            # When batching pays, measured here: the default method alone against lockstep steps.
            self.batcher.plan = measure_plan(self._start_generation(prepared, batched=False), self.batcher.batch_pair,
                                             settings.max_batch, settings.max_draft_length, settings.defaults.max_new_tokens)
            self.telemetry.batch_from.set(self.batcher.plan.min_rows or 0)
        seconds = time.perf_counter() - started
        self.telemetry.warmup_seconds.set(seconds)
        return seconds

    def _warm_up_spec(self) -> MethodSpec:
        """The default method; `exact` instead of a default `ar` where requests may draft, so the draft is warm too."""
        spec = self.default_spec
        drafting = self.pair.draft is not None or not get_proposer(self.settings.defaults.proposer).needs_draft_model
        if spec.method == AR and LOSSLESS in self.settings.allowed_methods and drafting:
            return MethodSpec(LOSSLESS)
        return spec

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.scheduler.shutdown()
        self.preparers.shutdown(wait=False, cancel_futures=True)
        self.worker.close()

    async def prepare(self, raw: bytes, flavor: Flavor) -> tuple[Prepared, Generation | ServedGeneration]:
        """Everything between a received body and the queue, within --prepare-timeout (else
        PrepareTimeoutError). Cancelling it (a client gone) stops the preparation process's work."""
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(self.settings.prepare_timeout)
        try:
            async with deadline:
                if len(raw) <= IN_PROCESS_BODY_BYTES:
                    # A thread cannot be stopped: past the deadline it finishes its bounded work unread.
                    prepared = await loop.run_in_executor(self.preparers, prepare_request, raw, flavor, self.context)
                else:
                    prepared = await self.worker.prepare(raw, flavor)
                generation = await loop.run_in_executor(self.preparers, self._start_generation, prepared)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise PrepareTimeoutError(f"the request could not be prepared within {self.settings.prepare_timeout:g} s (the server's --prepare-timeout)") from None
        return prepared, generation

    def _start_generation(self, prepared: Prepared, batched: bool = True) -> Generation | ServedGeneration:
        """The verifier (a head may load) and the generation's proposer and policy: on a preparation thread.
        With batching on, the generation the batch worker runs."""
        try:
            verifier = self.verifier_for(prepared.spec)
        except HeadMismatchError:
            # The message would show the server's files: name the field instead.
            raise ApiError(f"speculative.head {prepared.spec.head!r} was trained for another model pair", param="speculative.head") from None
        generation = start_generation(self.pair, prepared.prompt_ids, prepared.spec, prepared.config, verifier=verifier)
        if self.batcher is None or not batched:
            return generation
        return ServedGeneration(self.batcher, generation, prepared.config.seed)

    def queue(self, prepared: Prepared, generation: Generation | ServedGeneration) -> Job:
        """The generation, queued for the model (QueueFullError when the queue is full)."""
        method = prepared.spec.method
        return Job(self.scheduler, generation, self.settings.request_timeout, lambda job: self.telemetry.record_job(job, method))

    def response_header(self, flavor: Flavor) -> dict[str, Any]:
        return {"id": f"{flavor.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name}

    def model_entry(self) -> dict[str, Any]:
        return {
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "diversed",
            "draft": self.pair.draft_name, "context_window": self.pair.context_window, "default_method": self.default_spec.label,
        }

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "model": self.model_name, "draft": self.pair.draft_name, "default_method": self.default_spec.label,
            "allowed_methods": list(self.settings.allowed_methods), "in_flight": self.scheduler.in_flight, "capacity": self.scheduler.capacity,
            "batch": self._batch_health(),
        }

    def _batch_health(self) -> dict[str, Any] | None:
        """Whether and from how many requests concurrent requests decode together, and the measurement behind it."""
        if self.batcher is None:
            return None
        plan = self.batcher.plan
        return {"from_requests": plan.min_rows, "max_rows": plan.max_rows, "rows_now": self.batcher.rows, "measured": plan.measured}
