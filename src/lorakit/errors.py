"""Exceptions a user can act on: each says what was wrong, what was expected, what to try."""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """An adapter or training configuration that cannot be built."""


class TargetNotFoundError(LorakitError, ValueError):
    """Target rules that match no adaptable module."""


class AdapterNotFoundError(LorakitError, KeyError):
    """An adapter name that is not loaded on this model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AdapterFileError(LorakitError, ValueError):
    """An adapter file that is corrupt, truncated or does not fit the model."""


class FingerprintMismatchError(AdapterFileError):
    """An adapter trained on different base weights than the model it is loaded onto."""


class GeneralTextError(LorakitError, ValueError):
    """A general-text file (for forgetting measurements) that cannot be read as passages."""


class InterruptedTrainingError(LorakitError):
    """The user stopped a run (Ctrl-C): said in one line, with how to continue, not a traceback."""
