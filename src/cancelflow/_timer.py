"""One timer thread per process for every token deadline.

:func:`call_at` schedules a callable at a ``time.monotonic()`` deadline and returns a
:class:`TimerHandle` whose :meth:`~TimerHandle.cancel` removes it at once (not lazily), so a
long-lived program that makes and drops many timeout tokens keeps no dead entries.

The thread starts with the first pending timer and ends as soon as none is pending, so an
idle program holds no cancelflow thread. Callbacks run on the timer thread; one that
raises is logged and does not disturb the others.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

from ._log import safe_log

__all__ = ("TimerHandle", "call_at", "pending")

_lock = threading.Condition(threading.Lock())
_heap: list[tuple[float, int]] = []
_entries: dict[int, Callable[[], object]] = {}
_ids = itertools.count()
_running = False


class TimerHandle:
    """A scheduled callback; :meth:`cancel` unschedules it (idempotent)."""

    __slots__ = ("_id",)

    def __init__(self, ident: int) -> None:
        self._id = ident

    def cancel(self) -> bool:
        """Unschedule; return ``True`` if the callback had not run yet."""
        with _lock:
            removed = _entries.pop(self._id, None) is not None
            if removed and len(_heap) > 2 * len(_entries) + 16:
                _heap[:] = [item for item in _heap if item[1] in _entries]
                heapq.heapify(_heap)
            _lock.notify()
        return removed


def call_at(deadline: float, callback: Callable[[], object]) -> TimerHandle:
    """Run ``callback`` on the timer thread at ``deadline`` (``time.monotonic()`` clock)."""
    global _running
    with _lock:
        ident = next(_ids)
        _entries[ident] = callback
        heapq.heappush(_heap, (deadline, ident))
        if not _running:
            _running = True
            threading.Thread(target=_run, name="cancelflow-timer", daemon=True).start()
        else:
            _lock.notify()
    return TimerHandle(ident)


def pending() -> int:
    """How many timers are scheduled (for tests and statistics)."""
    with _lock:
        return len(_entries)


def _run() -> None:
    global _running
    while True:
        with _lock:
            while True:
                while _heap and _heap[0][1] not in _entries:
                    heapq.heappop(_heap)
                if not _heap:
                    _running = False
                    return
                deadline, ident = _heap[0]
                delay = deadline - time.monotonic()
                if delay <= 0:
                    heapq.heappop(_heap)
                    callback = _entries.pop(ident)
                    break
                _lock.wait(delay)
        try:
            callback()
        except Exception as exc:  # noqa: BLE001 - one timer must not stop the others
            safe_log("ERROR", "timer callback raised", exception=exc)
