"""Issue 26: the remaining CLI tracebacks are one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from diversed.errors import UserInputError
from diversed.head import EnsembleHead, HeadConfig, load_head

from .test_cli import one_line_error, tiny_args
from .test_eval_hardening import FIXTURE
from .test_evaluate import eval_args

JUDGE = Path(__file__).resolve().parents[1] / "docs" / "results" / "gsm8k-issue15" / "judge-gsm8k-flip.json"


@pytest.mark.parametrize("seed", [str(2**70), str(-(2**70))])
def test_huge_seeds(capsys, tiny_model_dirs, seed):
    assert "seed" in one_line_error(capsys, "generate", "hi", *tiny_args(tiny_model_dirs), "--seed", seed, "--max-new-tokens", "2")


def test_prompt_with_invalid_utf8_bytes(capsys, tiny_model_dirs):
    prompt = os.fsdecode(b"hi \xff\xfe there")  # what Python makes of such bytes in argv
    assert "UTF-8" in one_line_error(capsys, "generate", prompt, *tiny_args(tiny_model_dirs), "--max-new-tokens", "2")


def test_prompt_the_tokenizer_drops_says_so(capsys, tiny_model_dirs):
    line = one_line_error(capsys, "generate", "\u4e2d\u6587", *tiny_args(tiny_model_dirs), "--raw", "--max-new-tokens", "2")
    assert "dropped" in line


@pytest.mark.parametrize(("extra", "message"), [(["--max-draft-length", "0"], "--max-draft-length"),
                                                (["--temperature", "inf"], "finite"), (["--temperature", "nan"], "temperature")])
def test_refused_sampling_options(capsys, tiny_model_dirs, extra, message):
    assert message in one_line_error(capsys, "generate", "hi", *tiny_args(tiny_model_dirs), *extra)


@pytest.mark.parametrize("damage", ["missing", "garbage", "wrong shape"])
def test_head_with_bad_weights(tmp_path, damage):
    from diversed.head import PairSignature

    pair = PairSignature("t", "d", 6, 4, 100)
    weights = EnsembleHead(HeadConfig(pair)).save(tmp_path / "head")
    if damage == "missing":
        weights.unlink()
    elif damage == "garbage":
        weights.write_bytes(b"\x00garbage" * 10)
    else:
        EnsembleHead(HeadConfig(PairSignature("t", "d", 8, 4, 100))).save(tmp_path / "other")
        weights.write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(UserInputError, match="head"):
        load_head(tmp_path / "head", pair)


@pytest.mark.parametrize(("field", "value"), [("features", 5), ("features", [1, 2]), ("mean", "abc"), ("mean", [None] * 10),
                                              ("mean", [1.0]), ("intercept", "x")])
def test_judge_with_bad_numbers(tmp_path, field, value):
    meta = json.loads(JUDGE.read_text())
    meta[field] = value
    (tmp_path / "judge.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="judge head"):
        load_head(tmp_path / "judge.json")


@pytest.mark.parametrize("where", ["existing file", "under a file", "read-only", "/proc"])
def test_eval_out_that_cannot_be_written(capsys, tiny_model_dirs, tmp_path, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    out = {"existing file": blocker, "under a file": blocker / "run", "read-only": readonly / "run", "/proc": Path("/proc/diversed-run")}[where]
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    line = one_line_error(capsys, *eval_args(tiny_model_dirs, out, **FIXTURE))
    assert "cannot write" in line
