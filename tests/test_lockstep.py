"""Lockstep evaluation walks the engine's rounds one token at a time: same law, same counts.

The joint law of (3 emitted tokens, drafted, accepted, rounds) under N = 2 rounds is
enumerated exactly from the small-vocabulary pair and the verifier's own tables; lockstep
samples and the engine's samples must both pass a chi-square test against it, and a
deliberately wrong process (every token from v, no bonus from p) must fail it.
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache

import pytest
import torch

from diversed.draft_length import FixedDraftLength
from diversed.engine import GenerationConfig, decode
from diversed.errors import UserInputError
from diversed.evaluate.lockstep import LockstepRow, lockstep_generate
from diversed.metrics import Metrics
from diversed.proposers import ModelProposer
from diversed.sampling import SamplingParams, logits_to_probs
from diversed.gates import KLGate
from diversed.verifiers import EMPTY_CONTEXT, Exact, StaticEnsemble

from diversed import cli

from .test_engine_statistics import PREFIX, chi_square_pvalue, load_small_vocab_pair
from .test_evaluate import copy_run, eval_args, gsm8k_run, needs_shared_data, read_rows  # noqa: F401 (gsm8k_run is a fixture)

PARAMS = SamplingParams(1.0)
LENGTH, N, RUNS = 3, 2, 3000


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    return load_small_vocab_pair(tmp_path_factory.mktemp("lockstep-small-vocab"))


def round_law(pair, verifier, bonus_from_p: bool = True) -> dict[tuple, float]:
    """P(tokens, drafted, accepted, rounds) of LENGTH tokens under fixed-N rounds, enumerated."""

    @lru_cache(maxsize=None)
    def probs(prefix: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for role in ("target", "draft"):
            runner = pair.runner(role)
            runner.rollback(0)
            logits, _ = runner.feed(PREFIX + list(prefix), 1)
            out.append(logits_to_probs(logits[0], PARAMS).double())
        return out[0], out[1]

    policy = FixedDraftLength(N)
    law: dict[tuple, float] = {}

    def walk(prefix: tuple[int, ...], n: int, k: int, done: tuple[int, int, int], prob: float) -> None:
        drafted, accepted, rounds = done
        if len(prefix) == LENGTH:
            if n:  # a round cut off by the budget still counts
                drafted, accepted, rounds = drafted + n, accepted + k, rounds + 1
            key = (prefix, drafted, accepted, rounds)
            law[key] = law.get(key, 0.0) + prob
            return
        if n == 0:
            n = policy.choose(LENGTH - len(prefix))
        p, q = probs(prefix)
        if k == n:  # bonus token
            source = p if bonus_from_p else verifier.tables(p[None], q[None], EMPTY_CONTEXT).emitted[0]
            for y in range(len(p)):
                if source[y] > 0:
                    walk(prefix + (y,), 0, 0, (drafted + n, accepted + n, rounds + 1), prob * float(source[y]))
            return
        tables = verifier.tables(p[None], q[None], EMPTY_CONTEXT)
        accept = q * tables.acceptance[0]  # P(draft x and accept it)
        reject = 1.0 - float(accept.sum())
        for x in range(len(p)):
            if accept[x] > 0:
                walk(prefix + (x,), n, k + 1, done, prob * float(accept[x]))
            if reject > 0 and tables.residual[0, x] > 0:
                walk(prefix + (x,), 0, 0, (drafted + n, accepted + k, rounds + 1), prob * reject * float(tables.residual[0, x]))

    walk((), 0, 0, (0, 0, 0), 1.0)
    return law


def _key(tokens, metrics: Metrics) -> tuple:
    return (tuple(tokens), metrics.drafted, metrics.accepted, metrics.rounds)


def pvalue(counts: dict[tuple, int], law: dict[tuple, float]) -> float:
    """Chi-square of (last two tokens, drafted, accepted, rounds): the full key has too many
    outcomes for RUNS samples when the law is diffuse. Enough bins are checked, or a test of
    one pooled bin could pass by construction."""
    coarse = lambda key: (key[0][1:],) + key[1:]  # noqa: E731
    observed: dict[tuple, int] = {}
    expected: dict[tuple, float] = {}
    for key, count in counts.items():
        observed[coarse(key)] = observed.get(coarse(key), 0) + count
    for key, prob in law.items():
        expected[coarse(key)] = expected.get(coarse(key), 0.0) + prob
    assert sum(prob * RUNS >= 5 for prob in expected.values()) >= 20
    return chi_square_pvalue(observed, expected, RUNS)


def lockstep_counts(pair, verifier) -> dict[tuple, int]:
    config = GenerationConfig(max_new_tokens=LENGTH, draft_length=N, sampling=PARAMS, ignore_eos=True)
    rows = [LockstepRow(seed, tuple(PREFIX), verifier, "m", seed) for seed in range(RUNS)]
    counts: dict[tuple, int] = {}
    for _, result in lockstep_generate(pair, rows, config, batch_size=500):
        key = _key(result.token_ids, result.metrics)
        counts[key] = counts.get(key, 0) + 1
    return counts


def engine_counts(pair, verifier) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for seed in range(RUNS):
        metrics = Metrics()
        config = GenerationConfig(max_new_tokens=LENGTH, draft_length=N, sampling=PARAMS, ignore_eos=True, seed=seed)
        proposer = ModelProposer(pair.runner("draft"), pair.vocab_size)
        tokens = list(itertools.chain.from_iterable(decode(pair.runner("target"), proposer, PREFIX, verifier, config, metrics=metrics)))
        key = _key(tokens, metrics)
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("verifier", [StaticEnsemble(weight=0.5), KLGate(threshold=0.05)], ids=["static", "klgate"])
def test_lockstep_follows_the_engines_joint_law(small_pair, verifier):
    law = round_law(small_pair, verifier)
    assert abs(sum(law.values()) - 1) < 1e-6
    assert pvalue(lockstep_counts(small_pair, verifier), law) > 1e-4


def test_engine_follows_the_enumerated_law_and_a_wrong_law_is_rejected(small_pair):
    """The enumeration is the engine's law (so lockstep matching it means matching the engine),
    and the test has power: a process without the bonus token from p is rejected."""
    verifier = StaticEnsemble(weight=0.2)
    counts = lockstep_counts(small_pair, verifier)
    assert pvalue(engine_counts(small_pair, verifier), round_law(small_pair, verifier)) > 1e-4
    assert pvalue(counts, round_law(small_pair, verifier, bonus_from_p=False)) < 1e-6


def test_lockstep_ar_rows_and_stop_strings(small_pair):
    """`ar` rows draft nothing; a stop string ends a row and is cut from its text; rows keep their keys."""
    config = GenerationConfig(max_new_tokens=12, draft_length=3, sampling=PARAMS, stop=("a",), ignore_eos=True)
    rows = [LockstepRow(("ar", seed), tuple(PREFIX), None, "ar", seed) for seed in range(20)]
    rows += [LockstepRow(("exact", seed), tuple(PREFIX[:2]), Exact(), "exact", seed) for seed in range(20)]
    results = dict(lockstep_generate(small_pair, rows, config, batch_size=16))
    assert set(results) == set(rows)
    for row, result in results.items():
        assert "a" not in result.text
        assert result.finish_reason in ("stop", "length")
        assert (result.metrics.drafted == 0) == (row.verifier is None)
        if row.verifier is None:
            assert result.metrics.rounds == len(result.token_ids)
    assert any(r.finish_reason == "stop" for r in results.values())


def test_lockstep_refuses_what_it_cannot_do(small_pair):
    row = [LockstepRow(0, tuple(PREFIX), Exact(), "exact", 0)]
    for config, message in (
        (GenerationConfig(sampling=SamplingParams(0.0)), "greedy"),
        (GenerationConfig(draft_length="auto"), "fixed"),
        (GenerationConfig(bias_budget=1.0), "bias-budget"),
    ):
        with pytest.raises(UserInputError, match=message):
            list(lockstep_generate(small_pair, row, config))


@needs_shared_data
def test_eval_lockstep_adds_rows_to_an_engine_run(gsm8k_run, tiny_model_dirs, tmp_path, capsys):
    """`diversed eval --lockstep` writes the same kind of row, marked, beside engine rows of the
    same settings; its summary leaves timing empty; a rerun has nothing to do; greedy is refused."""
    out = copy_run(gsm8k_run, tmp_path)
    before = read_rows(out)
    assert cli.main(eval_args(tiny_model_dirs, out, "--lockstep", "3", methods=["static:0.3", "klgate:0.1"], sequential=False)) == 0
    rows = read_rows(out)
    added = rows[len(before):]
    assert rows[: len(before)] == before
    assert sorted((r["example_id"], r["method"]) for r in added) == sorted((e, m) for e in ("test-0", "test-1") for m in ("static:0.3", "klgate:0.1"))
    assert all(r["lockstep"] and r["metrics"]["seconds"] > 0 and r["metrics"]["drafted"] > 0 for r in added)
    summary = {m["method"]: m for m in json.loads((out / "summary.json").read_text())["methods"]}
    assert summary["static:0.3"]["tokens_per_second"] is None and summary["static:0.3"]["speedup"] is None
    assert summary["static:0.3"]["acceptance_rate"] is not None
    assert cli.main(eval_args(tiny_model_dirs, out, "--lockstep", methods=["static:0.3"], sequential=False)) == 0
    assert len(read_rows(out)) == len(rows)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(eval_args(tiny_model_dirs, out, "--lockstep", "0", methods=["static:0.3"], sequential=False))
    assert exit_.value.code == 2 and "at least 1" in capsys.readouterr().err
    assert cli.main(eval_args(tiny_model_dirs, tmp_path / "greedy", "--lockstep", "--temperature", "0", methods=["exact"], sequential=False)) == 2
    assert "greedy" in capsys.readouterr().err


def test_lockstep_settles_auto_on_the_batching_backend():
    """Under --backend auto a lockstep run takes the backend that decodes batches, whatever auto
    would measure for one sequence at a time (llama.cpp, or torch-static on a GPU)."""
    import argparse

    from diversed.commands.args import resolve_backend
    from diversed.runners import batch_backend

    args = argparse.Namespace(target=None, draft=None, dtype=None, device="cpu", backend="auto")
    assert resolve_backend(args, batched=True) == batch_backend().name
    assert args.backend_reason == f"auto: {batch_backend().name}, the backend that decodes batches" and args.dtype is not None


def test_rows_that_join_a_running_batch_make_the_tokens_they_make_alone(small_pair):
    """As rows finish, waiting rows take their places (prefilled, their caches padded to the
    batch's); each row's tokens and counts are those it makes in a batch of its own, and a
    later row really finished before an earlier one (it joined a running batch)."""
    config = GenerationConfig(max_new_tokens=10, draft_length=2, sampling=PARAMS, stop=("a",), ignore_eos=True)
    prompts = [tuple(PREFIX), tuple(PREFIX[:2]), tuple(PREFIX[1:]), tuple(PREFIX[:1])]
    verifiers = [Exact(), StaticEnsemble(weight=0.5), None]
    rows = [LockstepRow(i, prompts[i % 4], verifiers[i % 3], "m", 100 + i) for i in range(24)]
    alone = {row.key: result for row in rows for _, result in lockstep_generate(small_pair, [row], config, batch_size=1)}
    order = []
    for row, result in lockstep_generate(small_pair, rows, config, batch_size=4):
        order.append(row.key)
        assert result.token_ids == alone[row.key].token_ids
        assert _counts(result.metrics) == _counts(alone[row.key].metrics) | {"estimated_bias": pytest.approx(alone[row.key].metrics.estimated_bias)}
        assert result.metrics.seconds > 0  # its share of the batch's time
        assert result.finish_reason == alone[row.key].finish_reason
    assert sorted(order) == list(range(24))
    assert any(order.index(later) < order.index(first) for first in range(4) for later in range(4, 24))


def test_rows_join_in_whole_runs_of_a_shared_prompt():
    """A prompt's adjacent rows join together (one prefill); only an empty batch splits a run."""
    from collections import deque

    from diversed.evaluate.lockstep import _take

    rows = [LockstepRow(i, (i // 3,), None, "ar", i) for i in range(7)]  # runs of 3, 3 and 1 rows
    waiting = deque(rows)
    assert [row.key for row in _take(waiting, 5, into_empty=False)] == [0, 1, 2]
    assert [row.key for row in _take(waiting, 2, into_empty=False)] == []
    assert [row.key for row in _take(waiting, 2, into_empty=True)] == [3, 4]
    assert [row.key for row in _take(waiting, 9, into_empty=False)] == [5, 6]
    assert not waiting


@needs_shared_data
def test_eval_runs_lockstep_by_default_where_it_has_the_engines_law(tiny_model_dirs, tmp_path, capsys):
    """Sampling at a fixed N with the draft model: batched rows with their share of batch time. Greedy: one
    timed generation at a time, and a note says why. --sequential and --lockstep together: a one-line error."""
    out = tmp_path / "default"
    assert cli.main(eval_args(tiny_model_dirs, out, methods=["ar", "static:0.5"], sequential=False)) == 0
    rows = read_rows(out)
    assert len(rows) == 4 and all(row["lockstep"] and row["metrics"]["seconds"] > 0 for row in rows)
    capsys.readouterr()
    greedy = tmp_path / "greedy"
    assert cli.main(eval_args(tiny_model_dirs, greedy, "--temperature", "0", methods=["exact"], sequential=False)) == 0
    assert "one generation at a time" in capsys.readouterr().err
    assert not any(row.get("lockstep") for row in read_rows(greedy))
    assert cli.main(eval_args(tiny_model_dirs, tmp_path / "both", "--lockstep", methods=["exact"])) == 2
    assert "contradict" in capsys.readouterr().err


@needs_shared_data
def test_a_killed_lockstep_eval_resumes_without_losing_or_repeating_a_row(tiny_model_dirs, tmp_path):
    """Rows are written as they finish; a run cut mid-line resumes with each (example, method) exactly once."""
    out = tmp_path / "run"
    args = eval_args(tiny_model_dirs, out, "--lockstep", "4", methods=["exact", "static:0.5", "ar"], n=3, sequential=False)
    assert cli.main(args) == 0
    lines = (out / "rows.jsonl").read_text().splitlines(keepends=True)
    (out / "rows.jsonl").write_text("".join(lines[:4]) + lines[4][:30])  # killed while writing the fifth row
    assert cli.main(args) == 0
    keys = [(row["example_id"], row["method"]) for row in read_rows(out)]
    assert len(keys) == len(set(keys)) == 9
    assert (out / "rows.jsonl").read_text().splitlines(keepends=True)[:4] == lines[:4]


@needs_shared_data
def test_lockstep_runs_on_the_static_cache_backend(tiny_model_dirs, tmp_path):
    """--backend torch-static (CUDA graphs on a GPU) batches on the eager runner, so eval's batched path takes it too."""
    out = tmp_path / "static"
    assert cli.main(eval_args(tiny_model_dirs, out, "--backend", "torch-static", "--lockstep", "2", methods=["exact"], sequential=False)) == 0
    rows = read_rows(out)
    assert len(rows) == 2 and all(row["lockstep"] for row in rows)
    assert json.loads((out / "settings.json").read_text())["backend"] == "torch-static"


def _counts(metrics) -> dict:
    """A row's metrics without its timing (a row's share of batch time depends on the rows beside it)."""
    return {name: value for name, value in metrics.to_dict().items() if "second" not in name}
