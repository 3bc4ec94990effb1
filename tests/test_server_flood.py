"""Issue 26: a flood of chat messages is refused before any work, and a model name is not echoed
back unbounded. (A file of its own that sorts after test_draft_length: the server calibrates
the tiny pair into the session's shared calibration file.)"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from .test_server import model_dirs, pair  # noqa: F401  (fixtures)
from .test_server_hardening import post, server  # noqa: F401


def test_a_flood_of_chat_messages_is_refused_before_any_work(server):  # noqa: F811
    url, _ = server
    flood = {"messages": [{"role": "user", "content": "<|user|>"}] * 120_000, "max_tokens": 4}
    with ThreadPoolExecutor(2) as pool:
        floods = [pool.submit(post, url, "/v1/chat/completions", flood) for _ in range(2)]
        time.sleep(0.2)
        started = time.perf_counter()
        small = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 4})
        small_seconds = time.perf_counter() - started
        statuses = [f.result().status_code for f in floods]
    assert small.status_code == 200
    # 400: over the message cap; 408 where a loaded machine cannot take 4.7 MiB within this
    # fixture's 1 s body timeout. Never a 200, and never the ~49 s of work this once cost.
    assert set(statuses) <= {400, 408}, statuses
    assert small_seconds < 5, small_seconds  # a generous bound on a loaded 2-core machine


def test_the_404_does_not_echo_an_unbounded_model_name(server):  # noqa: F811
    url, _ = server
    response = post(url, "/v1/completions", {"model": "m" * 200_000, "prompt": "hi", "max_tokens": 2})
    assert response.status_code == 404
    assert len(response.text) < 1000
