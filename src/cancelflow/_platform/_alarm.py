"""A thread's sleep until a deadline that other threads can bring forward without waking it.

``"linux"``: a ``timerfd`` on ``CLOCK_MONOTONIC`` (the clock of ``time.monotonic()``).
The sleeping thread blocks reading it; setting its expiry is one short system call that
wakes nobody until the new time comes. So a thread that schedules an earlier deadline
(the grace timer of a task it just cancelled) does not wake the sleeper now, and the
sleeper does not take the GIL from the threads that the cancel is about to release.

Elsewhere :data:`HAVE_ALARM` is ``False``: a caller wakes its sleeper at once instead
(``_timer`` uses a futex word there).

The descriptor is a process's own: a forked child must not use its parent's (they share
one timer), so the owner drops it in the child and opens another.
"""

from __future__ import annotations

import ctypes
import os
import time

from ._flavour import FLAVOUR
from ._libc import libc_keeping_gil as _libc

__all__ = ("HAVE_ALARM", "alarm_open", "alarm_set", "alarm_wait")

_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1
#: seconds on the monotonic clock from which a deadline counts as never (a ``long`` of
#: seconds holds less than 2**63; nothing that far comes within the life of a process)
_NEVER = float(2**62)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _probe() -> bool:
    if FLAVOUR != "linux" or _libc is None:
        return False
    try:
        _libc.timerfd_create.restype = ctypes.c_int
        _libc.timerfd_settime.restype = ctypes.c_int
    except AttributeError:
        return False
    return True


#: whether :func:`alarm_open` works here (``"linux"`` with a C library that has timerfd)
HAVE_ALARM: bool = _probe()


def alarm_open() -> int:
    """A new alarm, disarmed: a descriptor closed on ``exec``, for the caller to close.

    Raises:
        OSError: the kernel refused (no descriptors left...).
    """
    assert _libc is not None
    fd = int(_libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_CLOEXEC))
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return fd


def alarm_set(fd: int, deadline: float) -> None:
    """Make the alarm ``fd`` go off at ``deadline`` (``time.monotonic()`` clock) instead of
    whenever it was set for: at once for a deadline already passed, never for
    ``math.inf`` (or one beyond 2**62 s). An expiry not read yet is dropped. Never blocks, keeps the GIL and
    takes no lock, so it is safe in a signal handler; a closed descriptor fails quietly.
    """
    assert _libc is not None
    spec = _Itimerspec()
    if deadline >= _NEVER:
        pass  # all zero: disarmed (a deadline this far would wrap the C field)
    elif deadline <= time.monotonic():
        spec.it_value.tv_nsec = 1  # an absolute time long past: now
    else:
        whole = int(deadline)
        spec.it_value.tv_sec = whole
        spec.it_value.tv_nsec = max(1, min(int((deadline - whole) * 1e9), 999_999_999))
    _libc.timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None)


def alarm_wait(fd: int) -> None:
    """Block (the GIL released) until the alarm ``fd`` goes off, then consume that."""
    os.read(fd, 8)
