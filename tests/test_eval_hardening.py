"""Issue 17: bad run files give one-line errors, runs in one folder cannot interleave, and code
tasks refuse an unisolated sandbox unless --unsafe-sandbox is given."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diversed import cli, sandbox
from diversed.evaluate import ROWS_FILE, SETTINGS_FILE

from .conftest import SHARED_DATA
from .test_evaluate import FIXTURES, eval_args, needs_shared_data

FIXTURE = dict(task="cnn_dailymail", data_dir=FIXTURES, methods=["ar"], n=1)


@pytest.fixture
def finished_run(tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    assert cli.main(eval_args(tiny_model_dirs, out, **FIXTURE)) == 0
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [(b'{"example_id": "\xff\xfe"}\n', "not UTF-8"), (b"{}\n", "not an eval row"), (b"[1, 2]\n", "not an eval row")],
)
def test_bad_rows_give_one_line_errors(finished_run, tiny_model_dirs, capsys, bad_line, expected):
    with open(finished_run / ROWS_FILE, "ab") as f:
        f.write(bad_line)
    capsys.readouterr()
    assert cli.main(eval_args(tiny_model_dirs, finished_run, **FIXTURE)) == 2
    assert expected in one_line_error(capsys)


def test_cut_off_settings_give_a_one_line_error(finished_run, tiny_model_dirs, capsys):
    path = finished_run / SETTINGS_FILE
    path.write_text(path.read_text()[:40])
    capsys.readouterr()
    assert cli.main(eval_args(tiny_model_dirs, finished_run, **FIXTURE)) == 2
    assert "settings.json" in one_line_error(capsys)


def test_settings_are_written_whole(finished_run):
    assert json.loads((finished_run / SETTINGS_FILE).read_text())["task"] == "cnn_dailymail"
    assert not [p.name for p in finished_run.iterdir() if p.name.endswith(".tmp")]


def test_a_second_run_in_the_same_folder_is_refused(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # Another process holds the folder's lock, as a running `diversed eval` does.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, time\nf = open({str(out / '.lock')!r}, 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        assert cli.main(eval_args(tiny_model_dirs, out, **FIXTURE)) == 2
        assert "another diversed eval is writing" in one_line_error(capsys)
        assert not (out / ROWS_FILE).exists() or not (out / ROWS_FILE).read_text()
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(eval_args(tiny_model_dirs, out, **FIXTURE)) == 0  # free again


@needs_shared_data
def test_code_eval_refuses_an_unisolated_sandbox_without_the_flag(tiny_model_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sandbox, "_namespace_prefix", lambda: None)
    monkeypatch.setattr(sandbox, "_allow_unisolated", False)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    args = eval_args(tiny_model_dirs, tmp_path / "mbpp", task="mbpp", data_dir=SHARED_DATA, methods=["ar"], n=1)
    assert cli.main(args) == 2
    assert "--unsafe-sandbox" in one_line_error(capsys)
    assert not (tmp_path / "mbpp" / ROWS_FILE).exists()
    assert cli.main([*args, "--unsafe-sandbox"]) == 0
    summary = json.loads((tmp_path / "mbpp" / "summary.json").read_text())
    assert summary["sandbox"] == {"isolated": False, "unsafe_sandbox_allowed": True}
