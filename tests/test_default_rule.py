"""Issue 23's written rule for the default method, checked against the code's default.

The rule (docs/results/confirmatory/PLAN.md): among the relaxed methods non-inferior to
`exact` on every task of the confirmatory run, the one with the highest mean acceptance; else
`static:0.9` if it passes; else `exact`. Its inputs are the committed results.json, which
benchmarks/confirmatory.py writes; until the run is complete no method has passed.
"""

from __future__ import annotations

import json
import sys

import pytest

from diversed.generation import default_method

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from confirmatory import rule_default  # noqa: E402

FOLDER = REPO / "docs" / "results" / "confirmatory"


@pytest.fixture(scope="module")
def committed():
    plan = json.loads((FOLDER / "plan.json").read_text())
    result = json.loads((FOLDER / "results.json").read_text())
    return plan, result


def test_the_rule_picks_the_most_accepting_method_that_passes_everywhere():
    tasks = ["gsm8k", "mbpp"]
    passes = {"static:0.9": {"gsm8k": True, "mbpp": True}, "static:0.5": {"gsm8k": True, "mbpp": True},
              "cascade:opt:0": {"gsm8k": True, "mbpp": False}}
    accept = {"static:0.9": {"gsm8k": 0.6, "mbpp": 0.7}, "static:0.5": {"gsm8k": 0.75, "mbpp": 0.8},
              "cascade:opt:0": {"gsm8k": 0.9, "mbpp": 0.9}}
    assert rule_default(passes, accept, tasks) == "static:0.5"
    assert rule_default({"cascade:opt:0": passes["cascade:opt:0"]}, accept, tasks) == "exact"
    assert rule_default({}, {}, tasks) == "exact"
    assert rule_default(passes, accept, tasks, static_only=True) == "static:0.5"


def test_committed_results_follow_the_rule(committed):
    plan, result = committed
    assert result["default"] == rule_default(result["non_inferiority"], result.get("acceptance", {}), list(plan["tasks"]))
    if not result["complete"]:
        assert result["non_inferiority"] == {} and result["default"] == "exact"


def test_the_code_default_is_the_rules_choice(committed, tiny_pair):
    plan, result = committed
    tasks = list(plan["tasks"])
    assert default_method(tiny_pair)[0].label == result["default"]
    ngram = rule_default(result["non_inferiority"], result.get("acceptance", {}), tasks, static_only=True)
    assert default_method(tiny_pair, proposer="ngram")[0].label == ngram
