"""The trusted side of a sandboxed run: the dataset's tests, and the verdict (see diversed.sandbox).

Never imported by the evaluator: the launcher passes the codec's and this file's source to a
fresh interpreter with -c. It reads its plan from stdin: the trusted helper definitions (the
HumanEval prompt's `poly`, `encode_cyclic`, ...; the imports of MBPP's reference solution), the
names that live in the candidate's process, optional setup code for that process, and the
checks. Each candidate name is bound here to a `Remote`: calling it sends the arguments to the
worker as plain data and decodes the result the same way; passing it as an argument sends a
reference (MBPP's `root` trees built by the setup code). The checks then run here, in this
process, on values this process built. The verdict goes to the launcher on stdout, which the
worker never holds.

The worker sees which calls it gets, so the calls must not depend on whether an earlier check
passed: a failed `assert` is recorded and the checks go on (each assert statement of the test
code becomes a call that records its outcome), and a check that raises does not stop the next
check. Only an error inside a check (a comparison that raises, the candidate's own exception)
still ends the rest of that check.

The judge runs in a cgroup of its own (its memory bound is the run's), and refuses a reply
larger than the run's bound before decoding it.
"""

import ast
import json
import os
import sys
import traceback

if __package__:  # imported by a test; the launcher concatenates the sources instead
    from .codec import CodecError, Ref, from_plain, read_frame, to_plain, write_frame  # noqa: F401


JUDGE_TAG = "__diversed_sandbox_judge__"  # in the judge's command line (tests look for it)
JUDGE_MEMORY_BYTES = 4 << 30  # address space: a second wall behind the judge's cgroup
EXPECT = "__diversed_expect__"  # what an assert of the checks becomes


class CandidateError(Exception):
    """The candidate raised, exited, or answered with something that is not plain data."""


class Channel:
    """Request and reply pipes to the worker: one request, one reply, in order."""

    def __init__(self, requests, replies):
        self.requests, self.replies = requests, replies
        self.remotes = {}  # one proxy per name: what the candidate returns twice is the same object here
        self.closed = False

    def remote(self, name):
        if name not in self.remotes:
            self.remotes[name] = Remote(name, self)
        return self.remotes[name]

    def receive(self):
        if self.closed:
            raise CandidateError("the candidate's process ended")
        try:
            message = read_frame(self.replies)
        except EOFError:
            self.closed = True
            raise CandidateError("the candidate's process ended") from None
        except CodecError as exc:
            self.closed = True  # the stream may be out of step: nothing more is read from it
            raise CandidateError(f"the candidate sent a malformed reply: {exc}") from None
        return message

    def ask(self, request):
        if self.closed:
            raise CandidateError("the candidate's process ended")
        try:
            write_frame(self.requests, request)
        except OSError:
            self.closed = True
            raise CandidateError("the candidate's process ended") from None
        reply = self.receive()
        if "raised" in reply:
            raise CandidateError(str(reply["raised"])[:500])
        if "ok" not in reply:
            raise CandidateError("the candidate sent a malformed reply")
        return reply


class Remote(Ref):
    """A name of the candidate's namespace: a call crosses the process boundary."""

    __slots__ = ("channel",)

    def __init__(self, name, channel):
        super().__init__(name)
        self.channel = channel

    def __call__(self, *args, **kwargs):
        try:
            request = {"op": "call", "name": self.name, "args": [to_plain(a) for a in args],
                       "kwargs": {str(k): to_plain(v) for k, v in kwargs.items()}}
        except CodecError as exc:
            raise CandidateError(f"an argument cannot cross to the candidate: {exc}") from None
        reply = self.channel.ask(request)
        try:
            result = from_plain(reply["ok"], self.channel.remote)
            mutated = {int(i): from_plain(v, self.channel.remote) for i, v in dict(reply.get("mutated") or {}).items()}
        except (CodecError, ValueError, TypeError, AttributeError) as exc:
            raise CandidateError(f"the candidate's result is not plain data: {exc}") from None
        for index, value in mutated.items():
            if 0 <= index < len(args):
                copy_back(args[index], value)
        return result


def copy_back(original, value):
    """Apply the candidate's change of an argument to the judge's own objects, in place and as
    deep as the shapes agree, so a test holding an inner list (a row of a grid) sees it too."""
    stack = [(original, value)]
    while stack:
        original, value = stack.pop()
        kind = type(original)
        if kind is not type(value) or kind not in (list, dict, set, tuple, bytearray):
            continue
        if kind is tuple:  # itself immutable: only what it holds can have changed
            if len(original) == len(value):
                stack += zip(original, value)
        elif kind is set:
            original.clear()
            original.update(value)
        elif kind is bytearray:
            original[:] = value
        elif kind is list:
            if len(original) != len(value):
                original[:] = value
                continue
            for i, (old, new) in enumerate(zip(original, value)):
                if _changes_in_place(old, new):
                    stack.append((old, new))
                else:
                    original[i] = new
        else:
            for key in [k for k in original if k not in value]:
                del original[key]
            for key, new in value.items():
                if key in original and _changes_in_place(original[key], new):
                    stack.append((original[key], new))
                else:
                    original[key] = new


def _changes_in_place(old, new):
    return type(old) is type(new) and type(old) in (list, dict, set, tuple, bytearray)


class RecordAsserts(ast.NodeTransformer):
    """`assert test, msg` becomes `__diversed_expect__(test, msg)`: the checks go on after a failure.
    A message that is not a constant is dropped: evaluating it only on failure would call the
    candidate only on failure."""

    def visit_Assert(self, node):
        msg = node.msg if isinstance(node.msg, ast.Constant) else ast.Constant(None)
        call = ast.Call(ast.Name(EXPECT, ast.Load()), [node.test, msg], [])
        return ast.copy_location(ast.Expr(call), node)


def compile_check(source, filename):
    tree = ast.fix_missing_locations(RecordAsserts().visit(ast.parse(source, filename)))
    return compile(tree, filename, "exec")


def run_checks(plan, channel):
    """(checks that ran to the end without a failed assert, the first error or None). Only this
    function decides a pass."""
    failures = []

    def expect(test, msg=None):
        if not test:
            failures.append(AssertionError(msg) if msg is not None else AssertionError())

    namespace = {"__name__": "__judge__", EXPECT: expect}
    try:
        exec(compile(plan["helpers"], "helpers.py", "exec"), namespace)
        for name in plan["remote"]:
            namespace[name] = channel.remote(name)
        if plan["candidate_setup"].strip():
            channel.ask({"op": "exec", "source": plan["candidate_setup"]})
    except BaseException as exc:
        return 0, exc
    done, first_error = 0, None
    for i, check in enumerate(plan["checks"]):
        before = len(failures)
        try:
            exec(compile_check(check, f"check{i}.py"), namespace)
        except BaseException as exc:  # the candidate's error, a comparison that raised
            first_error = first_error or exc
            if channel.closed:
                break  # nothing more can be asked of the candidate
            continue
        if len(failures) == before:
            done += 1
        else:
            first_error = first_error or failures[before]
    return done, first_error


def describe(exc):
    if isinstance(exc, CandidateError):
        return f"the candidate failed: {exc}"
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:500]


def verdict(plan, channel):
    """The run's result: passed only when every check ran to the end here."""
    try:
        started = channel.receive()
        loaded = channel.receive() if not started.get("error") else {}
    except CandidateError as exc:
        return {"passed": False, "reason": str(exc), "checks_run": 0}
    isolation = started.get("isolation") if started.get("kind") == "started" else None
    if started.get("error"):
        return {"passed": False, "reason": str(started["error"])[:500], "checks_run": 0, "isolation": isolation}
    if loaded.get("kind") != "loaded":
        return {"passed": False, "reason": "the candidate sent a malformed reply", "checks_run": 0, "isolation": isolation}
    if loaded.get("error") is not None:
        reason = f"the program failed before the tests: {str(loaded['error'])[:500]}"
        return {"passed": False, "reason": reason, "checks_run": 0, "isolation": isolation}
    done, error = run_checks(plan, channel)
    passed = error is None and done == len(plan["checks"])
    return {"passed": passed, "reason": "ok" if passed else describe(error), "checks_run": done, "isolation": isolation}


def join_own_cgroups(paths):
    """The judge's own cgroups (memory and process count), joined before it reads any reply."""
    try:
        for path in paths:
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write("0")
    except OSError:
        return False
    return bool(paths)


def main():
    global max_frame_bytes
    plan = json.loads(sys.stdin.readline())
    in_cgroup = join_own_cgroups(plan["cgroups"])
    # The checks are trusted, the values they get are not: a result can be large, not unbounded.
    max_frame_bytes = plan["max_reply_bytes"]
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (JUDGE_MEMORY_BYTES, JUDGE_MEMORY_BYTES))
    out = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the checks print does not mix with the verdict
    result = verdict(plan, Channel(plan["request_fd"], plan["reply_fd"]))
    if isinstance(result.get("isolation"), dict):
        result["isolation"]["judge_cgroup"] = in_cgroup
    os.write(out, (json.dumps(result, default=str) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
