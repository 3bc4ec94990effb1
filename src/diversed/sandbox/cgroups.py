"""A memory and a process-count cgroup per sandboxed run (where this host lets us make them).

RLIMIT_AS counts one process's address space: four forked children each get their own, and
shared memory (memfd_create, /dev/shm) counts in none. A memory cgroup counts every page the
run's processes touch, shared memory included, and a pids cgroup counts the run's processes
and threads. The worker joins the run's cgroups itself before it runs anything; after the run
the launcher kills whatever is left in them and removes them. Groups of a launcher that died
(SIGKILL) are swept by the next run.

cgroup v2 (one unified tree) is used where the host mounts it with the memory and pids
controllers; else cgroup v1 (a `memory` and a `pids` hierarchy). Both are made under this
process's own group, so the host's accounting of the evaluator still holds. Without a writable
cgroup file system `make_run_cgroups` returns an empty list and only the rlimits remain.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
BASE_NAME = "diversed-runs"


def _own_paths() -> dict[str, str]:
    """This process's cgroup by controller ("" for the unified v2 tree)."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _bases() -> list[tuple[Path, dict[str, str]]]:
    """(folder under which run groups are made, the limit files to write) per hierarchy in use."""
    own = _own_paths()
    unified = ROOT / "cgroup.controllers"
    if unified.exists() and {"memory", "pids"} <= set(unified.read_text().split()):
        return [(ROOT / BASE_NAME, {"memory.max": "memory", "memory.swap.max": "0", "pids.max": "pids"})]
    memory, pids = ROOT / "memory", ROOT / "pids"
    if not (memory / "cgroup.procs").exists() or not (pids / "cgroup.procs").exists():
        return []
    return [
        (memory / own.get("memory", "/").lstrip("/") / BASE_NAME,
         {"memory.limit_in_bytes": "memory", "memory.memsw.limit_in_bytes": "memory"}),
        (pids / own.get("pids", "/").lstrip("/") / BASE_NAME, {"pids.max": "pids"}),
    ]


def _prepare_v2_base(base: Path) -> None:
    base.mkdir(exist_ok=True)
    for folder in (base.parent, base):
        (folder / "cgroup.subtree_control").write_text("+memory +pids")


def make_run_cgroups(memory_bytes: int, max_processes: int) -> list[Path]:
    """Fresh cgroups for one run, with their limits set; [] where the host does not allow it."""
    made: list[Path] = []
    try:
        for base, files in _bases():
            if "memory.max" in files:
                _prepare_v2_base(base)
            base.mkdir(exist_ok=True)
            sweep_stale(base)
            group = base / f"run-{os.getpid()}-{secrets.token_hex(4)}"
            group.mkdir()
            made.append(group)
            values = {"memory": str(memory_bytes), "pids": str(max_processes)}
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
