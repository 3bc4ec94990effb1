"""Exact enumeration: each verifier's induced distribution, acceptance and bias (docs/method.md §3-4).

The induced distribution of a position is computed from the verifier's own acceptance and
residual functions over the whole (small) vocabulary, and compared with the formula of docs/method.md.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diversed.errors import UserInputError
from diversed.methods import make_verifier
from diversed.sampling import total_variation
from diversed.head import DynamicEnsemble
from diversed.verifiers import (
    Exact,
    Lenient,
    SpeculativeCascade,
    StaticEnsemble,
    TypicalAcceptance,
    VerifyContext,
    acceptance_rate,
    induced_distribution,
    position_bias,
)

ATOL = 1e-9


@st.composite
def distributions(draw, rows: int | None = None):
    """A pair (p, q) of [N, V] distributions, V in 2..8, with some exact zeros."""
    n = rows or draw(st.integers(1, 4))
    v = draw(st.integers(2, 8))

    def one():
        weights = draw(st.lists(st.floats(0.0, 1.0), min_size=n * v, max_size=n * v))
        t = torch.tensor(weights, dtype=torch.float64).reshape(n, v)
        t[:, 0] += 1e-3  # no all-zero rows
        return t / t.sum(-1, keepdim=True)

    return one(), one()


weights_strategy = st.floats(0.01, 1.0)


@settings(max_examples=200, deadline=None)
@given(distributions())
def test_exact_emits_p(pq):
    p, q = pq
    verifier = Exact()
    assert torch.allclose(induced_distribution(verifier, p, q), p, atol=ATOL)
    assert torch.allclose(acceptance_rate(verifier, p, q), 1 - total_variation(p, q), atol=ATOL)
    assert torch.allclose(position_bias(verifier, p, q), torch.zeros(p.shape[0], dtype=p.dtype), atol=ATOL)


@settings(max_examples=200, deadline=None)
@given(distributions(), weights_strategy)
def test_static_emits_mixture_on_the_pareto_line(pq, w):
    p, q = pq
    verifier = StaticEnsemble(w)
    tv = total_variation(p, q)
    assert torch.allclose(induced_distribution(verifier, p, q), w * p + (1 - w) * q, atol=ATOL)
    rejection = 1 - acceptance_rate(verifier, p, q)
    bias = position_bias(verifier, p, q)
    assert torch.allclose(rejection, w * tv, atol=ATOL)
    assert torch.allclose(bias, (1 - w) * tv, atol=ATOL)
    assert torch.allclose(rejection + bias, tv, atol=ATOL)  # exactly on the lowest line
    # The residual is the lossless one for every w > 0 (v - q = w (p - q)); rows with p = q up to
    # rounding fall back to v instead (a rejection there has probability ~0 anyway).
    distinct = tv > 1e-9
    assert torch.allclose(verifier.residual(p, q, VerifyContext())[distinct], Exact().residual(p, q, VerifyContext())[distinct], atol=1e-7)


class FixedHead(torch.nn.Module):
    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = weights

    def forward(self, draft_hidden, target_hidden):
        return self.weights


@settings(max_examples=200, deadline=None)
@given(distributions(rows=3), st.lists(weights_strategy, min_size=3, max_size=3))
def test_dynamic_ensemble_emits_per_position_mixture(pq, ws):
    p, q = pq
    w = torch.tensor(ws, dtype=torch.float64)
    verifier = DynamicEnsemble(head=FixedHead(w))
    ctx = verifier.context(torch.zeros(3, 2), torch.zeros(3, 2))
    tv = total_variation(p, q)
    assert torch.allclose(induced_distribution(verifier, p, q, ctx), w[:, None] * p + (1 - w[:, None]) * q, atol=ATOL)
    assert torch.allclose(acceptance_rate(verifier, p, q, ctx), 1 - w * tv, atol=ATOL)
    assert torch.allclose(position_bias(verifier, p, q, ctx), (1 - w) * tv, atol=ATOL)


def _cascade_pi(rule: str, alpha: float, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """docs/method.md §4 written out row by row, independently of the implementation."""
    rows = []
    for pi, qi in zip(p, q):
        if rule == "token":
            allowed = pi >= (1 - alpha) * pi.max()
            rows.append(qi * allowed + (1 - qi[allowed].sum()) * pi)
            continue
        trust_draft = {
            "chow": qi.max() >= 1 - alpha,
            "diff": qi.max() >= pi.max() - alpha,
            "opt": qi.max() >= pi.max() - alpha * 0.5 * (qi - pi).abs().sum(),
        }[rule]
        rows.append(qi if trust_draft else pi)
    return torch.stack(rows)


@settings(max_examples=200, deadline=None)
@given(distributions(), st.sampled_from(["chow", "diff", "opt", "token"]), st.floats(0.0, 1.0))
def test_cascade_emits_pi(pq, rule, alpha):
    p, q = pq
    verifier = SpeculativeCascade(rule, alpha)
    pi = _cascade_pi(rule, alpha, p, q)
    assert torch.allclose(induced_distribution(verifier, p, q), pi, atol=ATOL)


@settings(max_examples=200, deadline=None)
@given(distributions(), st.floats(0.05, 1.0))
def test_lenient(pq, lenience):
    p, q = pq
    verifier = Lenient(lenience)
    out = induced_distribution(verifier, p, q)
    assert torch.allclose(out.sum(-1), torch.ones(p.shape[0], dtype=p.dtype), atol=ATOL)
    expected_accept = (q * torch.where(q > 0, (p / (lenience * q)).clamp(max=1), torch.ones_like(q))).sum(-1)
    assert torch.allclose(acceptance_rate(verifier, p, q), expected_accept, atol=ATOL)
    assert (acceptance_rate(verifier, p, q) >= acceptance_rate(Exact(), p, q) - ATOL).all()
    if lenience == 1.0:
        assert torch.allclose(out, p, atol=ATOL)


@settings(max_examples=200, deadline=None)
@given(distributions(), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_typical_acceptance_rule(pq, eps, alpha):
    p, q = pq
    verifier = TypicalAcceptance(eps, alpha)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1, keepdim=True)
    threshold = torch.minimum(torch.full_like(entropy, eps), alpha * torch.exp(-entropy))
    assert torch.equal(verifier.acceptance(p, q, VerifyContext()), (p > threshold).to(p.dtype))
    out = induced_distribution(verifier, p, q)
    assert torch.allclose(out.sum(-1), torch.ones(p.shape[0], dtype=p.dtype), atol=ATOL)


ALL_VERIFIERS = [
    Exact(),
    StaticEnsemble(0.5),
    Lenient(0.3),
    SpeculativeCascade("chow", 0.2),
    SpeculativeCascade("diff", 0.2),
    SpeculativeCascade("opt", 0.5),
    SpeculativeCascade("token", 0.2),
    TypicalAcceptance(0.2, 0.5),
]


@pytest.mark.parametrize("verifier", ALL_VERIFIERS, ids=lambda v: v.describe())
@settings(max_examples=100, deadline=None)
@given(pq=distributions())
def test_no_verifier_beats_the_pareto_front(verifier, pq):
    """rejection + bias >= TV(p, q) for any verifier; residuals are distributions."""
    p, q = pq
    rejection = 1 - acceptance_rate(verifier, p, q)
    assert (rejection + position_bias(verifier, p, q) >= total_variation(p, q) - 1e-9).all()
    residual = verifier.residual(p, q, VerifyContext())
    assert (residual >= 0).all()
    assert torch.allclose(residual.sum(-1), torch.ones(p.shape[0], dtype=p.dtype), atol=1e-9)


def test_residual_falls_back_to_v_when_p_equals_q():
    p = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    assert torch.allclose(Exact().residual(p, p.clone(), VerifyContext()), p)
    assert torch.allclose(StaticEnsemble(0.4).residual(p, p.clone(), VerifyContext()), p)


def test_greedy_rules():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.2, 0.8], [0.1, 0.1, 0.8]], dtype=torch.float64)
    drafted = torch.tensor([2, 2])
    ctx = VerifyContext()
    assert Exact().greedy_accept(p, q, drafted, ctx).tolist() == [False, False]
    assert Exact().greedy_recovery(p, q, ctx).tolist() == [1, 0]
    # w = 0.3: v row 0 = [.03, .32, .65] -> argmax 2 (accept); row 1 = [.22, .13, .65] -> 2
    assert StaticEnsemble(0.3).greedy_accept(p, q, drafted, ctx).tolist() == [True, True]
    # lenient: accept iff p(x) >= l max p
    assert Lenient(0.5).greedy_accept(p, q, drafted, ctx).tolist() == [True, True]
    assert Lenient(0.9).greedy_accept(p, q, drafted, ctx).tolist() == [False, False]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "static", "weight": 0.0},
        {"method": "static", "weight": 1.5},
        {"method": "lenient", "lenience": 0.0},
        {"method": "lenient", "lenience": 2.0},
        {"method": "cascade", "rule": "nope"},
        {"method": "diversed"},
        {"method": "nope"},
    ],
)
def test_bad_knobs_are_user_errors(kwargs):
    with pytest.raises(UserInputError):
        make_verifier(**kwargs)
