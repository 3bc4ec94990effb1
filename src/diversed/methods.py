"""The method registry: every decoding method a user can name, derived from the verifier classes.

A verifier class declares its name, knobs and needs (verifiers.py, gates.py, judge.py), and
one line of `VERIFIERS` below registers it; from those this module derives what every front
shows:

- `METHODS`, the method names (`ar` plus every registered verifier);
- `MethodSpec`, a method and its knobs as a user names them, with its spec string
  (`MethodSpec.parse("cascade:token:0.1")`) and its label (`static:0.7`), which rows.jsonl files key on;
- `spec_from_knobs`, the method that a front's fields name (CLI flags, the server's
  `speculative` object), with the same checks for both;
- `knob_owners`, from which the CLI flags and the server's fields are built;
- `make_verifier` and `markdown_table` (the docs' method table).

Errors name the parameter they are about (`params`); the CLI writes it as a flag, the server
as a field (errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserInputError
from .knobs import Knob
from .gates import EntropyGate, KLGate
from .guard import GUARD_KNOBS, GuardVocabulary, guard
from .head import DynamicEnsemble
from .judge import Judge
from .verifiers import (DRAFT_PROBS, HEAD, HIDDEN_STATES, Exact, Lenient, SpeculativeCascade, StaticEnsemble, TypicalAcceptance,
                        Verifier)


def _registry(*classes: type[Verifier]) -> dict[str, type[Verifier]]:
    names = [cls.name for cls in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"two verification methods share a name: {names}")
    return dict(zip(names, classes))


#: Every verification method users can name, in the order fronts list them. Adding a method is
#: its class plus one entry here (docs/method.md, "Adding a method").
VERIFIERS: dict[str, type[Verifier]] = _registry(
    Exact, StaticEnsemble, DynamicEnsemble, Lenient, SpeculativeCascade, TypicalAcceptance, KLGate, EntropyGate, Judge,
)
AR = "ar"  # the target alone, one token per forward: the one method without a verifier
METHODS: tuple[str, ...] = (AR, *VERIFIERS)


def needs_draft(method: str) -> bool:
    """Whether a method verifies drafts (every method but `ar`)."""
    return method != AR


def static_line_weight(label: str) -> float | None:
    """w of a method label's point on the static line (`exact` is its w = 1 end); None off the line."""
    spec = MethodSpec.parse(label)
    return VERIFIERS[spec.method].static_line_weight(spec.given()) if spec.method in VERIFIERS else None


def head_kind(method: str) -> type | None:
    """The class of head a method loads (EnsembleHead, JudgeHead), None when it loads none."""
    return VERIFIERS[method].head_kind if method in VERIFIERS else None


def knobs_of(method: str) -> tuple[Knob, ...]:
    """The knobs of a method, in spec-string order: its own, then the guard's for a relaxed method
    (guard.py: `static:0.5:0.05` guards static:0.5). A UserInputError for an unknown method."""
    if method == AR:
        return ()
    if method not in VERIFIERS:
        raise UserInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}", params=("method",))
    cls = VERIFIERS[method]
    return cls.knobs + (GUARD_KNOBS if cls.guardable else ())


def knob_owners() -> dict[str, list[tuple[str, Knob]]]:
    """Every public knob name (aliases included) -> the (method, knob) pairs it sets, in registry order."""
    owners: dict[str, list[tuple[str, Knob]]] = {}
    for method in METHODS:
        for knob in knobs_of(method):
            for name in knob.names:
                owners.setdefault(name, []).append((method, knob))
    return owners


def canonical_knobs(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The knobs a user gave (None = not given) under their canonical names, each checked.

    A knob goes by its public name, an alias or its verifier field. Knobs that do not belong to
    the method are refused before any value is checked.
    """
    knobs = knobs_of(method)
    given = {key: value for key, value in given.items() if value is not None}

    def owner(key: str) -> Knob | None:
        return next((k for k in knobs if key in (*k.names, k.attribute)), None)

    misplaced = [key for key in given if owner(key) is None]
    if misplaced:
        names = ", ".join("{" + key + "}" for key in misplaced)
        raise UserInputError(f"{names} {'does' if len(misplaced) == 1 else 'do'} not apply to {{method}} {method}",
                             params=(*misplaced, "method"))
    values: dict[str, Any] = {}
    for key, value in given.items():
        knob = owner(key)
        if knob.name in values:
            raise UserInputError(f"{{{knob.name}}} is given twice (once as {{{key}}})", params=(knob.name, key))
        knob.check(value)
        values[knob.name] = value
    return {knob.name: values[knob.name] for knob in knobs if knob.name in values}


@dataclass(frozen=True, init=False, repr=False)
class MethodSpec:
    """A decoding method and its knobs, as a user names them (CLI flags, server fields, eval specs).

    `MethodSpec("static", weight=0.7)`; a knob reads as an attribute (`spec.weight`), None when
    not given. Construction checks the knobs (do they belong to the method, are they in range);
    whether a required knob is there (a head) is checked when the verifier is built.
    """

    method: str
    knobs: tuple[tuple[str, Any], ...]  # (canonical name, value) of the knobs given, in spec order

    def __init__(self, method: str, **knobs: Any):
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "knobs", tuple(canonical_knobs(method, knobs).items()))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in _KNOB_NAMES:
            raise AttributeError(name)
        knob = next((k for k in knobs_of(self.method) if name in k.names), None)
        return dict(self.knobs).get(knob.name) if knob is not None else None

    def __repr__(self) -> str:
        return f"MethodSpec({', '.join([repr(self.method), *(f'{k}={v!r}' for k, v in self.knobs)])})"

    def given(self) -> dict[str, Any]:
        """The knobs given, by canonical name."""
        return dict(self.knobs)

    def verifier_knobs(self) -> dict[str, Any]:
        """The knobs the verifier takes as they are (not a head's name, which is loaded first)."""
        return {knob.name: self.given()[knob.name] for knob in knobs_of(self.method) if knob.constructor and knob.name in self.given()}

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        """`ar`, `exact`, `static:0.7`, `diversed:gsm8k`, `cascade:token:0.1`, `klgate:0.5:0.1`, ... (see `spec_syntax`)."""
        name, _, arg = text.strip().partition(":")
        knobs = knobs_of(name)
        if not arg:
            return cls(name)
        if not knobs:
            raise UserInputError(f"method {name!r} takes no ':' argument (got {text!r})")
        values = {}
        for knob, part in zip(knobs, arg.split(":", len(knobs) - 1)):  # the last knob takes the rest (a head path)
            if part:
                try:
                    values[knob.name] = knob.parse(part)
                except ValueError:
                    raise UserInputError(f"bad method spec {text!r}: {part!r} is not a number") from None
        return cls(name, **values)

    @property
    def label(self) -> str:
        """A short stable name for tables and files (rows.jsonl keys on it): static:0.7, diversed:gsm8k, ..."""
        knobs, given = knobs_of(self.method), self.given()
        shown = max([i + 1 for i, knob in enumerate(knobs) if knob.name in given] + [_label_knobs(self.method)])
        return ":".join([self.method, *(knob.format(given.get(knob.name, knob.default)) for knob in knobs[:shown])])


_KNOB_NAMES = frozenset(knob_owners())


def _label_knobs(method: str) -> int:
    return VERIFIERS[method].label_knobs if method in VERIFIERS else 0


def spec_from_knobs(method: str | None, given: dict[str, Any]) -> MethodSpec | None:
    """The method named by a front's fields (flags or request fields; None = not given).

    Without a method, a knob that implies one selects it (a weight alone means `static`, a
    head alone `diversed`); other knobs without a method are an error, since they would
    silently run the default. None when nothing is given: the caller's default applies.
    """
    given = {key: value for key, value in given.items() if value is not None}
    if method is None:
        method = next((owner for owner in METHODS for knob in knobs_of(owner) if knob.implies_method and knob.name in given), None)
    if method is None:
        if not given:
            return None
        stray = list(given)
        owners = "; ".join(f"{key} belongs to {' or '.join(m for m, _ in knob_owners().get(key, []))}" for key in stray)
        names = ", ".join("{" + key + "}" for key in stray)
        raise UserInputError(f"{names} {'does' if len(stray) == 1 else 'do'} not apply without {{method}} ({owners})",
                             params=(*stray, "method"))
    return MethodSpec(method, **given)


def check_complete(spec: MethodSpec) -> None:
    """A UserInputError naming the first required knob the spec lacks (diversed's head)."""
    for knob in knobs_of(spec.method):
        if knob.required and knob.name not in spec.given():
            raise UserInputError(f"{{method}} {spec.method} needs {{{knob.name}}} ({knob.doc})", params=("method", knob.name))


def make_verifier(method: str, *, head: torch.nn.Module | None = None, vocabulary: GuardVocabulary | None = None,
                  **knobs: Any) -> Verifier | None:
    """The verifier for a method name and its knobs (None = the default); None for `ar`.

    `head` is the loaded ensemble head of a method that needs one; `vocabulary` the pair's
    tokenizer and stop tokens, which a guard (a `guard` or `guard_tokens` knob) reads.
    """
    values = canonical_knobs(method, knobs)
    if method == AR:
        return None
    cls = VERIFIERS[method]
    kwargs: dict[str, Any] = {knob.attribute: values[knob.name] for knob in cls.knobs if knob.constructor and knob.name in values}
    if HEAD in cls.needs:
        if head is None:
            raise UserInputError(f"{{method}} {method} needs an ensemble head ({{head}}: a path or a shipped head name)", params=("method", "head"))
        kwargs["head"] = head
    return guard(cls(**kwargs), values, vocabulary)


def spec_syntax(method: str) -> str:
    """How a spec string writes the method: `cascade:RULE:ALPHA` (a guard's knobs may follow: the
    method table's last row)."""
    return ":".join([method, *(knob.name.upper() for knob in knobs_of(method) if knob not in GUARD_KNOBS)])


def flag(name: str) -> str:
    """A knob's CLI flag: low_weight -> --low-weight."""
    return "--" + name.replace("_", "-")


def knob_help(name: str) -> str:
    """One help line for a CLI flag, naming every method the knob belongs to."""
    methods_of: dict[Knob, list[str]] = {}  # a knob several methods share (the guard's) is described once
    for method, knob in knob_owners()[name]:
        methods_of.setdefault(knob, []).append(method)
    parts = []
    for knob, methods in methods_of.items():
        if name != knob.name:
            parts.append(f"{', '.join(methods)}: same as {flag(knob.name)}")
            continue
        where = knob.describe_range()
        default = f" (default {knob.format(knob.default)})" if knob.default is not None else ""
        owners = "every relaxed method" if knob in GUARD_KNOBS else ", ".join(methods)
        parts.append(f"{owners}: {knob.doc}{', ' + where if where else ''}{default}")
    return "; ".join(parts).replace("%", "%%")  # argparse formats help with %


# The docs' method table (README.md): rows come from the registry, `ar` first, and a last row for
# the guard, whose knobs every relaxed method takes after its own.
_AR_ROW = ("target alone, one token per forward", "yes (baseline)")
_GUARD_ROW = ("(guard)", "`METHOD:…:GUARD:GUARD_TOKENS`",
              "any relaxed method, with `v_i = p_i` where `max(p_i(G), q_i(G)) ≥ τ`, G the stop tokens and the named ones",
              "tokenizer", "no (exact at guarded positions)")
_NEEDS = {DRAFT_PROBS: "draft probabilities", HIDDEN_STATES: "hidden states", HEAD: "a head"}


def markdown_table() -> str:
    """The method table of README.md (tests/test_registry.py checks the README holds it)."""
    lines = [
        "| `--method` | spec string | verification target / rule | knobs: range (default) | needs | lossless? |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        cls = VERIFIERS.get(method)
        verification, lossless = (cls.verification, cls.lossless) if cls is not None else _AR_ROW
        knobs = ", ".join(_knob_cell(knob) for knob in knobs_of(method) if knob not in GUARD_KNOBS)
        needs = ", ".join(text for need, text in _NEEDS.items() if need in cls.needs) if cls is not None else "no draft"
        lines.append(f"| `{method}` | `{spec_syntax(method)}` | {verification} | {knobs} | {needs or 'p only'} | {lossless} |")
    name, syntax, verification, needs, lossless = _GUARD_ROW
    knobs = ", ".join(_knob_cell(knob) for knob in GUARD_KNOBS)
    lines.append(f"| {name} | {syntax} | {verification} | {knobs} | {needs} | {lossless} |")
    return "\n".join(lines) + "\n"


def _knob_cell(knob: Knob) -> str:
    parts = [f"`{flag(knob.name)}`", knob.describe_range()]
    if knob.default is not None:
        parts.append(f"({knob.format(knob.default)})")
    parts += [f"(or `{flag(alias)}`)" for alias in knob.aliases]
    return " ".join(part for part in parts if part)
