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
Adding a method is adding one class (here or in a module of its own, as gates.py and judge.py),
one line in the method registry (`methods.VERIFIERS`), and its tests: the class declares its
name, its knobs (`knobs.Knob`: type, range, default, doc) and what it needs, and the registry
derives spec strings, CLI flags, the server's fields, the evaluator's method list and the docs'
table from that. The engine loop does not change. The two gates (gates.py) are examples.

Weight convention (docs/method.md §3): `w` is the weight on the **target**. w = 1 is lossless.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch

from .knobs import Knob
from .sampling import entropy, kl_divergence, normalize, total_variation

# What a method may need besides the target's distribution p (its `needs`).
DRAFT_PROBS = "draft probabilities"  # q beyond the drafted token (a prompt-lookup draft gives point masses)
HIDDEN_STATES = "hidden states"  # both models' last-layer states at the drafted positions
HEAD = "a head"  # a trained ensemble head (`--head`)


@dataclass(frozen=True)
class VerifyContext:
    """Per-round data a verifier may need beyond (p, q)."""

    weights: torch.Tensor | None = None  # [N] per-position target weight w_i (dynamic ensemble)
    hidden: tuple[torch.Tensor, torch.Tensor] | None = None  # ([N, H_d], [N, H_t]) states read with p, q (judge)


EMPTY_CONTEXT = VerifyContext()


class VerifyTables(NamedTuple):
    """A round's tables, each [N, V]: P(accept | v drafted), the residual, and the emitted law."""

    acceptance: torch.Tensor
    residual: torch.Tensor
    emitted: torch.Tensor


class Verifier(ABC):
    """One verification method. Subclasses are small frozen dataclasses holding their knobs.

    Besides the rules below, a method declares what the registry shows users: `knobs` (in the
    order a spec string lists them: `cascade:RULE:ALPHA`), `label_knobs` (how many leading
    knobs a label always writes, defaults filled: `static:0.9`), `needs`, and one line each of
    `verification` and `lossless` for the docs' method table.
    """

    name: ClassVar[str]
    knobs: ClassVar[tuple[Knob, ...]] = ()
    label_knobs: ClassVar[int] = 0
    needs: ClassVar[frozenset[str]] = frozenset({DRAFT_PROBS})
    verification: ClassVar[str] = ""
    lossless: ClassVar[str] = "no"
    #: The class of head the method loads (its `head` knob), None for a method without one.
    head_kind: ClassVar[type | None] = None
    #: Whether the method takes a guard's knobs (guard.py): every relaxed method; `exact` is already exact.
    guardable: ClassVar[bool] = True
    #: True when `context` needs the draft's and target's last-layer hidden states (from `needs`,
    #: unless a class decides per instance with a property of this name, as the judge does).
    needs_hidden_states: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not isinstance(cls.__dict__.get("needs_hidden_states"), property):
            cls.needs_hidden_states = HIDDEN_STATES in cls.needs

    @classmethod
    def static_line_weight(cls, knobs: dict) -> float | None:
        """The weight w of this method's point on the static line (`static:w`, with `exact` its
        w = 1 end) from its knobs; None for a method off that line. Plots and
        benchmarks/static_line.py draw and compare against the line."""
        return None

    def __post_init__(self) -> None:
        """Every knob checks its value (dataclass subclasses call this after __init__)."""
        for knob in self.knobs:
            if knob.constructor:
                knob.check(getattr(self, knob.attribute))

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


def mixture(p: torch.Tensor, q: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """w * p + (1 - w) * q, with w a float or a per-position [N] tensor."""
    if isinstance(w, torch.Tensor):
        w = w.to(p.dtype).unsqueeze(-1)  # [N, 1]
    return w * p + (1 - w) * q


# Verification methods by name, in the order users see them (`@register`).
@dataclass(frozen=True)
class Exact(MixtureVerifier):
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023): v = p."""

    name: ClassVar[str] = "exact"
    guardable: ClassVar[bool] = False

    @classmethod
    def static_line_weight(cls, knobs):
        return 1.0
    verification: ClassVar[str] = "`v = p` (Leviathan/Chen)"
    lossless: ClassVar[str] = "yes"

    def verification_target(self, p, q, ctx):
        return p


# The weight `static` uses when none is given, and the default method's (docs/heads.md).
# Measured on the default pair (docs/results, 50 problems each): w = 0.9 keeps exact's quality
# on GSM8K (0.30 vs 0.34) and MBPP, while w = 0.7 halves GSM8K accuracy (0.16).
DEFAULT_STATIC_WEIGHT = 0.9
WEIGHT = Knob("weight", float, DEFAULT_STATIC_WEIGHT, "the ensemble weight w (on the target; w = 1 is lossless)",
              interval=(0, 1, "(]"), implies_method=True)


@dataclass(frozen=True)
class StaticEnsemble(MixtureVerifier):
    """Static ensemble: v = w p + (1 - w) q with a fixed target weight w in (0, 1]."""

    name: ClassVar[str] = "static"
    knobs: ClassVar[tuple[Knob, ...]] = (WEIGHT,)
    label_knobs: ClassVar[int] = 1  # `static` names its weight even when it is the default
    verification: ClassVar[str] = "`v = w·p + (1−w)·q`"
    lossless: ClassVar[str] = "at w = 1"
    weight: float = WEIGHT.default

    @classmethod
    def static_line_weight(cls, knobs):
        return float(knobs.get("weight", WEIGHT.default))

    def verification_target(self, p, q, ctx):
        return mixture(p, q, self.weight)

    def describe(self) -> str:
        return f"static(w={self.weight:g})"


LENIENCE = Knob("lenience", float, 0.5, "the lenience l (l = 1 is lossless)", interval=(0, 1, "(]"))


@dataclass(frozen=True)
class Lenient(Verifier):
    """Lenient speculative sampling (Leviathan et al., appendix A.5), lenience l in (0, 1].

    Accept with min(1, p(x) / (l q(x))); recover from norm(max(0, p - q)). l = 1 is lossless.
    Greedy: accept x iff p(x) >= l * max p (x == argmax p when l = 1); recover argmax p.
    """

    name: ClassVar[str] = "lenient"
    knobs: ClassVar[tuple[Knob, ...]] = (LENIENCE,)
    verification: ClassVar[str] = "accept with `min(1, p/(l·q))`, residual `norm(max(0, p−q))`"
    lossless: ClassVar[str] = "at l = 1"
    lenience: float = LENIENCE.default

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
CASCADE_RULE = Knob("rule", str, "token", "the cascade's deferral rule", choices=tuple(sorted(CASCADE_RULES)))
# `lenience` was the cascade's alpha before the cascade had a knob of its own; it still works.
CASCADE_ALPHA = Knob("alpha", float, 0.1, "the cascade's lenience alpha", interval=(0, 1, "[]"), aliases=("lenience",))


@dataclass(frozen=True)
class SpeculativeCascade(MixtureVerifier):
    """Speculative cascades (Narasimhan et al., 2024): lossless verification against pi.

    chow/diff/opt: pi = q when the deferral rule trusts the draft at that position, else p.
    token (v3): A = {v : p(v) >= (1 - alpha) max p}, pi(v) = q(v) [v in A] + (1 - q(A)) p(v).
    """

    name: ClassVar[str] = "cascade"
    knobs: ClassVar[tuple[Knob, ...]] = (CASCADE_RULE, CASCADE_ALPHA)
    label_knobs: ClassVar[int] = 1  # `cascade:token`
    verification: ClassVar[str] = "lossless against π from a deferral rule (chow, diff, opt, token v3)"
    rule: str = CASCADE_RULE.default
    alpha: float = CASCADE_ALPHA.default

    def verification_target(self, p, q, ctx):
        if self.rule == "token":
            allowed = p >= (1 - self.alpha) * p.amax(dim=-1, keepdim=True)  # [N, V]
            q_allowed = torch.where(allowed, q, torch.zeros_like(q))
            rest = (1 - q_allowed.sum(-1, keepdim=True)).clamp_min(0)  # [N, 1]; rounding can make it -1e-16
            return q_allowed + rest * p
        defer = CASCADE_RULES[self.rule](p, q, self.alpha)  # [N] bool: trust the draft
        return torch.where(defer.unsqueeze(-1), q, p)

    def describe(self) -> str:
        return f"cascade({self.rule}, alpha={self.alpha:g})"


TYPICAL_EPS = Knob("eps", float, 0.09, "typical acceptance's floor eps", interval=(0, 1, "(]"))
TYPICAL_ALPHA = Knob("alpha", float, 0.3, "typical acceptance's entropy factor alpha", interval=(0, 1, "(]"))


@dataclass(frozen=True)
class TypicalAcceptance(Verifier):
    """Typical acceptance (Medusa; vLLM V0): accept x iff p(x) > min(eps, alpha * exp(-H(p))).

    The first rejection emits argmax p. Deterministic given (p, x); the same rule at T = 0.
    """

    name: ClassVar[str] = "typical"
    knobs: ClassVar[tuple[Knob, ...]] = (TYPICAL_EPS, TYPICAL_ALPHA)
    needs: ClassVar[frozenset[str]] = frozenset()  # p alone decides
    verification: ClassVar[str] = "accept iff `p(x) > min(ε, α·exp(−H(p)))`, else argmax p"
    eps: float = TYPICAL_EPS.default
    alpha: float = TYPICAL_ALPHA.default

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


__all__ = [
    "Verifier", "VerifyContext", "VerifyTables", "MixtureVerifier", "mixture",
    "Exact", "StaticEnsemble", "Lenient", "SpeculativeCascade", "TypicalAcceptance",
    "CASCADE_RULES", "entropy", "kl_divergence", "emitted_distribution", "induced_distribution", "acceptance_rate", "position_bias",
]
