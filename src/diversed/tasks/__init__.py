"""The paper's evaluation tasks (docs/method.md §7) behind one interface, `Task`.

    task = get_task("gsm8k")
    examples = task.load("test", n=50, data_dir="data/")
    score = task.score(examples[0], completion)   # pure: usable as an RL reward

Prompts, answer extraction and data locations are documented in docs/evaluation.md.
"""

from __future__ import annotations

from ..errors import UserInputError
from .base import DATA_DIR_ENV, Example, Task
from .cnn_dailymail import CNNDailyMail
from .gsm8k import GSM8K
from .humaneval import HumanEval
from .mbpp import MBPP
from .wmt16 import WMT16
from .xsum import XSum

TASKS: dict[str, Task] = {task.name: task for task in (GSM8K(), MBPP(), HumanEval(), XSum(), CNNDailyMail(), WMT16())}


def get_task(name: str) -> Task:
    """The task called `name`, or a UserInputError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserInputError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


__all__ = ["DATA_DIR_ENV", "Example", "Task", "TASKS", "get_task"]
