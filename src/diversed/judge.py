"""Judge heads (head v2, issue 15): a per-position target weight from standardised statistics.

A judge head is a logistic model of P(important | statistics of p_t and q_t): "important"
means that emitting the draft's token where the target would not changes the outcome or the
target's reading of the rest (the mined labels of docs/mining.md). It is fitted on the
standardised, log1p-tamed FEATURES of `features.py` (a scikit-learn pipeline, exported to a
few numbers), so it needs no hidden states and runs on any backend. Fitted with `--hidden`, it
also reads both models' hidden states through the fixed random projection the mined records
hold (`features.hidden_projections`), and then needs a backend that returns them.

The `judge` method turns it into a gate: w_t = 1 where P_t > threshold, else `low`, as the KL
gate does with one fixed statistic. Sweeping the threshold traces its quality/acceptance curve;
a threshold of 1 is the static weight `low` everywhere and 0 is `exact`.

A head is one JSON file: the feature names with their means and scales, the coefficients and
intercept (hidden-state columns after the named features), the pair it was mined on (it
refuses another), the projection it read, and how it was fitted.
"""

from __future__ import annotations

import functools

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import HeadMismatchError, UserInputError
from .features import FEATURES, PROJECTION_DIMS, PROJECTION_SEED, hidden_projections, log1p_columns, position_features, regression_inputs
from .knobs import Knob
from .paths import head_file, strip_head_suffix
from .gates import LOW_WEIGHT
from .verifiers import DRAFT_PROBS, HEAD, MixtureVerifier, VerifyContext, mixture

FORMAT = "diversed-judge-head/1"


@dataclass(frozen=True)
class JudgeHead:
    """P(important) = sigmoid(((x - mean) / scale) · coef + intercept).

    x: the named features, then (when `projection` is set) both models' projected hidden states.
    """

    kind: ClassVar[str] = "a judge head"

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    target: str  # the pair whose positions it was fitted on
    draft: str
    projection: tuple[int, int] | None = None  # (dims per model, seed) of the hidden-state projection read, if any
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # label, data, fit settings

    def __post_init__(self) -> None:
        if not isinstance(self.features, tuple) or not all(isinstance(name, str) for name in self.features):
            raise UserInputError("judge head: `features` must be a list of feature names")
        for name in ("mean", "scale", "coef"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not all(_finite_number(v) for v in values):
                raise UserInputError(f"judge head: `{name}` must be a list of finite numbers")
        if not _finite_number(self.intercept) or not all(self.scale):
            raise UserInputError("judge head: `intercept` must be a finite number and no `scale` may be 0")
        unknown = [name for name in self.features if name not in FEATURES]
        if unknown:
            raise UserInputError(f"judge head uses unknown features {unknown}; this version computes {', '.join(FEATURES)}")
        if self.projection is not None and tuple(self.projection) != (PROJECTION_DIMS, PROJECTION_SEED):
            raise UserInputError(f"judge head reads a hidden-state projection {tuple(self.projection)} (dims, seed); "
                                 f"this version computes {(PROJECTION_DIMS, PROJECTION_SEED)}: fit it again")
        columns = len(self.features) + (2 * PROJECTION_DIMS if self.projection else 0)
        if not columns == len(self.mean) == len(self.scale) == len(self.coef):
            raise UserInputError(f"judge head: mean, scale and coef must hold {columns} numbers each (its features and projection)")

    @property
    def reads_hidden_states(self) -> bool:
        return self.projection is not None

    def importance(self, p: torch.Tensor, q: torch.Tensor,
                   target_hidden: torch.Tensor | None = None, draft_hidden: torch.Tensor | None = None) -> torch.Tensor:
        """P(important) at each position. p, q: [N, V]; hidden: [N, H_t], [N, H_d] (hidden-state heads) -> [N].

        The target's token is taken as argmax p, as in greedy mining (where y_t = argmax p).
        """
        x = regression_inputs(position_features(p, q, p.argmax(-1)), self.features).double()  # [N, F]
        if self.reads_hidden_states:
            if target_hidden is None or draft_hidden is None:
                raise ValueError("this judge head reads hidden states; pass both models' states")
            x = torch.cat([x, hidden_projections(target_hidden, draft_hidden).double()], dim=-1)  # [N, F + 2 * dims]
        mean, scale, coef = (_on_device(v, p.device) for v in (self.mean, self.scale, self.coef))
        return torch.sigmoid(((x - mean) / scale) @ coef + self.intercept).to(p.dtype)

    def to(self, device: Any) -> "JudgeHead":
        return self  # a few numbers, moved with each call

    def check_pair(self, target: str, draft: str | None, where: str) -> None:
        """Refuse another pair's head; `draft` None (no draft model: prompt lookup) checks the target only."""
        if target != self.target or (draft is not None and draft != self.draft):
            raise HeadMismatchError(f"judge head {where!r} was fitted for {self.target} / {self.draft}, not {target} / {draft or '(no draft model)'}")

    def save(self, path: str | Path) -> Path:
        path = head_file(strip_head_suffix(Path(path)), ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, **{k: v for k, v in asdict(self).items() if k != "extra"}, **self.extra}
        path.write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: str) -> "JudgeHead":
        try:
            known = {name: meta.pop(name) for name in ("features", "mean", "scale", "coef", "intercept", "target", "draft")}
        except KeyError as exc:
            raise UserInputError(f"{where} is not a judge head: it lacks {exc}") from None
        known["projection"] = meta.pop("projection", None)
        meta.pop("format", None)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()}, extra=meta)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_judge_meta(meta: dict[str, Any]) -> bool:
    return meta.get("format") == FORMAT


def fit_judge(x: np.ndarray, y: np.ndarray, features: tuple[str, ...], target: str, draft: str, extra: dict[str, Any],
              hidden: np.ndarray | None = None) -> JudgeHead:
    """A standardised logistic regression of y [P] on raw features x [P, F] (log1p applied here).

    hidden: [P, 2 * PROJECTION_DIMS] the mined projections (target's, then draft's), or None.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if not 0 < y.sum() < len(y):
        raise UserInputError(f"fitting a judge needs important and unimportant positions; the labels have {int(y.sum())} of {len(y)} important")
    inputs = log1p_columns(x, features)
    if hidden is not None:
        inputs = np.concatenate([inputs, hidden], axis=1)
    scaler = StandardScaler().fit(inputs)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    model = LogisticRegression(max_iter=2000, class_weight="balanced").fit((inputs - scaler.mean_) / scale, y)
    return JudgeHead(tuple(features), tuple(map(float, scaler.mean_)), tuple(map(float, scale)),
                     tuple(map(float, model.coef_[0])), float(model.intercept_[0]), target, draft,
                     None if hidden is None else (PROJECTION_DIMS, PROJECTION_SEED), extra)


@functools.lru_cache(maxsize=64)
def _on_device(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A head's coefficients as a float64 tensor, made once per device: a copy to a GPU every
    round would make the round wait for it."""
    return torch.tensor(values, dtype=torch.float64, device=device)


JUDGE_HEAD = Knob("head", str, None, "the judge head (a path to its JSON file)", required=True, constructor=False)
JUDGE_THRESHOLD = Knob("threshold", float, 0.5, "the judge's threshold on P(important)", interval=(0, 1, "[]"))


@dataclass(frozen=True)
class Judge(MixtureVerifier):
    """Judge gate: v_i = w_i p_i + (1 - w_i) q_i, w_i = 1 where the head's P(important) > threshold, else `low`."""

    name: ClassVar[str] = "judge"
    knobs: ClassVar[tuple[Knob, ...]] = (JUDGE_HEAD, JUDGE_THRESHOLD, LOW_WEIGHT)
    needs: ClassVar[frozenset[str]] = frozenset({DRAFT_PROBS, HEAD})
    head_kind: ClassVar[type] = JudgeHead
    verification: ClassVar[str] = ("mixture with `w_i = 1` where a fitted judge's P(important) > τ, else the low weight "
                                   "(a head fitted with `--hidden` also reads hidden states)")
    lossless: ClassVar[str] = "no (bias reported)"
    head: JudgeHead = field(compare=False)
    threshold: float = JUDGE_THRESHOLD.default
    low: float = LOW_WEIGHT.default

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.head, JudgeHead):
            raise UserInputError("the judge method needs a judge head (`diversed fit-judge`), not an ensemble head")

    @property
    def needs_hidden_states(self) -> bool:  # type: ignore[override]  # only a head fitted with them reads them
        return self.head.reads_hidden_states

    def context(self, draft_hidden, target_hidden):
        return VerifyContext(hidden=(draft_hidden, target_hidden)) if self.needs_hidden_states else super().context(None, None)

    def weights(self, p: torch.Tensor, q: torch.Tensor, ctx: VerifyContext | None = None) -> torch.Tensor:
        """w_i per position. [N, V] -> [N]; ctx.hidden: ([N, H_d], [N, H_t]) for a hidden-state head."""
        draft_hidden, target_hidden = ctx.hidden if ctx is not None and ctx.hidden is not None else (None, None)
        importance = self.head.importance(p, q, target_hidden, draft_hidden)  # [N]
        return torch.where(importance > self.threshold, 1.0, self.low).to(p.dtype)

    def verification_target(self, p, q, ctx):
        return mixture(p, q, self.weights(p, q, ctx))

    def describe(self) -> str:
        return f"judge(tau={self.threshold:g}, low={self.low:g})"
