"""logits_to_probs matches Hugging Face's logits processors; metrics helpers."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from diversed.errors import UserInputError
from diversed.metrics import Metrics, ideal_speedup
from diversed.sampling import SamplingParams, logits_to_probs


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (0.5, 10, 0.9)])
def test_matches_hugging_face(temperature, top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = logits_to_probs(logits, SamplingParams(temperature, top_k, top_p))
    torch.testing.assert_close(ours, expected.softmax(-1))


def test_greedy_keeps_the_plain_softmax():
    logits = torch.randn(2, 10)
    torch.testing.assert_close(logits_to_probs(logits, SamplingParams(0.0)), logits.softmax(-1))


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.1}])
def test_bad_sampling_params(kwargs):
    with pytest.raises(UserInputError):
        SamplingParams(**kwargs)


def test_metrics_definitions():
    m = Metrics()
    m.record_round(drafted=5, accepted=3, bias=0.1)
    m.record_round(drafted=5, accepted=5, bias=0.2)
    m.record_round(drafted=2, accepted=0, bias=0.3)
    assert (m.drafted, m.accepted, m.rounds) == (12, 8, 3)
    assert m.acceptance_rate == pytest.approx(8 / 12)
    assert m.mean_accepted_length == pytest.approx(1 + 8 / 3)
    assert m.accepted_per_position == [2, 2, 2, 1, 1]
    assert m.drafted_per_position == [3, 3, 2, 2, 2]
    pooled = m.merge(m)
    assert pooled.accepted_per_position == [4, 4, 4, 2, 2] and pooled.acceptance_rate == m.acceptance_rate
    assert Metrics().acceptance_rate is None
    assert Metrics.from_dict(m.to_dict()).to_dict() == m.to_dict()


def test_ideal_speedup():
    assert ideal_speedup(0.0, 5, 0.1) == pytest.approx(1 / 1.5)
    assert ideal_speedup(1.0, 5, 0.0) == pytest.approx(6.0)
    assert ideal_speedup(0.5, 3, 0.2) == pytest.approx((1 - 0.5**4) / (0.5 * 1.6))
