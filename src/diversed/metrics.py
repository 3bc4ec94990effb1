"""The one metrics type (docs/method.md §6), used by the library, the CLI, the evaluator and the server."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Metrics:
    """Counts and rates of one generation (or, after `merge`, of many).

    `acceptance_rate` is pooled: accepted / drafted over the whole run. It is None when
    nothing was drafted (the `ar` baseline), rather than a misleading 0.

    `accept_counts[k]` counts the rounds that accepted exactly k drafted tokens, as gpt-fast's
    accept_counts and vLLM's observe_draft do; only rounds that drafted something are in it
    (an `ar` step, N = 0 or a prompt-lookup miss verifies nothing: `rounds - sum(accept_counts)`
    of them). `rejected_rounds` counts the rounds that ended at a rejected draft token; the other
    drafting rounds accepted their whole draft, however short it was. Both are None in metrics
    read from rows written before they existed (`from_dict`).
    """

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0  # target forward passes over a drafted block (or single tokens for `ar`)
    new_tokens: int = 0
    seconds: float = 0.0
    estimated_bias: float | None = 0.0  # sum over emitted positions of TV(emitted distribution, p); None: unknown (another engine's rows)
    draft_seconds: float = 0.0  # proposing (draft-model forwards and sampling, or prompt lookup)
    target_seconds: float = 0.0  # target forwards
    accepted_per_position: list[int] = field(default_factory=list)  # [N]: rounds accepting position i
    drafted_per_position: list[int] = field(default_factory=list)  # [N]: rounds that drafted position i
    accept_counts: list[int] | None = field(default_factory=list)  # [k]: drafting rounds that accepted exactly k
    rejected_rounds: int | None = 0  # drafting rounds that ended at a rejection

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per target call: 1 + accepted / rounds."""
        return 1 + self.accepted / self.rounds if self.rounds else None

    @property
    def other_seconds(self) -> float:
        """Neither drafting nor a target forward: verification maths, sampling, bookkeeping."""
        return max(0.0, self.seconds - self.draft_seconds - self.target_seconds)

    @property
    def tokens_per_second(self) -> float | None:
        return self.new_tokens / self.seconds if self.seconds > 0 else None

    def record_round(self, drafted: int, accepted: int, bias: float) -> None:
        """Count one verification round that drafted `drafted` tokens and accepted `accepted`."""
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.estimated_bias += bias
        _grow(self.drafted_per_position, drafted)
        _grow(self.accepted_per_position, drafted)
        for i in range(drafted):
            self.drafted_per_position[i] += 1
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        if drafted and self.accept_counts is not None:
            _grow(self.accept_counts, accepted + 1)
            self.accept_counts[accepted] += 1
            self.rejected_rounds += accepted < drafted

    def merge(self, other: "Metrics") -> "Metrics":
        """Pooled metrics of two runs (sums of counts and times)."""
        out = Metrics(
            drafted=self.drafted + other.drafted,
            accepted=self.accepted + other.accepted,
            rounds=self.rounds + other.rounds,
            new_tokens=self.new_tokens + other.new_tokens,
            seconds=self.seconds + other.seconds,
            estimated_bias=None if self.estimated_bias is None or other.estimated_bias is None else self.estimated_bias + other.estimated_bias,
            draft_seconds=self.draft_seconds + other.draft_seconds,
            target_seconds=self.target_seconds + other.target_seconds,
        )
        if self.accept_counts is None or other.accept_counts is None:
            out.accept_counts = out.rejected_rounds = None  # an old row: the histogram is unknown
        else:
            out.rejected_rounds = self.rejected_rounds + other.rejected_rounds
        for mine, theirs, pooled in (
            (self.accepted_per_position, other.accepted_per_position, out.accepted_per_position),
            (self.drafted_per_position, other.drafted_per_position, out.drafted_per_position),
            (self.accept_counts or [], other.accept_counts or [], out.accept_counts if out.accept_counts is not None else []),
        ):
            _grow(pooled, max(len(mine), len(theirs)))
            for i, count in enumerate(mine):
                pooled[i] += count
            for i, count in enumerate(theirs):
                pooled[i] += count
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every docs/method.md §6 name, counts and derived rates together (JSON-ready)."""
        out = asdict(self)
        out["acceptance_rate"] = self.acceptance_rate
        out["mean_accepted_length"] = self.mean_accepted_length
        out["tokens_per_second"] = self.tokens_per_second
        out["other_seconds"] = self.other_seconds
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Metrics":
        names = {f for f in cls.__dataclass_fields__}
        metrics = cls(**{k: v for k, v in data.items() if k in names})
        if "accept_counts" not in data:  # written before the histogram existed: unknown, not zero
            metrics.accept_counts = metrics.rejected_rounds = None
        return metrics

    def verified_positions(self) -> tuple[int, int] | None:
        """(positions the verifier decided on, rejections), or None when the histogram is unknown.

        A round decides min(k + 1, n) positions: its k accepted tokens plus the rejected one, if any.
        """
        if self.rejected_rounds is None:
            return None
        return self.accepted + self.rejected_rounds, self.rejected_rounds


def ideal_speedup(acceptance: float, draft_length: int, cost_ratio: float) -> float:
    """docs/method.md §6: (1 - a^(N+1)) / ((1 - a)(N c + 1)), the expected speedup for i.i.d. acceptance a."""
    if acceptance >= 1:
        expected_tokens = draft_length + 1.0
    else:
        expected_tokens = (1 - acceptance ** (draft_length + 1)) / (1 - acceptance)
    return expected_tokens / (draft_length * cost_ratio + 1)


def _grow(counts: list[int], length: int) -> None:
    counts.extend([0] * (length - len(counts)))
