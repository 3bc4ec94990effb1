"""Verified positions come from the per-round accepted-length record, not from the last per-position counter."""

from __future__ import annotations

from diversed.evaluate import verified_positions
from diversed.metrics import Metrics


def test_short_drafts_accepted_whole_are_not_rejections():
    metrics = Metrics()
    metrics.record_round(drafted=5, accepted=5, bias=0.0)
    metrics.record_round(drafted=2, accepted=2, bias=0.0)  # a budget-capped or confidence-stopped draft, all accepted
    metrics.record_round(drafted=5, accepted=1, bias=0.0)
    metrics.record_round(drafted=0, accepted=0, bias=0.0)  # N = 0: a plain target step
    assert metrics.accept_counts == [0, 1, 1, 0, 0, 1] and metrics.rejected_rounds == 1
    assert verified_positions(metrics) == (9, 1)
    pooled = Metrics.from_dict(metrics.to_dict()).merge(metrics)
    assert pooled.accept_counts == [0, 2, 2, 0, 0, 2] and verified_positions(pooled) == (18, 2)


def test_rows_written_before_the_histogram_use_the_old_count():
    old = {"drafted": 6, "accepted": 4, "rounds": 2, "accepted_per_position": [2, 1, 1], "drafted_per_position": [2, 2, 2]}
    metrics = Metrics.from_dict(old)
    assert metrics.accept_counts is None and verified_positions(metrics) == (5, 1)
    assert Metrics().merge(metrics).accept_counts is None
