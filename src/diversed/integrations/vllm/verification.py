"""Batched verification for vLLM's rejection sampler: every request with its own verifier.

vLLM flattens a step's drafted tokens over the batch: request i owns rows
`[start_i, start_i + n_i)` of the [T, V] target and draft distributions. Each request's rows go
through its verifier's own tables (`Verifier.tables`, the function our engine calls), grouped so
requests with the same method share one batched call. The round rule is the engine's
(`engine.verify_block`): accept drafted token x_j when u_j < acceptance(x_j), stop at the first
rejection and emit a token from that position's residual, or the bonus token (vLLM samples it
from p) when all n_i tokens were accepted.

Nothing here imports vLLM: the function is plain torch, tested without vLLM installed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property

import torch

from ...sampling import sample
from ...verifiers import EMPTY_CONTEXT, Verifier

PLACEHOLDER_TOKEN_ID = -1  # vLLM's marker for an output slot past the round's last token


@dataclass
class VerificationClock:
    """Time spent in `verify_batch` (the plugin's overhead), read by benchmarks/vllm_bench.py."""

    seconds: float = 0.0
    calls: int = 0
    rows: int = 0


CLOCK = VerificationClock()


@dataclass(frozen=True)
class BatchLayout:
    """Where each request's drafted tokens sit in the flattened [T] rows."""

    num_draft_tokens: list[int]  # n_i per request

    @cached_property
    def starts(self) -> list[int]:
        starts, total = [], 0
        for n in self.num_draft_tokens:
            starts.append(total)
            total += n
        return starts

    def rows_of(self, requests: list[int]) -> torch.Tensor:
        """The row indices of these requests, in request order. -> [R] int64."""
        starts = self.starts
        return torch.tensor([starts[i] + j for i in requests for j in range(self.num_draft_tokens[i])], dtype=torch.long)


def verify_batch(
    verifiers: list[Verifier | None],
    draft_token_ids: torch.Tensor,
    layout: BatchLayout,
    max_spec_len: int,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    uniforms: torch.Tensor,
    generators: dict[int, torch.Generator],
    output: torch.Tensor,
) -> torch.Tensor:
    """Fill `output` [B, max_spec_len + 1] for every request whose verifier is not None.

    draft_token_ids: [T]; draft_probs, target_probs: [T, V] (the processed q and p);
    bonus_token_ids: [B, 1] (drawn from p by vLLM); uniforms: [T] in [0, 1) (vLLM draws them,
    per-request seeded generators included); generators: request index -> its generator, used
    for that request's recovered tokens too. Rows of requests whose verifier is None are left
    as they are (vLLM's own path filled them: greedy requests).
    """
    started = time.perf_counter()
    batch = len(layout.num_draft_tokens)
    recovered = torch.full_like(draft_token_ids, PLACEHOLDER_TOKEN_ID, dtype=torch.long)  # [T]
    accepted = torch.zeros(draft_token_ids.shape, dtype=torch.bool, device=draft_token_ids.device)  # [T]
    for verifier, requests in _group_by_verifier(verifiers, layout).items():
        rows = layout.rows_of(requests).to(target_probs.device)
        tables = verifier.tables(target_probs[rows].float(), draft_probs[rows].float(), EMPTY_CONTEXT)
        drafted = draft_token_ids[rows].long()
        accept_drafted = tables.acceptance.gather(-1, drafted.unsqueeze(-1)).squeeze(-1)  # [R]
        accepted[rows] = uniforms[rows].double() < accept_drafted.double()
        recovered[rows] = _recovered_tokens(tables.residual, requests, layout, generators)
    _assemble(output, [i for i in range(batch) if verifiers[i] is not None], draft_token_ids, layout, max_spec_len,
              accepted, recovered, bonus_token_ids)
    CLOCK.seconds += time.perf_counter() - started
    CLOCK.calls += 1
    CLOCK.rows += int(draft_token_ids.shape[0])
    return output


def _group_by_verifier(verifiers: list[Verifier | None], layout: BatchLayout) -> dict[Verifier, list[int]]:
    """Requests (with drafted tokens) by verifier; equal verifiers (frozen dataclasses) share a group."""
    groups: dict[Verifier, list[int]] = {}
    for i, verifier in enumerate(verifiers):
        if verifier is not None and layout.num_draft_tokens[i] > 0:
            groups.setdefault(verifier, []).append(i)
    return groups


def _recovered_tokens(residual: torch.Tensor, requests: list[int], layout: BatchLayout, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One residual draw per row (only the first rejected row's is used); seeded requests use their generator."""
    tokens = sample(residual, None)  # [R]
    offset = 0
    for i in requests:
        n = layout.num_draft_tokens[i]
        if i in generators:
            tokens[offset:offset + n] = sample(residual[offset:offset + n], generators[i])
        offset += n
    return tokens


def _assemble(
    output: torch.Tensor,
    requests: list[int],
    draft_token_ids: torch.Tensor,
    layout: BatchLayout,
    max_spec_len: int,
    accepted: torch.Tensor,
    recovered: torch.Tensor,
    bonus_token_ids: torch.Tensor,
) -> None:
    """Accepted drafts, then the recovered token at the first rejection or the bonus token after all n."""
    if not requests:
        return
    device = output.device
    index = torch.tensor(requests, dtype=torch.long, device=device)  # [R]
    n = torch.tensor([layout.num_draft_tokens[i] for i in requests], dtype=torch.long, device=device)  # [R]
    starts = layout.starts
    start = torch.tensor([starts[i] for i in requests], dtype=torch.long, device=device)  # [R]
    position = torch.arange(max_spec_len, device=device)  # [S]
    valid = position.unsqueeze(0) < n.unsqueeze(1)  # [R, S]
    flat = (start.unsqueeze(1) + position.unsqueeze(0)).clamp_max(max(draft_token_ids.shape[0] - 1, 0))  # [R, S]
    kept = accepted[flat] & valid if draft_token_ids.numel() else valid
    k = kept.long().cumprod(dim=1).sum(dim=1)  # [R]: leading accepted tokens
    drafted = draft_token_ids[flat].long() if draft_token_ids.numel() else torch.zeros_like(flat)
    rows = torch.full((len(requests), max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.long, device=device)
    rows[:, :max_spec_len] = torch.where(position.unsqueeze(0) < k.unsqueeze(1), drafted, PLACEHOLDER_TOKEN_ID)
    rejected = k < n
    if rejected.any():
        which = rejected.nonzero().squeeze(1)
        rows[which, k[which]] = recovered[flat[which, k[which]]]
    done = ~rejected
    rows[done, n[done]] = bonus_token_ids.view(-1).long().to(device)[index[done]]
    output[index] = rows.to(output.dtype)
