"""Signals: the one guarded way cancelflow signals a process, and parent-death signals."""

from __future__ import annotations

import os
import signal

from ._flavour import FLAVOUR
from ._libc import libc as _libc

__all__ = ("UnsafeSignalTarget", "send_signal", "set_parent_death_signal")

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send ``signum`` to this process when its parent dies; return
    whether it will (only the ``"linux"`` flavour has this)."""
    if FLAVOUR != "linux" or _libc is None:
        return False
    return bool(_libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)


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
