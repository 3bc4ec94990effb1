"""The training objective (docs/method.md §5): reward, baseline, and the loss through the head alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..head import EnsembleHead
from .rollouts import Rollout

# Task scores in percent (ROUGE, BLEU) are divided by 100 so every reward lies in [0, 1] and
# one lam means the same trade-off on every task.
PERCENT_METRICS = {"rouge2", "bleu"}

RewardFn = Callable[[Any, str], float]


def task_reward(task: Any) -> RewardFn:
    """The task's pure scorer as a reward in [0, 1] (percent metrics divided by 100)."""
    scale = 100.0 if task.metric_name in PERCENT_METRICS else 1.0
    return lambda example, completion: task.score(example, completion) / scale




@dataclass
class RewardBaseline:
    """The REINFORCE baseline (docs/method.md §5).

    - "running": an exponential moving average of past batch-mean rewards, updated *after*
      each step, so a batch's baseline never depends on its own rewards; the first batch
      (no history yet) uses its own mean.
    - "batch": the current batch's mean reward (advantages sum to zero in each batch).
    - "group": with several samples per prompt, each sample's baseline is the mean reward of
      the *other* samples of its prompt (leave-one-out, as in RLOO). It stays unbiased, since it
      does not depend on the sample's own reward, and it removes the prompt's difficulty from
      the advantage: on GSM8K most of the reward variance comes from which problem was drawn.
    """

    kind: str = "running"
    decay: float = 0.9
    value: float | None = None  # the running average so far (None before the first batch)

    def current(self, rewards: torch.Tensor, group_size: int = 1) -> torch.Tensor:
        """The baseline of each reward [B]; rows come in groups of `group_size` samples of one prompt."""
        if self.kind == "group":
            groups = rewards.reshape(-1, group_size)  # [P, K]
            return ((groups.sum(-1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)  # [B] leave-one-out means
        value = float(rewards.mean()) if self.kind == "batch" or self.value is None else self.value
        return torch.full_like(rewards, value)

    def update(self, rewards: torch.Tensor) -> None:
        """Fold a finished batch's mean reward into the running average."""
        mean = float(rewards.mean())
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean


@dataclass
class LossTerms:
    loss: torch.Tensor  # [] what is minimised: (L_pg - lam * S) / normaliser
    pg: torch.Tensor  # [] L_pg
    acceptance: torch.Tensor  # [] S = mean_b sum_t (1 - w_t TV_t)
    weights: torch.Tensor  # [T_total] w_t with gradient


def policy_loss(
    head: EnsembleHead, rollouts: Sequence[Rollout], advantages: torch.Tensor, lam: float, normaliser: float
) -> LossTerms:
    """docs/method.md §5 on a batch of rollouts, recomputed with gradients through the head alone.

    advantages: [B] (R_b - baseline_b). `normaliser` (max_new_tokens) is a constant, so it rescales
    both terms alike and leaves their balance (lam) unchanged.
    """
    device = head.linear.weight.device
    draft_hidden = torch.cat([r.draft_hidden for r in rollouts])  # [T_total, H_d]
    target_hidden = torch.cat([r.target_hidden for r in rollouts])  # [T_total, H_t]
    p_token = torch.cat([r.p_token for r in rollouts])  # [T_total]
    q_token = torch.cat([r.q_token for r in rollouts])  # [T_total]
    tv = torch.cat([r.tv for r in rollouts])  # [T_total]
    lengths = torch.tensor([r.length for r in rollouts], device=device)  # [B]
    sequence = torch.repeat_interleave(torch.arange(len(rollouts), device=device), lengths)  # [T_total] -> b
    w = head(draft_hidden, target_hidden)  # [T_total]
    log_v = torch.log((w * p_token + (1 - w) * q_token).clamp_min(torch.finfo(w.dtype).tiny))  # log v_t(y_t)
    per_sequence = torch.zeros(len(rollouts), device=device, dtype=w.dtype)  # [B]
    log_v_sum = per_sequence.index_add(0, sequence, log_v)  # [B]
    accept_sum = per_sequence.index_add(0, sequence, 1 - w * tv)  # [B]
    pg = -(advantages.to(device, w.dtype) * log_v_sum).mean()
    acceptance = accept_sum.mean()
    return LossTerms((pg - lam * acceptance) / normaliser, pg, acceptance, w)


