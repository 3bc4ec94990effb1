"""The task interface every benchmark implements, and where task data comes from."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from ..errors import UserInputError

DATA_DIR_ENV = "DIVERSED_DATA_DIR"

# A task prompt: the user message, or the whole chat ({"role", "content"} turns) for few-shot
# prompts; with raw=True always the text to continue.
Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One benchmark item: a stable id (the same across runs and machines) and its raw fields."""

    id: str
    fields: Mapping[str, Any]


class Task(ABC):
    """A benchmark: examples, prompts, references and a pure scorer.

    `score(example, completion)` depends on nothing else (no model, no state), so the training
    module can use it as a reward. Prompts come in two forms: chat content (wrapped in the
    model's chat template by `diversed.generation.encode_prompt`) and `raw=True` text for plain
    completion, which ends at `stop(raw=True)`.
    """

    name: ClassVar[str]
    metric_name: ClassVar[str]  # what `score` measures: accuracy, pass@1, rouge2, bleu
    splits: ClassVar[tuple[str, ...]] = ("test",)
    # Bumped whenever prompt() changes, so a resumed evaluation never mixes rows of two prompts.
    prompt_version: ClassVar[int] = 1

    def load(self, split: str = "test", n: int | None = None, data_dir: str | Path | None = None, offset: int = 0) -> list[Example]:
        """`n` examples of `split` (all when n is None) after skipping the first `offset`, in a fixed order."""
        if split not in self.splits:
            raise UserInputError(f"task {self.name} has no split {split!r}; choose one of {', '.join(self.splits)}")
        if n is not None and n < 1:
            raise UserInputError(f"--n must be >= 1, got {n}")
        if offset < 0:
            raise UserInputError(f"--offset must be >= 0, got {offset}")
        examples = self.examples(split, data_dir)
        if offset >= len(examples):
            raise UserInputError(f"--offset {offset} skips every example: {self.name}'s {split} split has {len(examples)}")
        return examples[offset:] if n is None else examples[offset:offset + n]

    @abstractmethod
    def examples(self, split: str, data_dir: str | Path | None) -> list[Example]:
        """Every example of a (valid) split."""

    @abstractmethod
    def prompt(self, example: Example, raw: bool = False) -> Prompt:
        """The user message or chat turns (or, with raw, the text to continue)."""

    @abstractmethod
    def reference(self, example: Example, raw: bool = False) -> str:
        """A good continuation of `prompt(example, raw)`: what the pareto command teacher-forces."""

    @abstractmethod
    def score(self, example: Example, completion: str) -> float:
        """Quality of one completion (0/1 for accuracy and pass@1, 0-100 for ROUGE and BLEU)."""

    def stop(self, raw: bool = False) -> tuple[str, ...]:
        """Stop strings for generation (chat prompts end at EOS)."""
        return ()

    def corpus_score(self, examples: Sequence[Example], completions: Sequence[str]) -> float | None:
        """A corpus-level figure where the field reports one (BLEU); None otherwise."""
        return None


def data_file(task: str, filename: str, data_dir: str | Path | None, expected: str) -> Path:
    """`filename` in the data directory (--data-dir, else $DIVERSED_DATA_DIR), or a clear error."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise UserInputError(
            f"task {task} reads {filename} ({expected}) from a data directory: pass --data-dir DIR "
            f"or set {DATA_DIR_ENV}=DIR (see docs/evaluation.md)"
        )
    path = Path(chosen) / filename
    if not path.is_file():
        raise UserInputError(f"task {task} needs {path} ({expected}); put the file there or point --data-dir elsewhere")
    return path


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file, checking that each has the `required` fields."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}:{number} is not JSON: {exc}") from None
            missing = [key for key in required if key not in row]
            if missing:
                raise UserInputError(f"{path}:{number} lacks the field(s) {', '.join(missing)}")
            rows.append(row)
    return rows
