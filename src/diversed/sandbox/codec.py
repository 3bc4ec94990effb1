"""The plain-data codec every value crossing the sandbox boundary goes through (stdlib only).

A call from the trusted judge to the candidate sends its arguments, and gets its result back,
as tagged JSON built only from exact standard types: None, bool, int, float, complex, str,
bytes and lists, tuples, dicts, sets and frozensets of them. numpy scalars and arrays become their
Python equivalents (so a correct answer of type np.int64 passes), and the dict subclasses of
`collections` become dicts. Anything else — a subclass with its own `__eq__`, a function, an
object — cannot be encoded, and the call fails with that reason: the judge only ever compares
values it built itself from this data.

Frames are a 4-byte big-endian length and that many bytes of JSON. The launcher passes this
file's source, ahead of the worker's or the judge's, to a fresh interpreter, so it imports
nothing outside the standard library.
"""

import json
import math
import os
import sys

MAX_FRAME_BYTES = 64 << 20  # a larger result is a failure, not a memory problem for the judge
MAX_DEPTH = 200
_ATOMS = (type(None), bool, int, float, str)


class CodecError(Exception):
    """A value that is not plain data, or a frame that is not well formed."""


class Ref:
    """A name in the candidate's namespace (MBPP's setup objects): sent by name, never by value."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<candidate's {self.name}>"


def _numpy_plain(value):
    """numpy's own scalars and arrays as Python values, else None (numpy is never imported here)."""
    numpy = sys.modules.get("numpy")
    if numpy is None or type(value).__module__ != "numpy":
        return None
    if type(value) is numpy.ndarray:
        return ("array", value.tolist())
    if isinstance(value, numpy.generic) and getattr(numpy, type(value).__name__, None) is type(value):
        return ("scalar", value.item())  # exact numpy types only: a subclass keeps its own __eq__
    return None


def to_plain(value, depth=0):
    """`value` as tagged JSON data; CodecError for anything that is not plain data."""
    kind = type(value)
    if kind in _ATOMS:
        if kind is float and not math.isfinite(value):
            return ["float", repr(value)]
        if kind is int and value.bit_length() > 60:  # hex: no digit limit, exact in any JSON reader
            return ["int", format(value, "x")]
        return value
    if depth > MAX_DEPTH:
        raise CodecError("a value nested too deeply")
    if kind is bytes:
        return ["bytes", value.hex()]
    if isinstance(value, Ref):  # the judge's proxies of candidate names included
        return ["ref", value.name]
    if kind is complex:
        return ["complex", [to_plain(value.real), to_plain(value.imag)]]
    if kind in (list, tuple, set, frozenset):
        return [kind.__name__, [to_plain(v, depth + 1) for v in value]]
    if kind is dict or _is_collections_dict(kind):
        return ["dict", [[to_plain(k, depth + 1), to_plain(v, depth + 1)] for k, v in dict.items(value)]]
    converted = _numpy_plain(value)
    if converted is not None:
        return to_plain(converted[1], depth + 1)
    raise CodecError(f"a {kind.__module__}.{kind.__qualname__} is not plain data")


def _is_collections_dict(kind):
    import collections

    return kind in (collections.Counter, collections.OrderedDict, collections.defaultdict)


def from_plain(data, resolve=None, depth=0):
    """The value `to_plain` encoded. `resolve(name)` turns a reference into a value (the worker's
    namespace); without it a reference is refused."""
    if type(data) in _ATOMS:
        return data
    if depth > MAX_DEPTH or type(data) is not list or len(data) != 2 or type(data[0]) is not str:
        raise CodecError("a malformed value")
    tag, body = data
    if tag == "float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "int" and type(body) is str:
        try:
            return int(body, 16)
        except ValueError:
            raise CodecError("a malformed int") from None
    if tag == "bytes" and type(body) is str:
        try:
            return bytes.fromhex(body)
        except ValueError:
            raise CodecError("malformed bytes") from None
    if tag == "ref" and type(body) is str and resolve is not None:
        return resolve(body)
    if type(body) is not list:
        raise CodecError("a malformed value")
    if tag == "complex" and len(body) == 2 and all(type(part) in (float, list) for part in body):
        return complex(from_plain(body[0], None, depth + 1), from_plain(body[1], None, depth + 1))
    if tag == "dict":
        pairs = [(from_plain(k, resolve, depth + 1), from_plain(v, resolve, depth + 1)) for k, v in _pairs(body)]
        return dict(pairs)
    items = [from_plain(v, resolve, depth + 1) for v in body]
    kinds = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
    if tag not in kinds:
        raise CodecError(f"an unknown tag {tag[:20]!r}")
    try:
        return kinds[tag](items)
    except TypeError as exc:  # an unhashable set member
        raise CodecError(str(exc)) from None


def _pairs(body):
    for pair in body:
        if type(pair) is not list or len(pair) != 2:
            raise CodecError("a malformed dict")
        yield pair


def write_frame(fd, message):
    """One message (JSON-able data) as a length-prefixed frame."""
    payload = json.dumps(message, allow_nan=False).encode()
    if len(payload) > MAX_FRAME_BYTES:
        raise CodecError(f"a value of {len(payload)} bytes, over the {MAX_FRAME_BYTES}-byte limit")
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
    if size > MAX_FRAME_BYTES:
        raise CodecError(f"a frame of {size} bytes, over the limit")
    try:
        message = json.loads(_read_exactly(fd, size))
    except (ValueError, RecursionError) as exc:  # bad JSON, an int too long to parse, nesting too deep
        raise CodecError(f"a malformed frame: {type(exc).__name__}") from None
    if type(message) is not dict:
        raise CodecError("a malformed frame")
    return message
