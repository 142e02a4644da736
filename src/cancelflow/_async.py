"""Awaiting something another thread will finish, under asyncio or trio.

cancelflow's async entry points (``await token.wait()``, the pools' ``run_sync``,
:func:`cancelflow.to_thread.run_sync`, :func:`cancelflow.to_process.run_sync`) all wait
for the same thing: a callback that some other thread (a pool's worker or supervisor, a
token's canceller, a signal handler) calls once when the work is over. This module holds
that one wait, for the async library that runs the caller:

* **asyncio** (any loop, any thread): a future of the running loop, set through
  ``loop.call_soon_threadsafe``;
* **trio**: a :class:`trio.Event`, set through the run's ``TrioToken.run_sync_soon``
  (thread-safe, and safe from signal handlers).

anyio runs on one of the two, so its users get the same behaviour. trio is imported only
when a trio run is detected; nothing here requires it.

It also holds the library's one way to wait for an asyncio future without cancelling it
(:func:`shielded`, :func:`until_done`), used instead of ``asyncio.shield`` and
``asyncio.wait``: ``asyncio.run``'s Ctrl-C handler cancels the main task from inside the
signal handler, which Python runs between any two bytecodes of whatever is running, so
it can land inside those helpers' own callbacks, between their "is the outer future
done?" check and their ``set_result``: asyncio then logs an ``InvalidStateError`` traceback
(a program stopped with Ctrl-C printed one, rarely, on Python 3.11).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ("WhenDone", "running_trio", "shielded", "until_done", "wait_for_callback")

T = TypeVar("T")

#: ``when_done(callback)`` arranges for ``callback()`` to be called once, from any thread,
#: when the work is over (at once if it already is); it may return an ``undo`` callable
#: that cancels that arrangement (called when the wait ends).
WhenDone = Callable[[Callable[[], object]], "Callable[[], object] | None"]


async def until_done(future: asyncio.Future[Any], timeout: float | None = None) -> bool:
    """Wait until ``future`` is done, or ``timeout`` seconds passed; whether it is done.

    A cancel of the awaiting task ends the wait (``CancelledError``) and never reaches
    ``future``, whatever the moment, even from a signal handler; ``future`` is not read
    (an exception it holds is not raised, nor marked retrieved).
    """
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        # No "is it done?" check before the set: a signal handler may cancel the waiter
        # between the two; the set's own refusal is the check.
        with contextlib.suppress(asyncio.InvalidStateError):
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = None if timeout is None else loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        future.remove_done_callback(wake)
        if timer is not None:
            timer.cancel()
    return future.done()


async def shielded(aw: Awaitable[T]) -> T:
    """``await asyncio.shield(aw)``, safe from signal handlers (see the module's text).

    ``aw`` (a coroutine is wrapped in a task) runs on if the awaiting task is cancelled,
    which raises ``CancelledError`` here; otherwise its result is returned, or its
    exception raised.
    """
    future = asyncio.ensure_future(aw)
    await until_done(future)
    return future.result()


def running_trio() -> bool:
    """Whether the caller runs under trio (and not under an asyncio loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return False
    trio: Any = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


async def wait_for_callback(
    when_done: WhenDone,
    on_cancelled: Callable[[], object] | None = None,
    *,
    finish_after_cancel: bool = False,
) -> None:
    """Return once ``when_done``'s callback has been called; on asyncio or trio.

    If the awaiting task is cancelled first (``asyncio.CancelledError``, or trio's
    ``Cancelled``): ``on_cancelled()`` is called once, on the caller's thread; with
    ``finish_after_cancel`` the wait then goes on, shielded from further cancels, until
    the callback has been called (the work is over); then the cancellation propagates.

    Raises:
        RuntimeError: no asyncio loop and no trio run in this thread.
    """
    if running_trio():
        await _wait_trio(when_done, on_cancelled, finish_after_cancel)
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def on_done() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle)

    undo = when_done(on_done)
    try:
        await until_done(done)
    except asyncio.CancelledError:
        if on_cancelled is not None:
            on_cancelled()
        if finish_after_cancel:
            # Under anyio, a cancelled scope cancels its task again on every turn of the
            # loop until the task leaves it: shielded, it stops, and this wait sleeps
            # instead of spinning (which took the CPU from the threads finishing the work).
            with _anyio_shield():
                while not done.done():
                    with contextlib.suppress(BaseException):
                        await until_done(done)
        raise
    finally:
        if undo is not None:
            undo()


def _anyio_shield() -> contextlib.AbstractContextManager[Any]:
    """A shielded anyio cancel scope if anyio is in use (imported), else a no-op."""
    anyio: Any = sys.modules.get("anyio")
    if anyio is None:
        return contextlib.nullcontext()
    return anyio.CancelScope(shield=True)  # type: ignore[no-any-return]


async def _wait_trio(
    when_done: WhenDone, on_cancelled: Callable[[], object] | None, finish_after_cancel: bool
) -> None:
    trio: Any = sys.modules["trio"]
    event = trio.Event()
    run = trio.lowlevel.current_trio_token()

    def on_done() -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the run is over: nobody waits
            run.run_sync_soon(event.set)

    undo = when_done(on_done)
    try:
        await event.wait()
    except trio.Cancelled:
        if on_cancelled is not None:
            on_cancelled()
        if finish_after_cancel:
            with trio.CancelScope(shield=True):
                await event.wait()
        raise
    finally:
        if undo is not None:
            undo()
