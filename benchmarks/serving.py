"""Serving throughput: aggregate tokens/s and time to first token at 1, 4, 8 and 16 concurrent clients.

    python benchmarks/serving.py                              # diversed serve, batching on and off
    python benchmarks/serving.py --vllm .venv-vllm            # and serve --engine vllm
    python benchmarks/serving.py --servers batch --clients 1,16 --max-tokens 32

Each server (`batch`: `diversed serve` as shipped, concurrent requests decoding together once
that is measured to pay; `alone`: the same with --max-batch 1, one request at a time; `vllm`:
`diversed serve --engine vllm` from VENV) serves the embedded default pair on a loopback port,
started as a user starts it, warmed up before it says ready. For each client count C, C clients
each send one streamed chat request at once (a different coding prompt each, T = 1, a fixed
seed, --max-tokens); the figures are the completion tokens of all C over the wall time until
the last finishes, and the median time from sending to the first content chunk. The CPU and
its flags are printed first; the physical limit (FLOPs per token against the machine's peak)
is `benchmarks/throughput.py`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from diversed.calibration import machine_summary
from diversed.testing import served

PROMPTS = [
    "Write a Python function that reverses a string.", "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is.", "Write a Python class for a stack with push and pop.", "Write a function that merges two sorted lists.",
    "Explain recursion with an example.", "Write a Python function that counts the vowels in a string.",
    "Write a function that returns the n-th Fibonacci number.", "Explain the difference between a list and a tuple in Python.",
    "Write a Python function that flattens a nested list.", "Write a function that computes the factorial of n iteratively.",
    "Explain what a closure is in Python.", "Write a Python function that removes duplicates from a list, keeping order.",
    "Write a function that checks whether a string is a palindrome.", "Explain big-O notation briefly.",
    "Write a Python function that returns the largest element of a list without max().",
]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, seed: int) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 1.0,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                first = time.perf_counter() - started
    return (first if first is not None else time.perf_counter() - started), tokens


async def load(url: str, model: str, clients: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one_request(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens, i) for i in range(clients)))
        wall = time.perf_counter() - started
    tokens = sum(t for _, t in outcomes)
    return {"clients": clients, "tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
            "ttft_p50": statistics.median(f for f, _ in outcomes), "ttft_max": max(f for f, _ in outcomes)}


SERVE_ARGS = {"batch": [], "alone": ["--max-batch", "1"], "vllm": ["--engine", "vllm"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="batch,alone", help="comma-separated: batch, alone, vllm")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vllm", type=Path, metavar="VENV", help="also measure `diversed serve --engine vllm` from this venv")
    args = parser.parse_args()
    # A `timeout` or Ctrl-C must stop the server too: SIGTERM unwinds like SystemExit, through `served`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers = args.servers.split(",") + (["vllm"] if args.vllm and "vllm" not in args.servers else [])
    counts = [int(c) for c in args.clients.split(",")]
    print(machine_summary())
    print(f"each client: one streamed chat request, T = 1, at most {args.max_tokens} tokens; all clients at once\n")
    print("| server | clients | tokens | seconds | aggregate tokens/s | vs 1 client | p50 TTFT s | max TTFT s | health |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in servers:
        log = Path(tempfile.mkdtemp()) / f"{name}.log"
        python = str(args.vllm / "bin" / "python") if name == "vllm" else sys.executable
        started = time.perf_counter()
        try:
            with served(SERVE_ARGS[name], log, health_timeout=900, python=python) as url:
                ready = time.perf_counter() - started
                model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
                health = httpx.get(f"{url}/health", timeout=10)
                batch = (health.json().get("batch") if health.headers.get("content-type") == "application/json" else None) or {}
                note = f"ready in {ready:.0f} s" + (f", batches from {batch.get('from_requests')} requests" if batch else "")
                single = None
                for clients in counts:
                    result = {"server": name, **asyncio.run(load(url, model, clients, args.max_tokens))}
                    results.append(result)
                    single = single or result["tokens_per_second"]
                    print(f"| {name} | {clients} | {result['tokens']} | {result['seconds']:.1f} | {result['tokens_per_second']:.1f} | "
                          f"{result['tokens_per_second'] / single:.2f}x | {result['ttft_p50']:.2f} | {result['ttft_max']:.2f} | {note} |", flush=True)
                    note = ""
        except RuntimeError as error:
            print(f"| {name} | - | failed: {str(error).splitlines()[0]} (log: {log}) |", flush=True)
    print(json.dumps({"results": results}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
