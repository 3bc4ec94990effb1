"""Running an evaluation: every method on the same examples, one row each, resumable.

`run_eval(pair, task, examples, specs, settings, out_dir)` runs every method on the same
examples with the same per-example seeds, appends one JSON row per (example, method) to
`rows.jsonl` as it goes (so an interrupted run resumes where it stopped), then writes
`summary.json`, `summary.md` and `pareto.png` (summary.py, plots.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..calibration import measure_seconds
from ..errors import UserInputError
from ..generation import MethodSpec, build_verifier, fitting_prompts, generate
from ..models import ModelPair
from ..run_files import locked_folder, read_rows
from ..sandbox import is_isolated, unisolated_allowed
from ..tasks import Example, Task, get_task
from .lockstep import LockstepRow, check_lockstep, lockstep_generate
from .plots import plot_eval
from .settings import EvalSettings, check_settings, example_seed
from .summary import add_efficiency, summarize, write_summary

ROWS_FILE = "rows.jsonl"
EVAL_PLOT = "pareto.png"


ROW_FIELDS = ("example_id", "method", "score", "metrics")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The eval rows written so far (a last line cut off by an interruption is dropped from the file)."""
    return read_rows(path, ROW_FIELDS, "an eval row")


def encodable_examples(
    pair: ModelPair, task: Task, examples: Sequence[Example], raw: bool, room: int = 1
) -> tuple[list[tuple[Example, list[int]]], list[str]]:
    """(example, prompt ids) for each prompt that leaves `room` tokens in the context; and the ids skipped."""
    kept, skipped = fitting_prompts(pair, examples, lambda example: task.prompt(example, raw), room, raw)
    return kept, [example.id for example in skipped]


def run_eval(
    pair: ModelPair,
    task: Task,
    examples: Sequence[Example],
    specs: Sequence[MethodSpec],
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    progress: bool | None = None,
    lockstep: int | None = None,
) -> dict[str, Any]:
    """Run each method on each example (resuming from `out_dir`), then summarize and plot.

    Methods run example by example (all methods on example 1, then example 2, ...), so load on
    a shared machine affects them alike. `lockstep=B` generates B rows at a time in lockstep
    (evaluate/lockstep.py): the same law and counts, several times the throughput, no timing.
    Returns the summary (also in summary.json). The folder is locked for the run, so a second
    run there stops with an error instead of interleaving.
    """
    out_dir = Path(out_dir)
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise UserInputError(f"--methods names a method twice: {', '.join(labels)}")
    with locked_folder(out_dir):
        return _run_eval_locked(pair, task, examples, specs, settings, out_dir, labels, progress, lockstep)


def _run_eval_locked(pair, task, examples, specs, settings, out_dir: Path, labels: list[str], progress: bool | None, lockstep: int | None) -> dict[str, Any]:
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
    if lockstep is not None:
        check_lockstep(pair, settings.generation_config(task, ""))
        rows = _lockstep_rows(pair, task, todo, verifiers, settings, lockstep)
    else:
        if todo:
            _warm_up(pair, prompts[0][1], specs, verifiers, settings)
        rows = (_evaluate_one(pair, task, example, ids, spec, verifiers[spec.label], settings) for example, ids, spec in todo)
    with open(rows_path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc=f"eval {task.name}", unit="gen", file=sys.stderr, disable=None if progress is None else not progress) as bar:
        for row in rows:
            out.write(json.dumps(row) + "\n")
            out.flush()
            bar.update()
    kept = [example for example, _ in prompts]
    summary = summarize(task, kept, labels, load_rows(rows_path), settings)
    summary["skipped_examples"] = skipped
    if task.metric_name == "pass@1":
        summary["sandbox"] = {"isolated": is_isolated(), "unsafe_sandbox_allowed": unisolated_allowed()}
    if pair.draft is not None and prompts and settings.draft_length != "auto":  # the ideal speedup is for a fixed N
        add_efficiency(summary, measure_cost_ratio(pair), settings.draft_length)
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
    return _row(task, example, spec, config.seed, generate(pair, prompt_ids, spec, config, verifier=verifier))


def _lockstep_rows(pair: ModelPair, task: Task, todo, verifiers: dict, settings: EvalSettings, batch_size: int) -> Iterator[dict[str, Any]]:
    """The rows of `todo`, generated in lockstep batches; a row per (example, method), marked `lockstep`."""
    rows = [LockstepRow((example, spec), tuple(ids), verifiers[spec.label], spec.label, example_seed(settings.seed, example.id)) for example, ids, spec in todo]
    for row, result in lockstep_generate(pair, rows, settings.generation_config(task, ""), batch_size=batch_size):
        example, spec = row.key
        yield _row(task, example, spec, row.seed, result) | {"lockstep": True}


def _row(task: Task, example: Example, spec: MethodSpec, seed: int, result) -> dict[str, Any]:
    return {
        "example_id": example.id,
        "method": spec.label,
        "seed": seed,
        "completion": result.text,
        "score": task.score(example, result.text),
        "finish_reason": result.finish_reason,
        "metrics": result.metrics.to_dict(),
    }


def measure_cost_ratio(pair: ModelPair) -> float:
    """c = time of one draft step / one target step (single-token, KV-cached), for docs/method.md §6's ideal speedup.

    Measured afresh (not from the calibration cache), so it describes the conditions of this run.
    """
    seconds = measure_seconds(pair, max_tokens=1)
    return seconds["draft_step"] / seconds["target_step"]
