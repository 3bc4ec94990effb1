"""The DIVERSED ensemble head, per-position target weight w_i from both models' hidden states,
and the method that verifies with it (`diversed`, `DynamicEnsemble`).

`w_i = softmax(Linear([h^d_i ; h^t_i]))[TARGET]` (docs/method.md §3). About 2 (H_d + H_t) + 2 parameters.
Saved as `<name>.safetensors` + `<name>.json`; the JSON names the draft/target pair it was
trained for, and loading it for another pair is a `HeadMismatchError`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from .errors import HeadMismatchError, UserInputError
from .knobs import Knob
from .paths import head_file, strip_head_suffix
from .verifiers import DRAFT_PROBS, HEAD, HIDDEN_STATES, MixtureVerifier, VerifyContext, mixture

if TYPE_CHECKING:
    from .judge import JudgeHead

TARGET = 1  # index of the target's logit in the head's 2-way softmax (index 0 is the draft)
SHIPPED_HEADS_DIR = Path(__file__).parent / "heads"


@dataclass(frozen=True)
class PairSignature:
    """What identifies a draft/target pair for a head: ids, hidden sizes, vocabulary size."""

    target: str
    draft: str
    target_hidden_size: int
    draft_hidden_size: int
    vocab_size: int

    def differences(self, other: "PairSignature") -> list[str]:
        return [
            f"{name}: head has {mine!r}, pair has {theirs!r}"
            for name, mine, theirs in zip(asdict(self), asdict(self).values(), asdict(other).values())
            if mine != theirs
        ]


@dataclass
class HeadConfig:
    pair: PairSignature
    extra: dict[str, Any] = field(default_factory=dict)  # task, training settings, git commit...


class EnsembleHead(torch.nn.Module):
    """Linear(H_d + H_t -> 2) + softmax; initialised to output w = 0.5 everywhere."""

    kind = "an ensemble head"

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        pair = config.pair
        self.linear = torch.nn.Linear(pair.draft_hidden_size + pair.target_hidden_size, 2)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, draft_hidden: torch.Tensor, target_hidden: torch.Tensor) -> torch.Tensor:
        """draft_hidden: [..., H_d], target_hidden: [..., H_t] -> w: [...] (weight on the target)."""
        features = torch.cat([draft_hidden, target_hidden], dim=-1).to(self.linear.weight.dtype)
        return self.linear(features).softmax(dim=-1)[..., TARGET]

    def save(self, path: str | Path) -> Path:
        """Write `path.safetensors` and `path.json`; returns the safetensors path."""
        base = strip_head_suffix(Path(path))
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(head_file(base, ".safetensors")))
        meta = {"format": "diversed-ensemble-head/1", "pair": asdict(self.config.pair), **self.config.extra}
        head_file(base, ".json").write_text(json.dumps(meta, indent=2) + "\n")
        return head_file(base, ".safetensors")


def resolve_head_path(name_or_path: str | Path) -> Path:
    """A path (with or without suffix), or the name of a head shipped in the package."""
    candidate = strip_head_suffix(Path(name_or_path))
    if head_file(candidate, ".json").is_file():
        return candidate
    shipped = SHIPPED_HEADS_DIR / str(name_or_path)
    if head_file(shipped, ".json").is_file():
        return shipped
    names = ", ".join(shipped_head_names()) or "none"
    raise UserInputError(f"no head at {name_or_path!r} (expected NAME.json, + NAME.safetensors for an ensemble head); shipped heads: {names}")


def shipped_head_names() -> list[str]:
    if not SHIPPED_HEADS_DIR.is_dir():
        return []
    return sorted(p.stem for p in SHIPPED_HEADS_DIR.glob("*.json"))


def load_head(name_or_path: str | Path, pair: PairSignature | None = None, target: str | None = None) -> "EnsembleHead | JudgeHead":
    """Load an ensemble head or a judge head (judge.py); with `pair`, refuse one made for a
    different pair; with only `target` (no draft model loaded), one made for another target."""
    base = resolve_head_path(name_or_path)
    try:
        meta = json.loads(head_file(base, ".json").read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{head_file(base, '.json')} is not a head config: {exc}") from None
    from .judge import JudgeHead, is_judge_meta  # judge heads: one JSON file of a few numbers

    if isinstance(meta, dict) and is_judge_meta(meta):
        judge = JudgeHead.from_meta(meta, str(base))
        if pair is not None or target is not None:
            judge.check_pair(pair.target if pair is not None else target, pair.draft if pair is not None else None, str(base))
        return judge
    try:
        head_pair = PairSignature(**meta.pop("pair"))
    except (AttributeError, KeyError, TypeError) as exc:
        raise UserInputError(f"{head_file(base, '.json')} is not an ensemble-head config: {exc}") from None
    meta.pop("format", None)
    if pair is not None and head_pair != pair:
        raise HeadMismatchError(
            f"head {str(base)!r} was trained for another model pair ({'; '.join(head_pair.differences(pair))})"
        )
    if target is not None and head_pair.target != target:
        raise HeadMismatchError(f"head {str(base)!r} was trained for the target {head_pair.target!r}, not {target!r}")
    weights = head_file(base, ".safetensors")
    try:
        head = EnsembleHead(HeadConfig(head_pair, meta))
        head.load_state_dict(load_file(str(weights)))
    except FileNotFoundError:
        raise UserInputError(f"head {str(base)!r} has no weights file {weights.name}") from None
    except Exception as exc:  # safetensors' own errors, a wrong shape or key, a bad config value
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserInputError(f"head {str(base)!r}: {weights.name} does not fit its config: {first_line}") from None
    return head.eval()


HEAD_NAME = Knob("head", str, None, "the ensemble head (a path or a shipped head name)", implies_method=True, required=True,
                 constructor=False)


@dataclass(frozen=True)
class DynamicEnsemble(MixtureVerifier):
    """DIVERSED: v_i = w_i p_i + (1 - w_i) q_i with w_i = head(h^d_i, h^t_i)."""

    name: ClassVar[str] = "diversed"
    knobs: ClassVar[tuple[Knob, ...]] = (HEAD_NAME,)
    needs: ClassVar[frozenset[str]] = frozenset({DRAFT_PROBS, HIDDEN_STATES, HEAD})
    head_kind: ClassVar[type] = EnsembleHead
    verification: ClassVar[str] = "`v_i = w_i·p_i + (1−w_i)·q_i`, `w_i = head(h_draft, h_target)`"
    lossless: ClassVar[str] = "no (bias reported)"
    head: torch.nn.Module = field(compare=False)

    def context(self, draft_hidden, target_hidden):
        with torch.no_grad():
            return VerifyContext(weights=self.head(draft_hidden, target_hidden))

    def verification_target(self, p, q, ctx):
        if ctx.weights is None:
            raise ValueError("the dynamic ensemble needs per-position weights in its context")
        return mixture(p, q, ctx.weights)

    def describe(self) -> str:
        return "diversed"
