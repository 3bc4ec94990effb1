"""Running an evaluation: every method on the same examples, one row each, resumable.

`run_eval(maker, task, examples, specs, settings, out_dir)` runs every method on the same
examples with the same per-example seeds, appends one JSON row per (example, method) to
`rows.jsonl` as it goes (so an interrupted run resumes where it stopped), then writes
`summary.json`, `summary.md` and `pareto.png` (summary.py, plots.py).

A `RowMaker` is the seam between the harness and what generates: `EngineRows` (our engine, one
generation at a time, timed), `LockstepRows` (lockstep.py: the same law, batched, untimed) and
makers of other engines (integrations/vllm/evaluation.py) all fill the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from ..calibration import measure_seconds
from ..errors import UserInputError
from ..generation import GenerationResult, MethodSpec, PromptEncoder, build_verifier, fitting_prompts, generate
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

Todo = list[tuple[Example, list[int], MethodSpec]]  # the rows still to generate: (example, prompt ids, method)


class RowMaker(Protocol):
    """What generates an evaluation's rows; the harness (`run_eval`) does the rest."""

    @property
    def encoder(self) -> PromptEncoder:
        """The tokenizer and context window that turn each example's prompt into ids."""

    def rows(self, task: Task, todo: Todo, settings: EvalSettings) -> Iterator[dict[str, Any]]:
        """One row (`eval_row`) per item of `todo`, in any order, yielded as each is done."""

    def cost_ratio(self) -> float | None:
        """c = draft step / target step for the ideal speedup (docs/method.md §6), or None where unmeasured."""


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The eval rows written so far (a last line cut off by an interruption is dropped from the file)."""
    return read_rows(path, ROW_FIELDS, "an eval row")


def encodable_examples(
    encoder: PromptEncoder, task: Task, examples: Sequence[Example], raw: bool, room: int = 1
) -> tuple[list[tuple[Example, list[int]]], list[str]]:
    """(example, prompt ids) for each prompt that leaves `room` tokens in the context; and the ids skipped."""
    kept, skipped = fitting_prompts(encoder, examples, lambda example: task.prompt(example, raw), room, raw)
    return kept, [example.id for example in skipped]


def run_eval(
    maker: RowMaker,
    task: Task,
    examples: Sequence[Example],
    specs: Sequence[MethodSpec],
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run each method on each example (resuming from `out_dir`), then summarize and plot.

    `maker` generates the rows still missing (`EngineRows(pair)`, `LockstepRows(pair, B)`, ...).
    Returns the summary (also in summary.json). The folder is locked for the run, so a second
    run there stops with an error instead of interleaving.
    """
    out_dir = Path(out_dir)
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise UserInputError(f"--methods names a method twice: {', '.join(labels)}")
    with locked_folder(out_dir):
        return _run_eval_locked(maker, task, examples, specs, settings, out_dir, labels, progress)


def _run_eval_locked(maker: RowMaker, task, examples, specs, settings, out_dir: Path, labels: list[str], progress: bool | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    check_settings(out_dir, settings)
    rows_path = out_dir / ROWS_FILE
    done = {(row["example_id"], row["method"]) for row in load_rows(rows_path)}
    # A round may draft N tokens and emit one more past the prompt.
    prompts, skipped = encodable_examples(maker.encoder, task, examples, settings.raw, room=settings.generation_config(task, "").longest_draft + 2)
    if skipped:
        print(f"note: skipping {len(skipped)} example(s) whose prompt does not fit the context window: {', '.join(skipped[:5])}", file=sys.stderr)
    todo = [(example, ids, spec) for example, ids in prompts for spec in specs if (example.id, spec.label) not in done]
    with open(rows_path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc=f"eval {task.name}", unit="gen", file=sys.stderr, disable=None if progress is None else not progress) as bar:
        for row in maker.rows(task, todo, settings) if todo else ():
            out.write(json.dumps(row) + "\n")
            out.flush()
            bar.update()
    kept = [example for example, _ in prompts]
    summary = summarize(task, kept, labels, load_rows(rows_path), settings)
    summary["skipped_examples"] = skipped
    if task.metric_name == "pass@1":
        summary["sandbox"] = {"isolated": is_isolated(), "unsafe_sandbox_allowed": unisolated_allowed()}
    if prompts and settings.draft_length != "auto":  # the ideal speedup is for a fixed N
        cost_ratio = maker.cost_ratio()
        if cost_ratio is not None:
            add_efficiency(summary, cost_ratio, settings.draft_length)
    write_summary(out_dir, summary)
    plot_eval(summary, out_dir / EVAL_PLOT)
    return summary


class EngineRows:
    """Our engine, one generation at a time, in order (all methods on example 1, then example 2, ...),
    so load on a shared machine affects the methods alike. Rows are timed."""

    def __init__(self, pair: ModelPair):
        self.pair = pair

    @property
    def encoder(self) -> PromptEncoder:
        return self.pair

    def rows(self, task: Task, todo: Todo, settings: EvalSettings) -> Iterator[dict[str, Any]]:
        specs = _methods(todo)
        verifiers = _verifiers(self.pair, specs, settings)
        _warm_up(self.pair, todo[0][1], specs, verifiers, settings)
        for example, ids, spec in todo:
            config = settings.generation_config(task, example.id)
            yield eval_row(task, example, spec, config.seed, generate(self.pair, ids, spec, config, verifier=verifiers[spec.label]))

    def cost_ratio(self) -> float | None:
        return measure_cost_ratio(self.pair) if self.pair.draft is not None else None


class LockstepRows(EngineRows):
    """Our engine's law, `batch_size` rows at a time in lockstep (lockstep.py): several times the
    throughput, no timing (rows are marked `lockstep`)."""

    def __init__(self, pair: ModelPair, batch_size: int):
        super().__init__(pair)
        self.batch_size = batch_size

    def rows(self, task: Task, todo: Todo, settings: EvalSettings) -> Iterator[dict[str, Any]]:
        check_lockstep(self.pair, settings.generation_config(task, ""))
        verifiers = _verifiers(self.pair, _methods(todo), settings)
        rows = [LockstepRow((example, spec), tuple(ids), verifiers[spec.label], spec.label, example_seed(settings.seed, example.id))
                for example, ids, spec in todo]
        for row, result in lockstep_generate(self.pair, rows, settings.generation_config(task, ""), batch_size=self.batch_size):
            example, spec = row.key
            yield eval_row(task, example, spec, row.seed, result) | {"lockstep": True}


def _methods(todo: Todo) -> dict[str, MethodSpec]:
    """The methods `todo` runs, by label."""
    return {spec.label: spec for _, _, spec in todo}


def _verifiers(pair: ModelPair, specs: dict[str, MethodSpec], settings: EvalSettings) -> dict[str, Any]:
    return {label: build_verifier(pair, spec, settings.proposer) for label, spec in specs.items()}


def _warm_up(pair: ModelPair, prompt_ids: list[int], specs: dict[str, MethodSpec], verifiers: dict, settings: EvalSettings) -> None:
    """A few tokens per method first, so one-time costs do not land on the first timed row."""
    config = dataclasses.replace(settings.generation_config(get_task(settings.task), ""), max_new_tokens=4, seed=0, stop=())
    for label, spec in specs.items():
        generate(pair, prompt_ids, spec, config, verifier=verifiers[label])


def eval_row(task: Task, example: Example, spec: MethodSpec, seed: int, result: GenerationResult) -> dict[str, Any]:
    """The one row format of every maker: the completion, its score and its metrics."""
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
