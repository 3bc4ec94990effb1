"""Errors a user can cause. The CLI and server turn these into one-line messages / 400s."""


class DiversedError(Exception):
    """Base class for every error caused by the user's input, not by a bug."""


class UserInputError(DiversedError, ValueError):
    """A bad option or argument (out-of-range weight, empty prompt, unknown method...)."""


class PairMismatchError(DiversedError):
    """The draft model cannot serve the target: their vocabularies differ."""


class HeadMismatchError(DiversedError):
    """An ensemble head was trained for a different draft/target pair."""


class ModelLoadError(DiversedError):
    """A model could not be found, assembled or verified."""
