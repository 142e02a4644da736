"""Signals: the one guarded way cancelflow signals a process, and parent-death signals."""

from __future__ import annotations

import os
import signal
import threading

from ._flavour import FLAVOUR
from ._libc import libc as _libc

__all__ = (
    "UnsafeSignalTarget",
    "prepare_parent_death_signals",
    "send_signal",
    "set_parent_death_signal",
)

_PR_SET_PDEATHSIG = 1


def prepare_parent_death_signals() -> None:
    """Let the children this process forks from now on ask for a parent-death signal.

    Call it in the parent before it forks them. ``"linux"``: nothing to do (``prctl``).
    ``"posix"``: makes the pipe whose end-of-file tells a child that this process died;
    only this process keeps its write end (each child closes its copy when it asks for a
    signal), so the end-of-file comes when this process exits, however it exits.
    """
    global _death_pipe
    if FLAVOUR == "posix" and _death_pipe is None:
        _death_pipe = os.pipe()


def set_parent_death_signal(signum: int) -> bool:
    """Have ``signum`` sent to this process when its parent dies; return whether it will.

    Called again, it replaces the signal (0: none). ``"linux"``: the kernel sends it
    (``prctl(PR_SET_PDEATHSIG)``). ``"posix"``: a daemon thread of this process, blocked
    on the pipe of :func:`prepare_parent_death_signals` (which the parent must have made
    before it forked this process; ``False`` otherwise), sends it to this process at the
    pipe's end-of-file. Event-driven on both; ``False`` on ``"windows"``.

    ``"posix"``, for a process that leads its process group (a pool's worker, see
    ``contain_descendants``): ``SIGKILL`` and ``SIGSTOP`` both become ``SIGKILL`` of the
    whole group. Freezing (what ``"linux"`` asks for while a task runs) keeps a tree
    under its root for the pool to kill; the group holds the tree here, so nothing is
    lost by ending it at once, and a frozen worker whose pool's owner died in the same
    instant (a kill of the owner's process group, which a worker leading its own does not
    receive) would never be ended by anyone.
    """
    global _death_pipe, _death_signal, _death_watcher
    if FLAVOUR == "linux":
        return _libc is not None and bool(_libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)
    if FLAVOUR != "posix" or _death_pipe is None:
        return False
    _death_signal = signum
    if _death_watcher != os.getpid():  # the first call in this process: start watching
        _death_watcher = os.getpid()
        reader, writer = _death_pipe
        os.close(writer)  # only the parent may hold it
        _death_pipe = (reader, -1)
        watcher = threading.Thread(
            target=_watch_parent, args=(reader,), name="cancelflow-parent-death", daemon=True
        )
        # Born with every signal blocked (a thread inherits its creator's mask): a signal
        # sent to the process must never be taken by this thread, or a task that blocks
        # SIGTERM in its own thread would have its handler run anyway.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            watcher.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return True


#: (read end, write end or -1) of the pipe a parent made for its children to watch
_death_pipe: tuple[int, int] | None = None
_death_signal = 0
#: the pid of the process whose thread watches the pipe (a fork does not copy the thread)
_death_watcher = 0


def _watch_parent(reader: int) -> None:
    while True:
        try:
            if not os.read(reader, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            return
    me = os.getpid()
    if not _death_signal or _death_watcher != me:
        return
    if os.getpgrp() == me and _death_signal in (signal.SIGKILL, signal.SIGSTOP):
        os.killpg(me, signal.SIGKILL)  # this process and what it started (see above)
    os.kill(me, _death_signal)


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
