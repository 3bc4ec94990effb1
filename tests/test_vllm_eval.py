"""`diversed eval --engine vllm`, through vLLM itself on a tiny random pair: rows in the format of our
engine's, counts that add up, per-example seeds shared by the methods, resumption.

Needs vLLM (the environment scripts/setup_vllm.sh builds); skipped where it is not importable.
The refusals that need no vLLM are in tests/test_vllm_plugin.py.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup_vllm.sh builds its environment)")

from diversed.cli import main  # noqa: E402
from diversed.evaluate import EvalSettings, load_rows  # noqa: E402
from diversed.testing import build_tiny_vllm_pair  # noqa: E402

from .conftest import FIXTURE_DATA  # noqa: E402

METHODS = "exact,static:0.5,cascade:opt:0,static:0.5:0.05"  # the last one guarded (EOS, from vLLM's stop ids)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_tiny_vllm_pair(tmp_path_factory.mktemp("vllm-eval-pair"), alphabet="0123456789 abcdefghijklmnopqrstuvwxyz?.")


def _eval(pair, out, n: int) -> int:
    target, draft = pair
    return main(["eval", "--engine", "vllm", "--task", "gsm8k", "--n", str(n), "--methods", METHODS, "--target", str(target), "--draft", str(draft),
                 "--dtype", "float32", "--max-new-tokens", "24", "--draft-length", "3", "--temperature", "1", "--seed", "5",
                 "--data-dir", str(FIXTURE_DATA), "--out", str(out)])


@pytest.fixture(scope="module")
def run(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-eval")
    assert _eval(pair, out, 2) == 0
    return out


def test_rows_have_our_format_and_counts_that_add_up(run):
    rows = load_rows(run / "rows.jsonl")
    assert sorted((r["example_id"], r["method"]) for r in rows) == sorted(
        (f"test-{i}", m) for i in range(2) for m in METHODS.split(","))
    for row in rows:
        m = row["metrics"]
        assert row["engine"].startswith("vllm 0.32.0") and not row.get("lockstep")
        assert 0 < m["new_tokens"] <= 24 and row["finish_reason"] in ("stop", "length") and isinstance(row["completion"], str)
        assert m["drafted"] == sum(m["drafted_per_position"]) > 0
        assert m["accepted"] == sum(m["accepted_per_position"]) == sum(k * c for k, c in enumerate(m["accept_counts"]))
        assert m["rounds"] == sum(m["accept_counts"]) and len(m["drafted_per_position"]) <= 3
        # Each round emits its accepted tokens and one more; the first token comes from the prefill.
        assert m["new_tokens"] <= 1 + m["accepted"] + m["rounds"]
        assert m["estimated_bias"] is None and m["seconds"] == 0
    # The plugin verified the relaxed rows: static:0.5 accepts more than exact on this pair.
    acceptance = {label: sum(r["metrics"]["accepted"] for r in rows if r["method"] == label) /
                  sum(r["metrics"]["drafted"] for r in rows if r["method"] == label) for label in ("exact", "static:0.5")}
    assert acceptance["static:0.5"] > acceptance["exact"] + 0.1, acceptance
    seeds = {}
    for row in rows:
        seeds.setdefault(row["example_id"], set()).add(row["seed"])
    assert all(len(s) == 1 for s in seeds.values()) and len({next(iter(s)) for s in seeds.values()}) == 2


def test_settings_and_summary_name_the_engine(run):
    settings = EvalSettings(**json.loads((run / "settings.json").read_text()))
    assert settings.backend == "vllm" and settings.draft_length == 3 and settings.dtype == "float32"
    summary = json.loads((run / "summary.json").read_text())
    for method in summary["methods"]:
        assert method["n"] == 2 and method["timed_n"] == 0 and method["tokens_per_second"] is None
        assert method["estimated_bias"] is None and 0 <= method["acceptance_rate"] <= 1


def test_a_rerun_adds_only_the_missing_rows(pair, run):
    before = (run / "rows.jsonl").read_text()
    assert _eval(pair, run, 2) == 0  # nothing missing: vLLM does not even start
    assert (run / "rows.jsonl").read_text() == before
    assert _eval(pair, run, 3) == 0
    rows = load_rows(run / "rows.jsonl")
    methods = len(METHODS.split(","))
    assert (run / "rows.jsonl").read_text().startswith(before) and len(rows) == 3 * methods
    assert {r["example_id"] for r in rows[2 * methods:]} == {"test-2"}
