"""`--bias-budget B`: once a response's estimated bias reaches B, the rest is verified exactly."""

from __future__ import annotations

import pytest

from diversed.engine import GenerationConfig
from diversed.errors import UserInputError
from diversed.generation import MethodSpec, generate, start_generation

W, N = 0.3, 4


def run(pair, budget, seed=0, tokens=60):
    config = GenerationConfig(max_new_tokens=tokens, draft_length=N, seed=seed, ignore_eos=True, bias_budget=budget)
    return generate(pair, "count to ten", MethodSpec("static", weight=W), config)


def test_reported_bias_is_bounded_by_the_budget_plus_one_round(tiny_pair):
    unbounded = run(tiny_pair, None).metrics.estimated_bias
    for budget in (0.2, 1.0):
        assert unbounded > budget + N * (1 - W)  # the budget really binds here
        for seed in range(4):
            m = run(tiny_pair, budget, seed).metrics
            # One round adds at most N positions of bias (1 - w) TV <= 1 - w each.
            assert m.estimated_bias <= budget + N * (1 - W) + 1e-9


def test_after_the_budget_the_law_is_the_targets(tiny_pair):
    """B = 0: every round is verified exactly from the start, so the output is exact's, draw for
    draw (same seed, same random stream); a small B switches after the first round, and no
    later round adds bias."""
    exact = generate(tiny_pair, "count to ten", MethodSpec("exact"), GenerationConfig(max_new_tokens=60, draft_length=N, seed=3, ignore_eos=True))
    assert run(tiny_pair, 0.0, seed=3).token_ids == exact.token_ids
    assert run(tiny_pair, 0.0, seed=3).metrics.estimated_bias == 0
    for budget in (1e-6, 0.5):
        generation = start_generation(tiny_pair, "count to ten", MethodSpec("static", weight=W),
                                      GenerationConfig(max_new_tokens=60, draft_length=N, seed=3, ignore_eos=True, bias_budget=budget))
        after_each_round = [generation.metrics.estimated_bias for _ in generation]
        crossed = next(i for i, bias in enumerate(after_each_round) if bias >= budget)
        assert crossed < len(after_each_round) - 1  # rounds ran after the budget was spent
        assert after_each_round[crossed:] == [after_each_round[crossed]] * (len(after_each_round) - crossed)


def test_bad_budget_is_a_user_error():
    with pytest.raises(UserInputError, match="bias budget"):
        GenerationConfig(bias_budget=-1.0)
