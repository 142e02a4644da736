"""Wait on a 32-bit word in (possibly shared) memory until another thread or process
changes it: the ``futex`` system call on Linux, a bounded sleep-and-recheck elsewhere."""

from __future__ import annotations

import ctypes
import platform
import time

from ._libc import libc as _libc

__all__ = ("HAVE_FUTEX", "futex_wait", "futex_wake")

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_INT_MAX = 2**31 - 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "i686": 240, "armv7l": 240}.get(platform.machine())
#: longest single futex wait (one day); a longer ``timeout`` just returns early
_MAX_WAIT = 86_400.0


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


HAVE_FUTEX: bool = _libc is not None and _SYS_FUTEX is not None


def futex_wait(address: int, expected: int, timeout: float | None) -> None:
    """Block while the 32-bit word at ``address`` equals ``expected``, at most ``timeout`` s.

    May return early (a signal, a spurious wake-up, a change that was undone, or a
    ``timeout`` over one day): the caller re-reads the word and decides whether to wait
    again. Never raises for those.
    Safe from any thread; the GIL is released while blocked, and a signal makes it return
    so that Python runs the handler.
    """
    if HAVE_FUTEX:
        assert _libc is not None
        assert _SYS_FUTEX is not None
        if timeout is None:
            ts_ptr = None
        else:
            # Clamped: a timespec the kernel rejects (huge or NaN) would make the call
            # return at once, and a caller looping until its deadline would spin.
            seconds = min(max(timeout, 0.0), _MAX_WAIT) if timeout == timeout else 0.0
            whole = int(seconds)
            ts = _Timespec(whole, min(int((seconds - whole) * 1e9), 999_999_999))
            ts_ptr = ctypes.byref(ts)
        _libc.syscall(
            _SYS_FUTEX,
            ctypes.c_void_p(address),
            _FUTEX_WAIT,
            ctypes.c_uint32(expected & 0xFFFFFFFF),
            ts_ptr,
            None,
            0,
        )
        return
    # Fallback: a bounded sleep; the caller loops and re-reads the word.
    time.sleep(0.005 if timeout is None else min(max(timeout, 0.0), 0.005))


def futex_wake(address: int) -> None:
    """Wake every thread, in every process, blocked in :func:`futex_wait` on ``address``.

    Never blocks and takes no lock, so it is safe in a signal handler.
    """
    if HAVE_FUTEX:
        assert _libc is not None
        assert _SYS_FUTEX is not None
        _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAKE, _INT_MAX, None, None, 0)
