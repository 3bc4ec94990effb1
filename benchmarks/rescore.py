"""Rescore the completions of an eval folder with today's task scorer (e.g. after a sandbox fix).

    DIVERSED_DATA_DIR=../shared/data python benchmarks/rescore.py docs/results/mbpp-50 [--write]

Prints each method's quality before and after and the rows whose score changed. With --write,
rows.jsonl gets the new scores (same format, written atomically); rerun the folder's eval
command to redraw its summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from diversed.evaluate import ROWS_FILE, SETTINGS_FILE, load_rows, read_settings
from diversed.run_files import atomic_write_text, locked_folder
from diversed.tasks import get_task


def rescore(folder: Path, data_dir: str | None) -> tuple[list[dict], list[tuple[str, str, float, float, str]]]:
    settings = read_settings(folder / SETTINGS_FILE)
    task = get_task(settings["task"])
    examples = {example.id: example for example in task.load(settings.get("split", "test"), None, data_dir)}
    rows, changed = load_rows(folder / ROWS_FILE), []
    for row in rows:
        score = task.score(examples[row["example_id"]], row["completion"])
        if score != row["score"]:
            changed.append((row["example_id"], row["method"], row["score"], score, row["completion"][:80]))
        row["score"] = score
    return rows, changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--data-dir")
    parser.add_argument("--write", action="store_true", help="store the new scores in rows.jsonl")
    args = parser.parse_args()
    before = defaultdict(list)
    for row in load_rows(args.folder / ROWS_FILE):
        before[row["method"]].append(row["score"])
    with locked_folder(args.folder, "rescoring"):
        rows, changed = rescore(args.folder, args.data_dir)
        after = defaultdict(list)
        for row in rows:
            after[row["method"]].append(row["score"])
        print("| method | n | quality before | quality after |\n|---|---|---|---|")
        for method, scores in before.items():
            print(f"| {method} | {len(scores)} | {sum(scores) / len(scores):.3f} | {sum(after[method]) / len(after[method]):.3f} |")
        print(f"\n{len(changed)} row(s) changed" + (":" if changed else ""))
        for example_id, method, old, new, start in changed:
            print(f"  {example_id} {method}: {old:g} -> {new:g}  {start!r}")
        if args.write and changed:
            atomic_write_text(args.folder / ROWS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
            print(f"wrote {args.folder / ROWS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
