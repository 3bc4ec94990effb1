"""Rescore the completions of an eval folder with today's task scorer (e.g. after a sandbox fix).

    DIVERSED_DATA_DIR=../shared/data python benchmarks/rescore.py docs/results/mbpp-50 [--jobs 2] [--write]

Prints each method's quality before and after and the rows whose score changed, with the
sandbox's reason where the task runs code (a task's `run_checks`). With --write,
rows.jsonl gets the new scores (same format, written atomically); rerun the folder's eval
command to redraw its summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from diversed.evaluate import ROWS_FILE, SETTINGS_FILE, load_rows, read_settings
from diversed.run_files import atomic_write_text, locked_folder
from diversed.tasks import get_task


def rescore(folder: Path, data_dir: str | None, jobs: int = 1) -> tuple[list[dict], list[tuple[str, str, float, float, str]]]:
    settings = read_settings(folder / SETTINGS_FILE)
    task = get_task(settings["task"])
    examples = {example.id: example for example in task.load(settings.get("split", "test"), None, data_dir)}
    rows, changed = load_rows(folder / ROWS_FILE), []
    run_checks = getattr(task, "run_checks", None)

    def score(row: dict) -> tuple[float, str]:
        example = examples[row["example_id"]]
        if run_checks is None:
            return task.score(example, row["completion"]), ""
        result = run_checks(example, row["completion"])
        return (1.0 if result.passed else 0.0), result.reason

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        scores = list(tqdm(pool.map(score, rows), total=len(rows), desc=f"rescore {folder.name}", unit="row", file=sys.stderr))
    for row, (new, reason) in zip(rows, scores):
        if new != row["score"]:
            changed.append((row["example_id"], row["method"], row["score"], new, reason[:160]))
        row["score"] = new
    return rows, changed


def rescore_folder(folder: Path, data_dir: str | None, jobs: int = 1, write: bool = False) -> tuple[list[dict], list[tuple[str, str, float, float, str]]]:
    """`rescore` under the folder's lock; with `write`, rows.jsonl gets the new scores (atomically)."""
    with locked_folder(folder, "rescoring"):
        rows, changed = rescore(folder, data_dir, jobs)
        if write and changed:
            atomic_write_text(folder / ROWS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
            print(f"wrote {folder / ROWS_FILE}", file=sys.stderr)
    return rows, changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--data-dir")
    parser.add_argument("--jobs", type=int, default=1, help="programs run at a time")
    parser.add_argument("--write", action="store_true", help="store the new scores in rows.jsonl")
    args = parser.parse_args()
    before = defaultdict(list)
    for row in load_rows(args.folder / ROWS_FILE):
        before[row["method"]].append(row["score"])
    rows, changed = rescore_folder(args.folder, args.data_dir, args.jobs, args.write)
    after = defaultdict(list)
    for row in rows:
        after[row["method"]].append(row["score"])
    print("| method | n | quality before | quality after |\n|---|---|---|---|")
    for method, scores in before.items():
        print(f"| {method} | {len(scores)} | {sum(scores) / len(scores):.3f} | {sum(after[method]) / len(after[method]):.3f} |")
    print(f"\n{len(changed)} row(s) changed" + (":" if changed else ""))
    for example_id, method, old, new, reason in changed:
        print(f"  {example_id} {method}: {old:g} -> {new:g}  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
