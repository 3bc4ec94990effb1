"""Issue 26: a flood of chat messages is refused without delaying anyone else, preparing a request
runs under a deadline and stops when its client leaves, and a model name is not echoed back
unbounded. (A file of its own that sorts after test_draft_length: the server calibrates the
tiny pair into the session's shared calibration file.)"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from diversed.testing import served

from .test_server import _scrape, model_dirs, pair  # noqa: F401  (fixtures)
from .test_server_hardening import post

PREPARE_TIMEOUT = 0.5
JSON = {"Content-Type": "application/json"}
RESTARTS = ("diversed_prepare_restarts_total", ())
# A chat of 4096 messages and 1 MiB of content, within every limit: the tiny pair's
# character-level tokeniser takes seconds over it, far past PREPARE_TIMEOUT.
SLOW_CHAT = {"messages": [{"role": "user", "content": "ab " * 85}] * 4096, "max_tokens": 4}
# Over the size that goes to the preparation process, and refused there at once (max_tokens).
CHEAP_LARGE = {"prompt": "a" * 70_000, "max_tokens": 0}


def _serve(model_dirs, tmp_path_factory, *extra: str):  # noqa: F811
    target, draft, _ = model_dirs
    log_path = tmp_path_factory.mktemp("flood-log") / "server.log"
    args = ["--target", str(target), "--draft", str(draft), "--dtype", "float32", "--queue-size", "2", "--max-tokens-limit", "64", *extra]
    return served(args, log_path, threads=1)


@pytest.fixture(scope="module")
def flood_server(model_dirs, tmp_path_factory):  # noqa: F811
    with _serve(model_dirs, tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def deadline_server(model_dirs, tmp_path_factory):  # noqa: F811
    with _serve(model_dirs, tmp_path_factory, "--prepare-timeout", str(PREPARE_TIMEOUT)) as url:
        yield url


def _worker_pid(url: str) -> int:
    """The server's preparation process, once it takes work: a large body it refuses answers 400."""
    deadline = time.monotonic() + 60
    while (status := post(url, "/v1/completions", CHEAP_LARGE).status_code) != 400:
        assert status == 503 and time.monotonic() < deadline, status  # 503: still spawning
        time.sleep(0.2)
    port = url.rsplit(":", 1)[1].encode()
    procs = [p.parent for p in Path("/proc").glob("[0-9]*/cmdline")]
    server = next(proc.name for proc in procs if (argv := _argv(proc)) and b"serve" in argv and b"--port" in argv
                  and argv[argv.index(b"--port") + 1] == port)
    children = [proc.name for proc in procs if any(b"spawn_main" in arg for arg in _argv(proc)) and _parent(proc) == server]
    assert len(children) == 1, children
    return int(children[0])


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


def _argv(proc: Path) -> list[bytes]:
    try:
        return (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _parent(proc: Path) -> str | None:
    try:
        return next(line.split()[1] for line in (proc / "status").read_text().splitlines() if line.startswith("PPid:"))
    except OSError:
        return None


def test_health_and_small_requests_answer_within_a_second_during_two_chat_floods(flood_server):
    url = flood_server
    _worker_pid(url)  # the floods meet a preparation process that is up
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 4}).status_code == 200  # a server's first generation is slower
    # 120,000 messages, 4.7 MiB: under the body and prompt limits, over the message cap.
    # Encoded once here, so that the test's own JSON encoding does not slow its probes.
    flood = json.dumps({"messages": [{"role": "user", "content": "<|user|>"}] * 120_000, "max_tokens": 4}).encode()
    latencies: dict[str, list[float]] = {"/health": [], "/v1/completions": []}
    during = 0  # probe rounds that started while a flood was in
    with ThreadPoolExecutor(2) as pool, httpx.Client(timeout=30) as client:
        floods = [pool.submit(httpx.post, f"{url}/v1/chat/completions", content=flood, headers=JSON, timeout=60) for _ in range(2)]
        while not all(f.done() for f in floods) or len(latencies["/health"]) < 5:
            during += not all(f.done() for f in floods)
            for path in latencies:
                started = time.perf_counter()
                response = client.get(f"{url}{path}") if path == "/health" else client.post(f"{url}{path}", json={"prompt": "hi", "max_tokens": 4})
                latencies[path].append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
            time.sleep(0.05)
        statuses = [f.result().status_code for f in floods]
    assert statuses == [400, 400], statuses  # over the message cap, refused by the preparation process
    assert during >= 2, during
    worst = {path: max(values) for path, values in latencies.items()}
    assert all(seconds < 1.0 for seconds in worst.values()), worst


def test_a_preparation_past_its_deadline_is_stopped_and_its_process_respawned(deadline_server):
    url = deadline_server
    before = _worker_pid(url)
    # Counted from here: a probe of _worker_pid's that waited most of this short deadline for a
    # spawn can overrun it while working, and is stopped too (docs/server.md).
    restarts = _scrape(url)[RESTARTS]
    started = time.perf_counter()
    slow = post(url, "/v1/chat/completions", SLOW_CHAT)
    assert time.perf_counter() - started < PREPARE_TIMEOUT + 2
    assert slow.status_code == 503, slow.text
    assert slow.json()["error"]["code"] == "prepare_timeout" and slow.json()["error"]["type"] == "timeout_error"
    assert _scrape(url)[RESTARTS] == restarts + 1  # counted before the 503 is sent
    assert _gone(before)  # stopped, not left to finish
    assert post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 4}).status_code == 200
    after = _worker_pid(url)  # a new process takes large bodies again
    assert after != before


def test_a_client_leaving_during_preparation_stops_the_work(flood_server):
    url = flood_server
    before, restarts = _worker_pid(url), _scrape(url)[RESTARTS]
    body = json.dumps(SLOW_CHAT).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)  # the body is in, its preparation takes seconds
    deadline = time.monotonic() + 10
    while _scrape(url)[RESTARTS] == restarts and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _scrape(url)[RESTARTS] == restarts + 1
    assert _gone(before) and _worker_pid(url) != before


@pytest.mark.parametrize("prompt", ["hi", "a" * 70_000])  # prepared on a thread, and in the preparation process
def test_the_404_does_not_echo_an_unbounded_model_name(flood_server, prompt):
    response = post(flood_server, "/v1/completions", {"model": "m" * 200_000, "prompt": prompt, "max_tokens": 2})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"  # kept across processes
    assert len(response.text) < 1000
