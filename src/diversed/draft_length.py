"""How many tokens to draft each round: a fixed N, or `auto` (cost-aware, from past rounds).

`auto` picks, before each round, the N in {0, ..., N_max} that maximises expected tokens per
unit of time (docs/performance.md):

    E[tokens | N] = 1 + sum_{i=1..N} prod_{j=1..i} a_j
    cost(N)       = N c + v(N + 1)            (in target steps; v(1) = 1, so N = 0 is an AR step)

where c is a draft step and v(k) a k-token verification, both relative to one target step
(measured once per machine: `calibration.py`), and a_j is the running estimate of
P(accept position j | positions < j accepted) from this generation's earlier rounds. N
depends only on earlier rounds, never on the current draft, so every verifier keeps its
guarantee (the law of each emitted token is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


class DraftLengthPolicy(Protocol):
    def choose(self, remaining: int) -> int:
        """N for the next round (0 = one target-only step); `remaining` tokens may still be emitted."""

    def observe(self, drafted: int, accepted: int) -> None:
        """Feedback after a round that drafted `drafted` tokens and accepted the first `accepted`."""


@dataclass
class FixedDraftLength:
    n: int

    def choose(self, remaining: int) -> int:
        # Never draft past the budget: a round emits at most n + 1 tokens.
        return max(1, min(self.n, remaining - 1))

    def observe(self, drafted: int, accepted: int) -> None:
        pass


@dataclass(frozen=True)
class StepCosts:
    """Relative costs on one machine and backend: c = draft step / target step, and
    verify[k - 1] = v(k) = k-token target forward / one-token target forward (v(1) = 1)."""

    c: float
    verify: tuple[float, ...]

    @property
    def max_draft_length(self) -> int:
        return len(self.verify) - 1

    def round_cost(self, n: int) -> float:
        return n * self.c + self.verify[n]


@dataclass
class AdaptiveDraftLength:
    """The cost-aware rule above, with per-position acceptance estimated from past rounds.

    Estimates are smoothed counts with exponential forgetting (recent rounds weigh more),
    starting from `prior_acceptance`. When the chosen N is 0 no acceptance is observed, so a
    one-token probe round is forced after `probe_every` target-only steps, an interval that
    doubles after each probe that still does not pay: the probing cost vanishes on a machine
    where speculation does not pay, and the estimate recovers where it starts to.
    """

    costs: StepCosts
    max_draft_length: int = 8
    prior_acceptance: float = 0.6
    prior_weight: float = 2.0
    decay: float = 0.97
    probe_every: int = 8
    _trials: list[float] = field(default_factory=list)
    _accepts: list[float] = field(default_factory=list)
    _since_probe: int = 0
    _probe_interval: int = 0

    def __post_init__(self) -> None:
        self.max_draft_length = min(self.max_draft_length, self.costs.max_draft_length)
        # Where even a draft that is always accepted loses to a target step, never draft (nor probe).
        if all((n + 1) / self.costs.round_cost(n) <= 1 / self.costs.round_cost(0) for n in range(1, self.max_draft_length + 1)):
            self.max_draft_length = 0
        self._trials = [0.0] * self.max_draft_length
        self._accepts = [0.0] * self.max_draft_length
        self._probe_interval = self.probe_every

    def acceptance_estimates(self) -> list[float]:
        """a_j for j = 1..N_max: each position's counts, shrunk toward the estimate of the
        position before it (toward `prior_acceptance` for the first), so a position that has
        rarely been drafted borrows from its neighbour rather than from a fixed guess."""
        estimates, prior = [], self.prior_acceptance
        for accepts, trials in zip(self._accepts, self._trials):
            prior = (accepts + prior * self.prior_weight) / (trials + self.prior_weight)
            estimates.append(prior)
        return estimates

    def best_length(self, limit: int) -> int:
        """argmax_N E[tokens | N] / cost(N) over N in {0, ..., limit}."""
        best_n, best_rate = 0, 1.0 / self.costs.round_cost(0)
        expected, reach = 1.0, 1.0
        for n, a in enumerate(self.acceptance_estimates()[:limit], start=1):
            reach *= a
            expected += reach
            rate = expected / self.costs.round_cost(n)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n

    def choose(self, remaining: int) -> int:
        n = self.best_length(min(self.max_draft_length, remaining - 1))
        if n > 0 or remaining < 2 or self.max_draft_length == 0:
            self._since_probe = 0
            return n
        self._since_probe += 1
        if self._since_probe >= self._probe_interval:
            self._since_probe = 0
            self._probe_interval *= 2
            return 1
        return 0

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        # Positions 1..accepted were accepted; position accepted + 1 (if drafted) was rejected.
        for j in range(min(drafted, accepted + 1, self.max_draft_length)):
            self._trials[j] = self.decay * self._trials[j] + 1
            self._accepts[j] = self.decay * self._accepts[j] + (1.0 if j < accepted else 0.0)
        if self.best_length(self.max_draft_length) > 0:
            self._probe_interval = self.probe_every


def parse_draft_length(value: str | int) -> int | str:
    """`auto` or a positive integer (the CLI's and server's --draft-length)."""
    from .errors import UserInputError

    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserInputError(f"the draft length must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise UserInputError(f"the draft length N must be >= 1 or 'auto', got {n}")
    return n


def verify_costs_from_seconds(step: float, draft_step: float, verify_seconds: Sequence[float]) -> StepCosts:
    """StepCosts from measured seconds: verify_seconds[k - 1] is a k-token target forward."""
    return StepCosts(draft_step / step, tuple([1.0] + [s / step for s in verify_seconds[1:]]))
