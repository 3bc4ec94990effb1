"""Evaluation harness: quality vs speed of decoding methods on the paper's tasks (docs/method.md §6, §7).

- run.py: `run_eval` runs every method on the same examples with the same per-example seeds,
  one resumable row per (example, method) in `rows.jsonl`, made by a `RowMaker`
  (`EngineRows`, `LockstepRows`, or another engine's);
- summary.py: `summarize`, `summary_markdown`, `verified_positions`, `mean_ci`;
- plots.py: pareto.png and front.png;
- theory.py: `theoretical_front`, the exact rejection/bias front of the static ensemble on
  reference text, and `teacher_forced`.

Commands: `diversed eval` and `diversed pareto` (diversed/commands/evaluate.py, docs/evaluation.md).
"""

from ..run_files import read_settings
from .plots import plot_eval, plot_front
from .run import ROW_FIELDS, ROWS_FILE, EngineRows, LockstepRows, RowMaker, Todo, encodable_examples, eval_row, load_rows, run_eval
from .settings import SETTINGS_FILE, EvalSettings, check_settings, example_seed
from .summary import SUMMARY_JSON, SUMMARY_MD, mean_ci, summarize, summary_markdown, verified_positions, write_summary
from .theory import DEFAULT_WEIGHTS, FRONT_JSON, FRONT_PLOT, position_tv, teacher_forced, theoretical_front

__all__ = [
    "read_settings", "plot_eval", "plot_front",
    "ROW_FIELDS", "ROWS_FILE", "EngineRows", "LockstepRows", "RowMaker", "Todo", "encodable_examples", "eval_row", "load_rows", "run_eval",
    "SETTINGS_FILE", "EvalSettings", "check_settings", "example_seed",
    "SUMMARY_JSON", "SUMMARY_MD", "mean_ci", "summarize", "summary_markdown", "verified_positions", "write_summary",
    "DEFAULT_WEIGHTS", "FRONT_JSON", "FRONT_PLOT", "position_tv", "teacher_forced", "theoretical_front",
]
