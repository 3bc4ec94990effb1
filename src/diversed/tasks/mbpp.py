"""MBPP (Austin et al., 2021): short Python functions; pass@1 by running the task's asserts.

Data: `mbpp.jsonl` in the data directory, rows `{"text", "code", "task_id", "test_setup_code",
"test_list"}`. Splits by task_id, as in the paper and on the Hugging Face hub: prompt (few-shot
examples) 1-10, test 11-510, validation 511-600, train 601-974.
"""

from __future__ import annotations

from pathlib import Path

import ast
import warnings

from ..sandbox import SandboxResult, TestPlan
from .base import Example, Task, data_file, read_jsonl
from .scoring import extract_code, run_checks

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
        return 1.0 if self.run_checks(example, completion).passed else 0.0

    def run_checks(self, example: Example, completion: str) -> SandboxResult:
        """The sandbox's result for a completion: passed, and why not."""
        return run_checks(extract_code(completion), self.plan(example))

    def plan(self, example: Example) -> TestPlan:
        """Each assert is a check of its own in the trusted judge. The names it calls that the
        reference solution defines (task 126's `sum` included) are the candidate's; the setup
        code, where MBPP has any, builds objects of classes the solution defines (tasks 367 and
        927's trees of `Node`s), so it runs in the candidate's process and its names are passed
        to the candidate by reference. The reference's imports (task 596's `sys`) are the judge's."""
        fields = example.fields
        setup = (fields.get("test_setup_code") or "").replace("\r\n", "\n")
        tests = tuple(fields["test_list"])
        try:
            with warnings.catch_warnings():  # old references hold regexes in plain strings
                warnings.simplefilter("ignore")
                reference = ast.parse(fields["code"].replace("\r\n", "\n"))
                candidate_names = _top_level_names(reference) | (_top_level_names(ast.parse(setup)) if setup.strip() else set())
                used = {node.id for test in tests for node in ast.walk(ast.parse(test)) if isinstance(node, ast.Name)}
        except SyntaxError:  # a row we cannot read: the tests' free names are the candidate's
            return TestPlan.from_tests(tests)
        imports = "\n".join(ast.unparse(node) for node in reference.body if isinstance(node, (ast.Import, ast.ImportFrom)))
        return TestPlan(checks=tests, remote=tuple(sorted(candidate_names & used)), helpers=imports, candidate_setup=setup)


def _top_level_names(module: ast.Module) -> set[str]:
    """Functions, classes and variables a module defines at its top level."""
    names = set()
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names
