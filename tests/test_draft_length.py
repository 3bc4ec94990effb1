"""`--draft-length auto`: the cost-aware rule, its calibration, and proof that choosing N from
earlier rounds keeps every verifier's law (chi-square through the real engine)."""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from diversed.draft_length import AdaptiveDraftLength, FixedDraftLength, StepCosts, parse_draft_length
from diversed.engine import GenerationConfig, decode
from diversed.errors import UserInputError
from diversed.generation import MethodSpec, generate, start_generation
from diversed.proposers import ModelProposer
from diversed.sampling import SamplingParams, logits_to_probs
from diversed.verifiers import Exact, StaticEnsemble

from .test_engine_statistics import PREFIX, chi_square_pvalue, load_small_vocab_pair

CHEAP = StepCosts(c=0.1, verify=(1.0, 1.05, 1.1, 1.15, 1.2, 1.25))  # batched verification nearly free
LINEAR = StepCosts(c=0.5, verify=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0))  # k tokens cost k steps: never pays


def observe_rounds(policy, drafted: int, accepted: int, times: int) -> None:
    for _ in range(times):
        policy.observe(drafted, accepted)


def test_cheap_verification_and_high_acceptance_draft_long():
    policy = AdaptiveDraftLength(CHEAP, max_draft_length=5)
    observe_rounds(policy, 5, 5, 50)
    assert policy.choose(remaining=100) == 5
    assert policy.choose(remaining=3) == 2  # never past the budget: a round emits up to N + 1


def test_low_acceptance_drafts_short_or_not_at_all():
    policy = AdaptiveDraftLength(StepCosts(c=0.4, verify=(1.0, 1.3, 1.6, 1.9, 2.2, 2.5)), max_draft_length=5)
    observe_rounds(policy, 5, 0, 60)
    assert policy.choose(remaining=100) == 0
    long_policy = AdaptiveDraftLength(StepCosts(c=0.4, verify=(1.0, 1.3, 1.6, 1.9, 2.2, 2.5)), max_draft_length=5)
    observe_rounds(long_policy, 5, 5, 60)
    assert long_policy.choose(remaining=100) > 0


def test_a_machine_where_speculation_cannot_pay_never_drafts():
    policy = AdaptiveDraftLength(LINEAR, max_draft_length=5)
    observe_rounds(policy, 5, 5, 100)  # even perfect acceptance
    assert {policy.choose(remaining=100) for _ in range(500)} == {0}  # and no probing either


def test_probing_backs_off_where_drafting_does_not_pay():
    policy = AdaptiveDraftLength(StepCosts(c=0.4, verify=(1.0, 1.3, 1.6, 1.9, 2.2, 2.5)), max_draft_length=5, probe_every=4)
    observe_rounds(policy, 5, 0, 60)
    probes = []
    for step in range(200):
        if policy.choose(remaining=100) > 0:
            probes.append(step)
            policy.observe(1, 0)
    assert len(probes) >= 3
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # the interval grows


def test_expected_rate_formula():
    """best_length maximises (1 + sum_i prod_{j<=i} a_j) / (N c + v(N + 1)) over N."""
    policy = AdaptiveDraftLength(StepCosts(c=0.3, verify=(1.0, 1.2, 1.5, 1.9)), max_draft_length=3, prior_weight=1e9, prior_acceptance=0.7)
    rates = [(1 + sum(0.7 ** i for i in range(1, n + 1))) / (n * 0.3 + (1.0, 1.2, 1.5, 1.9)[n]) for n in range(4)]
    assert policy.best_length(3) == max(range(4), key=rates.__getitem__)


def test_fixed_length_and_parsing():
    assert FixedDraftLength(5).choose(remaining=3) == 2 and FixedDraftLength(5).choose(remaining=1) == 1
    assert parse_draft_length("auto") == "auto" and parse_draft_length("7") == 7
    for bad in ("0", "-1", "x", "2.5"):
        with pytest.raises(UserInputError, match="draft length"):
            parse_draft_length(bad)
    with pytest.raises(UserInputError, match="draft length"):
        GenerationConfig(draft_length="sometimes")


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    return load_small_vocab_pair(tmp_path_factory.mktemp("auto-small-vocab"))


def sequence_law(pair, length: int, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(y_1..y_length) under the target alone, enumerated exactly."""
    law: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, prob in law.items():
            with torch.inference_mode():
                logits, _ = pair.runner("target").feed(PREFIX + list(prefix), 1)
            p = logits_to_probs(logits[0], params).double()
            for y in range(pair.vocab_size):
                if p[y] > 0:
                    grown[prefix + (y,)] = prob * float(p[y])
        law = grown
    return law


def test_auto_draft_length_keeps_exact_lossless(small_pair):
    """One policy shared by every generation, so N varies with the history of earlier rounds (and
    of earlier generations), and still every 3-token continuation follows the target's law."""
    params, runs = SamplingParams(1.0), 4000
    policy = AdaptiveDraftLength(StepCosts(c=0.3, verify=(1.0, 1.1, 1.15)), max_draft_length=2, prior_acceptance=0.9, probe_every=2)
    observed: dict[tuple[int, ...], int] = {}
    lengths: set[int] = set()
    for seed in range(runs):
        proposer = ModelProposer(small_pair.runner("draft"), small_pair.vocab_size)
        config = GenerationConfig(max_new_tokens=3, sampling=params, ignore_eos=True, seed=seed)
        rounds = decode(small_pair.runner("target"), proposer, PREFIX, Exact(), config, policy=_Recording(policy, lengths))
        tokens = tuple(itertools.chain.from_iterable(rounds))
        observed[tokens] = observed.get(tokens, 0) + 1
    assert len(lengths) >= 2  # the rule really varied N
    assert chi_square_pvalue(observed, sequence_law(small_pair, 3, params), runs) > 1e-4


class _Recording:
    """A policy wrapper that remembers which N it chose."""

    def __init__(self, policy, seen: set):
        self.policy, self.seen = policy, seen

    def choose(self, remaining: int) -> int:
        n = self.policy.choose(remaining)
        self.seen.add(n)
        return n

    def observe(self, drafted: int, accepted: int) -> None:
        self.policy.observe(drafted, accepted)


class _HistoryPolicy:
    """N from earlier rounds only, chosen to visit 0, 1 and 2 often: (calls + last accepted) mod 3."""

    def __init__(self):
        self.calls, self.last_accepted, self.first = 0, 0, None

    def choose(self, remaining: int) -> int:
        n = min((self.calls + self.last_accepted) % 3, remaining - 1)
        self.calls += 1
        if self.first is None:
            self.first = n
        return n

    def observe(self, drafted: int, accepted: int) -> None:
        self.last_accepted = accepted


def test_history_dependent_draft_length_keeps_the_static_law(small_pair):
    """The first emitted token follows v = w p + (1 - w) q when its round drafted (N >= 1) and p
    when it did not (N = 0): N comes from earlier rounds (here of earlier generations, through a
    shared policy), never from this round's draws."""
    params, runs, w = SamplingParams(1.0), 4000, 0.5
    with torch.inference_mode():
        p = logits_to_probs(small_pair.runner("target").feed(PREFIX, 1)[0][0], params).double()
        q = logits_to_probs(small_pair.runner("draft").feed(PREFIX, 1)[0][0], params).double()
    policy = _HistoryPolicy()
    counts: dict[int, dict[int, int]] = {0: {}, 1: {}}
    for seed in range(runs):
        policy.first = None
        proposer = ModelProposer(small_pair.runner("draft"), small_pair.vocab_size)
        config = GenerationConfig(max_new_tokens=3, sampling=params, ignore_eos=True, seed=seed)
        first = next(iter(decode(small_pair.runner("target"), proposer, PREFIX, StaticEnsemble(w), config, policy=policy)))[0]
        bucket = counts[int(policy.first > 0)]
        bucket[first] = bucket.get(first, 0) + 1
    for drafted, law in ((0, p), (1, w * p + (1 - w) * q)):
        total = sum(counts[drafted].values())
        assert total > 500
        expected = {y: float(law[y]) for y in range(small_pair.vocab_size)}
        assert chi_square_pvalue(counts[drafted], expected, total) > 1e-4


def test_generate_with_auto_measures_once_and_caches(tiny_pair):
    path = os.environ["DIVERSED_CALIBRATION"]
    config = GenerationConfig(max_new_tokens=20, draft_length="auto", seed=0, ignore_eos=True)
    result = generate(tiny_pair, "count to ten", MethodSpec("exact"), config)
    assert len(result.token_ids) == 20
    cache = json.loads(open(path).read())
    [entry] = [value for key, value in cache.items() if tiny_pair.target_name in key and "|torch|" in key]
    assert len(entry["verify"]) == config.max_draft_length + 1 and entry["draft_step"] > 0
    mtime = os.stat(path).st_mtime_ns
    generation = start_generation(tiny_pair, "again", MethodSpec("exact"), config)
    assert os.stat(path).st_mtime_ns == mtime  # read from the cache, not measured again
    assert generation.policy.costs.verify[0] == 1.0


def test_time_split_is_recorded(tiny_pair):
    m = generate(tiny_pair, "count", MethodSpec("static", weight=0.5), GenerationConfig(max_new_tokens=24, draft_length=3, seed=0, ignore_eos=True)).metrics
    assert m.draft_seconds > 0 and m.target_seconds > 0 and m.draft_seconds + m.target_seconds <= m.seconds
    assert m.to_dict()["other_seconds"] == pytest.approx(m.seconds - m.draft_seconds - m.target_seconds)
    ar = generate(tiny_pair, "count", MethodSpec("ar"), GenerationConfig(max_new_tokens=8, seed=0, ignore_eos=True)).metrics
    assert ar.draft_seconds == 0 and ar.target_seconds > 0 and ar.rounds == 8 and ar.drafted == 0
