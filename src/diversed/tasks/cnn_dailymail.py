"""CNN/DailyMail (Hermann et al., 2015; See et al., 2017): multi-sentence news summaries; ROUGE-2.

Data: `cnn_dailymail_<split>.jsonl` (split test, validation or train) in the data directory,
rows `{"article", "highlights"}` (the Hugging Face `cnn_dailymail` 3.0.0 fields).
"""

from __future__ import annotations

from pathlib import Path

from .base import Example, Task, data_file, read_jsonl
from .scoring import rouge2


class CNNDailyMail(Task):
    name = "cnn_dailymail"
    metric_name = "rouge2"
    splits = ("test", "validation", "train")

    def examples(self, split: str, data_dir: str | Path | None) -> list[Example]:
        path = data_file(self.name, f"cnn_dailymail_{split}.jsonl", data_dir, 'JSONL rows {"article", "highlights"}')
        return [Example(f"{split}-{i}", row) for i, row in enumerate(read_jsonl(path, ("article", "highlights")))]

    def prompt(self, example: Example, raw: bool = False) -> str:
        article = example.fields["article"]
        if raw:
            return f"Article: {article}\n\nSummary in a few sentences:"
        return f"Summarize the following news article in a few sentences.\n\n{article}"

    def reference(self, example: Example, raw: bool = False) -> str:
        highlights = example.fields["highlights"]
        return f" {highlights}" if raw else highlights

    def stop(self, raw: bool = False) -> tuple[str, ...]:
        return ("\n\n",) if raw else ()

    def score(self, example: Example, completion: str) -> float:
        return rouge2(completion, example.fields["highlights"])
