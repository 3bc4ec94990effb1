"""Run model-written Python in locked-down processes, and judge it from a trusted one
(docs/evaluation.md, "The code sandbox").

`run_tests(code, plan, limits)` starts two processes joined by two pipes: the *worker*
(worker.py, confinement.py) runs the program behind every barrier this host allows and
answers calls to the program's names; the *judge* (judge.py) runs the dataset's checks, whose
calls to the candidate cross to the worker as plain data (codec.py), and is the only one that
decides `passed`. This module starts both with a minimal environment (no variable of the
parent), gives the worker and the judge cgroups of their own (cgroups.py), enforces the
wall-clock limit and, at the end, kills every process of the run and removes what it left
(cleanup.py).

Where the host allows namespaces (util-linux `unshare`, probed once) the worker runs in fresh
network, pid, mount, IPC and UTS namespaces, in a minimal root under a uid of its own (run by
root) or behind locked read-only mounts (run by another user): no state outlives the run. Without them `run_tests` refuses to run anything unless
the user accepted it (`--unsafe-sandbox`, `allow_unisolated()` or DIVERSED_UNSAFE_SANDBOX=1):
the fallback has a fresh uid per run (run by root), the cgroups, rlimits and seccomp.
`isolation()` says which level this host gets.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserInputError
from .cgroups import kill_members, make_run_cgroups, remove_run_cgroups
from .cleanup import kill_group, kill_uid, remove_leftovers

# util-linux `unshare`. --mount-proc gives the pid namespace its own /proc (so the program cannot
# read other processes' environments) and implies a mount namespace with private propagation
# (nothing the runner mounts reaches the host). The IPC namespace takes SysV objects and POSIX
# message queues down with the run's last process, so no run reads what an earlier one stored.
# Root needs no user namespace (and must not use one: a namespace root mapped to the host's root
# is exempt from the process limit); the runner then switches to the run's own uid itself.
_NAMESPACE_FLAGS = ["--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
_USER_NAMESPACE_FLAGS = ["--user", "--map-root-user"]
MINIMAL_ROOT_WORKDIR = "/diversed-work"  # inside the minimal root; a name no bound tree uses
_OUTPUT_TAIL = 4000  # characters of stdout/stderr kept in a result


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    seconds: float = 10.0  # wall clock; the per-process CPU limit is derived from it
    memory_bytes: int = 2 << 30  # the whole run (its cgroup, shared memory included), each process's address space, and the judge's cgroup
    max_processes: int = 64  # processes + threads of the run (its cgroup: fork-bomb guard)
    cpus: float = 1.0  # CPU time per second of wall clock, for all the run's processes together (its cgroup)
    max_reply_bytes: int = 64 << 20  # the largest message the judge accepts from the candidate
    max_file_bytes: int = 16 << 20  # largest file the program may write
    disk_bytes: int = 64 << 20  # size of the private tmpfs working directory (namespaces only)
    open_files: int = 256


@dataclass(frozen=True)
class SandboxResult:
    passed: bool  # the judge's verdict: every check ran to the end in its own process, in time
    reason: str  # "ok", "timeout after 10s", "AssertionError", "the candidate failed: ...", ...
    seconds: float
    stdout: str  # the last few thousand characters
    stderr: str
    isolation: dict[str, bool]  # what the run achieved: namespaces, minimal_root, readonly_fs, separate_user, cgroup, seccomp, judge_cgroup


def _source(*modules: str) -> str:
    """Modules of this package as one script for `python -c` (nothing outside the stdlib is imported)."""
    return "\n".join(Path(__file__).with_name(f"{m}.py").read_text(encoding="utf-8") for m in modules)


JUDGE_PROCESSES = 8  # the judge runs the checks in one thread; a few more for what an import may start

# The worker's and the judge's code, passed with -c: no file of the project needs to be in reach.
WORKER_SOURCE = _source("codec", "confinement", "worker")
JUDGE_SOURCE = _source("codec", "judge")


@functools.cache
def _namespace_prefix() -> tuple[str, ...] | None:
    """`unshare ...` if this host lets us create the namespaces, else None (probed once)."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    flags = _NAMESPACE_FLAGS if os.geteuid() == 0 else _USER_NAMESPACE_FLAGS + _NAMESPACE_FLAGS
    try:
        probe = subprocess.run([unshare, *flags, "--", "true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (unshare, *flags, "--") if probe.returncode == 0 else None


def _minimal_env(workdir: str) -> dict[str, str]:
    """No variable of the parent survives: API keys and tokens stay out of the child."""
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": workdir,
        "TMPDIR": workdir,
        # numpy & co. would start one thread per core, each counted against max_processes.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


# --------------------------------------------------------------------------- the unisolated fallback

UNSAFE_ENV = "DIVERSED_UNSAFE_SANDBOX"  # "1": run model code even where namespaces are unavailable
_allow_unisolated = False


class SandboxUnavailable(UserInputError):
    """This host cannot isolate a program, and the user has not accepted running it anyway."""


def allow_unisolated(allowed: bool = True) -> None:
    """Accept (or stop accepting) runs without namespaces: the CLI's --unsafe-sandbox."""
    global _allow_unisolated
    _allow_unisolated = allowed


def unisolated_allowed() -> bool:
    return _allow_unisolated or os.environ.get(UNSAFE_ENV) == "1"


def is_isolated() -> bool:
    """Whether programs get the namespaces (the full sandbox) on this host."""
    return _namespace_prefix() is not None


def require_isolation(allow_unsafe: bool = False) -> None:
    """For commands about to run model-written code: refuse a host without namespaces unless the
    user said --unsafe-sandbox (or DIVERSED_UNSAFE_SANDBOX=1)."""
    if allow_unsafe:
        allow_unisolated(True)
    if not is_isolated() and not unisolated_allowed():
        raise SandboxUnavailable(
            "this host cannot isolate model-written code (no usable `unshare` namespaces); pass --unsafe-sandbox "
            f"(or set {UNSAFE_ENV}=1) to run it with only a dropped uid, rlimits and seccomp"
        )


def _run_uid() -> int | None:
    """A fresh uid for a run by root (None when we cannot switch users): nothing a user owns
    (a kernel keyring, a count of processes, a file in /tmp) is shared with another run."""
    if os.geteuid() != 0:
        return None
    return secrets.randbelow(1 << 29) + (1 << 30)  # far above any real account


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class TestPlan:
    """What the trusted judge runs against a program (docs/evaluation.md, "The code sandbox").

    checks: test code run one by one in the judge's process, each counted;
    remote: the names that live in the candidate's process (its functions; MBPP's setup objects):
        in the checks they are proxies, and a call crosses the process boundary as plain data;
    helpers: trusted definitions run in the judge first (the HumanEval prompt's helpers, the
        imports of MBPP's reference solution);
    candidate_setup: code run in the candidate's namespace after the program (MBPP's setup code,
        which builds objects of classes the program defines).
    """

    __test__ = False  # not a pytest class, despite its name

    checks: tuple[str, ...] = ()
    remote: tuple[str, ...] = ()
    helpers: str = ""
    candidate_setup: str = ""

    @classmethod
    def from_tests(cls, tests: Sequence[str], helpers: str = "") -> "TestPlan":
        """Each free name of the tests that is not a builtin (nor bound by the helpers or the
        tests themselves) belongs to the candidate."""
        return cls(tuple(tests), tuple(sorted(free_names([helpers, *tests]))), helpers)


def free_names(sources: Sequence[str]) -> set[str]:
    """Names the sources read but neither bind nor get from builtins."""
    loaded, bound = set(), set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name):
                (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
    return {name for name in loaded - bound if not hasattr(builtins, name)}


def run_python(code: str, limits: Limits = Limits(), tests: Sequence[str] = (), *, allow_unisolated: bool | None = None) -> SandboxResult:
    """Run `code` in the sandbox, then `tests` in the trusted judge (TestPlan.from_tests)."""
    return run_tests(code, TestPlan.from_tests(tests), limits, allow_unisolated=allow_unisolated)


def run_tests(code: str, plan: TestPlan, limits: Limits = Limits(), *, allow_unisolated: bool | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox, and `plan`'s checks against it in the judge.

    passed is the judge's verdict: every check ran to the end in the judge's own process, on
    plain data the candidate's process sent back. Nothing the program prints, raises, returns
    or does to its own process can make a run pass otherwise. Never raises for anything the
    program does; raises SandboxUnavailable on a host without namespaces unless unisolated runs
    were allowed.
    """
    allowed = unisolated_allowed() if allow_unisolated is None else allow_unisolated
    if not is_isolated() and not allowed:
        require_isolation()
    try:
        return _run(code, plan, limits)
    except Exception as exc:  # our own failure: a scored failure with a reason, never a crash
        return SandboxResult(False, f"sandbox error: {type(exc).__name__}: {exc}", 0.0, "", "", {})


def _run(code: str, plan: TestPlan, limits: Limits) -> SandboxResult:
    prefix = _namespace_prefix()
    run_uid = _run_uid()
    # With namespaces as root the working folder exists only inside the run's own mount namespace,
    # so nothing is left on the host even if we are killed; otherwise it is a host folder.
    minimal_root = prefix is not None and "--user" not in prefix
    host_dir = None if minimal_root else Path(tempfile.mkdtemp(prefix="diversed-sandbox-"))
    groups = make_run_cgroups(limits.memory_bytes, limits.max_processes, limits.cpus)
    judge_groups = make_run_cgroups(limits.memory_bytes, JUDGE_PROCESSES)
    try:
        if host_dir is not None:
            host_dir.chmod(0o711)
            if run_uid is not None:
                os.chown(host_dir, run_uid, run_uid)
        workdir = MINIMAL_ROOT_WORKDIR if host_dir is None else str(host_dir)
        config = _worker_config(code, limits, prefix, run_uid, workdir, groups)
        return _launch(config, plan, limits, prefix, run_uid, groups, judge_groups)
    finally:
        remove_run_cgroups(groups + judge_groups)
        if prefix is None:  # namespaces take the run's IPC objects and files down with it
            remove_leftovers(run_uid)
        if host_dir is not None:
            shutil.rmtree(host_dir, ignore_errors=True)


def _worker_config(code: str, limits: Limits, prefix, run_uid, workdir: str, groups: list[Path]) -> dict[str, Any]:
    return {
        "program": code,
        "workdir": workdir,
        "namespaces": prefix is not None,
        "user_namespace": prefix is not None and "--user" in prefix,
        "run_uid": run_uid,
        "cgroups": [str(g) for g in groups],
        "site_packages": [p for p in sys.path if p.endswith("site-packages")],
        "memory_bytes": limits.memory_bytes,
        "max_file_bytes": limits.max_file_bytes,
        "disk_bytes": limits.disk_bytes,
        "open_files": limits.open_files,
        "max_processes": limits.max_processes,
        "cpu_seconds": max(1, int(limits.seconds + 0.999)),
        "max_reply_bytes": limits.max_reply_bytes,
    }


def _dies_with_us() -> tuple[str, ...]:
    """A prefix that kills the child when this process dies, even by SIGKILL (util-linux setpriv)."""
    setpriv = shutil.which("setpriv")
    return (setpriv, "--pdeathsig", "KILL", "--") if setpriv else ()


def _launch(config: dict[str, Any], plan: TestPlan, limits: Limits, prefix, run_uid, groups, judge_groups) -> SandboxResult:
    """Start the worker and the judge, joined by two pipes; the judge's verdict is the result."""
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    pipes = [request_read, request_write, reply_read, reply_write]
    env = _minimal_env(config["workdir"])
    # Output goes to anonymous files, not pipes: a program printing without end cannot fill our
    # memory (RLIMIT_FSIZE caps them), and nothing stays on disk if we are killed.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        worker = subprocess.Popen(
            [*_dies_with_us(), *(prefix or ()), sys.executable, "-I", "-B", "-c", WORKER_SOURCE],
            stdin=subprocess.PIPE, stdout=out, stderr=err, cwd="/", env=env,
            start_new_session=True, pass_fds=(request_read, reply_write),
        )
        judge = None
        try:
            _send_config(worker, {**config, "request_fd": request_read, "reply_fd": reply_write})
            judge = subprocess.Popen(
                [*_dies_with_us(), sys.executable, "-I", "-B", "-c", JUDGE_SOURCE],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/", env=env,
                start_new_session=True, pass_fds=(request_write, reply_read),
            )
            for fd in pipes:
                os.close(fd)
            pipes = []
            judge_plan = {**asdict(plan), "request_fd": request_write, "reply_fd": reply_read,
                          "cgroups": [str(g) for g in judge_groups], "max_reply_bytes": limits.max_reply_bytes}
            verdict, timed_out = _await_verdict(judge, judge_plan, limits.seconds)
        finally:
            for fd in pipes:
                os.close(fd)
            _end_run(worker, judge, run_uid, groups + judge_groups)
        seconds = time.perf_counter() - started
        stdout, stderr = _tail(out), _tail(err)
    return _result(verdict, timed_out, limits.seconds, seconds, stdout, stderr)


def _await_verdict(judge: subprocess.Popen, plan: dict[str, Any], seconds: float) -> tuple[dict[str, Any], bool]:
    """The judge's one-line verdict, or ({}, True) after `seconds`."""
    try:
        output, _ = judge.communicate(json.dumps(plan).encode() + b"\n", timeout=seconds)
    except subprocess.TimeoutExpired:
        return {}, True
    try:
        verdict = json.loads(output.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"passed": False, "reason": f"the judge ended without a verdict (exit status {judge.returncode})"}, False
    return (verdict if isinstance(verdict, dict) else {}), False


def _end_run(worker: subprocess.Popen, judge: subprocess.Popen | None, run_uid: int | None, groups) -> None:
    """Kill every process of the run, whatever state it is in, and wait until they are gone."""
    for proc in (judge, worker):
        if proc is not None:
            kill_group(proc.pid)
            proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (kill_group(worker.pid) | kill_uid(run_uid) | kill_members(groups)):
        time.sleep(0.01)


def _result(verdict: dict[str, Any], timed_out: bool, limit: float, seconds: float, stdout: str, stderr: str) -> SandboxResult:
    isolation = verdict.get("isolation") if isinstance(verdict.get("isolation"), dict) else {}
    if timed_out:
        return SandboxResult(False, f"timeout after {limit:g}s", seconds, stdout, stderr, isolation)
    passed = verdict.get("passed") is True
    reason = str(verdict.get("reason", "no verdict"))[:600]
    return SandboxResult(passed, "ok" if passed else reason, seconds, stdout, stderr, isolation)


def _send_config(proc: subprocess.Popen, config: dict[str, Any]) -> None:
    """The configuration goes through stdin, which the worker then closes: no argv or env shows it."""
    try:
        proc.stdin.write(json.dumps(config).encode() + b"\n")  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    except OSError:
        pass  # the worker died before reading it: the judge gets no reply, so the run fails


def _tail(file) -> str:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - 4 * _OUTPUT_TAIL))
    return file.read().decode("utf-8", errors="replace")[-_OUTPUT_TAIL:]


@functools.cache
def isolation() -> dict[str, bool]:
    """What this host gives a sandboxed program: {"namespaces", "minimal_root", "readonly_fs", "separate_user", "cgroup", "seccomp"}."""
    return dict(run_python("pass", Limits(seconds=20), allow_unisolated=True).isolation)


__all__ = [
    "Limits", "SandboxResult", "SandboxUnavailable", "TestPlan", "run_python", "run_tests", "isolation", "is_isolated", "require_isolation",
    "allow_unisolated", "unisolated_allowed", "UNSAFE_ENV",
]

