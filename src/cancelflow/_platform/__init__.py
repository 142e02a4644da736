"""Operating-system primitives that cancelflow needs, behind one small surface.

Everything that depends on the kernel lives here, so the rest of the package never
checks ``sys.platform`` itself:

* :func:`futex_wait` / :func:`futex_wake`: block on a 32-bit word in (possibly shared)
  memory until another thread or process changes it. On Linux this is the ``futex``
  system call, used through :mod:`ctypes` with the GIL released, so a wait wakes as
  soon as the word changes, in whatever process the change is made. Elsewhere a
  documented fallback sleeps in short, growing steps (up to 5 ms) and re-reads the word.
* :func:`set_child_subreaper`: make this process adopt orphaned descendants, so that a
  killed task's grandchildren can be reaped here instead of becoming zombies of a PID 1
  that never reaps (containers). A no-op returning ``False`` where unsupported.
* :func:`pidfd_open`: a file descriptor that becomes readable when a process exits, for
  event-driven confirmation that a worker is gone. ``None`` where unsupported.
* :func:`send_signal`: the one place cancelflow signals a process. It refuses targets that
  can only be a bug (pid 0 or below, which mean process groups; pid 1; this process; its
  process group's leader), so a stale or unset pid can never stop the owner.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import signal
import sys
import time

__all__ = (
    "HAVE_FUTEX",
    "descendants",
    "futex_wait",
    "futex_wake",
    "UnsafeSignalTarget",
    "children",
    "pidfd_open",
    "send_signal",
    "set_child_subreaper",
    "signal_name",
    "set_parent_death_signal",
)

_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
_INT_MAX = 2**31 - 1
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "i686": 240, "armv7l": 240}.get(platform.machine())
_PR_SET_CHILD_SUBREAPER = 36
#: longest single futex wait (one day); a longer ``timeout`` just returns early
_MAX_WAIT = 86_400.0


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_libc = _load_libc()
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


def set_child_subreaper(enabled: bool = True) -> bool:
    """Make this process the reaper of its orphaned descendants; return whether it worked."""
    if _libc is None:
        return False
    return bool(_libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) == 0)


def pidfd_open(pid: int) -> int | None:
    """Return a descriptor that is readable once ``pid`` has exited, or ``None``.

    ``None`` means the platform has no pidfd or the process is already gone
    (``ESRCH``); the caller then falls back to ``waitpid``.
    """
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOSYS, errno.EPERM):
            return None
        raise
    return fd


_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies."""
    if _libc is None:
        return False
    return bool(_libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first, then theirs), or ``[]``.

    Reads ``/proc/<pid>/task/*/children`` where the kernel has it (cheap: no scan of
    every process); otherwise asks psutil. A process that exits meanwhile is skipped.
    """
    found: list[int] = []
    frontier = [pid]
    seen = {pid}
    while frontier:
        parent = frontier.pop()
        for child in _children_of(parent):
            if child not in seen:
                seen.add(child)
                found.append(child)
                frontier.append(child)
    return found


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (zombies included), or ``[]``."""
    return _children_of(pid)


def _children_of(pid: int) -> list[int]:
    task_dir = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return _children_psutil(pid)
    result: list[int] = []
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/children", "rb") as handle:
                result.extend(int(x) for x in handle.read().split())
        except FileNotFoundError:
            continue  # the thread exited
        except OSError:
            return _children_psutil(pid)
    return result


def _children_psutil(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.Error:
        return []


class UnsafeSignalTarget(ValueError):
    """:func:`send_signal` was asked to signal a process it must never signal."""


_SIGNAL_NAMES: dict[int, str] = {int(sig): sig.name for sig in signal.Signals}


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, for messages; the number as text if it has no name."""
    return _SIGNAL_NAMES.get(signum, str(signum))


def send_signal(pid: int, signum: int) -> bool:
    """Send ``signum`` to the one process ``pid``; ``False`` if it no longer exists.

    Refuses, with :class:`UnsafeSignalTarget` and nothing sent: ``pid <= 1`` (0 and
    negative numbers address process groups, 1 is init), this process, and the leader of
    this process's group. Those can only come from a bug (a pid not yet known, a stale
    one); signalling them would stop or kill the program that owns the pool.
    """
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise UnsafeSignalTarget(f"refusing to send signal {signum} to {pid!r}: not a pid")
    if pid <= 1 or pid == os.getpid() or pid == os.getpgrp():
        name = signal_name(signum)
        raise UnsafeSignalTarget(
            f"refusing to send {name} to pid {pid}: it would reach "
            + ("a process group or init" if pid <= 1 else "this process or its group")
        )
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # the pid was reused by a process that is not ours
    return True
