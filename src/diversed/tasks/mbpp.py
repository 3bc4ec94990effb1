"""MBPP (Austin et al., 2021): short Python functions; pass@1 by running the task's asserts.

Data: `mbpp.jsonl` in the data directory, rows `{"text", "code", "task_id", "test_setup_code",
"test_list"}`. Splits by task_id, as in the paper and on the Hugging Face hub: prompt (few-shot
examples) 1-10, test 11-510, validation 511-600, train 601-974.
"""

from __future__ import annotations

from pathlib import Path

from .base import Example, Task, data_file, read_jsonl
from .scoring import extract_code, passes

SPLITS = {"test": range(11, 511), "validation": range(511, 601), "train": range(601, 975), "prompt": range(1, 11)}


class MBPP(Task):
    name = "mbpp"
    metric_name = "pass@1"
    splits = tuple(SPLITS)

    def examples(self, split: str, data_dir: str | Path | None) -> list[Example]:
        path = data_file(self.name, "mbpp.jsonl", data_dir, 'JSONL rows {"text", "code", "task_id", "test_setup_code", "test_list"}')
        rows = read_jsonl(path, ("text", "code", "task_id", "test_list"))
        chosen = sorted((row for row in rows if int(row["task_id"]) in SPLITS[split]), key=lambda row: int(row["task_id"]))
        return [Example(f"mbpp-{row['task_id']}", row) for row in chosen]

    def prompt(self, example: Example, raw: bool = False) -> str:
        # The prompt of Austin et al. (2021), plus where to put the answer.
        tests = "\n".join(example.fields["test_list"])
        task = f"You are an expert Python programmer, and here is your task: {example.fields['text']} Your code should pass these tests:\n\n{tests}\n"
        if raw:
            return task + "\n```python\n"
        return task + "\nWrite the solution in a single ```python code block."

    def reference(self, example: Example, raw: bool = False) -> str:
        code = example.fields["code"].replace("\r\n", "\n")
        return f"{code}\n```" if raw else f"```python\n{code}\n```"

    def stop(self, raw: bool = False) -> tuple[str, ...]:
        return ("```",) if raw else ()

    def score(self, example: Example, completion: str) -> float:
        fields = example.fields
        # Each assert runs as a test of its own after the solution, so the harness knows they all
        # ran. The setup code goes first: where MBPP has any, it builds objects of classes the
        # solution defines (task 367's tree of `Node`s).
        setup = fields.get("test_setup_code") or ""
        tests = ([setup] if setup.strip() else []) + list(fields["test_list"])
        return passes(extract_code(completion), tests)
