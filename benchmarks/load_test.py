"""Load test for `diversed serve`: many concurrent clients, every response checked.

Starts a server on 127.0.0.1 (tiny random models built on the fly, or the embedded default
pair with --real), or targets a running one with --url (loopback only), then fires --clients
concurrent clients, each sending --requests-per-client short requests that rotate through
completions / chat x plain / streamed. Every response must be either a valid completion
(OpenAI shape, usage with the docs/method.md §6 metrics, `data: [DONE]` at the end of a stream) or a
clean 429 (error body, Retry-After); anything else (other statuses, malformed bodies,
transport errors, requests still open at --deadline) is counted as a failure. The server's
own /metrics request counts are compared with what the clients saw, so nothing is dropped
silently. Exit status 1 on any failure.

    python benchmarks/load_test.py --clients 32 --requests-per-client 2 --max-tokens 16
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --clients 8
    python benchmarks/load_test.py --real --clients 4 --requests-per-client 1 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import httpx

KINDS = (("completions", False), ("chat/completions", True), ("completions", True), ("chat/completions", False))
METRIC_NAMES = ("drafted", "accepted", "rounds", "acceptance_rate", "mean_accepted_length", "estimated_bias")


@dataclass
class Outcome:
    kind: str  # "ok", "429" or a failure reason
    endpoint: str
    seconds: float
    completion_tokens: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_seconds: float = 0.0
    server_counts: dict[str, int] = field(default_factory=dict)

    def failures(self) -> Counter:
        return Counter(o.kind for o in self.outcomes if o.kind not in ("ok", "429"))

    def summary(self, expected: int) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.kind == "ok"]
        latencies = sorted(o.seconds for o in ok)
        tokens = sum(o.completion_tokens for o in ok)
        drafted, accepted = sum(o.drafted for o in ok), sum(o.accepted for o in ok)
        failures = self.failures()
        missing = expected - len(self.outcomes)
        if missing:
            failures["no outcome (dropped)"] += missing
        return {
            "requests": expected,
            "ok": len(ok),
            "rejected_429": sum(o.kind == "429" for o in self.outcomes),
            "failures": dict(failures),
            "wall_seconds": round(self.wall_seconds, 3),
            "throughput_requests_per_s": round(len(ok) / self.wall_seconds, 3) if self.wall_seconds else None,
            "throughput_tokens_per_s": round(tokens / self.wall_seconds, 2) if self.wall_seconds else None,
            "latency_p50_s": round(_percentile(latencies, 50), 3) if latencies else None,
            "latency_p95_s": round(_percentile(latencies, 95), 3) if latencies else None,
            "completion_tokens": tokens,
            "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
            "server_counts": self.server_counts,
        }


def _percentile(sorted_values: list[float], percent: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, round(percent / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --------------------------------------------------------------------------- checks


def check_usage(usage: Any, max_tokens: int) -> str | None:
    if not isinstance(usage, dict):
        return "malformed: no usage"
    missing = [name for name in ("prompt_tokens", "completion_tokens", "total_tokens", *METRIC_NAMES) if name not in usage]
    if missing:
        return f"malformed: usage lacks {missing[0]}"
    if not 0 <= usage["completion_tokens"] <= max_tokens or usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return "malformed: inconsistent token counts"
    return None


def check_plain(body: Any, chat: bool, max_tokens: int) -> str | None:
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        if not isinstance(text, str) or choice["finish_reason"] not in ("stop", "length"):
            return "malformed: choice"
    except (KeyError, IndexError, TypeError):
        return "malformed: choices"
    return check_usage(body.get("usage"), max_tokens)


def check_stream(text: str, chat: bool, max_tokens: int) -> tuple[str | None, dict]:
    """(failure or None, the final usage)."""
    events = [block for block in text.split("\n\n") if block.strip()]
    if not events or events[-1] != "data: [DONE]":
        return "malformed: stream does not end with [DONE]", {}
    try:
        chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    except json.JSONDecodeError:
        return "malformed: non-JSON event", {}
    if not chunks or any("error" in chunk for chunk in chunks):
        return "malformed: error event in stream", {}
    final = chunks[-1]
    try:
        if final["choices"][0]["finish_reason"] not in ("stop", "length"):
            return "malformed: final chunk has no finish_reason", {}
        for chunk in chunks[:-1]:
            delta = chunk["choices"][0]["delta"] if chat else chunk["choices"][0]["text"]
            if chat and not isinstance(delta.get("content", ""), str):
                return "malformed: delta", {}
    except (KeyError, IndexError, TypeError):
        return "malformed: chunk", {}
    usage = final.get("usage")
    return check_usage(usage, max_tokens), usage or {}


def check_rejection(response: httpx.Response) -> str | None:
    try:
        error = response.json()["error"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "malformed: 429 without an error body"
    if not error.get("message") or "retry-after" not in response.headers:
        return "malformed: 429 without message or Retry-After"
    return None


# --------------------------------------------------------------------------- clients


def request_body(endpoint: str, index: int, stream: bool, args: argparse.Namespace) -> dict[str, Any]:
    text = f"Request {index}: write a short line."
    body: dict[str, Any] = {"max_tokens": args.max_tokens, "stream": stream, "seed": index}
    if args.method:
        body["speculative"] = {"method": args.method}
    if endpoint == "completions":
        return {**body, "prompt": text}
    return {**body, "messages": [{"role": "user", "content": text}]}


async def one_request(client: httpx.AsyncClient, endpoint: str, stream: bool, index: int, args: argparse.Namespace) -> Outcome:
    body = request_body(endpoint, index, stream, args)
    started = time.perf_counter()
    chat = endpoint.startswith("chat")
    try:
        async with client.stream("POST", f"/v1/{endpoint}", json=body) as response:
            raw = (await response.aread()).decode()
    except httpx.HTTPError as exc:
        return Outcome(f"transport: {type(exc).__name__}", endpoint, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if response.status_code == 429:
        return Outcome(check_rejection(response) or "429", endpoint, seconds)
    if response.status_code != 200:
        return Outcome(f"status {response.status_code}", endpoint, seconds)
    if stream:
        failure, usage = check_stream(raw, chat, args.max_tokens)
    else:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            return Outcome("malformed: non-JSON body", endpoint, seconds)
        failure, usage = check_plain(parsed, chat, args.max_tokens), parsed.get("usage") or {}
    if failure:
        return Outcome(failure, endpoint, seconds)
    return Outcome("ok", endpoint, seconds, usage["completion_tokens"], usage["drafted"], usage["accepted"])


async def run_client(client: httpx.AsyncClient, number: int, args: argparse.Namespace, outcomes: list[Outcome]) -> None:
    for j in range(args.requests_per_client):
        endpoint, stream = KINDS[(number + j) % len(KINDS)]
        outcomes.append(await one_request(client, endpoint, stream, number * args.requests_per_client + j, args))


async def run_load(url: str, args: argparse.Namespace) -> Report:
    report = Report()
    timeout = httpx.Timeout(args.deadline, connect=10)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        before = await server_request_counts(client)
        started = time.perf_counter()
        tasks = [asyncio.create_task(run_client(client, i, args, report.outcomes)) for i in range(args.clients)]
        _, pending = await asyncio.wait(tasks, timeout=args.deadline)  # bounded in time
        for task in pending:
            task.cancel()
        report.wall_seconds = time.perf_counter() - started
        after = await server_request_counts(client)
    report.server_counts = {key: after.get(key, 0) - before.get(key, 0) for key in sorted(set(after) | set(before))}
    return report


async def server_request_counts(client: httpx.AsyncClient) -> dict[str, int]:
    """diversed_requests_total for the generation endpoints, keyed 'endpoint status'."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "diversed_requests_total" and sample.labels["endpoint"].startswith("/v1/") and "models" not in sample.labels["endpoint"]:
                counts[f"{sample.labels['endpoint']} {sample.labels['status']}"] = int(sample.value)
    return counts


def dropped_by_server(report: Report) -> list[str]:
    """Differences between what the clients saw and what the server counted."""
    seen = Counter(f"/v1/{o.endpoint} {200 if o.kind == 'ok' else o.kind}" for o in report.outcomes if o.kind in ("ok", "429"))
    return [f"{key}: clients saw {seen.get(key, 0)}, server counted {report.server_counts.get(key, 0)}"
            for key in sorted(set(seen) | set(report.server_counts)) if seen.get(key, 0) != report.server_counts.get(key, 0)]


# --------------------------------------------------------------------------- the server under test


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"error: --url must be a loopback address (127.0.0.1, ::1, localhost), got {url!r}")
    return url.rstrip("/")


@contextmanager
def local_server(args: argparse.Namespace) -> Iterator[str]:
    """Start `diversed serve` on a free loopback port; yield its URL; stop it."""
    from diversed.testing import build_tiny_model, served

    with tempfile.TemporaryDirectory(prefix="diversed-load-") as tmp:
        serve_args = ["--queue-size", str(args.queue_size), "--log-level", "warning"]
        threads = None
        if not args.real:
            target = build_tiny_model(Path(tmp) / "tiny-target", seed=1, sharpness=10.0)
            draft = build_tiny_model(Path(tmp) / "tiny-draft", seed=1, sharpness=10.0, perturb=1.0)
            serve_args += ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
            threads = 1  # tiny models only lose from intra-op threads
        try:
            with served(serve_args, Path(tmp) / "server.log", threads=threads, health_timeout=900 if args.real else 120) as url:
                yield url
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}") from None


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (loopback only); default: start one")
    parser.add_argument("--real", action="store_true", help="start the server on the embedded default pair (default: tiny models)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--method", help="speculative.method for every request (default: the server's)")
    parser.add_argument("--queue-size", type=int, default=8, help="for the server this script starts (default 8, so some requests get 429)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole run; requests still open count as failures")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests_per_client, args.max_tokens) < 1 or args.deadline <= 0:
        parser.error("--clients, --requests-per-client and --max-tokens must be >= 1, --deadline > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    expected = args.clients * args.requests_per_client
    if args.url:
        report = asyncio.run(run_load(check_loopback(args.url), args))
    else:
        with local_server(args) as url:
            report = asyncio.run(run_load(url, args))
    summary = summary_with_checks(report, expected)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0 if summary["valid"] else 1


def summary_with_checks(report: Report, expected: int) -> dict[str, Any]:
    summary = report.summary(expected)
    summary["server_mismatches"] = dropped_by_server(report)
    summary["valid"] = not summary["failures"] and not summary["server_mismatches"]
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"requests        {summary['requests']}: {summary['ok']} ok, {summary['rejected_429']} clean 429, "
          f"{sum(summary['failures'].values())} failed {summary['failures'] or ''}")
    print(f"wall time       {summary['wall_seconds']:.2f} s")
    print(f"throughput      {summary['throughput_requests_per_s']} req/s, {summary['throughput_tokens_per_s']} completion tok/s")
    print(f"latency (ok)    p50 {summary['latency_p50_s']} s, p95 {summary['latency_p95_s']} s")
    print(f"acceptance      {summary['acceptance_rate']} (pooled over ok responses)")
    print(f"server counted  {summary['server_counts']}")
    print("check           " + ("PASS: every response a valid completion or a clean 429" if summary["valid"]
                              else f"FAIL: {summary['failures']} {summary['server_mismatches']}"))


if __name__ == "__main__":
    sys.exit(main())
