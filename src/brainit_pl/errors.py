"""The one exception type for user errors.

The CLI turns a :class:`BrainITError` into one line on stderr and a non-zero exit, never a traceback.
Library code raises it (or a subclass) whenever the cause is the user's input: a missing file, a wrong
shape, a bad field. The message says what was expected, what was found, and how to fix it.
"""

from __future__ import annotations


class BrainITError(Exception):
    """A user error: bad input, a missing file, an incompatible store. Printed as one line."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`BrainITError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise BrainITError(message)
