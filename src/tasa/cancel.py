"""Cooperative deadlines: a long computation calls :func:`cancel_point` where stopping leaves everything as
consistent as any error there would (between learning steps, GPTQ modules, calibration batches); inside a
:func:`deadline` block, the first cancel point past the deadline raises :class:`Overtime`.  Nothing is interrupted
asynchronously (a signal landing in a ``finally`` block could leave a layer half restored)."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("tasa_cancel_check", default=None)


class Overtime(BaseException):
    """A block ran past its deadline.  A BaseException, as KeyboardInterrupt is: code that handles errors
    (``except Exception``) lets it through."""


def cancel_point() -> None:
    """Raise :class:`Overtime` if the innermost :func:`deadline` of this thread (context) has passed."""
    check = _CHECK.get()
    if check is not None:
        check()


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Within the block, a :func:`cancel_point` reached ``seconds`` or more after entering raises
    :class:`Overtime`; other threads are not affected."""
    end = time.perf_counter() + seconds

    def check() -> None:
        if time.perf_counter() >= end:
            raise Overtime

    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)
