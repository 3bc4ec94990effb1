"""Abuse test for `diversed serve` (issues 17, 26): load, slowloris, drop-mid-body, huge prompts and chat floods
against a real server process on 127.0.0.1 (tiny random models), with /health polled all along.

    python benchmarks/abuse.py                     # every case, bounded in count and time
    python benchmarks/abuse.py --slowloris 300 --hold 20
    python benchmarks/abuse.py --cases "chat flood"

Prints one table row per case: requests, status counts, /health latency during the attack
(p50 / max), during chat floods also the latency of 4-token completions sent every 100 ms,
and the server's RSS before and after. Loopback only: the server is started here on 127.0.0.1
and nothing else is ever contacted. Exit status 1 if /health ever took longer than
--health-limit, a small request longer than --small-limit, or either answered anything but 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx

HOST = "127.0.0.1"


def server_pid(port: int) -> int:
    """The pid of the `diversed serve --port PORT` process started here."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and b"--port" in argv and argv[argv.index(b"--port") + 1] == str(port).encode():
            return int(cmdline.parent.name)
    raise RuntimeError(f"no server process on port {port}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Probe:
    """Sends one request every `every` seconds from its own thread while an attack runs: /health,
    or (`small=True`) a 4-token completion."""

    def __init__(self, url: str, small: bool = False, every: float = 0.05):
        self.url, self.small, self.every, self.latencies, self.failures = url, small, every, [], Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _send(self, client: httpx.Client) -> int:
        if self.small:
            return client.post(f"{self.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}).status_code
        return client.get(f"{self.url}/health").status_code

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    status = self._send(client)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.latencies.append(time.perf_counter() - started)
                if status != 200:
                    self.failures[str(status)] += 1
                time.sleep(self.every)

    def __enter__(self) -> "Probe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- attacks


def attack_load(url: str, args: argparse.Namespace) -> tuple[int, Counter]:
    async def run() -> Counter:
        statuses: Counter = Counter()
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> None:
                body = {"prompt": f"Hello {i}", "max_tokens": 16, "seed": i, "stream": i % 2 == 0}
                try:
                    statuses[(await client.post(f"{url}/v1/completions", json=body)).status_code] += 1
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
            await asyncio.gather(*(one(i) for i in range(args.load)))
        return statuses

    return args.load, asyncio.run(run())


def _raw(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=args_timeout)


args_timeout = 30.0


def attack_slowloris(url: str, args: argparse.Namespace) -> tuple[int, Counter]:
    """Connections that send half their headers (or half their body) and then nothing."""
    port = int(url.rsplit(":", 1)[1])

    def one(i: int) -> str:
        try:
            sock = _raw(port)
        except OSError as exc:
            return f"connect {type(exc).__name__}"
        with sock:
            if i % 2:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"pro")
            sock.settimeout(args.hold)
            try:
                answer = sock.recv(64)
            except TimeoutError:
                return "still open"
            except OSError:
                return "reset"
            return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "closed"

    with ThreadPoolExecutor(min(args.slowloris, 256)) as pool:
        return args.slowloris, Counter(pool.map(one, range(args.slowloris)))


def attack_drop_mid_body(url: str, args: argparse.Namespace) -> tuple[int, Counter]:
    port = int(url.rsplit(":", 1)[1])
    before = _count_499(url)
    for _ in range(args.drops):
        with _raw(port) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"ab")
            time.sleep(0.02)
    time.sleep(1.0)
    return args.drops, Counter({"499 in /metrics": _count_499(url) - before})


def _count_499(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith("diversed_requests_total") and 'status="499"' in line)


def attack_huge_prompts(url: str, args: argparse.Namespace) -> tuple[int, Counter]:
    bodies = [{"prompt": "a" * (7 << 20), "max_tokens": 4}] * args.huge + [{"prompt": "ab " * 300_000, "max_tokens": 4}] * args.huge
    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = Counter(pool.map(lambda body: httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code, bodies))
    return len(bodies), statuses


def chat_flood_body(messages: int = 120_000) -> bytes:
    """A chat of `messages` `<|user|>` messages: 4.7 MiB at 120,000, under the body and prompt limits.
    Encoded once, so the client's own JSON encoding never competes with its probes."""
    return json.dumps({"messages": [{"role": "user", "content": "<|user|>"}] * messages, "max_tokens": 4}).encode()


def attack_chat_flood(url: str, args: argparse.Namespace) -> tuple[int, Counter]:
    """Chats of 120,000 messages, all sent at once; run_case probes small requests meanwhile."""
    body, headers = chat_flood_body(), {"Content-Type": "application/json"}
    with ThreadPoolExecutor(args.chat_floods) as pool:
        floods = [pool.submit(httpx.post, f"{url}/v1/chat/completions", content=body, headers=headers, timeout=300)
                  for _ in range(args.chat_floods)]
        return args.chat_floods, Counter(f.result().status_code for f in floods)


ATTACKS: dict[str, Callable[[str, argparse.Namespace], tuple[int, Counter]]] = {
    "load": attack_load, "slowloris": attack_slowloris, "drop mid-body": attack_drop_mid_body, "huge prompt": attack_huge_prompts,
    "chat flood": attack_chat_flood,
}
SMALL_PROBED = {"chat flood"}  # cases during which 4-token completions are timed too


# --------------------------------------------------------------------------- main


def run_case(name: str, url: str, pid: int, args: argparse.Namespace) -> dict:
    rss_before = rss_mb(pid)
    started = time.perf_counter()
    with Probe(url) as probe, (Probe(url, small=True, every=0.1) if name in SMALL_PROBED else nullcontext()) as small:
        requests, statuses = ATTACKS[name](url, args)
    latencies = sorted(probe.latencies) or [float("nan")]
    small_latencies = sorted(small.latencies) if small else []
    return {
        "small": (len(small_latencies), statistics.median(small_latencies), small_latencies[-1], dict(small.failures)) if small_latencies else None,
        "case": name, "requests": requests, "statuses": dict(statuses), "seconds": time.perf_counter() - started,
        "health_p50": statistics.median(latencies), "health_max": latencies[-1], "health_failures": dict(probe.failures),
        "rss_before": rss_before, "rss_after": rss_mb(pid),
    }


def print_table(rows: list[dict]) -> None:
    print("| case | requests | status counts | /health p50 / max during (s) | /health errors | small requests: n, p50 / max (s), errors "
          "| RSS before → after (MB) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items(), key=str))
        errors = ", ".join(f"{k}: {v}" for k, v in r["health_failures"].items()) or "none"
        small = "-"
        if r["small"]:
            n, p50, worst, failures = r["small"]
            small = f"{n}, {p50:.3f} / {worst:.3f}, " + (", ".join(f"{k}: {v}" for k, v in failures.items()) or "none")
        print(f"| {r['case']} | {r['requests']} | {statuses} | {r['health_p50']:.3f} / {r['health_max']:.3f} | {errors} | {small} | "
              f"{r['rss_before']:.0f} → {r['rss_after']:.0f} | {r['seconds']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    from diversed.testing import build_tiny_model, served

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=int, default=64, help="concurrent completion requests (default %(default)s)")
    parser.add_argument("--slowloris", type=int, default=200, help="slow connections (default %(default)s)")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds a slow connection waits for the server to act (default %(default)s)")
    parser.add_argument("--drops", type=int, default=20, help="clients that leave mid-body (default %(default)s)")
    parser.add_argument("--huge", type=int, default=3, help="7 MB prompts, and as many ~1 MB ones (default %(default)s)")
    parser.add_argument("--chat-floods", type=int, default=2, help="chats of 120,000 messages (default %(default)s)")
    parser.add_argument("--header-timeout", type=float, default=5.0, help="the server's --header-timeout (default %(default)s)")
    parser.add_argument("--health-limit", type=float, default=0.5, help="slowest acceptable /health, seconds (default %(default)s)")
    parser.add_argument("--small-limit", type=float, default=1.0, help="slowest acceptable small request, seconds (default %(default)s)")
    parser.add_argument("--cases", default=",".join(ATTACKS), help="comma-separated cases to run (default: all)")
    args = parser.parse_args(argv)
    cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    if unknown := [name for name in cases if name not in ATTACKS]:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    with tempfile.TemporaryDirectory(prefix="diversed-abuse-") as tmp:
        target = build_tiny_model(Path(tmp) / "tiny-target", seed=1, sharpness=10.0)
        draft = build_tiny_model(Path(tmp) / "tiny-draft", seed=1, sharpness=10.0, perturb=1.0)
        serve_args = ["--host", HOST, "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--queue-size", "8",
                      "--header-timeout", str(args.header_timeout), "--body-timeout", str(args.header_timeout), "--log-level", "warning"]
        log = Path(tmp) / "server.log"
        with served(serve_args, log, threads=1) as url:
            pid = server_pid(int(url.rsplit(":", 1)[1]))
            rows = [run_case(name, url, pid, args) for name in cases]
        tracebacks = log.read_text().count("Traceback")
    print_table(rows)
    print(f"\nserver log: {tracebacks} traceback(s)")
    bad = [r["case"] for r in rows if r["health_max"] > args.health_limit or r["health_failures"]
           or (r["small"] and (r["small"][2] > args.small_limit or r["small"][3]))]
    if bad:
        print(f"/health or small requests were slow or failing during: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
