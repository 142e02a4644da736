"""What every pool's ``submit_task`` / ``run_sync`` repeat: checking the call and the stop
ladder's seconds, and awaiting a task from asyncio.

Package-internal: for the pools (``_thread_pool``, ``_process._pool``). The public signatures stay each pool's own (they
differ: ``term_grace_period``, ``interrupt_on_cancel``, ``run_in``), and so do the checks
whose wording differs between pools; what is here is said the same way everywhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from ._token import CancellationToken
from ._validate import check_seconds

__all__ = ("await_or_stop", "check_call", "future_done", "ladder_seconds", "loop_future")

T = TypeVar("T")


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


def ladder_seconds(value: float | None, default: float, what: str) -> float:
    """A step of the stop ladder for one task (``grace_period``, ``term_grace_period``):
    ``default`` (the pool's) for ``None``, else ``value`` checked as seconds >= 0."""
    return default if value is None else check_seconds(value, what)


def loop_future(when_done: Callable[[Callable[[], object]], object]) -> asyncio.Future[None]:
    """A future of the running loop, set (to ``None``) once the work is done.

    ``when_done(callback)`` must call ``callback()`` once, from any thread, when the work
    is done (at once if it already is): e.g. ``lambda cb: future.add_done_callback(lambda
    _: cb())``. The loop is woken with ``call_soon_threadsafe``; if it is closed by then,
    nobody waits any more and nothing happens. Read the outcome from the work itself.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def on_done() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(settle)

    when_done(on_done)
    return done


def future_done(
    future: concurrent.futures.Future[Any],
) -> Callable[[Callable[[], object]], object]:
    """The ``when_done`` of :func:`loop_future` for a :class:`concurrent.futures.Future`:
    done when it is (a result, an exception, or cancelled)."""

    def when_done(callback: Callable[[], object]) -> None:
        future.add_done_callback(lambda _: callback())

    return when_done


async def await_or_stop(
    done: asyncio.Future[T], stop: Callable[[], object], *, wait_for_stop: bool
) -> T:
    """Await ``done`` (shielded) and return its result; if the awaiting task is cancelled
    first, stop the work behind it and re-raise the cancellation.

    ``stop()`` is called once, on the loop, when the awaiting task is cancelled. With
    ``wait_for_stop`` this then keeps waiting, through further cancels, until ``done`` is
    done (the stop is complete: nothing of the task runs any more; whatever ``done``
    ended with is dropped), and only then lets ``asyncio.CancelledError`` propagate.
    Without it, ``asyncio.CancelledError`` propagates at once.
    """
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        stop()
        if wait_for_stop:
            while not done.done():
                with contextlib.suppress(BaseException):
                    await asyncio.shield(done)
        raise
