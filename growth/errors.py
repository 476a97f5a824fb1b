"""The project's errors: one root, a subclass per kind of bad input. Every `b2b` command and the
training worker print any of them as one line and exit 2."""


class B2BError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""


class GrowthError(B2BError):
    """A model or checkpoint that cannot be read or grown as asked (shapes, formats, files)."""


class CheckpointError(B2BError):
    """A training checkpoint that is damaged, missing or does not fit the run resuming it."""
