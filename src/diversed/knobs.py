"""A method's knob: its public name, type, range, default and doc, declared once next to its verifier.

The method registry (`methods.py`) derives everything a user sees from these: spec strings
(`static:0.7`), the CLI flags (`--weight`), the server's `speculative` fields, the evaluator's
method list and the docs' method table. A knob checks its own values; the error names the knob
(`params`), and each front phrases the name its own way (errors.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import UserInputError


@dataclass(frozen=True)
class Knob:
    """One parameter of one verification method.

    `interval` is (low, high, brackets) with brackets one of "()", "(]", "[)", "[]"; None for
    knobs without a numeric range. `field` is the verifier's dataclass field when it is not
    called `name`; `aliases` are older public names that still work. `implies_method` lets the
    knob alone select its method (a weight alone means `static`). `constructor` is False for a
    knob the verifier does not take as is (a head's name is loaded into a module first).
    """

    name: str
    type: type
    default: Any
    doc: str  # what the knob is, as a noun phrase: "the target weight w of the mixture"
    interval: tuple[float, float, str] | None = None
    choices: tuple[str, ...] | None = None
    field: str | None = None
    aliases: tuple[str, ...] = ()
    implies_method: bool = False
    required: bool = False
    constructor: bool = True

    @property
    def attribute(self) -> str:
        """The verifier's dataclass field holding this knob."""
        return self.field or self.name

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def describe_range(self) -> str:
        """'(0, 1]', 'one of chow, diff', or '' when any value of the type goes."""
        if self.interval is not None:
            low, high, brackets = self.interval
            return f"{brackets[0]}{low:g}, {'inf' if math.isinf(high) else format(high, 'g')}{brackets[1]}"
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        return ""

    def check(self, value: Any) -> None:
        """Raise a UserInputError naming this knob unless `value` is of its type and in its range."""
        where = self.describe_range()
        if self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and self._in_interval(float(value))
        else:
            ok = isinstance(value, self.type) and (self.choices is None or value in self.choices)
        if not ok:
            expected = f"must be {'in ' if self.interval else ''}{where}" if where else f"must be a {self.type.__name__}"
            raise UserInputError(f"{self.doc} {expected}, got {value!r} ({{{self.name}}})", params=(self.name,))

    def _in_interval(self, value: float) -> bool:
        if self.interval is None:
            return math.isfinite(value)
        low, high, brackets = self.interval
        above = value > low if brackets[0] == "(" else value >= low
        below = value < high if brackets[1] == ")" else value <= high
        return above and below

    def parse(self, text: str) -> Any:
        """A value from a spec string's part ('0.7' -> 0.7); ValueError if it is not one."""
        return float(text) if self.type is float else text

    def format(self, value: Any) -> str:
        """The value as a spec string writes it: 0.7 -> '0.7', 'token' -> 'token'."""
        return format(value, "g") if self.type is float else str(value)
