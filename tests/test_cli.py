"""`diversed generate`: JSON shape, default method note, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from diversed.cli import COMMANDS, build_parser, main
from diversed.head import EnsembleHead, HeadConfig, PairSignature
from diversed.testing import build_tiny_model


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(dirs) -> list[str]:
    return ["--target", str(dirs[0]), "--draft", str(dirs[1]), "--dtype", "float32"]


def test_generate_json(capsys, tiny_model_dirs):
    code, out, err = run(capsys, "generate", "hi there", *tiny_args(tiny_model_dirs), "--max-new-tokens", "12", "--seed", "0", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"text", "token_ids", "method", "metrics"}
    assert data["method"] == "exact"  # issue 23's rule (tests/test_default_rule.py)
    assert "using --method exact, which is lossless" in err
    metrics = data["metrics"]
    for name in ("drafted", "accepted", "rounds", "acceptance_rate", "mean_accepted_length", "accepted_per_position",
                 "new_tokens", "seconds", "tokens_per_second", "estimated_bias"):
        assert name in metrics
    assert metrics["new_tokens"] == len(data["token_ids"]) <= 12


def test_generate_stream_prints_text_and_summary(capsys, tiny_model_dirs):
    code, out, err = run(capsys, "generate", "hi", *tiny_args(tiny_model_dirs), "--method", "exact", "--max-new-tokens", "20",
                         "--seed", "1", "--stream", "--temperature", "0")
    assert code == 0 and out.strip()
    assert "method exact" in err and "acceptance" in err


def one_line_error(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err
    assert sum(line.startswith("error: ") for line in lines) == 1
    return lines[-1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "static", "--weight", "0"], "(0, 1]"),
        (["--method", "static", "--weight", "1.5"], "(0, 1]"),
        (["--method", "lenient", "--lenience", "0"], "(0, 1]"),
        (["--method", "lenient", "--lenience", "3"], "(0, 1]"),
        (["--draft-length", "0"], "draft length"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--method", "diversed"], "needs --head"),
        (["--method", "diversed", "--head", "/nonexistent/head"], "no head at"),
        (["--method", "exact", "--weight", "0.5"], "does not apply"),
        (["--device", "banana"], "unknown device"),
        (["--device", "meta"], "unsupported device"),
    ],
)
def test_bad_options_fail_before_loading_models(capsys, extra, message):
    # No model options: these must fail before any (default-pair) model loads.
    assert message in one_line_error(capsys, "generate", "a prompt", *extra)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA (tests/test_cuda.py covers it)")
def test_cuda_device_without_cuda_is_a_clear_error(capsys):
    assert "CUDA is not available" in one_line_error(capsys, "generate", "a prompt", "--device", "cuda")


def test_explicit_cpu_device(capsys, tiny_model_dirs):
    assert main(["generate", "hello", *tiny_args(tiny_model_dirs), "--device", "cpu", "--max-new-tokens", "4", "--seed", "0"]) == 0


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "x", "--method", "nope"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_empty_prompt(capsys):
    assert "empty" in one_line_error(capsys, "generate", "  ")


def test_prompt_longer_than_context(capsys, tiny_model_dirs):
    assert "context window" in one_line_error(capsys, "generate", "x" * 2100, *tiny_args(tiny_model_dirs), "--raw")


def test_mismatched_head(capsys, tiny_model_dirs, tmp_path):
    other = PairSignature("someone/else", "someone/small", 64, 32, 1000)
    EnsembleHead(HeadConfig(other)).save(tmp_path / "head")
    line = one_line_error(capsys, "generate", "x", *tiny_args(tiny_model_dirs), "--method", "diversed", "--head", str(tmp_path / "head"))
    assert "another model pair" in line and "target_hidden_size" in line


def test_missing_model(capsys, tmp_path):
    assert "cannot load model" in one_line_error(capsys, "generate", "x", "--target", str(tmp_path / "missing"), "--draft", str(tmp_path / "missing"))


def test_mismatched_pair(capsys, tiny_model_dirs, tmp_path):
    odd = build_tiny_model(tmp_path / "odd", seed=5, alphabet="xyz")
    line = one_line_error(capsys, "generate", "x", "--target", str(tiny_model_dirs[0]), "--draft", str(odd), "--dtype", "float32")
    assert "different vocabularies" in line and "e.g." in line


HEAVY = ("torch", "transformers", "numpy", "fastapi", "pydantic", "matplotlib", "sklearn", "llama_cpp")


def _modules_after(code: str) -> tuple[str, list[str]]:
    """(stdout, the HEAVY modules loaded) after running `code` in a fresh interpreter."""
    probe = f"import sys\n{code}\nprint('LOADED', *[m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out, _, loaded = done.stdout.rpartition("LOADED")
    return out, loaded.split()


def test_help_starts_without_torch():
    """`diversed --help` lists every command without importing torch and the rest (issue 40:
    start-up time), and `import diversed` loads its public names only when used."""
    out, loaded = _modules_after("from diversed.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert loaded == []
    assert all(name in out for name in COMMANDS)
    assert _modules_after("import diversed, diversed.errors")[1] == []
    assert "torch" in _modules_after("import diversed\ndiversed.SamplingParams")[1]


def test_command_summaries_match_their_modules():
    """`diversed --help` shows cli.COMMANDS' summaries; each must be the help its module gives."""
    parser = build_parser()
    [sub] = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    given = {action.dest: action.help for action in sub._choices_actions}
    assert given == {name: summary for name, (_, summary) in COMMANDS.items()}
    assert list(given) == list(COMMANDS)


def test_a_command_builds_only_its_own_parser(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--max-draft-length" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nonsense"])
    assert "invalid choice" in capsys.readouterr().err
