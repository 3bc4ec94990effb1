"""Logits -> processed probabilities, and sampling from them.

Both models' logits go through the same `logits_to_probs` with the same `SamplingParams`,
so `q` is exactly the distribution the drafted token was sampled from (docs/method.md §1 contract).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .errors import UserInputError

# Temperatures below this are greedy decoding. Dividing logits by a smaller one overflows
# float32 (1e-39 is itself below float32's normal range) and would turn probabilities into NaN;
# at this temperature a logit gap of 0.01 already leaves the runner-up a weight of e^-100,
# so greedy is what such a request means.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """How logits become the distribution tokens are drawn from.

    `temperature == 0` (or any temperature below MIN_TEMPERATURE) is greedy decoding:
    distributions are then the plain softmax (temperature 1, still top-k/top-p filtered) and
    every choice is an argmax. A top_p too small for float32 keeps just the most likely token.
    """

    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables nucleus filtering

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:
            raise UserInputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserInputError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserInputError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order Hugging Face uses), then softmax.

    logits: [..., V] -> probabilities [..., V] in float32.
    """
    logits = logits.float()
    if not params.greedy and params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)  # [..., V]
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p; the most
        # likely token is always kept.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False  # even when top_p rounds to 0 in float32 (1e-46)
        drop = drop_sorted.scatter(-1, sorted_index, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row. probs: [..., V] -> token ids [...].

    Inverse-CDF sampling: the first token whose cumulative mass exceeds u ~ U(0, total). It
    draws one uniform per row instead of one per vocabulary entry (the exponential race and
    torch.multinomial both do), which on a CPU with a large vocabulary is many times
    faster; the cumulative sum runs in float64 so rounding cannot shift mass between
    neighbours, and a token of probability 0 is never chosen (its cumulative mass equals its
    predecessor's, and `right=True` skips it).
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [..., V]
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, dtype=torch.float64, device=probs.device)  # [..., 1]
    token = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)  # [..., 1]
    return token.clamp_max(probs.shape[-1] - 1).squeeze(-1)


def choose(probs: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Argmax when greedy, else a sample. probs: [..., V] -> token ids [...]."""
    if params.greedy:
        return probs.argmax(dim=-1)
    return sample(probs, generator)


def normalize(mass: torch.Tensor) -> torch.Tensor:
    """Rows of non-negative mass [..., V] scaled to sum to 1 (zero rows stay zero)."""
    total = mass.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(mass.dtype).tiny), mass)


def total_variation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TV(a, b) = sum_v max(0, a(v) - b(v)). a, b: [..., V] -> [...]."""
    return (a - b).clamp_min(0).sum(dim=-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in nats per row. [N, V] -> [N]; 0 log 0 = 0."""
    return -torch.xlogy(p, p).sum(-1)


def kl_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) in nats per row. [N, V] -> [N], finite everywhere.

    Where b = 0 but a > 0 the true value is +inf; b is clamped to the dtype's smallest normal
    so the result is large and finite (a gate only compares it with a threshold), never NaN.
    """
    log_b = b.clamp_min(torch.finfo(b.dtype).tiny).log()
    return (torch.xlogy(a, a) - a * log_b).sum(-1).clamp_min(0)


def derived_seed(*parts: object, bits: int = 32) -> int:
    """A seed for one use of randomness, from what it is for: derived_seed(seed, example_id).

    The same parts give the same seed in any order of use and on any machine (a hash, not a
    generator's state), so resumed runs and reruns of one example sample alike.
    """
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << bits) - 1)
