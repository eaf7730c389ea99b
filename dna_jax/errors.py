"""Errors shared by every trainer (one class each, so callers catch one name)."""


class NonFiniteLossError(FloatingPointError):
    """A training loss or the state became NaN or infinite. The message names the step (and
    the block, for a supernet) and the last good (finite) checkpoint, from which a rerun with a
    fixed config resumes."""
