"""What every pool's ``submit_task`` / ``run_sync`` repeat: checking the call and the stop
ladder's seconds, and when a task's future is done (awaited through
:func:`cancelflow._async.wait_for_callback`, on asyncio or trio).

Package-internal: for the pools (``_thread_pool``, ``_process._pool``). The public signatures stay each pool's own (they
differ: ``term_grace_period``, ``interrupt_on_cancel``, ``run_in``), and so do the checks
whose wording differs between pools; what is here is said the same way everywhere.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._token import CancellationToken
from ._validate import check_seconds

__all__ = ("check_call", "check_initializer", "future_done", "ladder_seconds", "usable_cpus")


def check_call(
    fn: object, args: object, kwargs: object, token: object = None, partial_sink: object = None
) -> None:
    """Refuse a task call that cannot be made: ``fn`` not callable, ``args`` not an
    iterable of arguments (a ``str`` or ``bytes`` is refused), ``kwargs`` neither a
    mapping nor ``None``, ``token`` neither a :class:`CancellationToken` nor ``None``,
    ``partial_sink`` neither callable nor ``None``.

    Raises:
        TypeError: naming the argument.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if isinstance(args, (str, bytes)) or not isinstance(args, Iterable):
        raise TypeError(f"args must be an iterable of arguments, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping or None, not {type(kwargs).__name__}")
    if token is not None and not isinstance(token, CancellationToken):
        raise TypeError(f"token must be a CancellationToken or None, not {type(token).__name__}")
    if partial_sink is not None and not callable(partial_sink):
        raise TypeError(f"partial_sink must be callable, not {type(partial_sink).__name__}")


def check_initializer(initializer: object, initargs: object) -> tuple[Any, ...]:
    """Refuse an ``initializer`` that is neither callable nor ``None``, and ``initargs``
    that are not an iterable of arguments (a ``str`` or ``bytes`` is refused); return the
    arguments as a tuple (any iterable is taken, as ``*initargs`` takes it in the stdlib).

    Raises:
        TypeError: naming the argument.
    """
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")
    if isinstance(initargs, (str, bytes)) or not isinstance(initargs, Iterable):
        raise TypeError(f"initargs must be an iterable, not {type(initargs).__name__}")
    return tuple(initargs)


def usable_cpus() -> int:
    """The CPUs the stdlib's executors size their default pool by: those this process may
    run on (``os.process_cpu_count()``, CPU affinity included) from Python 3.13, all of
    the machine's before (``os.cpu_count()``); at least 1."""
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return count or 1


def ladder_seconds(value: float | None, default: float, what: str) -> float:
    """A step of the stop ladder for one task (``grace_period``, ``term_grace_period``):
    ``default`` (the pool's) for ``None``, else ``value`` checked as seconds >= 0."""
    return default if value is None else check_seconds(value, what)


def future_done(
    future: concurrent.futures.Future[Any],
) -> Callable[[Callable[[], object]], None]:
    """The ``when_done`` of :func:`cancelflow._async.wait_for_callback` for a
    :class:`concurrent.futures.Future`:
    done when it is (a result, an exception, or cancelled)."""

    def when_done(callback: Callable[[], object]) -> None:
        future.add_done_callback(lambda _: callback())

    return when_done
