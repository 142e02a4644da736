"""One timer thread per process for every token deadline.

:func:`call_at` schedules a callable at a ``time.monotonic()`` deadline and returns a
:class:`TimerHandle` whose :meth:`~TimerHandle.cancel` removes it at once (not lazily), so a
long-lived program that makes and drops many timeout tokens keeps no dead entries.

The thread starts with the first pending timer and ends as soon as none is pending, so an
idle program holds no cancelflow thread, unless it is held (:func:`hold`): a thread pool
holds it while open, so that the cancel of a running task (which schedules its grace
timer) never has to start a thread, a slow step when a busy task holds the GIL.
Callbacks run on the timer thread; one that
raises is logged and does not disturb the others.

Signal safety: :meth:`TimerHandle.cancel` takes no lock (it is reached from
``CancellationToken.cancel()``, which may run in a signal handler that interrupted this
very module). It removes the entry in one atomic step and wakes the timer thread through a
``futex`` on a private word; the timer thread never waits on a condition variable.

Where the platform has an *alarm* (``"linux"``: a timerfd, see ``_platform._alarm``), the
timer thread sleeps on it instead, and a new timer due before the thread would wake does
not wake it: :func:`call_at` brings the alarm forward (one short system call, no
wake-up). A cancel that schedules a grace timer then wakes no thread that would take the
GIL from the threads the cancel releases. The alarm's descriptor is opened with the first
timer thread and kept for the life of the process (a forked child opens its own).

Timers belong to the process that scheduled them: a forked child starts with none (the
parent's timers keep running in the parent, and a token's flag is shared, so a timeout
fired there is seen in the child).
"""

from __future__ import annotations

import collections
import ctypes
import heapq
import itertools
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable

from ._log import safe_log
from ._platform import (
    HAVE_ALARM,
    alarm_open,
    alarm_set,
    alarm_wait,
    at_fork,
    futex_wait,
    futex_wake,
)

__all__ = ("TimerHandle", "call_at", "hold", "pending", "wait_idle_end")

_lock = threading.Lock()  # taken by the timer thread only
_IDLE_RECHECK = 0.01  # seconds: see wait_idle_end
_heap: list[tuple[float, int]] = []
_entries: dict[int, Callable[[], object]] = {}
# Non-empty while the timer thread runs a callback: it is doing someone's work then (set
# before the callback leaves _entries, so that wait_idle_end never sees neither).
_calling: list[None] = []
_ids = itertools.count()
# New timers wait here until the timer thread moves them into the heap: call_at takes no
# lock, so a signal handler can schedule a timer while its thread is inside call_at.
_incoming: collections.deque[tuple[float, int]] = collections.deque()
# Holds one ticket while no timer thread runs; whoever pops it starts one.
_ticket: list[None] = [None]
# Bumped (and futex-woken) whenever the timer thread should look again.
_kicks = ctypes.c_uint32(0)
# When the timer thread wakes by itself at the latest (math.inf: not before a kick),
# written before it last looked at _incoming and went to sleep. A timer due no earlier
# needs no kick (see call_at): it is in _incoming when the thread wakes. (With an alarm,
# call_at goes by _alarm_at, which an earlier timer brings forward.)
_wakes_at = -math.inf
# The timer thread's alarm (see the module's docstring): its descriptor once open (-1:
# none, the futex word above is slept on), and the time it is set for (math.inf: never;
# written under _alarm_lock only, re-entrant so that a signal handler that interrupted
# its own thread inside _set_alarm can take it too).
_alarm_fd = -1
_alarm_at = math.inf
_alarm_lock = threading.RLock()
# A kick that would not wait for _alarm_lock is due (see _set_alarm).
_kick_missed = False
#: this interpreter runs with a GIL (free-threaded builds may run without one)
_GIL: bool = getattr(sys, "_is_gil_enabled", lambda: True)()
_kick_address = ctypes.addressof(_kicks)
# The holds that keep the timer thread running while no timer is pending (see hold()):
# added and discarded in one atomic step each, so no lock (a signal handler may release
# one while its thread is inside hold()).
_holds: set[TimerHold] = set()
# The timer thread last started (for wait_idle_end); it may have ended since.
_thread: threading.Thread | None = None


def _kick(*, wait: bool = True) -> None:
    """Make the timer thread look again now; ``wait=False``: unless that means waiting
    for another thread that is setting the alarm (then the thread looks when it wakes)."""
    _kicks.value = (_kicks.value + 1) & 0xFFFFFFFF
    if _alarm_fd >= 0:
        _set_alarm(-math.inf, earlier_only=True, wait=wait)  # now
    else:
        futex_wake(_kick_address)


def _set_alarm(deadline: float, *, earlier_only: bool, wait: bool = True) -> None:
    """Set the alarm for ``deadline`` (``earlier_only``: unless it goes off by then).

    Under ``_alarm_lock``; ``wait=False`` (a kick) does not wait for another thread
    that holds it: that thread sets the alarm to now once it gave the lock back. A
    signal handler that interrupts this in the same thread and brings the alarm forward
    is not undone: the set is repeated until ``_alarm_at`` says what was set last. (A
    handler runs only at a call or a backward jump, so none runs between the comparison
    with ``_alarm_at`` and the store to it.)
    """
    global _alarm_at, _kick_missed
    if not wait:
        # Said before the try: a holder that we fail to wait for reads it after it gave
        # the lock back, and kicks for us.
        _kick_missed = True
    lock = _alarm_lock  # (the one released below, even if a fork in between made another)
    if not lock.acquire(blocking=wait):
        return
    if not wait:
        _kick_missed = False  # (this is that kick: a later miss is seen after the release)
    try:
        if earlier_only and deadline >= _alarm_at:
            return
        _alarm_at = deadline
        while True:
            alarm_set(_alarm_fd, deadline)
            if _alarm_at == deadline:
                return
            deadline = _alarm_at
    finally:
        lock.release()
        if _kick_missed:
            _kick_missed = False
            _set_alarm(-math.inf, earlier_only=True, wait=False)


class TimerHandle:
    """A scheduled callback; :meth:`cancel` unschedules it (idempotent)."""

    __slots__ = ("_id",)

    def __init__(self, ident: int) -> None:
        self._id = ident

    def cancel(self) -> bool:
        """Unschedule; return ``True`` if the callback had not run yet.

        Lock-free and safe from any thread or a signal handler.
        """
        removed = _entries.pop(self._id, None) is not None
        if removed and (not _holds or len(_heap) + len(_incoming) > 2 * len(_entries) + 16):
            # The timer thread drops the entry and ends if nothing is left. A held one
            # stays anyway: it drops the entry when it wakes (by its due time at the
            # latest), so a task's stop that cancels its timer wakes no thread that
            # would take the GIL from its caller; only a heap grown mostly dead is
            # worth a kick (made and dropped timeout tokens: see _next_due).
            # Never a wait for the alarm's lock: a token's finalizer cancels its timer
            # wherever the token is freed, maybe inside a lock that the thread setting
            # the alarm waits for (its own alarm_set may free a token): a deadlock. This
            # kick is never urgent (the thread drops the entry when it wakes).
            _kick(wait=False)
        return removed


def call_at(deadline: float, callback: Callable[[], object]) -> TimerHandle:
    """Run ``callback`` on the timer thread at ``deadline`` (``time.monotonic()`` clock).

    Lock-free (each step is one atomic operation under the GIL), so it is safe from any
    thread and from a signal handler that interrupted a ``call_at`` in progress.
    """
    ident = next(_ids)
    _entries[ident] = callback
    _incoming.append((deadline, ident))
    try:
        _ticket.pop()
    except IndexError:
        # A timer thread runs. It wakes by itself by _wakes_at (or the alarm's
        # _alarm_at), which it wrote before it last looked at _incoming: if it did not see
        # this entry, it wakes in time for it, or is kicked (its alarm brought forward)
        # here. (So a timeout token made while an earlier timer is pending wakes no
        # thread that would take the GIL from this one, and with an alarm, neither does
        # an earlier one.) Each side writes, then reads the other's write: that takes
        # the order the GIL gives; without a GIL, always kick.
        if not _GIL:
            _kick()
        elif _alarm_fd >= 0:
            if deadline < _alarm_at:
                _set_alarm(deadline, earlier_only=True)
        elif deadline < _wakes_at:
            _kick()
    else:
        _start()
    return TimerHandle(ident)


class TimerHold:
    """Keeps the timer thread running while no timer is pending, until :meth:`release`."""

    __slots__ = ("__weakref__",)

    def release(self) -> None:
        """Let the timer thread end once nothing else holds it and no timer is pending.
        Idempotent, lock-free, safe from any thread and from a signal handler."""
        if self in _holds:
            _holds.discard(self)
            # (never a wait for the alarm's lock: a pool's finalizer releases its hold
            # wherever the pool is freed; see TimerHandle.cancel)
            _kick(wait=False)  # an idle timer thread looks again, and ends if it may


def hold(owner: object | None = None) -> TimerHold:
    """Start the timer thread now if it does not run, and keep it running (idle, asleep on
    its futex) until the returned hold is released; scheduling a timer then never starts
    a thread. With ``owner``, the hold is also released when ``owner`` is collected (a
    pool dropped without a shutdown). Lock-free; starting the thread takes
    :mod:`threading`'s own locks."""
    held = TimerHold()
    _holds.add(held)
    if owner is not None:
        weakref.finalize(owner, held.release)
    try:
        _ticket.pop()
    except IndexError:
        pass  # a timer thread runs; it sees the hold before it could leave
    else:
        _start()
    return held


def _start() -> None:
    """Start a timer thread (the caller popped the ticket)."""
    global _thread, _alarm_fd
    if HAVE_ALARM and _alarm_fd < 0:
        try:
            _alarm_fd = alarm_open()
        except OSError:  # (no descriptor left): the futex word does
            pass
    _thread = thread = threading.Thread(target=_run, name="cancelflow-timer", daemon=True)
    thread.start()


def wait_idle_end() -> None:
    """Wait for the timer thread to end, for as long as nothing keeps it: no hold, no
    pending timer and no callback running (it ends soon after the last one goes).
    Returns at once when none runs, when it is the calling thread, or as soon as a hold,
    a timer or a running callback appears (the thread is then another part of the
    program's, not the caller's to wait for: a callback may even wait for a lock the
    caller holds)."""
    thread = _thread
    if thread is None or thread is threading.current_thread():
        return
    while thread.is_alive() and not _holds and not _entries and not _calling:
        # Returns as soon as the thread ends; the bound only re-reads the conditions,
        # which a lock-free call_at or hold may change without telling anyone.
        thread.join(_IDLE_RECHECK)


def pending() -> int:
    """How many timers are scheduled (for tests and statistics)."""
    return len(_entries)


def _next_due() -> tuple[Callable[[], object] | None, float | None]:
    """Under ``_lock``: pop a due callback (and ``0.0``), or say until when to sleep
    (a deadline; ``None``: no timer)."""
    while _incoming:
        heapq.heappush(_heap, _incoming.popleft())
    while _heap and _heap[0][1] not in _entries:
        heapq.heappop(_heap)
    if len(_heap) > 2 * len(_entries) + 16:
        _heap[:] = [item for item in _heap if item[1] in _entries]
        heapq.heapify(_heap)
    if not _heap:
        return None, None
    deadline, ident = _heap[0]
    if deadline > time.monotonic():
        return None, deadline
    heapq.heappop(_heap)
    _calling.append(None)  # (see _calling: before the entry goes)
    callback = _entries.pop(ident, None)
    if callback is None:  # cancelled meanwhile
        _calling.clear()
    return callback, 0.0


def _sleep(deadline: float, seen: int) -> None:
    """Sleep until ``deadline`` (``math.inf``: a kick), unless a timer arrived or a kick
    came since the loop read ``seen``; may return early."""
    global _wakes_at
    _wakes_at = deadline
    fd = _alarm_fd
    if fd >= 0:
        # Set first, then look: the set drops an expiry not read yet (a kick's), and a
        # kick or an earlier timer from now on sets the alarm after this.
        _set_alarm(deadline, earlier_only=False)
        if not _incoming and _kicks.value == seen:
            alarm_wait(fd)
        return
    if _incoming:  # (after _wakes_at: see call_at)
        return
    if deadline == math.inf:
        futex_wait(_kick_address, seen, None)
        return
    delay = deadline - time.monotonic()
    if delay > 0:
        futex_wait(_kick_address, seen, delay)


def _run() -> None:
    while True:
        seen = _kicks.value  # read before looking, so a later kick cannot be missed
        with _lock:
            callback, until = _next_due()
        if until is None and _holds:
            _sleep(math.inf, seen)  # held: idle until a kick
            continue
        if until is None:
            _ticket.append(None)  # we are leaving: the next call_at starts a thread
            if not _incoming and not _holds:
                return
            try:  # a timer or a hold arrived while we were leaving: stay if we can
                _ticket.pop()
            except IndexError:
                return  # ...or another thread already took over
            continue
        if callback is None:
            _sleep(until, seen)
            continue
        try:
            callback()
        except Exception as exc:  # noqa: BLE001 - one timer must not stop the others
            safe_log("ERROR", "timer callback raised", exception=exc)
        finally:
            _calling.clear()
        del callback


def _after_fork_in_child() -> None:
    global _lock, _ticket, _thread, _wakes_at, _alarm_fd, _alarm_at, _alarm_lock, _kick_missed
    _wakes_at = -math.inf
    if _alarm_fd >= 0:  # the parent's timer too: setting it would move the parent's
        os.close(_alarm_fd)
        _alarm_fd = -1
    _alarm_at = math.inf
    _alarm_lock = threading.RLock()
    _kick_missed = False
    _lock = threading.Lock()  # another thread may have held it at the fork
    _holds.clear()  # the holders' threads (pools) do not survive a fork either
    _ticket = [None]  # the timer thread does not survive a fork
    _thread = None
    _heap.clear()
    _incoming.clear()
    _entries.clear()
    _calling.clear()


at_fork(after_in_child=_after_fork_in_child)
