"""The plain-data codec every value crossing the sandbox boundary goes through (stdlib only).

A call from the trusted judge to the candidate sends its arguments, and gets its result back,
as JSON the receiver rebuilds into values of exact standard types only, so the judge compares
values it built itself. The aim is Python's own equality: what compares equal (or unequal) in
one process compares the same after crossing.

- None, bool, int, float, complex, str, bytes, bytearray; lists, tuples, dicts, sets and
  frozensets of them; `Fraction`, `Decimal`, `range`, and builtin types as values (`int`).
- A subclass of one of these that keeps its base's `__eq__` (a namedtuple, an IntEnum)
  crosses as its base; one with an `__eq__` of its own is refused.
- `OrderedDict` stays an OrderedDict (its comparison is order-sensitive) and `Counter` a
  Counter; `defaultdict` becomes a dict. Dict views stay views of a dict of the same items.
- A generator or other iterator is materialised (up to MAX_ITEMS items) and arrives as an
  iterator over those items: `tuple(result)` works, `result == [...]` is False as in Python.
- numpy scalars and arrays become their Python equivalents (a correct np.int64 answer passes).
- Objects of the program's own classes (and its functions) whose type keeps the default
  identity semantics (no `__eq__`, `__bool__` or `__len__` of their own) stay in the
  candidate's process: the other side gets an opaque reference, compared by identity, which
  it can pass back or call (MBPP 601's `Pair`). Anything else is refused.

A value is a flat list of nodes, each referring to earlier ones by index, so nesting depth
costs nothing: only the number of items (MAX_ITEMS) and the frame's size bound it. Shared
objects stay shared; a value that contains itself is refused.

Frames are a 4-byte big-endian length and that many bytes of JSON, at most `max_frame_bytes`.
The launcher passes this file's source, ahead of the worker's or the judge's, to a fresh
interpreter, so it imports nothing outside the standard library.
"""

import builtins
import collections
import collections.abc
import json
import math
import os
import sys

MAX_FRAME_BYTES = 64 << 20  # the default bound on a frame; the launcher sets the run's own
MAX_ITEMS = 1 << 20  # items one value may hold (an iterator is materialised up to this many)
_ATOMS = (type(None), bool, int, float, str)
# Types that may cross as values (`remove_datatype(t, int)`): the builtins, by name.
TYPE_NAMES = ("int", "float", "complex", "str", "bytes", "bytearray", "bool", "list", "tuple", "dict", "set",
              "frozenset", "object", "type", "range")
_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
_VIEW_TYPES = {type({}.keys()): "keys", type({}.values()): "values", type({}.items()): "items"}
max_frame_bytes = MAX_FRAME_BYTES


class CodecError(Exception):
    """A value that is not plain data, or a frame that is not well formed."""


class Ref:
    """A value that lives in the candidate's process (a name of its namespace, or an object it
    returned): sent by name, never by value; compared by identity."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<candidate's {self.name}>"


# --------------------------------------------------------------------------- encoding


_NODE = object()  # what _inline returns for a value that needs a node of its own


def _inline(value):
    """`value` itself where JSON carries it exactly, else _NODE."""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else _NODE
    if kind is int:
        return value if value.bit_length() <= 60 else _NODE  # larger ones as hex: no digit limit
    return value if kind in _ATOMS else _NODE


def _default_identity(kind):
    """A type whose instances compare, hash and test true like a bare object()."""
    return kind.__eq__ is object.__eq__ and kind.__hash__ is object.__hash__ and not any(
        hasattr(kind, name) for name in ("__bool__", "__len__"))


class _Encoder:
    def __init__(self, keep):
        self.keep, self.nodes, self.index, self.items = keep, [], {}, 0
        self.alive = []  # every object described stays alive, so no id is reused while encoding

    def _count(self, n):
        self.items += n
        if self.items > MAX_ITEMS:
            raise CodecError(f"a value of more than {MAX_ITEMS} items")

    def item(self, value):
        """Post-order and iterative: any depth, no recursion."""
        stack, in_progress = [], set()

        def resolved(child):
            """The child's item, or _NODE while it still needs encoding."""
            inline = _inline(child)
            if inline is not _NODE:
                return inline
            if id(child) in self.index:
                return [self.index[id(child)]]
            if id(child) in in_progress:
                raise CodecError("a value that contains itself")
            return _NODE

        if resolved(value) is not _NODE:
            return resolved(value)
        stack.append(self._frame(value))
        in_progress.add(id(value))
        while stack:
            obj, tag, children, make, items = stack[-1]
            while len(items) < len(children) and (done := resolved(children[len(items)])) is not _NODE:
                items.append(done)
            if len(items) < len(children):
                child = children[len(items)]
                stack.append(self._frame(child))
                in_progress.add(id(child))
                continue
            stack.pop()
            in_progress.discard(id(obj))
            self.nodes.append([tag, make(items)])
            self.index[id(obj)] = len(self.nodes) - 1
        return [self.index[id(value)]]

    def _frame(self, obj):
        tag, children, make = self._describe(obj)
        self.alive += [obj, children]
        self._count(len(children) + 1)
        return [obj, tag, children, make, []]

    def _describe(self, value):
        """(tag, child values, body from the children's items) of one value that needs a node."""
        kind, same = type(value), (lambda items: items)
        if _inline(value) is not _NODE:  # a converted value (np.int64(3) became 3): JSON carries it
            return "atom", [], lambda _: value
        if kind is int:
            return "int", [], lambda _: format(value, "x")
        if kind is float:
            return "float", [], lambda _: repr(value)
        if kind in (bytes, bytearray):
            return kind.__name__, [], lambda _: value.hex()
        if isinstance(value, Ref):  # the judge's proxies of candidate names included
            return "ref", [], lambda _: value.name
        if kind is complex:
            return "complex", [value.real, value.imag], same
        if kind in (list, tuple, set, frozenset):
            return kind.__name__, list(value), same
        if kind is range:
            return "range", [value.start, value.stop, value.step], same
        if kind in _VIEW_TYPES:
            tag = _VIEW_TYPES[kind]
            return (tag, [x for pair in value for x in pair], _pairs_of) if tag == "items" else (tag, list(value), same)
        if kind is collections.OrderedDict or kind is collections.Counter:
            return ("ordered" if kind is collections.OrderedDict else "counter"), _flat_items(value), _pairs_of
        if kind is dict:
            return "dict", _flat_items(value), _pairs_of
        if kind is type and value.__name__ in TYPE_NAMES and getattr(builtins, value.__name__, None) is value:
            return "type", [], lambda _: value.__name__
        numeric = _stdlib_number(value)
        if numeric is not None:
            return numeric
        converted = _as_base(value)
        if converted is _NODE:
            converted = _numpy_plain(value)
        if converted is not _NODE:
            self.alive.append(converted)
            return self._describe(converted)
        if isinstance(value, collections.abc.Iterator):
            items = []
            for item in value:
                items.append(item)
                if len(items) > MAX_ITEMS:
                    raise CodecError(f"an iterator of more than {MAX_ITEMS} items")
            return "iterator", items, same
        if self.keep is not None and _default_identity(kind):
            name = self.keep(value)
            return "ref", [], lambda _: name
        raise CodecError(f"a {kind.__module__}.{kind.__qualname__} is not plain data")


def _flat_items(mapping):
    return [x for pair in dict.items(mapping) for x in pair]


def _pairs_of(items):
    return [[items[i], items[i + 1]] for i in range(0, len(items), 2)]


def _stdlib_number(value):
    fractions, decimal = sys.modules.get("fractions"), sys.modules.get("decimal")
    if fractions is not None and type(value) is fractions.Fraction:
        return "fraction", [value.numerator, value.denominator], lambda items: items
    if decimal is not None and type(value) is decimal.Decimal:
        return "decimal", [], lambda _: str(value)
    return None


# A subclass that keeps its base's __eq__ crosses as the base, read through the base's own methods.
_BASES = ((tuple, lambda v: tuple.__getitem__(v, slice(None))), (list, lambda v: list.__getitem__(v, slice(None))),
          (dict, lambda v: dict(dict.items(v))), (int, int.__int__), (float, float.__float__), (str, str.__str__),
          (frozenset, lambda v: frozenset(frozenset.__iter__(v))), (set, lambda v: set(set.__iter__(v))),
          (bytes, lambda v: bytes.__getitem__(v, slice(None))))


def _as_base(value):
    """A subclass of a standard type with its base's equality, as the base; else _NODE."""
    kind = type(value)
    for base, convert in _BASES:
        if isinstance(value, base):
            return _NODE if kind.__eq__ is not base.__eq__ else convert(value)
    return _NODE


def _numpy_plain(value):
    """numpy's own scalars and arrays as Python values, else _NODE (numpy is never imported here)."""
    numpy = sys.modules.get("numpy")
    if numpy is None or type(value).__module__ != "numpy":
        return _NODE
    if type(value) is numpy.ndarray:
        return value.tolist()
    if isinstance(value, numpy.generic) and getattr(numpy, type(value).__name__, None) is type(value):
        return value.item()  # exact numpy types only: a subclass keeps its own __eq__
    return _NODE


def to_plain(value, keep=None):
    """`value` as JSON data: {"root": item, "nodes": [[tag, body], ...]}, where an item is a JSON
    scalar or [index] of an earlier node. `keep(obj)` stores an object of default identity
    semantics on this side and returns its reference name (the worker); without it such an
    object is refused. CodecError for anything that cannot cross."""
    encoder = _Encoder(keep)
    return {"root": encoder.item(value), "nodes": encoder.nodes}


# --------------------------------------------------------------------------- decoding


def _check_item(item, built):
    if type(item) in _ATOMS:
        return item
    if type(item) is list and len(item) == 1 and type(item[0]) is int and 0 <= item[0] < len(built):
        return built[item[0]]
    raise CodecError("a malformed value")


def _typed(value, kinds, what):
    if type(value) not in kinds:
        raise CodecError(f"a malformed {what}")
    return value


def _build(tag, body, items, resolve):
    """One node's value from its body (items already decoded)."""
    if tag == "atom":
        return _typed(body, _ATOMS, "atom")
    if tag == "int":
        try:
            return int(_typed(body, (str,), "int"), 16)
        except ValueError:
            raise CodecError("a malformed int") from None
    if tag == "float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag in ("bytes", "bytearray"):
        try:
            return (bytes if tag == "bytes" else bytearray).fromhex(_typed(body, (str,), tag))
        except ValueError:
            raise CodecError(f"malformed {tag}") from None
    if tag == "ref":
        if resolve is None or type(body) is not str:
            raise CodecError("a reference where none may be")
        return resolve(body)
    if tag == "type":
        if body not in TYPE_NAMES:
            raise CodecError("a type that may not cross")
        return getattr(builtins, body)
    if tag == "decimal":
        import decimal

        try:
            return decimal.Decimal(_typed(body, (str,), "decimal"))
        except decimal.InvalidOperation:
            raise CodecError("a malformed decimal") from None
    if items is None:
        raise CodecError(f"an unknown tag {str(tag)[:20]!r}")
    if tag == "complex" and len(items) == 2 and all(type(part) is float for part in items):
        return complex(*items)
    if tag == "range" and len(items) == 3 and all(type(part) is int for part in items) and items[2] != 0:
        return range(*items)
    if tag == "fraction" and len(items) == 2 and all(type(part) is int for part in items) and items[1] > 0:
        import fractions

        return fractions.Fraction(*items)
    if tag in _SEQUENCES:
        return _SEQUENCES[tag](items)
    if tag == "iterator":
        return iter(items)
    if tag in ("keys", "values"):
        return dict.fromkeys(items).keys() if tag == "keys" else dict(enumerate(items)).values()
    if tag in ("dict", "ordered", "counter", "items") and len(items) % 2 == 0:
        mapping = {"dict": dict, "items": dict, "ordered": collections.OrderedDict, "counter": collections.Counter}[tag]()
        for i in range(0, len(items), 2):
            mapping[items[i]] = items[i + 1]
        return mapping.items() if tag == "items" else mapping
    raise CodecError(f"a malformed {str(tag)[:20]}")


def from_plain(data, resolve=None):
    """The value `to_plain` encoded. `resolve(name)` turns a reference into a value (the worker's
    namespace; the judge's proxies); without it a reference is refused."""
    if type(data) is not dict or type(data.get("nodes")) is not list:
        raise CodecError("a malformed value")
    built = []
    for node in data["nodes"]:
        if type(node) is not list or len(node) != 2 or type(node[0]) is not str:
            raise CodecError("a malformed value")
        tag, body = node
        if tag in ("dict", "ordered", "counter", "items") and type(body) is list:
            if not all(type(pair) is list and len(pair) == 2 for pair in body):
                raise CodecError("a malformed dict")
            body = [x for pair in body for x in pair]
        items = [_check_item(item, built) for item in body] if type(body) is list else None
        try:
            built.append(_build(tag, body, items, resolve))
        except TypeError as exc:  # an unhashable set member or dict key
            raise CodecError(str(exc)) from None
    return _check_item(data.get("root"), built)


# --------------------------------------------------------------------------- frames


def write_frame(fd, message):
    """One message (JSON-able data) as a length-prefixed frame."""
    payload = json.dumps(message, allow_nan=False).encode()
    if len(payload) > max_frame_bytes:
        raise CodecError(f"a value of {len(payload)} bytes, over the {max_frame_bytes}-byte limit")
    data = len(payload).to_bytes(4, "big") + payload
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd):
    """The next message; EOFError when the other side is gone, CodecError for a bad frame."""
    size = int.from_bytes(_read_exactly(fd, 4), "big")
    if size > max_frame_bytes:
        raise CodecError(f"a reply of {size} bytes, over the {max_frame_bytes}-byte limit")
    try:
        message = json.loads(_read_exactly(fd, size))
    except (ValueError, RecursionError) as exc:  # bad JSON, an int too long to parse, nesting too deep
        raise CodecError(f"a malformed frame: {type(exc).__name__}") from None
    if type(message) is not dict:
        raise CodecError("a malformed frame")
    return message
