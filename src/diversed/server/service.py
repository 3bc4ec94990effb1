"""What a server does for one pair, without HTTP: the default method, verifiers (cached per
spec), preparing generations off the event loop, the scheduler and telemetry (app.py adds the
routes)."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..engine import GenerationConfig
from ..errors import UserInputError
from ..generation import Generation, MethodSpec, build_verifier, default_method, start_generation
from ..head import HeadMismatchError
from ..methods import AR
from ..models import ModelPair
from .api_errors import ApiError
from .limits import check_prompt_size
from .scheduler import Job, Scheduler
from .schemas import ServerSettings, Flavor, GenerationBody, request_config, resolve_spec
from .telemetry import Telemetry


def resolve_default_spec(pair: ModelPair, settings: ServerSettings) -> MethodSpec:
    """The configured method, else `default_method(pair)`; `ar` when no draft is loaded."""
    spec = settings.default_spec
    if spec is None:
        spec = default_method(pair)[0] if pair.draft is not None else MethodSpec(AR)
    if spec.method not in settings.allowed_methods:
        raise UserInputError(f"the default method {spec.label} is not in --allowed-methods ({', '.join(settings.allowed_methods)}); pass --method")
    return spec


class GenerationService:
    """One pair served. Fails fast (UserInputError...) on a bad default method or head."""

    def __init__(self, pair: ModelPair, settings: ServerSettings):
        self.pair, self.settings = pair, settings
        self.default_spec = resolve_default_spec(pair, settings)
        self.verifier_for = functools.lru_cache(maxsize=64)(functools.partial(build_verifier, pair))
        self.verifier_for(self.default_spec)  # a bad or mismatched default head fails at startup, not per request
        self.model_name = settings.model_name or pair.target_name
        self.scheduler = Scheduler(settings.queue_size)
        self.telemetry = Telemetry(self.scheduler)
        self.preparers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="diversed-prepare")  # bounded: tokenising is CPU work

    def close(self) -> None:
        self.scheduler.shutdown()
        self.preparers.shutdown(wait=False, cancel_futures=True)

    def prepare(self, prompt: Any, spec: MethodSpec, config: GenerationConfig, raw: bool) -> Generation:
        """Tokenisation, chat template and head loading: run on a preparation thread, off the loop."""
        try:
            verifier = self.verifier_for(spec)
        except HeadMismatchError:
            # The message would show the server's files: name the field instead.
            raise ApiError(f"speculative.head {spec.head!r} was trained for another model pair", param="speculative.head") from None
        return start_generation(self.pair, prompt, spec, config, raw=raw, verifier=verifier)

    async def start_job(self, body: GenerationBody, flavor: Flavor) -> Job:
        settings = self.settings
        if body.model is not None and body.model != self.model_name:
            shown = body.model if len(body.model) <= 100 else body.model[:100] + "…"  # never echo an unbounded name
            raise ApiError(f"the model {shown!r} does not exist; this server serves {self.model_name!r}", status=404, param="model", code="model_not_found")
        prompt, raw = flavor.prompt(body)
        check_prompt_size(prompt, settings.max_prompt_bytes)
        spec = resolve_spec(body.speculative, self.default_spec, settings)
        config = request_config(body, settings)
        generation = await asyncio.get_running_loop().run_in_executor(self.preparers, self.prepare, prompt, spec, config, raw)
        return Job(self.scheduler, generation, settings.request_timeout, lambda job: self.telemetry.record_job(job, spec.method))

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
        }
