"""Metric helpers shared by tasks: ROUGE-2, BLEU and running code against tests.

Each wraps the field's standard library (rouge-score, sacrebleu, the sandbox) so every task
computes a metric the same way.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Sequence

from ..sandbox import Limits, SandboxResult, SandboxUnavailable, TestPlan, run_tests

log = logging.getLogger("diversed.tasks")

CODE_LIMITS = Limits(seconds=10.0)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code in a completion: its first ```python block (else its first ``` block), else the text.

    An unclosed fence (a truncated completion) yields everything after it.
    """
    blocks = _FENCE.findall(completion)
    for language, body in blocks:
        if language.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else completion


def run_checks(program: str, plan: TestPlan, limits: Limits = CODE_LIMITS) -> SandboxResult:
    """The sandbox's result for `program` against `plan` (its `reason` says why a run failed).

    Never raises for anything the code does: the sandbox's own failure is a failed result (and
    logged). Only a host that cannot isolate code, without --unsafe-sandbox, raises.
    """
    try:
        return run_tests(program, plan, limits)
    except SandboxUnavailable:
        raise
    except Exception as exc:  # the sandbox's own failure: scored as a failure, never a crash
        log.warning("could not score a program: %s: %s", type(exc).__name__, exc)
        return SandboxResult(False, f"sandbox error: {type(exc).__name__}: {exc}", 0.0, "", "", {})


@functools.cache
def _rouge2_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)


def rouge2(prediction: str, reference: str) -> float:
    """ROUGE-2 F1 x 100 (rouge-score, Porter stemming)."""
    return 100.0 * _rouge2_scorer().score(reference, prediction)["rouge2"].fmeasure


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """sacreBLEU sentence BLEU (0-100) with the default 13a tokenizer and exp smoothing."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (0-100): the figure WMT papers report."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
