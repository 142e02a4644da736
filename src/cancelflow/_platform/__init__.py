"""Operating-system primitives that cancelflow needs, behind one small surface.

Everything that depends on the kernel lives here, so the rest of the package never
checks ``sys.platform`` itself. There are three implementations (*flavours*), chosen
once at import (:data:`FLAVOUR`, forceable with ``CANCELFLOW_PLATFORM``; see
``_flavour``): ``"linux"``, ``"posix"`` (what macOS and the BSDs have) and
``"windows"`` (no fork, no fcntl, no POSIX signals). One module per concern:
``_flavour`` (the choice), ``_shared_memory`` (token slots and their lock), ``_wake``
(futex, or a per-process parking lot), ``_alarm`` (a sleep until a deadline that others
can bring forward: timerfd), ``_doorbell`` (wake-ups across processes without futex),
``_fork`` (fork hooks), ``_local_socket`` (an endpoint for local processes),
``_scratch`` (private directories in the temporary directory, and their sweep),
``_exit_watch`` (pidfd), ``_signals`` (guarded signalling, parent-death signal),
``_tree`` (descendants, subreaper, the one kill sequence, memory of a tree), ``_libc``.

* :func:`shared_memory` / :func:`map_shared` / :func:`lock_range`: a descriptor to map
  shared (memfd, or an unlinked temporary file), its mapping (which does not keep the
  descriptor open where Python allows), and a record lock on part of it that dies with
  its holder.
* :func:`futex_wait` / :func:`futex_wake`: block on a 32-bit word until another thread
  (with :data:`HAVE_FUTEX`, also another process) changes it; event-driven on every
  flavour. Without futex, :func:`wake_all_parked` is how a cross-process wake-up that
  arrived through a doorbell reaches this process's waiters. :func:`futex_bump` (with
  :data:`HAVE_FUTEX` only): add 1 to a shared word and wake its waiters in one atomic
  step, so that several threads and processes can bump one word.
* :func:`make_doorbell` / :func:`ring_doorbell` / :class:`DoorbellRinger` /
  :class:`DoorbellListener` / :func:`discard_doorbell`: a wake-up that crosses
  processes, for the flavours without futex.
* :func:`listen_local` / :func:`connect_local` / :func:`knock_local`: an authenticated
  endpoint for other processes of this machine, named by a path (``AF_UNIX``, or
  loopback TCP with a rendezvous file on ``"windows"``).
* :func:`make_scratch_directory` / :func:`scratch_entry`: a private directory (mode
  0700) whose entries are named after the processes that made them, so that the first
  one made by a later process sweeps what dead processes left (a doorbell's is one).
* :func:`alarm_open` / :func:`alarm_set` / :func:`alarm_wait` (:data:`HAVE_ALARM`,
  ``"linux"``): a sleep until a deadline that another thread can bring forward without
  waking the sleeper now (``timerfd``): the timer thread's, so that scheduling a grace
  timer on a cancel path wakes no thread.
* :func:`at_fork`: ``os.register_at_fork`` where there is fork (:data:`CAN_FORK`).
* :func:`contain_descendants`: keep this process's descendants reachable after their
  parent exits: a child subreaper (:func:`set_child_subreaper`, ``"linux"``: orphans
  are re-parented here and reaped here, not by a PID 1 that may never reap) or the
  leader of a process group they inherit (``"posix"``; :func:`kill_remains` ends what
  is left of it once its leader died).
* :func:`set_parent_death_signal` (after the parent's
  :func:`prepare_parent_death_signals`): a signal this process gets when its parent
  dies (``prctl``, or a thread blocked on a pipe only the parent writes to).
* :func:`pidfd_open`: a file descriptor that becomes readable when a process exits, for
  event-driven confirmation that a worker is gone. ``None`` where unsupported
  (:data:`HAVE_PIDFD`: there, a worker's exit is reported by its parent, the zygote).
* :func:`kill_tree`: the one kill sequence (freeze the tree in rounds, then SIGKILL it),
  used by the pool's supervisor, its workers, its zygote and the Dask worker plugin; a
  :class:`ProcessView` kept open on a worker spares its kill the lookup of ``/proc``
  paths.
* :func:`private_memory` (a quick, high estimate) and :func:`proportional_memory` (shared
  pages split between their processes) of the memory a set of processes holds: what a
  memory limit over a process tree counts.
* :func:`send_signal`: the one place cancelflow signals a process. It refuses targets that
  can only be a bug (pid 0 or below, which mean process groups; pid 1; this process; its
  process group's leader), so a stale or unset pid can never stop the owner.
* :data:`PROCESS_POOLS`: whether this flavour runs cancelflow's process pool (``"linux"``
  and ``"posix"``); :func:`require_process_pools` raises the one error for it
  elsewhere.
"""

from __future__ import annotations

from ._alarm import HAVE_ALARM, alarm_open, alarm_set, alarm_wait
from ._doorbell import (
    FRESH_WAIT as DOORBELL_FRESH_WAIT,
    DoorbellListener,
    Ringer as DoorbellRinger,
    discard as discard_doorbell,
    make_directory as make_doorbell,
    ring as ring_doorbell,
)
from ._exit_watch import HAVE_PIDFD, pidfd_open
from ._flavour import ENVIRONMENT_VARIABLE, FLAVOUR, FLAVOURS, TOKENS_CROSS_PROCESSES
from ._fork import CAN_FORK, at_fork
from ._local_socket import connect_local, knock_local, listen_local, local_pair
from ._scratch import entry_name as scratch_entry, make_directory as make_scratch_directory
from ._shared_memory import lock_range, map_shared, shared_memory
from ._signals import (
    UnsafeSignalTarget,
    prepare_parent_death_signals,
    send_signal,
    set_parent_death_signal,
    signal_name,
)
from ._support import PROCESS_POOLS, require_process_pools
from ._tree import (
    ProcessView,
    children,
    contain_descendants,
    descendants,
    kill_group_members,
    kill_remains,
    kill_tree,
    preload as preload_tree_functions,
    private_memory,
    proportional_memory,
    set_child_subreaper,
)
from ._wake import HAVE_FUTEX, futex_bump, futex_wait, futex_wake, wake_all_parked

__all__ = (
    "CAN_FORK",
    "ENVIRONMENT_VARIABLE",
    "FLAVOUR",
    "FLAVOURS",
    "HAVE_ALARM",
    "HAVE_FUTEX",
    "HAVE_PIDFD",
    "PROCESS_POOLS",
    "ProcessView",
    "TOKENS_CROSS_PROCESSES",
    "DOORBELL_FRESH_WAIT",
    "DoorbellListener",
    "DoorbellRinger",
    "UnsafeSignalTarget",
    "alarm_open",
    "alarm_set",
    "alarm_wait",
    "at_fork",
    "children",
    "connect_local",
    "contain_descendants",
    "descendants",
    "discard_doorbell",
    "futex_bump",
    "futex_wait",
    "futex_wake",
    "kill_group_members",
    "kill_remains",
    "kill_tree",
    "knock_local",
    "listen_local",
    "local_pair",
    "lock_range",
    "make_doorbell",
    "make_scratch_directory",
    "map_shared",
    "pidfd_open",
    "preload_tree_functions",
    "prepare_parent_death_signals",
    "private_memory",
    "require_process_pools",
    "proportional_memory",
    "ring_doorbell",
    "scratch_entry",
    "send_signal",
    "set_child_subreaper",
    "set_parent_death_signal",
    "shared_memory",
    "signal_name",
    "wake_all_parked",
)
