"""Many sequences at once: rows with their own settings side by side keep their own law, greedy
rows make the target's greedy tokens, and the server's batch worker gives every request what it
gets alone (also a request that moves from the engine into a running batch)."""

from __future__ import annotations

import itertools
import json
import threading

import pytest

from diversed.engine import GenerationConfig, decode
from diversed.lockstep import Batch, LockstepRow, new_state
from diversed.sampling import SamplingParams
from diversed.server import create_app
from diversed.server.batching import BatchPlan, plan_from_costs
from diversed.server.schemas import ServerSettings
from diversed.verifiers import Exact, StaticEnsemble

from .test_engine_statistics import PREFIX
from .test_lockstep import LENGTH, N, PARAMS, RUNS, _key, pvalue, round_law, small_pair  # noqa: F401 (a fixture)


def run_batch(pair, states, batch_size: int):
    """Every state decoded to its end, `batch_size` at a time, joining as places free up."""
    waiting, batch, done = list(states), Batch(pair), []
    while waiting or batch.states:
        free = batch_size - len(batch.states)
        if waiting and free:
            batch.join(waiting[:free])
            waiting = waiting[free:]
        done += list(batch.step())
    return done


def test_rows_with_their_own_settings_side_by_side_keep_their_own_law(small_pair):
    """The enumerated law of T = 1, N = 2 rows holds for rows decoded beside rows with other
    temperatures, top-k, draft lengths, budgets, prompts and greedy rows; the wrong law (no
    bonus token from p) is still rejected on the same counts."""
    verifier = StaticEnsemble(weight=0.5)
    config = GenerationConfig(max_new_tokens=LENGTH, draft_length=N, sampling=PARAMS, ignore_eos=True)
    others = [
        GenerationConfig(max_new_tokens=5, draft_length=4, sampling=SamplingParams(0.5, top_k=3), ignore_eos=True),
        GenerationConfig(max_new_tokens=2, draft_length=1, sampling=SamplingParams(0.0), ignore_eos=True),
        GenerationConfig(max_new_tokens=7, draft_length=3, sampling=SamplingParams(1.5, top_p=0.8), ignore_eos=True),
    ]
    states = []
    for seed in range(RUNS):
        states.append(new_state(small_pair, LockstepRow(("law", seed), tuple(PREFIX), verifier, "m", seed), config))
        if seed % 3 == 0:
            other = others[seed % len(others)]
            states.append(new_state(small_pair, LockstepRow(("other", seed), tuple(PREFIX[: 1 + seed % 3]), verifier, "m", -seed), other))
    counts: dict[tuple, int] = {}
    for state in run_batch(small_pair, states, batch_size=400):
        if state.row.key[0] == "law":
            key = _key(state.ids, state.result().metrics)
            counts[key] = counts.get(key, 0) + 1
        else:
            assert len(state.ids) == state.config.max_new_tokens
    assert sum(counts.values()) == RUNS
    assert pvalue(counts, round_law(small_pair, verifier)) > 1e-4
    assert pvalue(counts, round_law(small_pair, verifier, bonus_from_p=False)) < 1e-6


def test_greedy_exact_rows_make_the_targets_greedy_tokens(small_pair):
    """Lossless greedy decoding in a batch (beside sampled rows) equals the target's own greedy output, token for token."""
    prompts = [tuple(PREFIX), tuple(PREFIX[:2]), tuple(PREFIX[1:]), tuple(PREFIX[:1])]
    greedy = GenerationConfig(max_new_tokens=12, draft_length=3, sampling=SamplingParams(0.0), ignore_eos=True)
    sampled = GenerationConfig(max_new_tokens=9, draft_length=2, sampling=PARAMS, ignore_eos=True)
    states = [new_state(small_pair, LockstepRow(("greedy", i), prompt, Exact(), "exact", i), greedy) for i, prompt in enumerate(prompts)]
    states += [new_state(small_pair, LockstepRow(("sampled", i), prompt, StaticEnsemble(0.3), "s", i), sampled) for i, prompt in enumerate(prompts)]
    results = {state.row.key: state for state in run_batch(small_pair, states, batch_size=5)}
    for i, prompt in enumerate(prompts):
        runner = small_pair.runner("target")
        runner.rollback(0)
        target_alone = list(itertools.chain.from_iterable(decode(runner, None, list(prompt), None, greedy)))
        assert results[("greedy", i)].ids == target_alone
        assert results[("greedy", i)].result().metrics.drafted > 0


def test_batch_plan_batches_from_the_size_that_pays():
    # Requests of 100 tokens; alone each takes 10 s. A lockstep step costs 0.2 s at 1 row and
    # 0.5 s at 16 rows (0.02 s a row more); joining costs 0.5 s at 1 row, 0.5 s a row more.
    plan = plan_from_costs(10.0, (0.2, 0.5), (0.5, 8.0), 16, tokens=100)
    assert plan.min_rows == 3  # 2 rows: 200 tokens in 1.0 + 22 s (8.7/s); 3 rows: 300 in 1.5 + 24 s (11.8/s)
    assert not plan.batches(2) and plan.batches(3) and plan.batches(16)
    # Dearer joins (4 s a row) push it up: 4 rows make 400 tokens in 14 + 26 s (10/s, not more); 5 rows 10.9/s.
    assert plan_from_costs(10.0, (0.2, 0.5), (2.0, 62.0), 16, tokens=100).min_rows == 5
    assert plan_from_costs(1.0, (0.2, 0.5), (0.5, 8.0), 16, tokens=100).min_rows is None  # nothing beats 100 tokens/s
    assert not BatchPlan(None, 16).batches(16)


@pytest.fixture()
def batching_app(tiny_pair):
    """An app whose requests batch from 2 in flight (the measured plan replaced), and the worker."""
    from starlette.testclient import TestClient

    with TestClient(create_app(tiny_pair, ServerSettings(max_batch=4, max_tokens_limit=64), batch_pair=tiny_pair)) as client:
        service = client.app.state.service
        assert client.get("/health").json()["batch"]["max_rows"] == 4  # measured at start-up
        yield client, service


def _complete(client, prompt: str, max_tokens: int, **extra):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "speculative": {"method": "exact", "draft_length": 3}, **extra}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response


def test_concurrent_requests_decode_together_and_get_what_they_get_alone(batching_app):
    client, service = batching_app
    prompts = [("Hello there", 40), ("def f(x):", 24), ("One two", 32), ("abc", 16), ("Hello there", 8)]
    service.batcher.plan = BatchPlan(None, 4)  # alone: the engine, one at a time
    alone = [_complete(client, prompt, tokens).json()["choices"][0]["text"] for prompt, tokens in prompts]
    service.batcher.plan = BatchPlan(2, 4)
    texts: dict[int, str] = {}
    streamed: dict[int, str] = {}

    def ask(i: int) -> None:
        prompt, tokens = prompts[i]
        texts[i] = _complete(client, prompt, tokens).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                                                           "speculative": {"method": "exact", "draft_length": 3}}) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        streamed[i] = "".join(chunk["choices"][0]["text"] for chunk in chunks)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [texts[i] for i in range(len(prompts))] == alone  # greedy exact: the target's own output, batched or not
    assert [streamed[i] for i in range(len(prompts))] == alone
    assert service.batcher.peak >= 2  # they did decode together
    assert "diversed_batch_from_requests" in client.get("/metrics").text


def test_a_request_running_alone_moves_into_the_batch_when_others_arrive(batching_app):
    client, service = batching_app
    service.batcher.plan = BatchPlan(None, 4)
    long_alone = _complete(client, "Hello there", 64).json()["choices"][0]["text"]
    short_alone = _complete(client, "abc", 8).json()["choices"][0]["text"]
    service.batcher.plan = BatchPlan(2, 4)
    with client.stream("POST", "/v1/completions", json={"prompt": "Hello there", "max_tokens": 64, "temperature": 0, "stream": True,
                                                       "speculative": {"method": "exact", "draft_length": 3}}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))  # it runs alone now
        assert _complete(client, "abc", 8).json()["choices"][0]["text"] == short_alone
        chunks = [first] + [line for line in lines if line.startswith("data: {")]
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in chunks) == long_alone
    assert service.batcher.moved >= 1


def test_contexts_that_begin_alike_prefill_it_once_and_make_the_tokens_they_make_alone(small_pair, monkeypatch):
    """Rows whose prompts share a long beginning (a system prompt, few-shot examples) prefill it
    once; each row's tokens and counts are those it makes alone, joining an empty batch or a running one."""
    from diversed import lockstep

    fed: list[int] = []
    batch_type = type(small_pair.batch("target"))
    feed = batch_type.feed
    monkeypatch.setattr(batch_type, "feed", lambda self, ids, *rest: fed.append(ids.numel()) or feed(self, ids, *rest))
    shared = tuple(PREFIX) * 4  # longer than MIN_SHARED_PREFIX
    assert len(shared) - 1 >= lockstep.MIN_SHARED_PREFIX
    prompts = [shared + tail for tail in ((3,), (4, 5), (6, 3, 4), (5,))]
    config = GenerationConfig(max_new_tokens=6, draft_length=2, sampling=PARAMS, ignore_eos=True)
    rows = [LockstepRow(i, prompts[i % 4], StaticEnsemble(0.5), "m", 200 + i) for i in range(8)]
    alone = {}
    for row in rows:
        (state,) = run_batch(small_pair, [new_state(small_pair, row, config)], batch_size=1)
        alone[row.key] = state.ids
    fed.clear()
    together = run_batch(small_pair, [new_state(small_pair, row, config) for row in rows], batch_size=3)
    assert {state.row.key: state.ids for state in together} == alone
    prefill = max(fed)
    assert prefill < 3 * len(shared)  # the shared beginning was not fed once per distinct prompt
