"""Two gates: the worked example of adding a method (docs/method.md, "Adding a method").

Each is a class with its knobs, one line in the method registry (`methods.VERIFIERS`), and
its tests (tests/test_gates.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .knobs import Knob
from .sampling import entropy, kl_divergence
from .verifiers import DRAFT_PROBS, MixtureVerifier, mixture


# Target weight of the gates where they trust the draft. Not 0: the emitted law then keeps some
# target mass on every token the target supports (v = q would never emit a token the draft
# gives probability 0), at a cost of only 10% of the acceptance gain at those positions.
LOW_WEIGHT = Knob("low_weight", float, 0.1, "the gate's low weight (target weight where it trusts the draft)",
                  interval=(0, 1, "[)"), field="low")


def _gate_threshold(default: float, statistic: str) -> Knob:
    # Gate thresholds (nats) when none is given: starting points for a sweep, not tuned values.
    return Knob("threshold", float, default, f"the gate threshold tau on {statistic} (nats)", interval=(0, math.inf, "()"))


KL_THRESHOLD = _gate_threshold(0.5, "KL(p||q)")
ENTROPY_THRESHOLD = _gate_threshold(1.0, "H(p)")


@dataclass(frozen=True)
class KLGate(MixtureVerifier):
    """KL gate: v_i = w_i p_i + (1 - w_i) q_i with w_i = 1 where KL(p_i || q_i) > threshold, else `low`.

    Trusts the draft where it agrees with the target in KL (nats); by Pinsker the bias of an
    un-gated position is at most (1 - low) sqrt(threshold / 2). Needs only (p, q).
    """

    name: ClassVar[str] = "klgate"
    knobs: ClassVar[tuple[Knob, ...]] = (KL_THRESHOLD, LOW_WEIGHT)
    verification: ClassVar[str] = "mixture with `w_i = 1` where `KL(p‖q) > τ`, else the low weight"
    threshold: float = KL_THRESHOLD.default
    low: float = LOW_WEIGHT.default

    def weights(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """w_i per position. [N, V] -> [N]."""
        return torch.where(kl_divergence(p, q) > self.threshold, 1.0, self.low).to(p.dtype)

    def verification_target(self, p, q, ctx):
        return mixture(p, q, self.weights(p, q))

    def describe(self) -> str:
        return f"klgate(tau={self.threshold:g}, low={self.low:g})"


@dataclass(frozen=True)
class EntropyGate(MixtureVerifier):
    """Entropy gate (FLy-style): w_i = 1 where H(p_i) > threshold (nats), else `low`.

    Trusts the draft where the target is confident; an uncertain target keeps its own law.
    """

    name: ClassVar[str] = "entgate"
    knobs: ClassVar[tuple[Knob, ...]] = (ENTROPY_THRESHOLD, LOW_WEIGHT)
    needs: ClassVar[frozenset[str]] = frozenset({DRAFT_PROBS})
    verification: ClassVar[str] = "mixture with `w_i = 1` where `H(p) > τ`, else the low weight"
    threshold: float = ENTROPY_THRESHOLD.default
    low: float = LOW_WEIGHT.default

    def weights(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """w_i per position. [N, V] -> [N]."""
        return torch.where(entropy(p) > self.threshold, 1.0, self.low).to(p.dtype)

    def verification_target(self, p, q, ctx):
        return mixture(p, q, self.weights(p, q))

    def describe(self) -> str:
        return f"entgate(tau={self.threshold:g}, low={self.low:g})"
