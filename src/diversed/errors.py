"""Errors a user can cause. The CLI and server turn these into one-line messages / 400s.

An error may name the method-spec parameters it is about (`params`, e.g. ("weight",)): its
message then holds `{weight}` where the parameter's name goes, and each front phrases that
name in its own terms (`render`): the CLI as `--weight`, the server as `speculative.weight`.
"""

from __future__ import annotations

from typing import Callable


class DiversedError(Exception):
    """Base class for every error caused by the user's input, not by a bug."""

    def __init__(self, message: str = "", *, params: tuple[str, ...] = ()):
        self.template = message
        self.params = tuple(params)
        super().__init__(self.render(lambda name: name))

    @property
    def param(self) -> str | None:
        """The first parameter the error is about (None when it names none)."""
        return self.params[0] if self.params else None

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each named parameter phrased by `name` (e.g. weight -> --weight)."""
        text = self.template
        for param in self.params:
            text = text.replace("{" + param + "}", name(param))
        return text


class UserInputError(DiversedError, ValueError):
    """A bad option or argument (out-of-range weight, empty prompt, unknown method...)."""


class PairMismatchError(DiversedError):
    """The draft model cannot serve the target: their vocabularies differ."""


class HeadMismatchError(DiversedError):
    """An ensemble head was trained for a different draft/target pair."""


class ModelLoadError(DiversedError):
    """A model could not be found, assembled or verified."""


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
