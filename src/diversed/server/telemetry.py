"""Prometheus telemetry of a server: its own registry, per-job counters, per-request latency."""

from __future__ import annotations

import time
from typing import Any

from .scheduler import Job, Scheduler

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
        self.prepare_restarts = Counter(
            "diversed_prepare_restarts", "Preparation processes stopped and respawned (a request past --prepare-timeout, or its client gone)",
            registry=registry,
        )
        self.warmup_seconds = Gauge(
            "diversed_warmup_seconds", "Seconds of the start-up warm-up (step costs, first forwards) before the server reported ready",
            registry=registry,
        )
        self.batch_from = Gauge(
            "diversed_batch_from_requests", "Requests in flight from which they decode together (0: never; measured at start-up)",
            registry=registry,
        )
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


class RequestMetricsMiddleware:
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
