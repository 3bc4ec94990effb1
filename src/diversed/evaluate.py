"""Evaluation harness: quality vs speed of decoding methods on the paper's tasks (docs/method.md §6, §7).

Library entry points (the CLI wraps them thinly):

- `run_eval(pair, task, examples, specs, settings, out_dir)` runs every method on the same
  examples with the same per-example seeds, appends one JSON row per (example, method) to
  `rows.jsonl` as it goes (so an interrupted run resumes where it stopped), then writes
  `summary.json`, `summary.md` and `pareto.png`.
- `theoretical_front(pair, task, examples, params, weights)` teacher-forces each example's
  reference continuation through both models and returns the exact rejection/bias front of
  the static ensemble: rejection w·TV and bias (1−w)·TV per position (docs/method.md §3).

Commands: `diversed eval` and `diversed pareto` (see docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .engine import GenerationConfig
from .errors import UserInputError
from .generation import MethodSpec, build_verifier, encode_prompt, generate
from .metrics import Metrics, ideal_speedup
from .models import DEFAULT_DRAFT, DEFAULT_TARGET, ModelPair
from .run_files import atomic_write_text, locked_folder
from .sandbox import is_isolated, require_isolation, unisolated_allowed
from .sampling import SamplingParams, logits_to_probs, total_variation
from .tasks import TASKS, Example, Task, get_task

ROWS_FILE = "rows.jsonl"
SETTINGS_FILE = "settings.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
EVAL_PLOT = "pareto.png"
FRONT_JSON = "front.json"
FRONT_PLOT = "front.png"
DEFAULT_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides what a row contains. A resumed run must match them exactly.

    The number of examples and the method list are not settings: a rerun may add either,
    and only the missing rows are computed.
    """

    task: str
    split: str
    target: str
    draft: str
    dtype: str
    temperature: float
    top_k: int
    top_p: float
    draft_length: int
    max_new_tokens: int
    seed: int
    raw: bool = False
    draft_confidence: float = 0.0
    prompt_version: int = 1  # the task's Task.prompt_version
    backend: str = "torch"  # runs before the llama.cpp backend existed were torch runs
    proposer: str = "model"

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    def generation_config(self, task: Task, example_id: str) -> GenerationConfig:
        seed = example_seed(self.seed, example_id)
        return GenerationConfig(self.max_new_tokens, self.draft_length, self.sampling, seed, task.stop(self.raw),
                                draft_confidence=self.draft_confidence, proposer=self.proposer)


def example_seed(seed: int, example_id: str) -> int:
    """The sampling seed of one example: the same for every method, independent of order."""
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ----------------------------------------------------------------------------- run files


def check_settings(out_dir: Path, settings: EvalSettings) -> None:
    """Record the settings of a new run; refuse to mix rows of runs that differ."""
    path = out_dir / SETTINGS_FILE
    current = asdict(settings)
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(current, indent=2) + "\n")
        return
    stored = read_settings(path)
    defaults = {f.name: f.default for f in fields(EvalSettings)}  # settings added later keep their default
    differing = [
        f"{key}: {stored.get(key, defaults[key])!r} there, {value!r} now"
        for key, value in current.items()
        if stored.get(key, defaults[key]) != value
    ]
    if differing:
        raise UserInputError(
            f"{out_dir} holds a run with other settings ({'; '.join(differing)}); "
            "rerun with the same settings to resume it, or choose another --out"
        )


def read_settings(path: Path) -> dict[str, Any]:
    """A run's settings.json, or a one-line error when it is cut off or not an object."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path} is unreadable ({exc}); restore it or choose another --out") from None
    if not isinstance(stored, dict):
        raise UserInputError(f"{path} is not a settings object; restore it or choose another --out")
    return stored


ROW_FIELDS = ("example_id", "method", "score", "metrics")


def load_rows(path: Path, required: tuple[str, ...] = ROW_FIELDS, kind: str = "an eval row") -> list[dict[str, Any]]:
    """The rows written so far; a row lacking a `required` key is an error (it is not `kind`).

    A last line cut off by an interruption is dropped from the file.
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    rows = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"line {number} of {path} is not UTF-8; remove it to resume") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"warning: ignoring unreadable line {number} of {path}", file=sys.stderr)
            continue
        if not isinstance(row, dict) or any(key not in row for key in required):
            raise UserInputError(f"line {number} of {path} is not {kind} (needs {', '.join(required)}); remove it to resume")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- running


def encodable_examples(
    pair: ModelPair, task: Task, examples: Sequence[Example], raw: bool, room: int = 1
) -> tuple[list[tuple[Example, list[int]]], list[str]]:
    """(example, prompt ids) for each prompt that leaves `room` tokens in the context; and the ids skipped.

    The same examples are skipped for every method (it depends on the prompt only), so the
    methods stay comparable.
    """
    kept, skipped = [], []
    for example in examples:
        try:
            ids = encode_prompt(pair, task.prompt(example, raw), raw)
        except UserInputError:
            ids = None
        if ids is None or len(ids) + room > pair.context_window:
            skipped.append(example.id)
        else:
            kept.append((example, ids))
    return kept, skipped


def run_eval(
    pair: ModelPair,
    task: Task,
    examples: Sequence[Example],
    specs: Sequence[MethodSpec],
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run each method on each example (resuming from `out_dir`), then summarize and plot.

    Methods run example by example (all methods on example 1, then example 2, ...), so load on
    a shared machine affects them alike. Returns the summary (also in summary.json). The folder
    is locked for the run, so a second run there stops with an error instead of interleaving.
    """
    out_dir = Path(out_dir)
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise UserInputError(f"--methods names a method twice: {', '.join(labels)}")
    with locked_folder(out_dir):
        return _run_eval_locked(pair, task, examples, specs, settings, out_dir, labels, progress)


def _run_eval_locked(pair, task, examples, specs, settings, out_dir: Path, labels: list[str], progress: bool | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    check_settings(out_dir, settings)
    rows_path = out_dir / ROWS_FILE
    done = {(row["example_id"], row["method"]) for row in load_rows(rows_path)}
    # A round may draft N tokens and emit one more past the prompt.
    prompts, skipped = encodable_examples(pair, task, examples, settings.raw, room=settings.generation_config(task, "").longest_draft + 2)
    if skipped:
        print(f"note: skipping {len(skipped)} example(s) whose prompt does not fit the context window: {', '.join(skipped[:5])}", file=sys.stderr)
    todo = [(example, ids, spec) for example, ids in prompts for spec in specs if (example.id, spec.label) not in done]
    verifiers = {spec.label: build_verifier(pair, spec, settings.proposer) for spec in specs}
    if todo:
        _warm_up(pair, prompts[0][1], specs, verifiers, settings)
    with open(rows_path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc=f"eval {task.name}", unit="gen", file=sys.stderr, disable=None if progress is None else not progress) as bar:
        for example, ids, spec in todo:
            row = _evaluate_one(pair, task, example, ids, spec, verifiers[spec.label], settings)
            out.write(json.dumps(row) + "\n")
            out.flush()
            bar.update()
    kept = [example for example, _ in prompts]
    summary = summarize(task, kept, labels, load_rows(rows_path), settings)
    summary["skipped_examples"] = skipped
    if task.metric_name == "pass@1":
        summary["sandbox"] = {"isolated": is_isolated(), "unsafe_sandbox_allowed": unisolated_allowed()}
    if pair.draft is not None and prompts and settings.draft_length != "auto":  # the ideal speedup is for a fixed N
        _add_efficiency(summary, measure_cost_ratio(pair, prompts[0][1]), settings.draft_length)
    write_summary(out_dir, summary)
    plot_eval(summary, out_dir / EVAL_PLOT)
    return summary


def _warm_up(pair: ModelPair, prompt_ids: list[int], specs: Sequence[MethodSpec], verifiers: dict, settings: EvalSettings) -> None:
    """A few tokens per method first, so one-time costs do not land on the first timed row."""
    config = dataclasses.replace(settings.generation_config(get_task(settings.task), ""), max_new_tokens=4, seed=0, stop=())
    for spec in specs:
        generate(pair, prompt_ids, spec, config, verifier=verifiers[spec.label])


def _evaluate_one(pair: ModelPair, task: Task, example: Example, prompt_ids: list[int], spec: MethodSpec, verifier, settings: EvalSettings) -> dict[str, Any]:
    config = settings.generation_config(task, example.id)
    result = generate(pair, prompt_ids, spec, config, verifier=verifier)
    return {
        "example_id": example.id,
        "method": spec.label,
        "seed": config.seed,
        "completion": result.text,
        "score": task.score(example, result.text),
        "finish_reason": result.finish_reason,
        "metrics": result.metrics.to_dict(),
    }


@torch.inference_mode()
def measure_cost_ratio(pair: ModelPair, prompt_ids: list[int], steps: int = 16) -> float:
    """c = time of one draft step / one target step (single-token, KV-cached), for docs/method.md §6's ideal speedup.

    The two models' steps alternate and the medians are compared, so a burst of load on a
    shared machine does not land on one model only.
    """
    models = [pair.runner("draft"), pair.runner("target")]
    for cached in models:
        cached.feed(prompt_ids, 1)  # prefill
    times: list[list[float]] = [[], []]
    for _ in range(steps):
        for cached, record in zip(models, times):
            started = time.perf_counter()
            logits, _ = cached.feed(prompt_ids[-1:], 1)
            float(logits[0, 0])  # wait for the device to finish
            record.append(time.perf_counter() - started)
    return float(np.median(times[0]) / np.median(times[1]))


# ----------------------------------------------------------------------------- summary


def verified_positions(metrics: Metrics) -> tuple[int, int]:
    """(positions the verifier decided on, rejections) of pooled metrics.

    A round decides min(k + 1, N) positions: its accepted tokens plus the rejected one, if any.
    Rounds that accepted their whole draft are counted by the last per-position counter.
    """
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
    ar_seconds = {example.id: by_key[(example.id, "ar")]["metrics"]["seconds"] for example in examples if (example.id, "ar") in by_key}
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


def _method_summary(task: Task, label: str, chosen: list[tuple[Example, dict]], ar_seconds: dict[str, float]) -> dict[str, Any]:
    scores = [row["score"] for _, row in chosen]
    pooled = functools.reduce(Metrics.merge, (Metrics.from_dict(row["metrics"]) for _, row in chosen), Metrics())
    n = len(chosen)
    verified, rejections = verified_positions(pooled)
    common = [(row["metrics"]["seconds"], ar_seconds[example.id]) for example, row in chosen if example.id in ar_seconds]
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
        "tokens_per_second": pooled.tokens_per_second,
        "seconds_per_example": pooled.seconds / n if n else None,
        "new_tokens_per_example": pooled.new_tokens / n if n else None,
        "speedup": sum(a for _, a in common) / method_seconds if common and method_seconds > 0 else None,
        "estimated_bias": pooled.estimated_bias / n if n else None,  # per sequence (docs/method.md §6)
        "rejection_per_position": rejections / verified if verified else None,
        "bias_per_position": pooled.estimated_bias / verified if verified else None,
        "metrics": pooled.to_dict(),
    }


def _add_efficiency(summary: dict[str, Any], cost_ratio: float, draft_length: int) -> None:
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
    if summary.get("cost_ratio") is not None:
        notes += f"\n\ncost ratio c (draft step / target step) = {summary['cost_ratio']:.3f}"
    if summary.get("skipped_examples"):
        notes += f"\n\nskipped (prompt longer than the context window): {', '.join(summary['skipped_examples'])}"
    return head + "\n".join(lines) + notes + "\n"


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    (out_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / SUMMARY_MD).write_text(summary_markdown(summary))


# ----------------------------------------------------------------------------- plots


def _static_weight(label: str) -> float | None:
    spec = MethodSpec.parse(label)
    return spec.weight if spec.method == "static" else None


def _plot_methods(ax, methods: list[dict], x_key: str, y_key: str, with_ci: bool = False) -> None:
    """One point per method; the static-ensemble sweep as a line in order of w.

    A method's colour comes from its place in `methods`, so it is the same in every panel
    even where a panel has no point for another method (ar has no acceptance rate).
    """
    colours = {m["method"]: f"C{i % 10}" for i, m in enumerate(methods)}
    points = [m for m in methods if m.get(x_key) is not None and m.get(y_key) is not None]
    sweep = sorted((m for m in points if _static_weight(m["method"]) is not None), key=lambda m: _static_weight(m["method"]))
    if len(sweep) > 1:
        ax.plot([m[x_key] for m in sweep], [m[y_key] for m in sweep], "-", color="grey", alpha=0.5, label="static sweep")
    for m in points:
        yerr = None
        if with_ci and m.get("quality_ci95"):
            low, high = m["quality_ci95"]
            yerr = [[max(0.0, m[y_key] - low)], [max(0.0, high - m[y_key])]]
        # A legend, not labels beside the points: methods at nearly the same point (a head
        # that behaves like one static weight) would print their labels over each other.
        ax.errorbar(m[x_key], m[y_key], yerr=yerr, fmt="o", capsize=3, color=colours[m["method"]], label=m["method"])


def plot_eval(summary: dict[str, Any], path: Path) -> None:
    """pareto.png: quality vs acceptance rate, and quality vs seconds per example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    metric = summary["metric"]
    _plot_methods(left, summary["methods"], "acceptance_rate", "quality", with_ci=True)
    left.set(xlabel="acceptance rate (accepted / drafted)", ylabel=metric, title="quality vs acceptance")
    _plot_methods(right, summary["methods"], "seconds_per_example", "quality", with_ci=True)
    right.set(xlabel="seconds per example", ylabel=metric, title="quality vs latency")
    right.legend(fontsize=7, loc="best")  # the right panel has every method (ar has no acceptance rate)
    fig.suptitle(f"{summary['task']} ({summary['n_examples']} examples, T={summary['settings']['temperature']:g}, N={summary['settings']['draft_length']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- theoretical front


@torch.inference_mode()
def teacher_forced(
    pair: ModelPair, prompt_ids: list[int], continuation_ids: list[int], params: SamplingParams
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both models over prompt + continuation, one forward each, at the continuation positions.

    -> ([target hidden [T, H_t], draft hidden [T, H_d]], [p [T, V], q [T, V]]), on the CPU.
    """
    ids = (prompt_ids + continuation_ids)[: pair.context_window]
    start, end = len(prompt_ids) - 1, len(ids) - 1  # the state at position j predicts token j + 1
    hidden, probs = [], []
    for role in ("target", "draft"):
        logits, h = pair.runner(role).feed(ids[: max(start, end)], max(0, end - start))  # [T, V], [T, H] | None
        hidden.append(h.float().cpu() if h is not None else None)
        probs.append(logits_to_probs(logits[:, : pair.vocab_size], params).cpu())
    return hidden, probs


def position_tv(pair: ModelPair, prompt_ids: list[int], continuation_ids: list[int], params: SamplingParams) -> torch.Tensor:
    """TV(p_i, q_i) at each continuation position, both models teacher-forced (one forward each). -> [T]."""
    _, (p, q) = teacher_forced(pair, prompt_ids, continuation_ids, params)
    return total_variation(p, q)


def theoretical_front(
    pair: ModelPair,
    task: Task,
    examples: Sequence[Example],
    params: SamplingParams,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    raw: bool = False,
) -> dict[str, Any]:
    """Exact rejection/bias front of the static ensemble on the examples' reference continuations.

    Per position, the ensemble with weight w rejects with probability w·TV(p, q) and has bias
    (1−w)·TV(p, q) (docs/method.md §3); the front reports their means over all positions.
    """
    if pair.draft is None:
        raise UserInputError("the pareto command needs a draft model")
    per_example, values = [], []
    prompts, skipped = encodable_examples(pair, task, examples, raw, room=2)
    for example, prompt_ids in prompts:
        continuation = pair.tokenizer(task.reference(example, raw), add_special_tokens=False).input_ids
        tv = position_tv(pair, prompt_ids, continuation, params)
        values.append(tv)
        per_example.append({"id": example.id, "positions": int(tv.numel()), "mean_tv": float(tv.mean()) if tv.numel() else None})
    all_tv = torch.cat(values) if values else torch.zeros(0)
    mean_tv = float(all_tv.double().mean()) if all_tv.numel() else float("nan")
    return {
        "task": task.name,
        "n_examples": len(prompts),
        "skipped_examples": skipped,
        "positions": int(all_tv.numel()),
        "mean_tv": mean_tv,
        "sampling": asdict(params),
        "raw": raw,
        "target": pair.target_name,
        "draft": pair.draft_name,
        "front": [{"w": w, "rejection": w * mean_tv, "acceptance": 1 - w * mean_tv, "bias": (1 - w) * mean_tv} for w in weights],
        "per_example": per_example,
    }


def plot_front(front: dict[str, Any], path: Path, summary: dict[str, Any] | None = None) -> None:
    """front.png: the theoretical front, with an eval run's measured points when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = front["front"]
    ax.plot([p["rejection"] for p in points], [p["bias"] for p in points], "-o", color="tab:blue", label="static ensemble, theory (reference text)")
    for p in points:
        ax.annotate(f"w={p['w']:g}", (p["rejection"], p["bias"]), textcoords="offset points", xytext=(4, 2), fontsize=7)
    if summary is not None:
        measured = [m for m in summary["methods"] if m.get("rejection_per_position") is not None]
        for m in measured:
            ax.plot(m["rejection_per_position"], m["bias_per_position"], "s", color="tab:red")
            ax.annotate(m["method"], (m["rejection_per_position"], m["bias_per_position"]), textcoords="offset points", xytext=(4, -10), fontsize=8, color="tab:red")
        if measured:
            ax.plot([], [], "s", color="tab:red", label="measured (eval run, own samples)")
    ax.set(xlabel="rejection probability per position", ylabel="bias per position (TV to target)",
           title=f"{front['task']}: mean TV(p, q) = {front['mean_tv']:.3f} over {front['positions']} positions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI


def _parse_methods(text: str) -> list[MethodSpec]:
    """Method specs, validated (knobs, head files) before any model loads."""
    from .head import resolve_head_path
    from .verifiers import make_verifier

    specs = [MethodSpec.parse(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise UserInputError("--methods is empty")
    for spec in specs:
        if spec.method == "diversed":
            if not spec.head:
                raise UserInputError("diversed needs a head: diversed:PATH or diversed:NAME")
            resolve_head_path(spec.head)
        else:
            make_verifier(spec.method, weight=spec.weight, lenience=spec.lenience, rule=spec.rule,
                          threshold=spec.threshold, low=spec.low_weight)
    return specs


def _parse_weights(text: str) -> list[float]:
    try:
        weights = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserInputError(f"--weights must be numbers separated by commas, got {text!r}") from None
    if not weights or any(not 0 <= w <= 1 for w in weights):
        raise UserInputError(f"--weights must be in [0, 1], got {text!r}")
    return weights


def _load(task_name: str, split: str, n: int | None, data_dir: str | None) -> tuple[Task, list[Example]]:
    task = get_task(task_name)
    return task, task.load(split, n, data_dir)


def cmd_eval(args: argparse.Namespace) -> int:
    from .calibration import choose_backend
    from .cli import NGRAM, config_from_args, pair_from_args

    task, examples = _load(args.task, args.split, args.n, args.data_dir)
    if task.metric_name == "pass@1":
        require_isolation(args.unsafe_sandbox)  # before anything runs model-written code
    specs = _parse_methods(args.methods)
    config = config_from_args(args)  # validates the sampling options before the models load
    target, draft = args.target or DEFAULT_TARGET.name, NGRAM if args.draft == NGRAM else args.draft or DEFAULT_DRAFT.name
    if args.backend == "auto":  # resolved first: the backend is a setting (weights and kernels differ)
        args.backend, _ = choose_backend(target, None if draft == NGRAM else draft, args.dtype, args.device)
    settings = EvalSettings(
        task=task.name, split=args.split, target=target, draft=draft,
        dtype=args.dtype, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        draft_length=config.draft_length, max_new_tokens=args.max_new_tokens, seed=args.seed, raw=args.raw,
        draft_confidence=args.draft_confidence, prompt_version=task.prompt_version, backend=args.backend, proposer=config.proposer,
    )
    out_dir = Path(args.out)
    check_settings(out_dir, settings)  # fail before the (slow) model load
    pair = pair_from_args(args, needs_draft=any(spec.method != "ar" for spec in specs))
    summary = run_eval(pair, task, examples, specs, settings, out_dir)
    print(summary_markdown(summary))
    print(f"rows, summary and plot in {out_dir}/", file=sys.stderr)
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from .cli import pair_from_args

    task, examples = _load(args.task, args.split, args.n, args.data_dir)
    weights = _parse_weights(args.weights)
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    pair = pair_from_args(args)
    front = theoretical_front(pair, task, examples, params, weights, raw=args.raw)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FRONT_JSON).write_text(json.dumps(front, indent=2) + "\n")
    summary_path = out_dir / SUMMARY_JSON
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if summary is not None and summary.get("task") != task.name:
        print(f"note: {summary_path} is for task {summary.get('task')}; not plotting its points", file=sys.stderr)
        summary = None
    plot_front(front, out_dir / FRONT_PLOT, summary)
    print(f"mean TV(p, q) = {front['mean_tv']:.4f} over {front['positions']} positions of {front['n_examples']} examples")
    for point in front["front"]:
        print(f"w={point['w']:<5g} rejection {point['rejection']:.4f}  bias {point['bias']:.4f}")
    print(f"front in {out_dir / FRONT_JSON} and {out_dir / FRONT_PLOT}", file=sys.stderr)
    return 0


def _add_task_args(parser: argparse.ArgumentParser, default_n: int) -> None:
    group = parser.add_argument_group("task")
    group.add_argument("--task", required=True, choices=list(TASKS), help="benchmark (see docs/evaluation.md)")
    group.add_argument("--split", default="test", help="data split (default test)")
    group.add_argument("--n", type=int, default=default_n, help=f"first N examples of the split (default {default_n})")
    group.add_argument("--data-dir", help="folder with the task's JSONL files (default: $DIVERSED_DATA_DIR)")
    group.add_argument("--raw", action="store_true", help="plain-completion prompts instead of the chat template")
    group.add_argument("--out", required=True, help="output folder (rows, summary, plots); an eval run there resumes")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` and `pareto` to the `diversed` command line."""
    from .cli import add_model_args, add_sampling_args

    ev = subparsers.add_parser("eval", help="compare decoding methods on a task: quality, acceptance, speed")
    _add_task_args(ev, default_n=50)
    ev.add_argument("--methods", default="ar,exact,static:0.9,static:0.7", help="comma-separated: ar, exact, static:W, diversed:HEAD, lenient:L, cascade:RULE:A, typical (default %(default)s)")
    add_model_args(ev)
    add_sampling_args(ev)
    ev.add_argument("--unsafe-sandbox", action="store_true", help="run model-written code even where the sandbox cannot isolate it (docs/evaluation.md)")
    # A fixed N by default: rows of different methods then compare at the same draft length.
    ev.set_defaults(handler=cmd_eval, max_new_tokens=256, seed=0, draft_length=5)

    pa = subparsers.add_parser("pareto", help="exact rejection/bias front of the static ensemble on reference texts")
    _add_task_args(pa, default_n=50)
    pa.add_argument("--weights", default=",".join(f"{w:g}" for w in DEFAULT_WEIGHTS), help="target weights w (default 0,0.1,...,1)")
    add_model_args(pa)
    group = pa.add_argument_group("distributions (processed as when decoding)")
    group.add_argument("--temperature", "-T", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--top-p", type=float, default=1.0)
    pa.set_defaults(handler=cmd_pareto)
