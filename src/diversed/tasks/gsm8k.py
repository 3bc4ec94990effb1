"""GSM8K (Cobbe et al., 2021): grade-school maths; exact match of the final number.

Data: `gsm8k_test.jsonl` / `gsm8k_train.jsonl` in the data directory, rows
`{"question", "answer"}` whose answer ends with `#### <number>`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .base import Example, Task, data_file, read_jsonl

# A number as people write it: optional minus (not a hyphen inside a word or range such as
# "3-4"), optional $, thousands commas, decimals.
_NUMBER = re.compile(r"(?<![\w.])([-−])?\s?\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations, e.g. <<16-3-4=9>>


def parse_number(text: str) -> Decimal | None:
    """'1,234.50' -> Decimal('1234.50'); '-$5' -> -5; None when there is no number."""
    match = _NUMBER.search(text)
    return _to_decimal(match) if match else None


def _to_decimal(match: re.Match) -> Decimal | None:
    sign, digits = match.groups()
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None
    return -value if sign else value


def reference_answer(answer: str) -> Decimal | None:
    """The number after the last `####` of a GSM8K reference answer."""
    return parse_number(answer.rsplit("####", 1)[-1])


def extract_answer(completion: str) -> Decimal | None:
    """The completion's answer: the number after its last `####`, else its last number."""
    if "####" in completion:
        found = parse_number(completion.rsplit("####", 1)[-1])
        if found is not None:
            return found
    matches = list(_NUMBER.finditer(completion))
    return _to_decimal(matches[-1]) if matches else None


class GSM8K(Task):
    name = "gsm8k"
    metric_name = "accuracy"
    splits = ("test", "train")

    def examples(self, split: str, data_dir: str | Path | None) -> list[Example]:
        path = data_file(self.name, f"gsm8k_{split}.jsonl", data_dir, 'JSONL rows {"question", "answer"}, answers ending "#### <number>"')
        rows = read_jsonl(path, ("question", "answer"))
        return [Example(f"{split}-{i}", row) for i, row in enumerate(rows)]

    def prompt(self, example: Example, raw: bool = False) -> str:
        question = example.fields["question"]
        if raw:
            return f"Question: {question}\nAnswer:"
        return (
            f"{question}\n\nSolve the problem step by step. "
            'End with the final answer on its own line in the form "#### <number>".'
        )

    def reference(self, example: Example, raw: bool = False) -> str:
        answer = _CALCULATOR.sub("", example.fields["answer"])
        return f" {answer}" if raw else answer

    def stop(self, raw: bool = False) -> tuple[str, ...]:
        return ("\nQuestion:",) if raw else ()

    def score(self, example: Example, completion: str) -> float:
        expected = reference_answer(example.fields["answer"])
        got = extract_answer(completion)
        return 1.0 if expected is not None and got is not None and got == expected else 0.0
