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
"""

import json
import os
import sys
import traceback

if __package__:  # imported by a test; the launcher concatenates the sources instead
    from .codec import CodecError, Ref, from_plain, read_frame, to_plain, write_frame  # noqa: F401


JUDGE_TAG = "__diversed_sandbox_judge__"  # in the judge's command line (tests look for it)
JUDGE_MEMORY_BYTES = 4 << 30


class CandidateError(Exception):
    """The candidate raised, exited, or answered with something that is not plain data."""


class Channel:
    """Request and reply pipes to the worker: one request, one reply, in order."""

    def __init__(self, requests, replies):
        self.requests, self.replies = requests, replies

    def receive(self):
        try:
            message = read_frame(self.replies)
        except EOFError:
            raise CandidateError("the candidate's process ended") from None
        except CodecError as exc:
            raise CandidateError(f"the candidate sent a malformed reply: {exc}") from None
        return message

    def ask(self, request):
        try:
            write_frame(self.requests, request)
        except OSError:
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
            result = from_plain(reply["ok"])
            mutated = {int(i): from_plain(v) for i, v in dict(reply.get("mutated") or {}).items()}
        except (CodecError, ValueError, TypeError) as exc:
            raise CandidateError(f"the candidate's result is not plain data: {exc}") from None
        for index, value in mutated.items():
            if 0 <= index < len(args):
                copy_back(args[index], value)
        return result


def copy_back(original, value):
    """Apply the candidate's mutation of an argument to the judge's own object."""
    if type(original) is not type(value):
        return
    if type(original) is list:
        original[:] = value
    else:  # dict or set
        original.clear()
        original.update(value)


def run_checks(plan, channel):
    """(checks that ran to the end, the error or None). Only this function decides a pass."""
    namespace = {"__name__": "__judge__"}
    done = 0
    try:
        exec(compile(plan["helpers"], "helpers.py", "exec"), namespace)
        for name in plan["remote"]:
            namespace[name] = Remote(name, channel)
        if plan["candidate_setup"].strip():
            channel.ask({"op": "exec", "source": plan["candidate_setup"]})
        for i, check in enumerate(plan["checks"]):
            exec(compile(check, f"check{i}.py", "exec"), namespace)
            done += 1
    except BaseException as exc:  # a failed assert, the candidate's error, a timeout of ours
        return done, exc
    return done, None


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


def main():
    plan = json.loads(sys.stdin.readline())
    # The checks are trusted, the values they get are not: a result can be large, not unbounded.
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (JUDGE_MEMORY_BYTES, JUDGE_MEMORY_BYTES))
    out = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what the checks print does not mix with the verdict
    result = verdict(plan, Channel(plan["request_fd"], plan["reply_fd"]))
    os.write(out, (json.dumps(result, default=str) + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
