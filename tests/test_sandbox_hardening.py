"""Issue 17: a wrong program never scores as passing, model output never crashes scoring, and
the sandbox holds in both modes (namespaces, and the unisolated fallback with --unsafe-sandbox).

Every program here is a real one run by the real sandbox.
"""

from __future__ import annotations

import http.server
import os
import threading
import time
from pathlib import Path

import pytest

from diversed import sandbox
from diversed.sandbox import Limits, SandboxUnavailable, run_python
from diversed.tasks import Example, get_task

from .test_sandbox import os_level_isolation, sandbox_processes

FAST = Limits(seconds=3.0)
# An MBPP row: the reference solution passes it, every cheat below must not.
MBPP_ROW = Example("mbpp-x", {"text": "add", "code": "def add(a, b):\n    return a + b\n", "task_id": 1,
                              "test_setup_code": "", "test_list": ["assert add(2, 3) == 5", "assert add(1, 1) == 2"]})

CHEATS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "raise SystemExit": "raise SystemExit\n",
    "sys.exit(main())": "def main():\n    return 0\n\nif __name__ == '__main__':\n    import sys\n    sys.exit(main())\n",
    "unittest.main()": "import unittest\n\ndef add(a, b):\n    return 0\n\nunittest.main()\n",
    "atexit os._exit": "import atexit, os\natexit.register(os._exit, 0)\n\ndef add(a, b):\n    return 0\n",
    "excepthook os._exit": "import sys, os\nsys.excepthook = lambda *exc: os._exit(0)\n\ndef add(a, b):\n    return 0\n",
    "__eq__ always True": "class Any:\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return Any()\n",
    "int subclass __eq__": "class Any(int):\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return Any(0)\n",
    "exit in a test": "def add(a, b):\n    raise SystemExit(0)\n",
    "fake marker": "import sys\nsys.stderr.write('x' * 5000 + '\\n__diversed_sandbox__ {')\nsys.stderr.flush()\nimport os\nos._exit(0)\n",
    "well-formed fake marker": "import sys, os\nsys.stderr.write('\\n__diversed_sandbox__ {\"namespaces\": true}\\n')\nos._exit(0)\n",
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_cheating_programs_do_not_pass_mbpp(cheat):
    task = get_task("mbpp")
    assert task.score(MBPP_ROW, MBPP_ROW.fields["code"]) == 1.0
    assert task.score(MBPP_ROW, f"```python\n{CHEATS[cheat]}```") == 0.0, cheat


def test_humaneval_early_exit_does_not_pass():
    task = get_task("humaneval")
    example = task.load("test", n=1)[0]
    assert task.score(example, task.reference(example)) == 1.0
    assert task.score(example, "```python\nimport sys\nsys.exit(0)\n```") == 0.0


def test_only_the_harness_can_report_a_pass():
    # The program writes whatever it likes into every descriptor it has: still a failure.
    code = (
        "import os, posix\n"
        "for fd in range(3, 64):\n"
        "    try:\n"
        "        posix.write(fd, b'0' * 32 + b' {\"kind\": \"finished\", \"tests_run\": 1}\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "os._exit(0)\n"
    )
    result = run_python(code, FAST, ["assert True"])
    assert not result.passed


def test_printed_markers_neither_crash_nor_spoof_the_isolation_report():
    fake = "import sys\nsys.stderr.write('x' * 5000 + '\\n__diversed_sandbox__ {\"namespaces\": \"spoofed\"}\\n')\n"
    result = run_python(fake, FAST)
    assert result.passed  # printing is allowed; it just changes nothing
    assert result.isolation.get("namespaces") in (True, False)
    broken = "import sys\nsys.stderr.write('x' * 5000 + '\\n__diversed_sandbox__ {')\n"
    assert run_python(broken, FAST).passed


def test_all_tests_must_run_and_pass():
    assert run_python("def f():\n    return 1\n", FAST, ["assert f() == 1", "assert f() == 1.0"]).passed
    result = run_python("def f():\n    return 1\n", FAST, ["assert f() == 1", "assert f() == 2"])
    assert not result.passed and "AssertionError" in result.reason


def test_plain_results_of_other_standard_types_still_compare():
    code = "from collections import Counter\n\ndef f():\n    return Counter('aab')\n\ndef g():\n    return (1, [2.0, 'x'], {3})\n"
    assert run_python(code, FAST, ["assert f() == {'a': 2, 'b': 1}", "assert g() == (1, [2, 'x'], {3})", "assert not g() != g()"]).passed


def test_internal_failure_is_a_scored_failure_not_an_exception():
    # A lone surrogate cannot be written as UTF-8: the old sandbox raised out of task.score.
    assert get_task("mbpp").score(MBPP_ROW, "def add(a, b):\n    return a + b  # \ud800\n") == 0.0


# ----------------------------------------------------------------------------- both modes


@pytest.fixture(params=["namespaces", "fallback"])
def mode(request, monkeypatch):
    """Run the test with the namespaces, and again in the unisolated fallback (--unsafe-sandbox)."""
    if request.param == "namespaces":
        if not os_level_isolation():
            pytest.skip("this host forbids the namespaces")
    else:
        if os.geteuid() != 0:
            pytest.skip("the fallback drops privileges only when run by root")
        monkeypatch.setattr(sandbox, "_namespace_prefix", lambda: None)
        monkeypatch.setattr(sandbox, "_allow_unisolated", True)
    return request.param


def test_fallback_refuses_without_unsafe_sandbox(monkeypatch):
    monkeypatch.setattr(sandbox, "_namespace_prefix", lambda: None)
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="--unsafe-sandbox"):
        run_python("pass", FAST)
    with pytest.raises(SandboxUnavailable):
        get_task("mbpp").score(MBPP_ROW, MBPP_ROW.fields["code"])
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    result = run_python("pass", FAST)
    assert result.passed and result.isolation["namespaces"] is False


def test_escape_delete_outside_tmp(mode, tmp_path):
    victim = tmp_path / "keep-me.txt"
    victim.write_text("precious")
    for code in (f"import posix\nposix.unlink({str(victim)!r})\n", f"open({str(victim)!r}, 'w').write('gone')\n"):
        assert not run_python(code, FAST).passed
    assert victim.read_text() == "precious"


def test_escape_read_parent_environ(mode):
    # /proc/PID/environ shows the environment a process started with: this test process's PATH.
    assert b"PATH=" in Path(f"/proc/{os.getpid()}/environ").read_bytes()
    code = "import posix\nprint(open(f'/proc/{posix.getppid()}/environ', 'rb').read())\n"
    result = run_python(code, FAST)
    assert "PATH=" not in result.stdout


@pytest.mark.skipif(not Path("/etc/shadow").exists(), reason="no /etc/shadow here")
def test_escape_read_etc_shadow(mode):
    result = run_python("print(open('/etc/shadow').read())\n", FAST)
    assert not result.passed and "root:" not in result.stdout


@pytest.fixture
def http_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_escape_reach_local_http_server(mode, http_port):
    import httpx

    assert httpx.get(f"http://127.0.0.1:{http_port}/", timeout=5).status_code == 200  # really open
    code = f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {http_port}))\ns.send(b'GET / HTTP/1.0\\r\\n\\r\\n')\nprint(s.recv(100))\n"
    result = run_python(code, FAST)
    assert not result.passed and "HTTP" not in result.stdout


def test_escape_fork_past_the_limit(mode):
    code = (
        "import posix, time\n"
        "children = 0\n"
        "for _ in range(200):\n"
        "    try:\n"
        "        if posix.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            posix._exit(0)\n"
        "        children += 1\n"
        "    except OSError:\n"
        "        break\n"
        "print(children)\n"
    )
    result = run_python(code, Limits(seconds=5.0, max_processes=64))
    assert result.passed, result.reason
    assert int(result.stdout.strip()) < 64
    assert not sandbox_processes()


def test_escape_leftover_setsid_daemon(mode):
    code = (
        "import posix, time\n"
        "if posix.fork() == 0:\n"
        "    try:\n"
        "        posix.setsid()\n"
        "    except OSError:\n"
        "        pass\n"
        "    time.sleep(60)\n"
        "    posix._exit(0)\n"
    )
    run_python(code, FAST)
    deadline = time.monotonic() + 2
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_processes(), "a daemon of the program survived the run"


def test_real_time_signal_in_both_modes(mode):
    result = run_python("import posix, time\nposix.kill(posix.getpid(), 40)\ntime.sleep(1)\n", FAST)
    assert isinstance(result.reason, str)  # no ValueError out of the sandbox
