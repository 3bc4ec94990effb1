"""The training-free gates (klgate, entgate): exact law, bias per position, specs and flags."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diversed.cli import main
from diversed.errors import UserInputError
from diversed.generation import MethodSpec
from diversed.methods import make_verifier
from diversed.sampling import total_variation
from diversed.gates import EntropyGate, KLGate
from diversed.verifiers import (
    VerifyContext,
    acceptance_rate,
    entropy,
    induced_distribution,
    kl_divergence,
    position_bias,
)

from .test_verifiers import ATOL, distributions


def _kl_by_hand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a log(a / b) over a > 0, written out independently of the implementation."""
    rows = []
    for ai, bi in zip(a, b):
        total = 0.0
        for x, y in zip(ai.tolist(), bi.tolist()):
            if x > 0:
                total += x * (math.log(x) - math.log(max(y, torch.finfo(a.dtype).tiny)))
        rows.append(max(total, 0.0))
    return torch.tensor(rows, dtype=a.dtype)


def _expected_weights(gate, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """w by hand; at a near-tie with the threshold (rounding decides) the gate's own choice stands."""
    statistic = _kl_by_hand(p, q) if isinstance(gate, KLGate) else -(p * p.clamp_min(1e-300).log()).sum(-1)
    by_hand = torch.where(statistic > gate.threshold, 1.0, gate.low).to(p.dtype)
    near_tie = (statistic - gate.threshold).abs() < 1e-9
    return torch.where(near_tie, gate.weights(p, q), by_hand)


@settings(max_examples=200, deadline=None)
@given(distributions(), st.sampled_from([KLGate, EntropyGate]), st.floats(0.01, 2.0), st.floats(0.0, 0.99))
def test_gate_emits_its_per_position_mixture(pq, gate_class, threshold, low):
    p, q = pq
    gate = gate_class(threshold, low)
    w = _expected_weights(gate, p, q)  # [N]
    tv = total_variation(p, q)
    v = w[:, None] * p + (1 - w[:, None]) * q
    assert torch.allclose(induced_distribution(gate, p, q), v, atol=ATOL)
    assert torch.allclose(acceptance_rate(gate, p, q), 1 - w * tv, atol=ATOL)
    assert torch.allclose(position_bias(gate, p, q), (1 - w) * tv, atol=ATOL)
    residual = gate.residual(p, q, VerifyContext())
    assert (residual >= 0).all() and torch.allclose(residual.sum(-1), torch.ones_like(tv), atol=1e-9)


def test_kl_is_finite_where_the_draft_gives_zero():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float32)
    q = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float32)
    kl = kl_divergence(p, q)
    assert torch.isfinite(kl).all() and kl[0] > 10 and kl[1] == 0
    assert torch.isfinite(entropy(q)).all() and entropy(q).tolist() == [0.0, 0.0]
    # The gate opens (w = 1, v = p) at the position where the draft misses target mass.
    assert KLGate(0.5, 0.1).weights(p, q).tolist() == pytest.approx([1.0, 0.1])
    assert not torch.isnan(induced_distribution(KLGate(0.5, 0.0), p, q)).any()


def test_gates_greedy_follow_argmax_of_v():
    p = torch.tensor([[0.4, 0.6, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    ctx = VerifyContext()
    # Row 0: KL large -> v = p -> argmax 1. Row 1: p = q -> v = q -> argmax 2.
    assert KLGate(0.1, 0.0).greedy_recovery(p, q, ctx).tolist() == [1, 2]
    # Entropy gate with a high threshold never opens: v = 0.1 p + 0.9 q -> argmax q on row 0.
    assert EntropyGate(5.0, 0.1).greedy_recovery(p, q, ctx).tolist() == [0, 2]


@pytest.mark.parametrize(
    "text, label",
    [
        ("klgate", "klgate"),
        ("klgate:0.3", "klgate:0.3"),
        ("klgate:0.3:0.2", "klgate:0.3:0.2"),
        ("entgate:1.5", "entgate:1.5"),
        ("entgate:1.5:0", "entgate:1.5:0"),
    ],
)
def test_gate_spec_round_trip(text, label):
    spec = MethodSpec.parse(text)
    assert spec.label == label
    assert MethodSpec.parse(spec.label) == spec


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "klgate", "threshold": 0.0},
        {"method": "klgate", "threshold": -1.0},
        {"method": "entgate", "low": 1.0},
        {"method": "entgate", "low": -0.1},
    ],
)
def test_bad_gate_knobs_are_user_errors(kwargs):
    with pytest.raises(UserInputError):
        make_verifier(**kwargs)


def test_bad_gate_spec_is_a_user_error():
    with pytest.raises(UserInputError):
        MethodSpec.parse("klgate:abc")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "klgate", "--threshold", "0"], "threshold"),
        (["--method", "entgate", "--low-weight", "1"], "[0, 1)"),
        (["--method", "static", "--threshold", "0.5"], "does not apply"),
    ],
)
def test_bad_gate_flags_fail_with_one_line(capsys, extra, message):
    code = main(["generate", "a prompt", *extra])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len([line for line in lines if line.startswith("error: ")]) == 1 and "Traceback" not in err
    assert message in lines[-1]


def test_gate_generates_on_the_tiny_pair(capsys, tiny_model_dirs):
    target, draft = tiny_model_dirs
    code = main(["generate", "hi", "--target", str(target), "--draft", str(draft), "--dtype", "float32",
                 "--method", "klgate", "--threshold", "0.2", "--low-weight", "0.3", "--max-new-tokens", "12", "--seed", "0"])
    err = capsys.readouterr().err
    assert code == 0 and "method klgate:0.2:0.3" in err
