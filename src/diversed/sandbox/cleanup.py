"""What the launcher removes after a run: every process of it, and what its uid left on the host.

With namespaces the run's IPC namespace (SysV shared memory, semaphores, message queues, POSIX
message queues) dies with its last process, and its files live on a tmpfs of its own mount
namespace, so only the processes need killing. The unisolated fallback shares the host's IPC
and `/tmp`: there the run's own uid is what marks its leftovers, and they are removed by it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
from pathlib import Path

IPC_RMID = 0
# /proc/sysvipc file: (its id column, how to remove one by id)
_SYSV = {"shm": ("shmid", "shmctl"), "msg": ("msqid", "msgctl"), "sem": ("semid", "semctl")}
# Folders any uid may write into on a usual host: the fallback's leftovers would be here.
SHARED_FOLDERS = ("/dev/shm", "/dev/mqueue", "/tmp", "/var/tmp")


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a process group; False once it is empty."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_uid(uid: int | None) -> bool:
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


def remove_ipc_objects(uid: int) -> int:
    """Remove the host's SysV IPC objects that `uid` owns or created; how many there were."""
    libc = ctypes.CDLL(None, use_errno=True)
    removed = 0
    for kind, (id_column, control) in _SYSV.items():
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except OSError:
            continue
        header = lines[0].split() if lines else []
        if not {id_column, "uid", "cuid"} <= set(header):
            continue
        columns = [header.index(name) for name in (id_column, "uid", "cuid")]
        for line in lines[1:]:
            ident, owner, creator = (int(line.split()[c]) for c in columns)
            if uid in (owner, creator):
                args = (ident, 0, IPC_RMID) if kind == "sem" else (ident, IPC_RMID, None)
                getattr(libc, control)(*args)
                removed += 1
    return removed


def remove_files_of(uid: int, folders=SHARED_FOLDERS) -> int:
    """Remove what `uid` made at the top of the shared folders (POSIX shared memory and message
    queues included); how many entries there were. Symbolic links are removed, never followed."""
    removed = 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed += 1
            except OSError:
                continue
    return removed


def remove_leftovers(uid: int | None) -> None:
    """The fallback's run is over: nothing its uid made may reach the next run."""
    if uid is None:
        return
    remove_ipc_objects(uid)
    remove_files_of(uid)
