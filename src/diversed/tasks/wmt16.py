"""WMT16 German -> English news translation; BLEU (sacreBLEU).

Data: `wmt16_de_en_<split>.jsonl` (split test, validation or train) in the data directory,
rows `{"de", "en"}`. Each example is scored by sentence BLEU; the summary adds corpus BLEU,
the figure papers report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .base import Example, Task, data_file, read_jsonl
from .scoring import corpus_bleu, sentence_bleu


def translation(completion: str) -> str:
    """The hypothesis scored: the first non-empty line (the source is one line)."""
    return next((line.strip() for line in completion.splitlines() if line.strip()), "")


class WMT16(Task):
    name = "wmt16"
    metric_name = "bleu"
    splits = ("test", "validation", "train")

    def examples(self, split: str, data_dir: str | Path | None) -> list[Example]:
        path = data_file(self.name, f"wmt16_de_en_{split}.jsonl", data_dir, 'JSONL rows {"de", "en"}')
        return [Example(f"{split}-{i}", row) for i, row in enumerate(read_jsonl(path, ("de", "en")))]

    def prompt(self, example: Example, raw: bool = False) -> str:
        german = example.fields["de"]
        if raw:
            return f"German: {german}\nEnglish:"
        return f"Translate the following German text into English. Reply with the English translation only.\n\n{german}"

    def reference(self, example: Example, raw: bool = False) -> str:
        english = example.fields["en"]
        return f" {english}" if raw else english

    def stop(self, raw: bool = False) -> tuple[str, ...]:
        return ("\n",) if raw else ()

    def score(self, example: Example, completion: str) -> float:
        return sentence_bleu(translation(completion), example.fields["en"])

    def corpus_score(self, examples: Sequence[Example], completions: Sequence[str]) -> float | None:
        return corpus_bleu([translation(c) for c in completions], [e.fields["en"] for e in examples])
