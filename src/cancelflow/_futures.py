"""What the pools' futures need of :class:`concurrent.futures.Future` beyond its public methods.

Package-internal: for the pools' futures (``_thread_pool``, ``_process._task``).
Everything else about a future goes through its public methods (``done()``,
``running()``, ``cancelled()``, ``set_result()``, ``set_exception()``, ``cancel()``).
These few helpers are the only place that touches the stdlib's private fields
(``_condition``, ``_state``, ``_result``, ``_exception``, ``_waiters``,
``_invoke_callbacks``), for four reasons the public methods cannot meet:

* **A task's own state changes together with its future's.** A pool keeps a task's fate
  (and whether it was claimed, dropped, returned) consistent with the future's state by
  changing both under the future's own re-entrant lock (:func:`lock`). The public
  ``set_result()`` / ``set_exception()`` run the done-callbacks before returning, so they
  cannot be called under that lock (a callback that waits for a thread that reads the
  future would deadlock), and calling them after it would let a racing cancel slip in
  between. So :func:`settle_locked` resolves under the lock and :func:`run_callbacks`
  runs the callbacks once it is released, as the stdlib itself does.
* **Starting a task is on every task's path.** :func:`start_locked` marks a future
  running with one test of its state under the lock the caller already holds;
  ``set_running_or_notify_cancel()`` plus the checks around it took the lock three times.
* **A running task's future can be cancelled.** ``Future.cancel()`` refuses a running
  future; a pool's ``cancel()`` does not.
* **A process task's caller can be woken by its worker.** A thread blocked in a process
  task's ``result()`` may sleep on a futex word its worker bumps instead of on the
  condition (see ``Supervisor.wait_on_worker``); :func:`sleepers` makes the condition
  bump those words too, whatever changes the future's state.
* **The cancel path must be safe in a signal handler.** ``Future.cancel()`` and
  ``set_exception()`` call each waiter directly, and ``as_completed()`` holds its
  waiter's plain lock for a moment in the caller's thread: a signal handler landing
  there that cancels one of its futures would wait for itself (see
  ``tests/test_thread_pool_contract.py``). ``settle_locked(..., signal_safe=True)`` hands
  such a call to the timer thread instead (:func:`_notify_waiter`).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any, TypeVar

from . import _timer
from ._platform import futex_bump

__all__ = (
    "PoolFuture",
    "done_locked",
    "has_callbacks",
    "held_here",
    "lock",
    "run_callbacks",
    "running_locked",
    "settle_locked",
    "sleepers",
    "start_locked",
)

T = TypeVar("T")
#: the states of a future that ``done()`` reports done
_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))


class PoolFuture(Future[T]):
    """The base of the pools' futures: a stdlib future whose :meth:`result` raises the
    task's exception even when that exception is false in a boolean context.

    (On CPython 3.11 and 3.12 the stdlib's ``result()`` tests the exception's truth, so
    one whose ``__bool__`` or ``__len__`` says false made it return ``None``, the error
    silently lost; later versions test ``is not None``, as this does.)
    """

    def _Future__get_result(self) -> T:  # the stdlib's private helper behind result()
        error = self._exception
        if error is not None:
            try:
                raise error
            finally:
                del error, self  # no cycle through the traceback's frame
        return self._result  # type: ignore[return-value]


def lock(future: Future[Any]) -> threading.RLock:
    """The re-entrant lock under the future's own condition: what its methods take.

    Held, it makes a pool's change of its task's state atomic with the future's. (The
    lock itself, not the condition: a ``with`` on a ``threading.Condition`` runs its
    ``__enter__`` and ``__exit__`` in Python, and this is on every task's path.)
    """
    return future._condition._lock  # type: ignore[attr-defined,no-any-return]


def held_here(future: Future[Any]) -> bool:
    """Whether the calling thread holds :func:`lock` of ``future`` (a signal handler may
    run inside code that does: it must not then wait for anything that needs it)."""
    return bool(future._condition._is_owned())  # type: ignore[attr-defined]


def start_locked(future: Future[Any]) -> bool:
    """Mark a pending future running (what ``set_running_or_notify_cancel`` does for a
    pending one); ``False`` if it is not pending any more (cancelled, failed or already
    running). The caller holds :func:`lock`, under which it also records the start in its
    own state. One test of the state: this is on every task's path, and the public
    methods would take the lock three times."""
    if future._state != PENDING:
        return False
    future._state = RUNNING
    return True


def running_locked(future: Future[Any]) -> bool:
    """``future.running()`` for a caller that holds :func:`lock` (one test of the state
    instead of a method that takes the lock again through the condition's Python
    ``__enter__``: this is on every cancel's path)."""
    return bool(future._state == RUNNING)


def done_locked(future: Future[Any]) -> bool:
    """``future.done()`` for a caller that holds :func:`lock` (see :func:`running_locked`)."""
    return bool(future._state in _DONE)


def settle_locked(
    future: Future[Any],
    *,
    result: object = None,
    exception: BaseException | None = None,
    cancelled: bool = False,
    signal_safe: bool = False,
) -> None:
    """Resolve a future that is not done: cancelled, else with ``exception``, else with
    ``result``; wake its waiters and whoever blocks in ``result()``.

    The caller holds :func:`lock` and runs :func:`run_callbacks` after releasing it.
    ``signal_safe``: on the cancel path, which may run in a signal handler, a waiter whose
    lock is taken is notified from the timer thread instead of waited for.
    """
    if cancelled:
        future._state = CANCELLED_AND_NOTIFIED
        method = "add_cancelled"
    elif exception is not None:
        future._exception = exception
        future._state = FINISHED
        method = "add_exception"
    else:
        future._result = result
        future._state = FINISHED
        method = "add_result"
    for waiter in future._waiters:
        if signal_safe:
            _notify_waiter(waiter, method, future)
        else:
            getattr(waiter, method)(future)
    future._condition.notify_all()


def sleepers(future: Future[Any]) -> list[int]:
    """The addresses of the futex words that threads blocked in ``future``'s ``result()``
    sleep on instead of its condition (the caller holds :func:`lock`, and adds or removes
    its own address): every ``notify_all()`` of the condition bumps each of them
    (:func:`futex_bump`), so any change of the future's state wakes those threads, as it
    wakes the condition's waiters. Set up on first use, under the lock that every
    ``notify_all()`` of a future holds: a future nobody sleeps on that way costs nothing
    more. ``"linux"`` only (futex)."""
    condition: Any = future._condition
    words: list[int] | None = condition.__dict__.get("_cf_sleepers")
    if words is None:
        words = condition._cf_sleepers = []
        # (the condition through a weak reference: no cycle through its own __dict__)
        condition.notify_all = functools.partial(
            _notify_all_and_bump, type(condition).notify_all, weakref.ref(condition), words
        )
    return words


def _notify_all_and_bump(
    notify_all: Callable[[Any], None], condition: weakref.ref[Any], words: list[int]
) -> None:
    target = condition()
    if target is not None:
        notify_all(target)
    for address in words:
        futex_bump(address)


def has_callbacks(future: Future[Any]) -> bool:
    """Whether ``future`` has done-callbacks to run (once resolved, no more are added:
    ``add_done_callback`` then runs the callback at once)."""
    return bool(future._done_callbacks)  # type: ignore[attr-defined]


def run_callbacks(future: Future[Any]) -> None:
    """Run the done-callbacks of a future :func:`settle_locked` resolved (lock released)."""
    future._invoke_callbacks()  # type: ignore[attr-defined]


def _notify_waiter(waiter: Any, method: str, future: Future[Any]) -> None:
    """Call ``waiter.<method>(future)`` for a ``concurrent.futures`` waiter, from the
    cancel path, without ever waiting on a lock the interrupted frame of this thread holds.

    ``as_completed()`` holds its waiter's plain lock for a moment in the caller's thread;
    a signal handler landing there that cancels one of the futures would otherwise wait
    for itself. If the waiter's lock is free, nobody in this thread holds it (a handler
    returns before the frame it interrupted resumes), so the call is made here, waiting
    at most for another thread; if it is taken, the call is handed to the timer thread.
    """
    waiter_lock = getattr(waiter, "lock", None)
    if waiter_lock is not None:
        if not waiter_lock.acquire(blocking=False):
            _timer.call_at(0.0, functools.partial(getattr(waiter, method), future))
            return
        waiter_lock.release()
    getattr(waiter, method)(future)
