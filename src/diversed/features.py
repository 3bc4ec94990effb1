"""Per-position statistics of a target/draft pair: one definition for mining, gates and judges.

`position_features(p, q, tokens)` computes FEATURES at each position; `regression_inputs`
applies the log1p that the regressions (benchmarks/gate_auc.py, judge heads) use on the
heavy-tailed ones; `hidden_projections` is the fixed random projection of both models'
hidden states that mining records and hidden-state judges read.
"""

from __future__ import annotations

import functools

import torch

from .sampling import entropy, kl_divergence, total_variation

# Scalar per-position statistics, in this order everywhere (records, arrays, gate tables).
FEATURES = (
    "tv",  # TV(p, q)
    "kl_pq",  # KL(p || q), nats
    "kl_qp",  # KL(q || p), nats
    "entropy_p",  # H(p), nats
    "entropy_q",  # H(q), nats
    "max_p",
    "max_q",
    "p_draft_token",  # p(argmax q)
    "q_target_token",  # q(y_t), y_t the completion's token
    "log_margin_p",  # log p(top1) - log p(top2) of the target: the margin ratio, as a log
)
# Hidden states enter as a fixed Gaussian random projection to this many dims per model:
# 2 x 32 floats per position keeps a 500-problem mining run in tens of MB, while raw states
# (~2,400 floats per position) would take GBs. A judge fitted on them records these two numbers.
PROJECTION_DIMS = 32
PROJECTION_SEED = 15

# Heavy-tailed features enter regressions as log1p(x); single-statistic rankings do not change.
LOG1P_FEATURES = ("kl_pq", "kl_qp", "log_margin_p")


def position_features(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """FEATURES at each position. p, q: [T, V]; tokens: [T] the completion's tokens -> name: [T]."""
    draft_tokens = q.argmax(-1)  # [T]
    top2 = p.topk(2, dim=-1).values  # [T, 2]
    tiny = torch.finfo(p.dtype).tiny
    return {
        "tv": total_variation(p, q),
        "kl_pq": kl_divergence(p, q),
        "kl_qp": kl_divergence(q, p),
        "entropy_p": entropy(p),
        "entropy_q": entropy(q),
        "max_p": p.amax(-1),
        "max_q": q.amax(-1),
        "p_draft_token": p.gather(-1, draft_tokens[:, None])[:, 0],
        "q_target_token": q.gather(-1, tokens[:, None])[:, 0],
        "log_margin_p": top2[:, 0].clamp_min(tiny).log() - top2[:, 1].clamp_min(tiny).log(),
    }


def regression_inputs(features: dict[str, torch.Tensor], names: tuple[str, ...] | list[str]) -> torch.Tensor:
    """The named features as regression inputs, log1p on LOG1P_FEATURES. -> [T, len(names)]."""
    columns = [features[name].log1p() if name in LOG1P_FEATURES else features[name] for name in names]
    return torch.stack(columns, dim=-1)


# A judge projects every round; the matrix never changes (read it, never write it), and is kept
# on each device it is used on, so a round on a GPU does not copy it there (a host sync).
@functools.lru_cache(maxsize=8)
def projection(hidden_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed projection of one model's hidden states. -> [H, PROJECTION_DIMS], seeded by H."""
    generator = torch.Generator().manual_seed(PROJECTION_SEED * 100_003 + hidden_size)
    return (torch.randn(hidden_size, PROJECTION_DIMS, generator=generator) / hidden_size**0.5).to(device)


def hidden_projections(target_hidden: torch.Tensor, draft_hidden: torch.Tensor) -> torch.Tensor:
    """Both models' projected states, target first. [T, H_t], [T, H_d] -> [T, 2 * PROJECTION_DIMS]."""
    project = lambda hidden: hidden.float() @ projection(hidden.shape[-1], hidden.device)  # noqa: E731
    return torch.cat([project(target_hidden), project(draft_hidden)], dim=-1)


def log1p_columns(x, names):
    """Raw feature columns x [P, F] (numpy) named `names`, log1p on LOG1P_FEATURES. -> a copy."""
    import numpy as np

    out = np.array(x, dtype=np.float64, copy=True)
    for column, name in enumerate(names):
        if name in LOG1P_FEATURES:
            out[:, column] = np.log1p(np.maximum(out[:, column], 0))
    return out
