"""The OpenAI-compatible server end to end: a real `diversed serve` process on tiny models,
driven by the official `openai` client (and raw HTTP where the client would hide the wire)."""

from __future__ import annotations

import argparse
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from diversed.engine import GenerationConfig
from diversed.errors import UserInputError
from diversed.generation import MethodSpec, generate
from diversed.head import EnsembleHead, HeadConfig
from diversed.models import load_pair
from diversed.sampling import SamplingParams
from diversed.commands.serve import register_cli, settings_from_args
from diversed.server import ServerSettings, create_app
from diversed.testing import build_tiny_model, served

CONTEXT = 16384  # long enough for a request that outlives the request timeout
MAX_TOKENS_LIMIT = 12000
MAX_DRAFT_LENGTH = 8
REQUEST_TIMEOUT = 5.0
MODEL = "tiny-target"  # the target directory's name is the served model id
SLOW = {"prompt": "Hello", "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0}  # greedy: runs ~25 s, no EOS


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("server-models")
    target = build_tiny_model(root / MODEL, seed=1, sharpness=10.0, max_positions=CONTEXT)
    draft = build_tiny_model(root / "tiny-draft", seed=1, sharpness=10.0, perturb=1.0, max_positions=CONTEXT)
    pair = load_pair(str(target), str(draft), dtype="float32")
    head = root / "tiny-head"
    EnsembleHead(HeadConfig(pair.signature())).save(head)  # untrained: w = 0.5 everywhere
    return target, draft, head


@pytest.fixture(scope="module")
def pair(model_dirs):
    target, draft, _ = model_dirs
    return load_pair(str(target), str(draft), dtype="float32")


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory) -> str:
    """Base URL of a real server: default method diversed, queue size 1, 5 s timeout."""
    target, draft, head = model_dirs
    log_path = tmp_path_factory.mktemp("server-log") / "server.log"
    serve_args = [
        "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--head", str(head), "--queue-size", "1",
        "--request-timeout", str(REQUEST_TIMEOUT), "--max-tokens-limit", str(MAX_TOKENS_LIMIT),
        "--max-draft-length", str(MAX_DRAFT_LENGTH), "--log-level", "warning",
        "--draft-length", "5",  # a fixed N: responses are compared with the library's at N = 5
    ]
    # One intra-op thread: the machine is shared, and tiny models only lose from more.
    with served(serve_args, log_path, threads=1) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    # No retries: a 429 or 504 must reach the test, not be retried away.
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=30)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def _wait_in_flight(url: str, expected: int, within: float) -> None:
    deadline = time.monotonic() + within
    while (seen := _health(url)["in_flight"]) != expected:
        assert time.monotonic() < deadline, f"in_flight stayed {seen}, expected {expected} within {within} s"
        time.sleep(0.05)


def _extra(obj, name: str):
    """A non-OpenAI field of a client response object (kept by the client's models)."""
    return (obj.model_extra or {})[name]


def _greedy(max_tokens: int, draft_length: int = 5) -> GenerationConfig:
    return GenerationConfig(max_tokens, draft_length, SamplingParams(temperature=0))


# --------------------------------------------------------------------------- happy paths


def test_health_and_models(server, client, model_dirs):
    health = _health(server)
    assert health["status"] == "ok"
    assert health["default_method"] == f"diversed:{model_dirs[2]}"
    assert (health["in_flight"], health["capacity"]) == (0, 2)
    [model] = client.models.list().data
    assert model.id == MODEL
    assert _extra(model, "context_window") == CONTEXT


@pytest.mark.parametrize("speculative", [None, {"method": "static", "weight": 0.9, "draft_length": 3}])
def test_completion_matches_library(client, pair, model_dirs, speculative):
    """The server feeds the prompt raw and decodes exactly as `generate` does (greedy)."""
    extra = {"speculative": speculative} if speculative else None
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, extra_body=extra)
    spec = MethodSpec("static", weight=0.9) if speculative else MethodSpec("diversed", head=str(model_dirs[2]))
    expected = generate(pair, "Hello", spec, _greedy(12, 3 if speculative else 5), raw=True)
    [choice] = response.choices
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert _extra(response, "method") == spec.label
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, len(expected.token_ids))  # char tokenizer: 5 chars
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    metrics = usage.model_extra
    for name in ("drafted", "accepted", "rounds", "acceptance_rate", "mean_accepted_length", "estimated_bias",
                 "accepted_per_position", "drafted_per_position", "tokens_per_second"):
        assert name in metrics, name
    assert (metrics["drafted"], metrics["accepted"], metrics["rounds"]) == (
        expected.metrics.drafted, expected.metrics.accepted, expected.metrics.rounds
    )
    assert metrics["acceptance_rate"] == pytest.approx(metrics["accepted"] / metrics["drafted"])
    assert metrics["mean_accepted_length"] == pytest.approx(1 + metrics["accepted"] / metrics["rounds"])
    assert len(metrics["drafted_per_position"]) == (3 if speculative else 5)


def test_chat_uses_the_chat_template(client, pair, model_dirs):
    messages = [{"role": "user", "content": "Hi"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    expected = generate(pair, messages, MethodSpec("diversed", head=str(model_dirs[2])), _greedy(8))
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == 4  # <|user|> H i <|assistant|>
    assert response.usage.completion_tokens == len(expected.token_ids)


def test_streamed_completion_equals_plain(client):
    request = dict(model=MODEL, prompt="Stream me", max_tokens=20, temperature=0)
    plain = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert all(c.usage is None for c in chunks[:-1])  # usage only in the final chunk
    final = chunks[-1]
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason
    assert final.usage.completion_tokens == plain.usage.completion_tokens
    assert final.usage.model_extra["accepted"] == plain.usage.model_extra["accepted"]


def test_streamed_chat(client):
    request = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me"}], max_tokens=16, temperature=0)
    plain = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert "acceptance_rate" in chunks[-1].usage.model_extra


def test_sse_wire_format(server):
    body = {"prompt": "Hi", "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [block for block in text.split("\n\n") if block]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]" and text.endswith("data: [DONE]\n\n")
    final = json.loads(events[-2][len("data: "):])
    assert final["usage"]["completion_tokens"] <= 6 and final["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "speculative, label",
    [
        ({"method": "ar"}, "ar"),
        ({"method": "exact", "draft_length": 2}, "exact"),
        ({"weight": 0.8}, "static:0.8"),  # a weight alone means the static ensemble
        ({"method": "lenient", "lenience": 0.5}, "lenient:0.5"),
        ({"method": "cascade", "rule": "chow", "lenience": 0.2}, "cascade:chow:0.2"),
        ({"method": "typical"}, "typical"),
        ({"method": "diversed"}, "diversed:"),  # no head: the server's own
    ],
)
def test_speculative_field_selects_the_method(client, speculative, label):
    response = client.completions.create(model=MODEL, prompt="Pick", max_tokens=8, extra_body={"speculative": speculative})
    assert _extra(response, "method").startswith(label)
    metrics = response.usage.model_extra
    if label == "ar":
        assert metrics["drafted"] == 0 and metrics["acceptance_rate"] is None
    else:
        assert metrics["drafted"] > 0 and 0 <= metrics["acceptance_rate"] <= 1
    if "draft_length" in speculative:
        assert len(metrics["drafted_per_position"]) == speculative["draft_length"]


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int, **extra) -> str:
        response = client.completions.create(model=MODEL, prompt="Seed", max_tokens=24, temperature=1.0, seed=seed, **extra)
        return response.choices[0].text if not extra else "".join(c.choices[0].text for c in response)

    first = sample(7)
    assert sample(7) == first
    assert sample(7, stream=True) == first
    assert sample(8) != first


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(model=MODEL, prompt="Stop", max_tokens=24, temperature=0).choices[0].text
    stop = full[6:8]
    expected = full[: full.find(stop)]
    for stops in (stop, ["@@never@@", stop]):
        choice = client.completions.create(model=MODEL, prompt="Stop", max_tokens=24, temperature=0, stop=stops).choices[0]
        assert (choice.text, choice.finish_reason) == (expected, "stop")


# --------------------------------------------------------------------------- errors


LONG_PROMPT = "a" * (CONTEXT + 10)


@pytest.mark.parametrize(
    "endpoint, payload, status, param",
    [
        ("completions", b'{"prompt": "Hi",', 400, None),  # invalid JSON
        ("completions", b"[1, 2]", 400, None),
        ("completions", {"prompt": 5}, 400, "prompt"),
        ("completions", {"prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ("completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
        ("completions", {"prompt": "Hi", "stream": "yes"}, 400, "stream"),
        ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        ("completions", {"prompt": "Hi", "n": 2}, 400, "n"),
        ("completions", {"prompt": "Hi", "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_tokens"),
        ("completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
        ("completions", {"prompt": LONG_PROMPT, "max_tokens": 4}, 400, None),
        # fits the window but leaves no room for a round: found by the worker, before the first token
        ("completions", {"prompt": "a" * (CONTEXT - 3), "stream": True}, 400, None),
        ("completions", {"prompt": "Hi", "speculative": {"method": "nope"}}, 400, "speculative.method"),
        ("completions", {"prompt": "Hi", "speculative": {"method": "static", "weight": 1.5}}, 400, "speculative.weight"),
        ("completions", {"prompt": "Hi", "speculative": {"weight": 0}}, 400, "speculative.weight"),
        ("completions", {"prompt": "Hi", "speculative": {"weight": "high"}}, 400, "speculative.weight"),
        ("completions", {"prompt": "Hi", "speculative": {"method": "exact", "weight": 0.5}}, 400, "speculative.weight"),
        ("completions", {"prompt": "Hi", "speculative": {"wieght": 0.5}}, 400, "speculative.wieght"),
        ("completions", {"prompt": "Hi", "speculative": {"draft_length": MAX_DRAFT_LENGTH + 1}}, 400, "speculative.draft_length"),
        ("completions", {"prompt": "Hi", "speculative": {"head": "/etc/passwd"}}, 400, "speculative.head"),
        ("completions", {"prompt": "Hi", "logprobs": 3}, 400, "logprobs"),
        ("completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model"),
        ("chat/completions", {"messages": "Hi"}, 400, "messages"),
        ("chat/completions", {"messages": []}, 400, "messages"),
        ("chat/completions", {"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages.0.role"),
        ("chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True}, 400, None),
    ],
)
def test_bad_requests_get_openai_error_bodies(server, endpoint, payload, status, param):
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = httpx.post(f"{server}/v1/{endpoint}", content=content, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_client_surfaces_error_messages(client):
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=MODEL, prompt="Hi", n=2)
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-this-one", prompt="Hi")


# --------------------------------------------------------------------------- metrics, queueing


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_and_tokens(server, client):
    ok = ("diversed_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    bad = ("diversed_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))
    latency = ("diversed_request_latency_seconds_count", (("endpoint", "/v1/completions"),))
    by_method = (("method", "static"),)
    before = _scrape(server)
    response = client.completions.create(model=MODEL, prompt="Count", max_tokens=10, extra_body={"speculative": {"weight": 0.6}})
    httpx.post(f"{server}/v1/completions", json={"prompt": "Hi", "n": 3}, timeout=10)
    deadline = time.monotonic() + 3  # a request is counted just after its last byte is sent
    while (after := _scrape(server)).get(bad, 0) < before.get(bad, 0) + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    usage = response.usage.model_extra

    def delta(key) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta(ok) == 1 and delta(bad) == 1 and delta(latency) == 2
    assert delta(("diversed_generated_tokens_total", by_method)) == response.usage.completion_tokens
    assert delta(("diversed_drafted_tokens_total", by_method)) == usage["drafted"]
    assert delta(("diversed_accepted_tokens_total", by_method)) == usage["accepted"]
    assert delta(("diversed_prompt_tokens_total", by_method)) == response.usage.prompt_tokens
    assert after[("diversed_requests_in_flight", ())] == 0


def _open_raw_request(url: str, payload: dict) -> socket.socket:
    """Send a POST on a raw socket, so the test decides exactly when the client goes away."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


def test_queue_full_429_timeout_and_disconnects_free_the_slot(server, client):
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{server}/v1/completions", json=SLOW, timeout=30)
        _wait_in_flight(server, 1, within=10)  # running
        queued = _open_raw_request(server, {**SLOW, "stream": True})
        _wait_in_flight(server, 2, within=5)  # waiting behind it: the queue (size 1) is full

        rejected = httpx.post(f"{server}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert rejected.status_code == 429
        assert int(rejected.headers["retry-after"]) >= 1
        assert rejected.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)

        queued.close()  # a client leaving while queued gives its place back
        _wait_in_flight(server, 1, within=3)

        timed_out = slow.result()
        assert timed_out.status_code == 504, timed_out.text
        assert timed_out.json()["error"]["code"] == "timeout"
        _wait_in_flight(server, 0, within=2)  # the timed-out generation stopped too

    streaming = _open_raw_request(server, {**SLOW, "stream": True})
    received = b""
    while b"data: " not in received:
        received += streaming.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    _wait_in_flight(server, 1, within=1)
    streaming.close()  # mid-stream: must stop well before the 5 s timeout would
    _wait_in_flight(server, 0, within=2)
    assert client.completions.create(model=MODEL, prompt="Again", max_tokens=4).choices[0].text is not None


# --------------------------------------------------------------------------- in-process app and settings


def test_create_app_around_any_pair(tiny_pair):
    """Two apps in one process (own Prometheus registries); the default method is default_method(pair)."""
    from starlette.testclient import TestClient

    with TestClient(create_app(tiny_pair, ServerSettings())) as app, TestClient(create_app(tiny_pair, ServerSettings(max_tokens_limit=4))) as small:
        assert app.get("/health").json()["default_method"] == "exact"  # no shipped head is a default; issue 23's rule
        response = app.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 6, "temperature": 0})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 6
        assert small.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 6}).status_code == 400
        assert "diversed_requests_total" in small.get("/metrics").text


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_options_are_validated_before_loading_models():
    settings = settings_from_args(_serve_args("--allowed-methods", "ar,static", "--queue-size", "3", "--weight", "0.9"))
    assert settings.allowed_methods == ("ar", "static") and settings.queue_size == 3
    assert settings.default_spec == MethodSpec("static", weight=0.9)
    for argv in (("--draft-length", "9", "--max-draft-length", "8"), ("--queue-size", "-1"), ("--request-timeout", "0"), ("--weight", "2")):
        with pytest.raises(UserInputError):
            settings_from_args(_serve_args(*argv))
    with pytest.raises(SystemExit):
        _serve_args("--allowed-methods", "ar,nope")
