"""Summaries of an evaluation run: per-method quality with intervals, pooled metrics, speedups.

`summarize` turns rows into summary.json's object, `summary_markdown` into summary.md's table
(docs/method.md §6 names throughout).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..methods import AR
from ..metrics import Metrics, ideal_speedup
from ..tasks import Example, Task

from .settings import EvalSettings

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def verified_positions(metrics: Metrics) -> tuple[int, int]:
    """(positions the verifier decided on, rejections) of pooled metrics.

    A round decides min(k + 1, n) positions: its accepted tokens plus the rejected one, if any.
    The rejections come from the per-round record (`Metrics.rejected_rounds`), so a short
    draft that was accepted whole (a budget-capped last round, `--draft-confidence`,
    `--draft-length auto`) is not a rejection. Rows written before that record existed fall
    back to reading fully accepted rounds off the last per-position counter, which assumes
    every round drafted the full N.
    """
    recorded = metrics.verified_positions()
    if recorded is not None:
        return recorded
    full_rounds = metrics.accepted_per_position[-1] if metrics.accepted_per_position else 0
    rejections = metrics.rounds - full_rounds if metrics.drafted else 0
    return metrics.accepted + rejections, rejections


def mean_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap percentile interval of the mean (fixed seed, so summaries are reproducible)."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return (float(data.mean()), float(data.mean())) if len(data) else (float("nan"), float("nan"))
    means = np.random.default_rng(0).choice(data, size=(resamples, len(data))).mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarize(task: Task, examples: Sequence[Example], labels: Sequence[str], rows: Sequence[dict[str, Any]], settings: EvalSettings) -> dict[str, Any]:
    """Per-method quality (with 95% CI), pooled docs/method.md §6 metrics and speedup vs `ar`."""
    by_key = {(row["example_id"], row["method"]): row for row in rows}
    ar_seconds = {example.id: by_key[(example.id, AR)]["metrics"]["seconds"] for example in examples
                  if (example.id, AR) in by_key and is_timed(by_key[(example.id, AR)])}
    methods = []
    for label in labels:
        chosen = [(example, by_key[(example.id, label)]) for example in examples if (example.id, label) in by_key]
        methods.append(_method_summary(task, label, chosen, ar_seconds))
    return {
        "task": task.name,
        "metric": task.metric_name,
        "split": settings.split,
        "n_examples": len(examples),
        "settings": asdict(settings),
        "methods": methods,
    }


def is_timed(row: dict[str, Any]) -> bool:
    """Rows our engine timed. Lockstep rows (lockstep.py) and rows another engine made (their
    `engine` field) have no seconds of ours and take no part in speeds and speedups."""
    return not row.get("lockstep") and not row.get("engine")


def _method_summary(task: Task, label: str, chosen: list[tuple[Example, dict]], ar_seconds: dict[str, float]) -> dict[str, Any]:
    scores = [row["score"] for _, row in chosen]
    pooled = functools.reduce(Metrics.merge, (Metrics.from_dict(row["metrics"]) for _, row in chosen), Metrics())
    n = len(chosen)
    # Timing comes from timed rows alone: an untimed row's zero seconds would inflate tokens/s.
    timed_rows = [row for _, row in chosen if is_timed(row)]
    timed = functools.reduce(Metrics.merge, (Metrics.from_dict(row["metrics"]) for row in timed_rows), Metrics())
    verified, rejections = verified_positions(pooled)
    common = [(row["metrics"]["seconds"], ar_seconds[example.id]) for example, row in chosen if example.id in ar_seconds and is_timed(row)]
    method_seconds = sum(s for s, _ in common)
    corpus = task.corpus_score([e for e, _ in chosen], [row["completion"] for _, row in chosen]) if chosen else None
    return {
        "method": label,
        "n": n,
        "quality": float(np.mean(scores)) if scores else None,
        "quality_ci95": list(mean_ci(scores)) if scores else None,
        "corpus_score": corpus,
        "acceptance_rate": pooled.acceptance_rate,
        "mean_accepted_length": pooled.mean_accepted_length,
        "timed_n": len(timed_rows),
        "tokens_per_second": timed.tokens_per_second,
        "seconds_per_example": timed.seconds / len(timed_rows) if timed_rows and timed.seconds > 0 else None,
        "new_tokens_per_example": pooled.new_tokens / n if n else None,
        "speedup": sum(a for _, a in common) / method_seconds if common and method_seconds > 0 else None,
        "estimated_bias": pooled.estimated_bias / n if n and pooled.estimated_bias is not None else None,  # per sequence (docs/method.md §6)
        "rejection_per_position": rejections / verified if verified else None,
        "bias_per_position": pooled.estimated_bias / verified if verified and pooled.estimated_bias is not None else None,
        "metrics": pooled.to_dict(),
    }


def add_efficiency(summary: dict[str, Any], cost_ratio: float, draft_length: int) -> None:
    """Ideal speedup for each method's per-position acceptance, and measured / ideal (docs/method.md §6)."""
    summary["cost_ratio"] = cost_ratio
    for method in summary["methods"]:
        rejection = method["rejection_per_position"]
        if rejection is None:
            continue
        ideal = ideal_speedup(1 - rejection, draft_length, cost_ratio)
        method["ideal_speedup"] = ideal
        method["efficiency"] = method["speedup"] / ideal if method["speedup"] is not None else None


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    head = (
        f"# {summary['task']} ({summary['split']}, {summary['n_examples']} examples)\n\n"
        f"quality = mean {summary['metric']} with a 95% bootstrap interval; bias = estimated bias (docs/method.md §6).\n\n"
        "| method | n | quality | 95% CI | acceptance | mean accepted length | tokens/s | s/example | speedup vs ar | ideal speedup | bias/sequence | bias/position |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m in summary["methods"]:
        ci = m["quality_ci95"]
        lines.append(
            f"| {m['method']} | {m['n']} | {_fmt(m['quality'])} | {_fmt(ci[0]) if ci else '–'}–{_fmt(ci[1]) if ci else '–'} "
            f"| {_fmt(m['acceptance_rate'], '.1%')} | {_fmt(m['mean_accepted_length'], '.2f')} | {_fmt(m['tokens_per_second'], '.1f')} "
            f"| {_fmt(m['seconds_per_example'], '.2f')} | {_fmt(m['speedup'], '.2f')} | {_fmt(m.get('ideal_speedup'), '.2f')} "
            f"| {_fmt(m['estimated_bias'])} | {_fmt(m['bias_per_position'], '.4f')} |"
        )
    corpus = [f"- {m['method']}: corpus {summary['metric']} {m['corpus_score']:.2f}" for m in summary["methods"] if m.get("corpus_score") is not None]
    notes = "\n\n" + "\n".join(corpus) if corpus else ""
    partly_timed = [f"{m['method']} ({m['timed_n']} of {m['n']})" for m in summary["methods"] if 0 < m.get("timed_n", m["n"]) < m["n"]]
    if partly_timed:
        notes += "\n\ntokens/s and s/example over the timed rows only (the rest are lockstep rows): " + ", ".join(partly_timed)
    if summary.get("cost_ratio") is not None:
        notes += f"\n\ncost ratio c (draft step / target step) = {summary['cost_ratio']:.3f}"
    if summary.get("skipped_examples"):
        notes += f"\n\nskipped (prompt longer than the context window): {', '.join(summary['skipped_examples'])}"
    return head + "\n".join(lines) + notes + "\n"


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / SUMMARY_MD).write_text(summary_markdown(summary))


