"""User-facing errors.

A :class:`TasaError` carries one line that tells the user what was wrong and,
where possible, what to do.  The CLI prints it (no traceback) and exits with
status 2.  Library callers can catch it like any other exception.
"""


class TasaError(Exception):
    """A problem with the user's input or environment, described in one line."""
