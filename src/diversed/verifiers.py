"""Verifiers: how a drafted token is accepted, and what is emitted when it is not.

Vocabulary (as in vLLM's rejection sampler):

- **accepted** token: a drafted token x_i ~ q_i the verifier keeps.
- **recovered** token: at the first rejected position i, a token drawn from the verifier's
  *residual* distribution; the round ends there.
- **bonus** token: when all N drafted tokens are accepted, one more token from p_{N+1}
  (the engine draws it; no verifier is involved).

Every verifier is three pure functions of the target distribution `p`, the draft
distribution `q` (both [N, V], the processed distributions of docs/method.md §1) and a context
(per-position data such as the dynamic ensemble weights):

- `acceptance(p, q, ctx) -> [N, V]`: P(accept | token v was drafted at position i), for every v.
  The engine reads it at the drafted token; tests enumerate it over the whole vocabulary.
- `residual(p, q, ctx) -> [N, V]`: distribution of the recovered token at position i.
- `greedy_accept(p, q, drafted, ctx) -> [N]` and `greedy_recovery(p, q, ctx) -> [N]`:
  the temperature-0 rule.

Position i then emits token v with probability
`q(v) * acceptance(v) + (1 - sum_u q(u) acceptance(u)) * residual(v)` (`induced_distribution`).
Adding a method is adding one class here (and its tests); the engine loop does not change.

Weight convention (docs/method.md §3): `w` is the weight on the **target**. w = 1 is lossless.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, NamedTuple

import torch

from .errors import UserInputError
from .sampling import normalize, total_variation


@dataclass(frozen=True)
class VerifyContext:
    """Per-round data a verifier may need beyond (p, q)."""

    weights: torch.Tensor | None = None  # [N] per-position target weight w_i (dynamic ensemble)


EMPTY_CONTEXT = VerifyContext()


class VerifyTables(NamedTuple):
    """A round's tables, each [N, V]: P(accept | v drafted), the residual, and the emitted law."""

    acceptance: torch.Tensor
    residual: torch.Tensor
    emitted: torch.Tensor


class Verifier(ABC):
    """One verification method. Subclasses are small frozen dataclasses holding their knobs."""

    name: ClassVar[str]
    #: True when `context` needs the draft's and target's last-layer hidden states.
    needs_hidden_states: ClassVar[bool] = False

    def context(self, draft_hidden: torch.Tensor | None, target_hidden: torch.Tensor | None) -> VerifyContext:
        """Build the round's context. draft_hidden: [N, H_d], target_hidden: [N, H_t]."""
        return EMPTY_CONTEXT

    @abstractmethod
    def acceptance(self, p: torch.Tensor, q: torch.Tensor, ctx: VerifyContext) -> torch.Tensor:
        """P(accept | v drafted). p, q: [N, V] -> [N, V] in [0, 1]."""

    @abstractmethod
    def residual(self, p: torch.Tensor, q: torch.Tensor, ctx: VerifyContext) -> torch.Tensor:
        """Distribution of the recovered token. p, q: [N, V] -> [N, V], rows sum to 1."""

    @abstractmethod
    def greedy_accept(self, p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, ctx: VerifyContext) -> torch.Tensor:
        """Temperature-0 acceptance. drafted: [N] -> bool [N]."""

    @abstractmethod
    def greedy_recovery(self, p: torch.Tensor, q: torch.Tensor, ctx: VerifyContext) -> torch.Tensor:
        """Temperature-0 recovered token. -> [N] token ids."""

    def tables(self, p: torch.Tensor, q: torch.Tensor, ctx: VerifyContext) -> VerifyTables:
        """All three tables at once (the engine's call: shared work is done once)."""
        acceptance, residual = self.acceptance(p, q, ctx), self.residual(p, q, ctx)
        return VerifyTables(acceptance, residual, emitted_distribution(q, acceptance, residual))

    def describe(self) -> str:
        return self.name


def _ratio_acceptance(target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """min(1, target / q), with acceptance 1 where q = 0 (such a token is never drafted)."""
    return torch.where(q > 0, (target / q.clamp_min(torch.finfo(q.dtype).tiny)).clamp(max=1.0), torch.ones_like(q))


def _residual_or_fallback(mass: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """norm(mass), or `fallback` on rows whose residual mass is zero (p == q up to rounding)."""
    has_mass = mass.sum(dim=-1, keepdim=True) > 1e-12
    return torch.where(has_mass, normalize(mass), fallback)


class MixtureVerifier(Verifier):
    """Lossless verification against a per-position target distribution `v` (docs/method.md §3).

    Emits exactly `v`: accept with min(1, v(x)/q(x)), recover from norm(max(0, v - q)).
    """

    @abstractmethod
    def verification_target(self, p: torch.Tensor, q: torch.Tensor, ctx: VerifyContext) -> torch.Tensor:
        """v: [N, V]."""

    def acceptance(self, p, q, ctx):
        return _ratio_acceptance(self.verification_target(p, q, ctx), q)

    def residual(self, p, q, ctx):
        v = self.verification_target(p, q, ctx)
        return _residual_or_fallback((v - q).clamp_min(0), v)

    def tables(self, p, q, ctx):
        cls = type(self)
        if cls.acceptance is not MixtureVerifier.acceptance or cls.residual is not MixtureVerifier.residual:
            return super().tables(p, q, ctx)  # a subclass changed a rule: no shortcut
        v = self.verification_target(p, q, ctx)  # once per round; it is also the emitted law
        return VerifyTables(_ratio_acceptance(v, q), _residual_or_fallback((v - q).clamp_min(0), v), v)

    def greedy_accept(self, p, q, drafted, ctx):
        return self.greedy_recovery(p, q, ctx) == drafted

    def greedy_recovery(self, p, q, ctx):
        return self.verification_target(p, q, ctx).argmax(dim=-1)


def _mix(p: torch.Tensor, q: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """w * p + (1 - w) * q, with w a float or a per-position [N] tensor."""
    if isinstance(w, torch.Tensor):
        w = w.to(p.dtype).unsqueeze(-1)  # [N, 1]
    return w * p + (1 - w) * q


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in nats per row. [N, V] -> [N]; 0 log 0 = 0."""
    return -torch.xlogy(p, p).sum(-1)


def kl_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) in nats per row. [N, V] -> [N], finite everywhere.

    Where b = 0 but a > 0 the true value is +inf; b is clamped to the dtype's smallest normal
    so the result is large and finite (a gate only compares it with a threshold), never NaN.
    """
    log_b = b.clamp_min(torch.finfo(b.dtype).tiny).log()
    return (torch.xlogy(a, a) - a * log_b).sum(-1).clamp_min(0)


def _check_unit_interval(value: float, what: str, flag: str) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise UserInputError(f"{what} must be in (0, 1], got {value!r} ({flag})")


@dataclass(frozen=True)
class Exact(MixtureVerifier):
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023): v = p."""

    name: ClassVar[str] = "exact"

    def verification_target(self, p, q, ctx):
        return p


# The weight `static` uses when none is given, and the default method's (docs/heads.md).
# Measured on the default pair (docs/results, 50 problems each): w = 0.9 keeps exact's quality
# on GSM8K (0.30 vs 0.34) and MBPP, while w = 0.7 halves GSM8K accuracy (0.16).
DEFAULT_STATIC_WEIGHT = 0.9


@dataclass(frozen=True)
class StaticEnsemble(MixtureVerifier):
    """Static ensemble: v = w p + (1 - w) q with a fixed target weight w in (0, 1]."""

    name: ClassVar[str] = "static"
    weight: float = DEFAULT_STATIC_WEIGHT

    def __post_init__(self) -> None:
        _check_unit_interval(self.weight, "the ensemble weight w", "--weight")

    def verification_target(self, p, q, ctx):
        return _mix(p, q, self.weight)

    def describe(self) -> str:
        return f"static(w={self.weight:g})"


@dataclass(frozen=True)
class DynamicEnsemble(MixtureVerifier):
    """DIVERSED: v_i = w_i p_i + (1 - w_i) q_i with w_i = head(h^d_i, h^t_i)."""

    name: ClassVar[str] = "diversed"
    needs_hidden_states: ClassVar[bool] = True
    head: torch.nn.Module = field(compare=False)

    def context(self, draft_hidden, target_hidden):
        with torch.no_grad():
            return VerifyContext(weights=self.head(draft_hidden, target_hidden))

    def verification_target(self, p, q, ctx):
        if ctx.weights is None:
            raise ValueError("the dynamic ensemble needs per-position weights in its context")
        return _mix(p, q, ctx.weights)

    def describe(self) -> str:
        return "diversed"


# Target weight of the gates where they trust the draft. Not 0: the emitted law then keeps some
# target mass on every token the target supports (v = q would never emit a token the draft
# gives probability 0), at a cost of only 10% of the acceptance gain at those positions.
DEFAULT_GATE_LOW = 0.1
# Gate thresholds (nats) when none is given: starting points for a sweep, not tuned values.
DEFAULT_GATE_THRESHOLDS = {"klgate": 0.5, "entgate": 1.0}


def _check_gate(threshold: float, low: float) -> None:
    if not (isinstance(threshold, (int, float)) and threshold > 0 and threshold < float("inf")):
        raise UserInputError(f"the gate threshold must be a positive number, got {threshold!r} (--threshold)")
    if not (isinstance(low, (int, float)) and 0 <= low < 1):
        raise UserInputError(f"the gate's low weight must be in [0, 1), got {low!r} (--low-weight)")


@dataclass(frozen=True)
class KLGate(MixtureVerifier):
    """KL gate: v_i = w_i p_i + (1 - w_i) q_i with w_i = 1 where KL(p_i || q_i) > threshold, else `low`.

    Trusts the draft where it agrees with the target in KL (nats); by Pinsker the bias of an
    un-gated position is at most (1 - low) sqrt(threshold / 2). Needs only (p, q).
    """

    name: ClassVar[str] = "klgate"
    threshold: float = DEFAULT_GATE_THRESHOLDS["klgate"]
    low: float = DEFAULT_GATE_LOW

    def __post_init__(self) -> None:
        _check_gate(self.threshold, self.low)

    def weights(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """w_i per position. [N, V] -> [N]."""
        return torch.where(kl_divergence(p, q) > self.threshold, 1.0, self.low).to(p.dtype)

    def verification_target(self, p, q, ctx):
        return _mix(p, q, self.weights(p, q))

    def describe(self) -> str:
        return f"klgate(tau={self.threshold:g}, low={self.low:g})"


@dataclass(frozen=True)
class EntropyGate(MixtureVerifier):
    """Entropy gate (FLy-style): w_i = 1 where H(p_i) > threshold (nats), else `low`.

    Trusts the draft where the target is confident; an uncertain target keeps its own law.
    """

    name: ClassVar[str] = "entgate"
    threshold: float = DEFAULT_GATE_THRESHOLDS["entgate"]
    low: float = DEFAULT_GATE_LOW

    def __post_init__(self) -> None:
        _check_gate(self.threshold, self.low)

    def weights(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """w_i per position. [N, V] -> [N]."""
        return torch.where(entropy(p) > self.threshold, 1.0, self.low).to(p.dtype)

    def verification_target(self, p, q, ctx):
        return _mix(p, q, self.weights(p, q))

    def describe(self) -> str:
        return f"entgate(tau={self.threshold:g}, low={self.low:g})"


@dataclass(frozen=True)
class Lenient(Verifier):
    """Lenient speculative sampling (Leviathan et al., appendix A.5), lenience l in (0, 1].

    Accept with min(1, p(x) / (l q(x))); recover from norm(max(0, p - q)). l = 1 is lossless.
    Greedy: accept x iff p(x) >= l * max p (x == argmax p when l = 1); recover argmax p.
    """

    name: ClassVar[str] = "lenient"
    lenience: float = 0.5

    def __post_init__(self) -> None:
        _check_unit_interval(self.lenience, "the lenience l", "--lenience")

    def acceptance(self, p, q, ctx):
        return _ratio_acceptance(p / self.lenience, q)

    def residual(self, p, q, ctx):
        return _residual_or_fallback((p - q).clamp_min(0), p)

    def greedy_accept(self, p, q, drafted, ctx):
        p_drafted = p.gather(-1, drafted.unsqueeze(-1)).squeeze(-1)
        return p_drafted >= self.lenience * p.amax(dim=-1)

    def greedy_recovery(self, p, q, ctx):
        return p.argmax(dim=-1)

    def describe(self) -> str:
        return f"lenient(l={self.lenience:g})"


def _defer_to_draft_chow(p: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    return q.amax(-1) >= 1 - alpha


def _defer_to_draft_diff(p: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    return q.amax(-1) >= p.amax(-1) - alpha


def _defer_to_draft_opt(p: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    return q.amax(-1) >= p.amax(-1) - alpha * total_variation(q, p)


CASCADE_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None] = {
    "chow": _defer_to_draft_chow,
    "diff": _defer_to_draft_diff,
    "opt": _defer_to_draft_opt,
    "token": None,  # token-level rule v3: mixes per token, see SpeculativeCascade.verification_target
}


@dataclass(frozen=True)
class SpeculativeCascade(MixtureVerifier):
    """Speculative cascades (Narasimhan et al., 2024): lossless verification against pi.

    chow/diff/opt: pi = q when the deferral rule trusts the draft at that position, else p.
    token (v3): A = {v : p(v) >= (1 - alpha) max p}, pi(v) = q(v) [v in A] + (1 - q(A)) p(v).
    """

    name: ClassVar[str] = "cascade"
    rule: str = "token"
    alpha: float = 0.1

    def __post_init__(self) -> None:
        if self.rule not in CASCADE_RULES:
            raise UserInputError(f"unknown cascade rule {self.rule!r}; choose one of {', '.join(CASCADE_RULES)} (--rule)")
        if not (isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1):
            raise UserInputError(f"the cascade lenience alpha must be in [0, 1], got {self.alpha!r} (--lenience)")

    def verification_target(self, p, q, ctx):
        if self.rule == "token":
            allowed = p >= (1 - self.alpha) * p.amax(dim=-1, keepdim=True)  # [N, V]
            q_allowed = torch.where(allowed, q, torch.zeros_like(q))
            return q_allowed + (1 - q_allowed.sum(-1, keepdim=True)) * p
        defer = CASCADE_RULES[self.rule](p, q, self.alpha)  # [N] bool: trust the draft
        return torch.where(defer.unsqueeze(-1), q, p)

    def describe(self) -> str:
        return f"cascade({self.rule}, alpha={self.alpha:g})"


@dataclass(frozen=True)
class TypicalAcceptance(Verifier):
    """Typical acceptance (Medusa; vLLM V0): accept x iff p(x) > min(eps, alpha * exp(-H(p))).

    The first rejection emits argmax p. Deterministic given (p, x); the same rule at T = 0.
    """

    name: ClassVar[str] = "typical"
    eps: float = 0.09
    alpha: float = 0.3

    def __post_init__(self) -> None:
        if not (0 < self.eps <= 1 and 0 < self.alpha <= 1):
            raise UserInputError(f"typical acceptance needs eps and alpha in (0, 1], got {self.eps}, {self.alpha}")

    def _threshold(self, p: torch.Tensor) -> torch.Tensor:
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [N]
        return torch.minimum(torch.full_like(entropy, self.eps), self.alpha * torch.exp(-entropy))

    def acceptance(self, p, q, ctx):
        return (p > self._threshold(p).unsqueeze(-1)).to(p.dtype)

    def residual(self, p, q, ctx):
        return torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).to(p.dtype)

    def greedy_accept(self, p, q, drafted, ctx):
        return p.gather(-1, drafted.unsqueeze(-1)).squeeze(-1) > self._threshold(p)

    def greedy_recovery(self, p, q, ctx):
        return p.argmax(dim=-1)

    def describe(self) -> str:
        return f"typical(eps={self.eps:g}, alpha={self.alpha:g})"


def emitted_distribution(q: torch.Tensor, acceptance: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """q(v) acceptance(v) + (1 - sum_u q(u) acceptance(u)) residual(v). All [N, V] -> [N, V]."""
    kept = q * acceptance  # [N, V]: drafted and accepted
    rejected_mass = (1 - kept.sum(-1, keepdim=True)).clamp_min(0)  # [N, 1]
    return kept + rejected_mass * residual


def induced_distribution(verifier: Verifier, p: torch.Tensor, q: torch.Tensor, ctx: VerifyContext = EMPTY_CONTEXT) -> torch.Tensor:
    """Distribution of the token a position emits when its draft is x ~ q. [N, V] -> [N, V]."""
    return emitted_distribution(q, verifier.acceptance(p, q, ctx), verifier.residual(p, q, ctx))


def acceptance_rate(verifier: Verifier, p: torch.Tensor, q: torch.Tensor, ctx: VerifyContext = EMPTY_CONTEXT) -> torch.Tensor:
    """P(accept) at each position: sum_v q(v) acceptance(v). -> [N]."""
    return (q * verifier.acceptance(p, q, ctx)).sum(-1)


def position_bias(verifier: Verifier, p: torch.Tensor, q: torch.Tensor, ctx: VerifyContext = EMPTY_CONTEXT) -> torch.Tensor:
    """TV(emitted distribution, p) at each position: (1 - w) TV(p, q) for the ensembles. -> [N]."""
    return total_variation(induced_distribution(verifier, p, q, ctx), p)


METHODS = ("ar", "exact", "static", "diversed", "lenient", "cascade", "typical", "klgate", "entgate")


def make_verifier(
    method: str,
    *,
    weight: float | None = None,
    lenience: float | None = None,
    rule: str | None = None,
    head: torch.nn.Module | None = None,
    eps: float | None = None,
    alpha: float | None = None,
    threshold: float | None = None,
    low: float | None = None,
) -> Verifier | None:
    """The verifier for a method name and its knobs; None for `ar` (no drafting)."""
    if method == "ar":
        return None
    if method == "exact":
        return Exact()
    if method == "static":
        return StaticEnsemble(DEFAULT_STATIC_WEIGHT if weight is None else weight)
    if method == "diversed":
        if head is None:
            raise UserInputError("--method diversed needs an ensemble head (--head PATH or a shipped head name)")
        return DynamicEnsemble(head=head)
    if method == "lenient":
        return Lenient(0.5 if lenience is None else lenience)
    if method == "cascade":
        return SpeculativeCascade(rule or "token", 0.1 if lenience is None else lenience)
    if method == "typical":
        return TypicalAcceptance(0.09 if eps is None else eps, 0.3 if alpha is None else alpha)
    if method in ("klgate", "entgate"):
        gate = KLGate if method == "klgate" else EntropyGate
        tau = DEFAULT_GATE_THRESHOLDS[method] if threshold is None else threshold
        return gate(tau, DEFAULT_GATE_LOW if low is None else low)
    raise UserInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


__all__ = [
    "Verifier",
    "VerifyContext",
    "VerifyTables",
    "MixtureVerifier",
    "Exact",
    "StaticEnsemble",
    "DynamicEnsemble",
    "Lenient",
    "SpeculativeCascade",
    "TypicalAcceptance",
    "KLGate",
    "EntropyGate",
    "entropy",
    "kl_divergence",
    "CASCADE_RULES",
    "METHODS",
    "emitted_distribution",
    "induced_distribution",
    "acceptance_rate",
    "position_bias",
    "make_verifier",
]

