class GrowthError(ValueError):
    """A bad input to growth: the message says what is wrong and how to fix it."""
