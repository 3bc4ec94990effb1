"""GSM8K (Cobbe et al., 2021): grade-school maths; exact match of the final number.

Data: `gsm8k_test.jsonl` / `gsm8k_train.jsonl` in the data directory, rows
`{"question", "answer"}` whose answer ends with `#### <number>`.

Prompt: three worked examples (the first three rows of GSM8K's *train* split, MIT licence,
calculator annotations removed) before the question, as earlier chat turns (or
Question/Answer blocks with `raw`). Why few-shot: asked zero-shot, the default 1.5B coder
model writes 230-380-token Markdown/LaTeX derivations at T = 1, so a 256-320-token cap
truncated a third of them and accuracy measured brevity; in the reference's terse style its
answers are ~110 tokens (measured on the first 5 test questions). The shots are embedded
here so the prompt does not need the train file.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .base import Example, Prompt, Task, data_file, read_jsonl

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


# GSM8K train rows 0-2 (github.com/openai/grade-school-math, MIT licence), "<<...>>" removed.
FEW_SHOT: tuple[tuple[str, str], ...] = (
    (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?",
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72",
    ),
    (
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
        "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10",
    ),
    (
        "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she needs. "
        "Her parents decided to give her $15 for that purpose, and her grandparents twice as much as her parents. "
        "How much more money does Betty need to buy the wallet?",
        "In the beginning, Betty has only 100 / 2 = $50.\nBetty's grandparents gave her 15 * 2 = $30.\n"
        "This means, Betty needs 100 - 50 - 30 - 15 = $5 more.\n#### 5",
    ),
)


class GSM8K(Task):
    name = "gsm8k"
    metric_name = "accuracy"
    splits = ("test", "train")
    prompt_version = 2  # 1: zero-shot "step by step" instruction; 2: three-shot

    def examples(self, split: str, data_dir: str | Path | None) -> list[Example]:
        path = data_file(self.name, f"gsm8k_{split}.jsonl", data_dir, 'JSONL rows {"question", "answer"}, answers ending "#### <number>"')
        rows = read_jsonl(path, ("question", "answer"))
        return [Example(f"{split}-{i}", row) for i, row in enumerate(rows)]

    def prompt(self, example: Example, raw: bool = False) -> Prompt:
        question = example.fields["question"]
        if raw:
            shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEW_SHOT)
            return f"{shots}Question: {question}\nAnswer:"
        turns = [{"role": role, "content": text} for q, a in FEW_SHOT for role, text in (("user", q), ("assistant", a))]
        return [*turns, {"role": "user", "content": question}]

    def reference(self, example: Example, raw: bool = False) -> str:
        answer = _CALCULATOR.sub("", example.fields["answer"])
        return f" {answer}" if raw else answer

    def stop(self, raw: bool = False) -> tuple[str, ...]:
        return ("\nQuestion:",) if raw else ()

    def score(self, example: Example, completion: str) -> float:
        expected = reference_answer(example.fields["answer"])
        got = extract_answer(completion)
        return 1.0 if expected is not None and got is not None and got == expected else 0.0
