"""Wait on a 32-bit word in memory until another thread (or process) changes it.

``"linux"``: the ``futex`` system call through :mod:`ctypes`, with the GIL released; a
wake reaches waiters in every process that maps the word.

Elsewhere: a *parking lot* per process. A waiter parks a locked :class:`threading.Lock`
under the word's address, re-reads the word, and blocks acquiring the lock again;
:func:`futex_wake` releases every lock parked under that address. Event-driven (no
polling), and a wake never blocks, but it reaches this process only: what crosses
processes there is :mod:`._doorbell`'s job (a chunk's hub wakes its process's waiters).
"""

from __future__ import annotations

import ctypes
import threading

from ._flavour import FLAVOUR, FUTEX_SYSCALL
from ._fork import at_fork
from ._libc import libc as _libc, libc_keeping_gil as _libc_keeping_gil

__all__ = ("HAVE_FUTEX", "futex_bump", "futex_wait", "futex_wake")

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_FUTEX_WAKE_OP = 5
#: FUTEX_WAKE_OP's operation: add 1 to the word (FUTEX_OP_ADD << 28 | oparg 1 << 12);
#: its comparison (== 0) only decides a second wake-up, of nobody (val2 = 0)
_ADD_ONE = (1 << 28) | (1 << 12)
_INT_MAX = 2**31 - 1
#: longest single wait (one day); a longer ``timeout`` just returns early
_MAX_WAIT = 86_400.0

#: whether waits and wakes use the kernel's futex, and so also cross processes
HAVE_FUTEX: bool = FLAVOUR == "linux"


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _clamp(timeout: float) -> float:
    # A NaN or huge timeout would make the kernel (or Lock.acquire) refuse it at once, and
    # a caller looping until its deadline would spin.
    return min(max(timeout, 0.0), _MAX_WAIT) if timeout == timeout else 0.0


def futex_wait(address: int, expected: int, timeout: float | None) -> None:
    """Block while the 32-bit word at ``address`` equals ``expected``, at most ``timeout`` s.

    May return early (a signal, a spurious wake-up, a change that was undone, or a
    ``timeout`` over one day): the caller re-reads the word and decides whether to wait
    again. Never raises for those.
    Safe from any thread; the GIL is released while blocked, and a signal makes it return
    (on POSIX) so that Python runs the handler.
    """
    if HAVE_FUTEX:
        assert _libc is not None
        if timeout is None:
            ts_ptr = None
        else:
            seconds = _clamp(timeout)
            whole = int(seconds)
            ts = _Timespec(whole, min(int((seconds - whole) * 1e9), 999_999_999))
            ts_ptr = ctypes.byref(ts)
        _libc.syscall(
            FUTEX_SYSCALL,
            ctypes.c_void_p(address),
            _FUTEX_WAIT,
            ctypes.c_uint32(expected & 0xFFFFFFFF),
            ts_ptr,
            None,
            0,
        )
        return
    lock = threading.Lock()
    lock.acquire()
    with _lot_lock:  # so that a list emptied and dropped by a leaving waiter is not joined
        _parked.setdefault(address, []).append(lock)  # before the word is read: see wake
    try:
        if ctypes.c_uint32.from_address(address).value != expected & 0xFFFFFFFF:
            return
        lock.acquire(True, -1 if timeout is None else _clamp(timeout))
    finally:
        with _lot_lock:
            parked = _parked.get(address)
            if parked is not None and lock in parked:
                parked.remove(lock)
                if not parked:
                    del _parked[address]


def futex_wake(address: int) -> None:
    """Wake every thread blocked in :func:`futex_wait` on ``address``: in every process
    with the kernel's futex, in this one with the parking lot.

    Never blocks and takes no lock (releasing a parked lock does not wait), so it is safe
    in a signal handler.
    """
    if HAVE_FUTEX:
        # Keeps the GIL: a wake never blocks, and letting a busy thread take the GIL here
        # could make this caller (a cancel()) wait a whole switch interval to go on.
        assert _libc_keeping_gil is not None
        _libc_keeping_gil.syscall(
            FUTEX_SYSCALL, ctypes.c_void_p(address), _FUTEX_WAKE, _INT_MAX, None, None, 0
        )
        return
    for lock in tuple(_parked.get(address, ())):
        try:
            lock.release()
        except RuntimeError:
            pass  # woken already


def futex_bump(address: int) -> None:
    """Add 1 to the 32-bit word at ``address`` and wake every thread blocked in
    :func:`futex_wait` on it, in every process: one atomic step of the kernel
    (``FUTEX_WAKE_OP``), so that several threads and processes may bump one word without
    losing a change, and a waiter that read the word before the bump never sleeps through
    it. ``"linux"`` only (the word must be in memory shared by those processes).

    Never blocks and takes no lock. An address that is not mapped any more fails quietly.
    """
    assert _libc_keeping_gil is not None  # ("linux" only)
    _libc_keeping_gil.syscall(
        FUTEX_SYSCALL,
        ctypes.c_void_p(address),
        _FUTEX_WAKE_OP,
        _INT_MAX,
        None,  # val2: how many to wake on the second word (the same word): none more
        ctypes.c_void_p(address),
        _ADD_ONE,
    )


def wake_all_parked() -> None:
    """Wake every thread parked in this process (each re-reads its word): what a hub
    does when another process rings its chunk's doorbell."""
    for address in tuple(_parked):
        futex_wake(address)


#: address -> locks of the threads parked on it (the parking lot; unused with futex)
_parked: dict[int, list[threading.Lock]] = {}
#: serialises parking and leaving (never taken by a wake); re-entrant for a signal
#: handler that waits while its thread was parking
_lot_lock = threading.RLock()


def _after_fork_in_child() -> None:
    global _lot_lock, _parked
    _lot_lock = threading.RLock()  # another thread may have held it at the fork
    _parked = {}  # the parked threads are the parent's


at_fork(after_in_child=_after_fork_in_child)
