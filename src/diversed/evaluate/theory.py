"""The theoretical front: the exact rejection/bias trade-off of the static ensemble on reference text.

`theoretical_front(pair, task, examples, params, weights)` teacher-forces each example's
reference continuation through both models; per position the ensemble with weight w rejects
with probability w·TV(p, q) and has bias (1−w)·TV(p, q) (docs/method.md §3).
`teacher_forced` is also what `diversed mine` records positions with.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import torch

from ..errors import UserInputError
from ..models import ModelPair
from ..sampling import SamplingParams, logits_to_probs, total_variation
from ..tasks import Example, Task
from .run import encodable_examples

FRONT_JSON = "front.json"
FRONT_PLOT = "front.png"
DEFAULT_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


@torch.inference_mode()
def teacher_forced(
    pair: ModelPair, prompt_ids: list[int], continuation_ids: list[int], params: SamplingParams
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both models over prompt + continuation, one forward each, at the continuation positions.

    -> ([target hidden [T, H_t], draft hidden [T, H_d]], [p [T, V], q [T, V]]), on the CPU.
    """
    ids = (prompt_ids + continuation_ids)[: pair.context_window]
    start, end = len(prompt_ids) - 1, len(ids) - 1  # the state at position j predicts token j + 1
    hidden, probs = [], []
    for role in ("target", "draft"):
        logits, h = pair.runner(role).feed(ids[: max(start, end)], max(0, end - start))  # [T, V], [T, H] | None
        hidden.append(h.float().cpu() if h is not None else None)
        probs.append(logits_to_probs(logits[:, : pair.vocab_size], params).cpu())
    return hidden, probs


def position_tv(pair: ModelPair, prompt_ids: list[int], continuation_ids: list[int], params: SamplingParams) -> torch.Tensor:
    """TV(p_i, q_i) at each continuation position, both models teacher-forced (one forward each). -> [T]."""
    _, (p, q) = teacher_forced(pair, prompt_ids, continuation_ids, params)
    return total_variation(p, q)


def theoretical_front(
    pair: ModelPair,
    task: Task,
    examples: Sequence[Example],
    params: SamplingParams,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    raw: bool = False,
) -> dict[str, Any]:
    """Exact rejection/bias front of the static ensemble on the examples' reference continuations.

    Per position, the ensemble with weight w rejects with probability w·TV(p, q) and has bias
    (1−w)·TV(p, q) (docs/method.md §3); the front reports their means over all positions.
    """
    if pair.draft is None:
        raise UserInputError("the pareto command needs a draft model")
    per_example, values = [], []
    prompts, skipped = encodable_examples(pair, task, examples, raw, room=2)
    for example, prompt_ids in prompts:
        continuation = pair.tokenizer(task.reference(example, raw), add_special_tokens=False).input_ids
        tv = position_tv(pair, prompt_ids, continuation, params)
        values.append(tv)
        per_example.append({"id": example.id, "positions": int(tv.numel()), "mean_tv": float(tv.mean()) if tv.numel() else None})
    all_tv = torch.cat(values) if values else torch.zeros(0)
    mean_tv = float(all_tv.double().mean()) if all_tv.numel() else float("nan")
    return {
        "task": task.name,
        "n_examples": len(prompts),
        "skipped_examples": skipped,
        "positions": int(all_tv.numel()),
        "mean_tv": mean_tv,
        "sampling": asdict(params),
        "raw": raw,
        "target": pair.target_name,
        "draft": pair.draft_name,
        "front": [{"w": w, "rejection": w * mean_tv, "acceptance": 1 - w * mean_tv, "bias": (1 - w) * mean_tv} for w in weights],
        "per_example": per_example,
    }
