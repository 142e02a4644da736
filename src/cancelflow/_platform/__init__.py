"""Operating-system primitives that cancelflow needs, behind one small surface.

Everything that depends on the kernel lives here, so the rest of the package never
checks ``sys.platform`` itself. One module per concern: ``_wake`` (futex), ``_exit_watch``
(pidfd), ``_signals`` (guarded signalling, parent-death signal), ``_tree`` (descendants,
subreaper, the one kill sequence), ``_libc``.

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
* :func:`kill_tree`: the one kill sequence (freeze the tree in rounds, then SIGKILL it),
  used by the pool's supervisor, its workers, its zygote and the Dask worker plugin.
* :func:`private_memory` (a quick, high estimate) and :func:`proportional_memory` (shared
  pages split between their processes) of the memory a set of processes holds: what a
  memory limit over a process tree counts.
* :func:`send_signal`: the one place cancelflow signals a process. It refuses targets that
  can only be a bug (pid 0 or below, which mean process groups; pid 1; this process; its
  process group's leader), so a stale or unset pid can never stop the owner.
"""

from __future__ import annotations

from ._exit_watch import pidfd_open
from ._signals import UnsafeSignalTarget, send_signal, set_parent_death_signal, signal_name
from ._tree import (
    children,
    descendants,
    kill_tree,
    private_memory,
    proportional_memory,
    set_child_subreaper,
)
from ._wake import HAVE_FUTEX, futex_wait, futex_wake

__all__ = (
    "HAVE_FUTEX",
    "UnsafeSignalTarget",
    "children",
    "descendants",
    "futex_wait",
    "futex_wake",
    "kill_tree",
    "pidfd_open",
    "private_memory",
    "proportional_memory",
    "send_signal",
    "set_child_subreaper",
    "set_parent_death_signal",
    "signal_name",
)
