"""Rollouts: completions sampled from the ensemble with the current head, what the loss needs kept.

Both models decode a batch in lockstep (left-padded, KV-cached, one token per row per step;
rows leave the batch at EOS). Per token only p_t(y_t), q_t(y_t), TV(p_t, q_t) and both hidden
states are kept: p and q do not depend on the head, so the loss recomputed from these
(through the head alone) is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..head import EnsembleHead
from ..models import ModelPair
from ..runners.base import left_pad
from ..sampling import SamplingParams, logits_to_probs, sample, total_variation
from ..head import DynamicEnsemble


@dataclass
class Rollout:
    """One sampled completion and what the loss needs of each of its T tokens."""

    tokens: list[int]  # [T] sampled ids; an EOS that ended the sequence is the last one
    p_token: torch.Tensor  # [T] p_t(y_t), target probability of the sampled token
    q_token: torch.Tensor  # [T] q_t(y_t), draft probability of the sampled token
    tv: torch.Tensor  # [T] TV(p_t, q_t)
    draft_hidden: torch.Tensor  # [T, H_d] the draft's last-layer state that produced q_t
    target_hidden: torch.Tensor  # [T, H_t] the target's last-layer state that produced p_t
    weights: torch.Tensor  # [T] w_t the rollout sampled with (no gradient)
    ended: bool  # True when EOS ended it (else max_new_tokens did)

    @property
    def length(self) -> int:
        return len(self.tokens)


def rollout(
    pair: ModelPair,
    head: EnsembleHead,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator,
) -> Rollout:
    """Sample one completion from the ensemble with the current head (both models KV-cached, in lockstep)."""
    return rollout_batch(pair, head, [prompt_ids], max_new_tokens, params, generator)[0]


def rollout_batch(
    pair: ModelPair,
    head: EnsembleHead,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator,
    repeats: int = 1,
) -> list[Rollout]:
    """Sample `repeats` completions per prompt from the ensemble with the current head, all at once.

    Both models decode the batch in lockstep, KV-cached: prompts are left-padded (masked
    out, positions counted from each prompt's first real token), each step feeds one token
    per row, and a row that emits EOS leaves the batch, so finished completions cost nothing.
    On a memory-bound CPU a step over B rows costs little more than a step over one (the
    weights are read once), which is what makes RL rollouts affordable here. With
    `repeats` > 1 each prompt is prefilled once and its KV cache copied to its samples, so a
    group of samples pays for one prefill (few-shot prompts make prefill a large share).
    Returns rollouts in prompt order, a prompt's samples next to each other: [B * repeats].
    """
    # The same verifier the engine uses at inference: training samples exactly the v it verifies against.
    ensemble = DynamicEnsemble(head=head)
    device = head.linear.weight.device
    model_device = pair.device
    eos = torch.tensor(sorted(pair.eos_token_ids), device=device)
    batch = len(prompts) * repeats
    ids, mask, positions = left_pad(prompts, model_device)  # [B, L] each

    rows: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(batch)]  # per sample, per token
    ended = [False] * batch
    active = torch.arange(batch)  # [A] sample index of each batch row
    with torch.inference_mode():
        target, draft = pair.batch("target"), pair.batch("draft")
        target_logits, target_hidden = target.feed(ids, mask, positions)  # prefill: [B, V], [B, H_t]
        draft_logits, draft_hidden = draft.feed(ids, mask, positions)  # [B, V], [B, H_d]
        if repeats > 1:  # one prefill per prompt, copied to its samples
            target.repeat(repeats)
            draft.repeat(repeats)
            target_logits, target_hidden, draft_logits, draft_hidden, mask, positions = (
                t.repeat_interleave(repeats, dim=0) for t in (target_logits, target_hidden, draft_logits, draft_hidden, mask, positions)
            )
        for step in range(max_new_tokens):
            if step > 0:
                target_logits, target_hidden = target.feed(ids, mask, positions)  # [A, V], [A, H_t]
                draft_logits, draft_hidden = draft.feed(ids, mask, positions)  # [A, V], [A, H_d]
            p = logits_to_probs(target_logits, params).to(device)  # [A, V]
            q = logits_to_probs(draft_logits, params).to(device)  # [A, V]
            draft_hidden, target_hidden = draft_hidden.to(device), target_hidden.to(device)
            ctx = ensemble.context(draft_hidden, target_hidden)  # weights [A]
            v = ensemble.verification_target(p, q, ctx)  # [A, V]
            tokens = sample(v, generator)  # [A]
            p_token = p.gather(-1, tokens[:, None])[:, 0]  # [A]
            q_token = q.gather(-1, tokens[:, None])[:, 0]  # [A]
            tv = total_variation(p, q)  # [A]
            for row, b in enumerate(active.tolist()):
                rows[b].append((tokens[row], p_token[row], q_token[row], tv[row], draft_hidden[row], target_hidden[row], ctx.weights[row]))
            finished = torch.isin(tokens, eos)  # [A]
            for b in active[finished.cpu()].tolist():
                ended[b] = True
            if finished.all():
                break
            if finished.any():  # the finished rows leave the batch
                keep = (~finished).nonzero()[:, 0].to(model_device)  # [A']
                target.keep(keep)
                draft.keep(keep)
                active, mask, positions, tokens = active[keep.cpu()], mask[keep], positions[keep], tokens[keep.to(device)]
            ids = tokens[:, None].to(model_device)  # [A, 1]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)  # [A, cached + 1]
            positions = positions[:, -1:] + 1  # [A, 1]
    # Stacking outside inference mode gives ordinary tensors the loss can use with autograd.
    results = []
    for b in range(batch):
        token, p_token, q_token, tv, draft_h, target_h, weights = (torch.stack(column) for column in zip(*rows[b]))
        results.append(Rollout([int(t) for t in token], p_token, q_token, tv, draft_h, target_h, weights, ended[b]))
    return results


def completion_text(pair: ModelPair, rollout_: Rollout) -> str:
    """The text a reward sees: the sampled tokens without a final EOS, special tokens skipped."""
    ids = rollout_.tokens[:-1] if rollout_.ended else rollout_.tokens
    return pair.tokenizer.decode(ids, skip_special_tokens=True)


