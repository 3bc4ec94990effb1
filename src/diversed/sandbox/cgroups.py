"""Memory, process-count and CPU cgroups per sandboxed run (where this host lets us make them).

RLIMIT_AS counts one process's address space: four forked children each get their own, and
shared memory (SysV segments, memfd_create, /dev/shm) counts in none. RLIMIT_NPROC counts a
user's processes, RLIMIT_CPU one process's time. A memory cgroup counts every page the run's
processes touch, shared memory included; a pids cgroup counts the run's processes and threads;
a CPU quota bounds the CPU time of all of them together to `cpus` seconds per second of wall
clock. The worker and the judge each join a group of their own before they run anything;
after the run the launcher kills whatever is left in them and removes them. Groups of a
launcher that died (SIGKILL) are swept by the next run.

cgroup v2 (one unified tree) is used where the host mounts it with the memory and pids
controllers (and cpu, where enabled); else cgroup v1 (`memory`, `pids` and `cpu` hierarchies).
All are made under this process's own group, so the host's accounting of the evaluator still
holds. Without a writable cgroup file system `make_run_cgroups` returns an empty list and only
the rlimits remain; a host without the cpu controller gets no CPU quota.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
BASE_NAME = "diversed-runs"
CPU_PERIOD_US = 100_000


def _own_paths() -> dict[str, str]:
    """This process's cgroup by controller ("" for the unified v2 tree)."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _bases(with_cpu: bool) -> list[tuple[Path, dict[str, str]]]:
    """(folder under which run groups are made, the limit files to write, in order) per hierarchy in use."""
    own = _own_paths()
    unified = ROOT / "cgroup.controllers"
    if unified.exists() and {"memory", "pids"} <= set(unified.read_text().split()):
        files = {"memory.max": "memory", "memory.swap.max": "0", "pids.max": "pids"}
        return [(ROOT / BASE_NAME, {**files, "cpu.max": "cpu.max"} if with_cpu else files)]
    memory, pids, cpu = ROOT / "memory", ROOT / "pids", ROOT / "cpu"
    if not (memory / "cgroup.procs").exists() or not (pids / "cgroup.procs").exists():
        return []
    bases = [
        (memory / own.get("memory", "/").lstrip("/") / BASE_NAME,
         {"memory.limit_in_bytes": "memory", "memory.memsw.limit_in_bytes": "memory"}),
        (pids / own.get("pids", "/").lstrip("/") / BASE_NAME, {"pids.max": "pids"}),
    ]
    if with_cpu and (cpu / "cpu.cfs_quota_us").exists():
        bases.append((cpu / own.get("cpu", "/").lstrip("/") / BASE_NAME, {"cpu.cfs_period_us": "period", "cpu.cfs_quota_us": "quota"}))
    return bases


def _prepare_v2_base(base: Path) -> None:
    """Let run groups under `base` have the memory, pids and (where the host has it) cpu controllers."""
    base.mkdir(exist_ok=True)
    for folder in (base.parent, base):
        try:
            (folder / "cgroup.subtree_control").write_text("+memory +pids +cpu")
        except OSError:  # no cpu controller here: the runs get no CPU quota
            (folder / "cgroup.subtree_control").write_text("+memory +pids")


def make_run_cgroups(memory_bytes: int, max_processes: int, cpus: float | None = None) -> list[Path]:
    """Fresh cgroups for one run (or the judge), with their limits set; [] where the host does
    not allow it. `cpus`: CPU seconds per second of wall clock for the whole group, or None."""
    made: list[Path] = []
    quota = None if cpus is None else max(1000, int(cpus * CPU_PERIOD_US))
    values = {"memory": str(memory_bytes), "pids": str(max_processes), "period": str(CPU_PERIOD_US),
              "quota": str(quota), "cpu.max": f"{quota} {CPU_PERIOD_US}"}
    try:
        for base, files in _bases(with_cpu=quota is not None):
            if "memory.max" in files:
                _prepare_v2_base(base)
            base.mkdir(exist_ok=True)
            sweep_stale(base)
            group = base / f"run-{os.getpid()}-{secrets.token_hex(4)}"
            group.mkdir()
            made.append(group)
            for name, value in files.items():
                if (group / name).exists():
                    (group / name).write_text(values.get(value, value))
    except OSError:
        remove_run_cgroups(made)
        return []
    return made


def _members(group: Path) -> list[int]:
    try:
        return [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill_members(groups: list[Path]) -> bool:
    """SIGKILL every process in the groups; False once they are all empty."""
    found = False
    for group in groups:
        for pid in _members(group):
            found = True
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    return found


def remove_run_cgroups(groups: list[Path], wait_seconds: float = 5.0) -> None:
    """Kill what is left in the groups, then remove them."""
    deadline = time.monotonic() + wait_seconds
    while kill_members(groups) and time.monotonic() < deadline:
        time.sleep(0.01)
    for group in groups:
        while True:
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # a killed process not yet gone
                if time.monotonic() > deadline:
                    break
                time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(base: Path) -> None:
    """Remove the groups of launchers that died without cleaning up (and kill what is in them)."""
    for group in base.glob("run-*-*"):
        try:
            owner = int(group.name.split("-")[1])
        except ValueError:
            continue
        if not _alive(owner):
            remove_run_cgroups([group], wait_seconds=1.0)
