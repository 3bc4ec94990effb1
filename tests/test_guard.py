"""The guard (docs/method.md §4, "Guard"): exact where the stop or named tokens carry mass, the inner method elsewhere.

Its law is enumerated exactly on small vocabularies, checked by chi-square through the real
engine, lockstep evaluation and the vLLM batch verifier, and a guard that forgets to guard or
guards with the wrong rule is rejected by the same tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diversed.cli import main
from diversed.errors import UserInputError
from diversed.gates import KLGate
from diversed.generation import build_verifier
from diversed.guard import DIGITS, GUARD, Guarded, GuardVocabulary, guarded_token_ids
from diversed.methods import MethodSpec, make_verifier
from diversed.sampling import total_variation
from diversed.verifiers import (EMPTY_CONTEXT, Exact, Lenient, SpeculativeCascade, StaticEnsemble, TypicalAcceptance,
                                acceptance_rate, induced_distribution)

from .test_engine_statistics import (PREFIX, ROUNDS, chi_square_pvalue, next_token_state, simulate, small_vocab_pair,  # noqa: F401 (fixtures)
                                     small_vocab_pairs, theory)
from .test_verifiers import ATOL, distributions

INNERS = [StaticEnsemble(0.3), Lenient(0.4), SpeculativeCascade("token", 0.3), SpeculativeCascade("opt", 0.5),
          TypicalAcceptance(0.3, 0.9), KLGate(0.2, 0.1)]


def _guarded_by_hand(p: torch.Tensor, q: torch.Tensor, ids: list[int], tau: float) -> torch.Tensor:
    """max(p(G), q(G)) >= tau, written out row by row."""
    rows = []
    for p_row, q_row in zip(p.tolist(), q.tolist()):
        rows.append(max(sum(p_row[i] for i in ids), sum(q_row[i] for i in ids)) >= tau)
    return torch.tensor(rows)


@settings(max_examples=150, deadline=None)
@given(distributions(), st.sampled_from(INNERS), st.floats(0.01, 1.0), st.data())
def test_guard_emits_p_where_it_guards_and_the_inner_law_elsewhere(pq, inner, tau, data):
    p, q = pq
    ids = sorted(data.draw(st.sets(st.integers(0, p.shape[1] - 1), min_size=1)))
    guard = Guarded(inner, tuple(ids), tau)
    guarded = _guarded_by_hand(p, q, ids, tau)
    near_tie = (torch.maximum(p[:, ids].sum(-1), q[:, ids].sum(-1)) - tau).abs() < 1e-12
    guarded = torch.where(near_tie, guard.guarded(p, q), guarded)  # rounding decides a tie: the guard's choice stands
    expected = torch.where(guarded[:, None], p, induced_distribution(inner, p, q))
    assert torch.allclose(induced_distribution(guard, p, q), expected, atol=ATOL)
    assert torch.allclose(guard.tables(p, q, EMPTY_CONTEXT).emitted, expected, atol=ATOL)
    rate = torch.where(guarded, 1 - total_variation(p, q), acceptance_rate(inner, p, q))
    assert torch.allclose(acceptance_rate(guard, p, q), rate, atol=ATOL)


def test_greedy_follows_argmax_p_where_guarded():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.1, 0.9], [0.0, 0.9, 0.1]], dtype=torch.float64)
    guard = Guarded(StaticEnsemble(0.3), (2,), 0.5)  # row 0: q(2) = 0.9 guards it; row 1: neither reaches 0.5
    assert guard.guarded(p, q).tolist() == [True, False]
    assert guard.greedy_recovery(p, q, EMPTY_CONTEXT).tolist() == [0, 1]  # argmax p; argmax 0.3 p + 0.7 q
    assert guard.greedy_accept(p, q, torch.tensor([2, 1]), EMPTY_CONTEXT).tolist() == [False, True]


@dataclass(frozen=True)
class GuardOnTargetOnly(Guarded):
    """Deliberately wrong: guards only where the *target* gives G mass (the draft's mass is ignored)."""

    def guarded(self, p, q):
        ids = torch.tensor(self.token_ids)
        return p.index_select(-1, ids).sum(-1) >= self.threshold


@pytest.fixture(scope="module")
def engine_case(small_vocab_pair):
    """A guard on the small pair that fires at some of the round's positions and not at others."""
    p1, q1, _, _ = next_token_state(small_vocab_pair, PREFIX)
    # The token the draft likes most and the target much less: guarding it separates the right rule from the wrong one.
    token = int((q1[0] - p1[0]).argmax())
    tau = float(q1[0, token]) * 0.9
    assert float(p1[0, token]) < tau
    return Guarded(StaticEnsemble(0.2), (token,), tau), token


def test_the_engine_case_guards_some_positions_only(small_vocab_pair, engine_case):
    guard, token = engine_case
    firing = []
    for x in range(small_vocab_pair.vocab_size):
        p, q, _, _ = next_token_state(small_vocab_pair, PREFIX + [x])
        firing.append(bool(guard.guarded(p, q)))
    assert any(firing) and not all(firing)


def test_engine_emits_the_guarded_law(small_vocab_pair, engine_case):
    guard, _ = engine_case
    expected, k_probs = theory(small_vocab_pair, guard)
    assert abs(sum(expected.values()) - 1) < 1e-6
    observed, k_counts, _ = simulate(small_vocab_pair, guard, ROUNDS)
    assert chi_square_pvalue(observed, expected, ROUNDS) > 1e-4
    assert chi_square_pvalue(dict(enumerate(k_counts)), dict(enumerate(k_probs)), ROUNDS) > 1e-4


@pytest.mark.parametrize("wrong", ["unguarded", "target-only"])
def test_the_engine_test_rejects_a_wrong_guard(small_vocab_pair, engine_case, wrong):
    guard, _ = engine_case
    bad = guard.inner if wrong == "unguarded" else GuardOnTargetOnly(guard.inner, guard.token_ids, guard.threshold)
    expected, _ = theory(small_vocab_pair, guard)
    observed, _, _ = simulate(small_vocab_pair, bad, ROUNDS, seed=1)
    assert chi_square_pvalue(observed, expected, ROUNDS) < 1e-6


# ---------------------------------------------------------------------------------- the token set and the registry


def test_token_set_holds_stop_named_and_digit_tokens(small_vocab_pair):
    tokenizer = small_vocab_pair.tokenizer
    vocabulary = GuardVocabulary(tokenizer, (tokenizer.eos_token_id,))
    assert guarded_token_ids(vocabulary, "") == (tokenizer.eos_token_id,)
    ids = guarded_token_ids(vocabulary, "ab c")  # a string longer than any token: its first token; "c": itself
    assert set(ids) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("c")}


def test_digits_class_is_every_token_with_a_digit(tmp_path):
    from diversed.testing import build_char_tokenizer

    tokenizer = build_char_tokenizer("ab12")
    ids = guarded_token_ids(GuardVocabulary(tokenizer, (tokenizer.eos_token_id,)), DIGITS)
    assert set(ids) == {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["1", "2"])}


@pytest.mark.parametrize("label", ["static:0.5:0.05", "cascade:opt:0:0.1:####", "klgate:0.5:0.1:0.05:#### <digits>", "typical:0.09:0.3:0.2"])
def test_guarded_labels_round_trip(label):
    assert MethodSpec.parse(label).label == label


def test_guard_knobs_follow_the_methods_own_and_old_labels_do_not_change():
    assert MethodSpec("static", weight=0.5, guard_tokens="####").label == "static:0.5:0.05:####"
    assert MethodSpec.parse("static:0.5").label == "static:0.5"
    with pytest.raises(UserInputError) as caught:
        MethodSpec.parse("exact:0.05")  # exact is already exact
    with pytest.raises(UserInputError) as caught:
        MethodSpec("static", guard=0)
    assert caught.value.param == "guard"


def test_a_guard_without_a_tokenizer_is_a_user_error():
    with pytest.raises(UserInputError):
        make_verifier("static", weight=0.5, guard=0.05)
    assert make_verifier("static", weight=0.5) == StaticEnsemble(0.5)  # no guard knob: no guard


def test_build_verifier_guards_with_the_pairs_stop_tokens(small_vocab_pair):
    verifier = build_verifier(small_vocab_pair, MethodSpec.parse("cascade:opt:0:0.1:c"))
    eos = small_vocab_pair.tokenizer.eos_token_id
    assert isinstance(verifier, Guarded) and verifier.inner == SpeculativeCascade("opt", 0.0)
    assert verifier.threshold == 0.1 and eos in verifier.token_ids and len(verifier.token_ids) == 2
    assert verifier.name == "cascade" and GUARD.default == Guarded(Exact(), (eos,)).threshold


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_generate_runs_guarded_with_both_proposers(tiny_model_dirs, draft, capsys):
    target, draft_model = tiny_model_dirs
    argv = ["generate", "abc", "--raw", "--target", str(target), "--draft", str(draft_model) if draft == "model" else "ngram",
            "--backend", "torch", "--method", "static", "--weight", "0.5", "--guard", "0.05", "--guard-tokens", "#",
            "--draft-length", "3", "--max-new-tokens", "8", "--seed", "0", "--json"]
    assert main(argv) == 0, capsys.readouterr().err


def test_lockstep_evaluation_emits_the_guarded_law(small_vocab_pair, engine_case):
    from .test_lockstep import RUNS, engine_counts, lockstep_counts, pvalue, round_law

    guard, _ = engine_case
    law = round_law(small_vocab_pair, guard)
    assert pvalue(lockstep_counts(small_vocab_pair, guard), law) > 1e-4
    assert pvalue(engine_counts(small_vocab_pair, guard), law) > 1e-4
    unguarded = round_law(small_vocab_pair, guard.inner)
    assert 0.5 * sum(abs(law.get(k, 0) - unguarded.get(k, 0)) for k in set(law) | set(unguarded)) > 0.02  # the guard matters here
    assert RUNS >= 1000


def test_vllm_batch_verifier_follows_the_guarded_law():
    from .test_vllm_plugin import REQUESTS, _distributions, _observed, _run_batch, _theory

    p, q = _distributions()
    mass = torch.maximum(p, q)  # [K, V]: the guard's statistic of each single token
    token = int((mass[0] - mass[1]).abs().argmax())
    guard = Guarded(StaticEnsemble(0.2), (token,), float(mass[:, token].mean()))
    assert sorted(guard.guarded(p, q).tolist()) == [False, True]  # one drafted position guarded, the other not
    verifiers = [guard if i % 2 else StaticEnsemble(0.5) for i in range(REQUESTS)]  # a guard shares batches with others
    output, _ = _run_batch(verifiers)
    guarded_rows = list(range(1, REQUESTS, 2))
    assert chi_square_pvalue(_observed(output, guarded_rows), _theory(guard), len(guarded_rows)) > 1e-4
    assert chi_square_pvalue(_observed(output, guarded_rows), _theory(guard.inner), len(guarded_rows)) < 1e-6
    assert chi_square_pvalue(_observed(output, list(range(0, REQUESTS, 2))), _theory(StaticEnsemble(0.5)), REQUESTS // 2) > 1e-4


def test_vllm_requests_name_a_guard_and_the_worker_builds_it_from_the_tokenizer():
    from diversed.integrations.vllm import requests

    spec = requests.request_spec({"speculative": {"method": "static", "weight": 0.5, "guard": 0.05}}, MethodSpec("exact"))
    assert spec.label == "static:0.5:0.05"
    with pytest.raises(requests.RequestError) as caught:
        requests.request_spec({"speculative": {"method": "static", "weight": 0.5, "guard": 2}}, MethodSpec("exact"))
    assert caught.value.field == "speculative.guard"
    eos = 1
    from diversed.testing import build_char_tokenizer

    verifier = requests.verifier_for(MethodSpec.parse("static:0.5:0.05"), GuardVocabulary(build_char_tokenizer("ab"), (eos,)))
    assert isinstance(verifier, Guarded) and verifier.token_ids == (eos,)
