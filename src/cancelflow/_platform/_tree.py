"""A process's tree: find it, keep orphans inside it, and kill all of it.

Keeping orphans: on ``"linux"`` the process is a child subreaper (orphans are
re-parented to it); on ``"posix"``, which has no subreaper, it leads a process group of
its own, which its descendants inherit, so one that lost its parent (and went to init)
is still reached through the group by :func:`kill_tree` and :func:`kill_remains`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

from ._exit_watch import pidfd_open
from ._flavour import FLAVOUR
from ._libc import libc as _libc, libc_keeping_gil as _libc_keeping_gil
from ._signals import send_signal

__all__ = (
    "ProcessView",
    "children",
    "contain_descendants",
    "descendants",
    "kill_group_members",
    "kill_remains",
    "kill_tree",
    "preload",
    "private_memory",
    "proportional_memory",
    "set_child_subreaper",
)

_PR_SET_CHILD_SUBREAPER = 36
#: rounds of freezing before giving up on a tree that keeps growing (a fork bomb)
_FREEZE_ROUNDS = 64


def set_child_subreaper(enabled: bool = True) -> bool:
    """Make this process the reaper of its orphaned descendants; return whether it worked
    (only the ``"linux"`` flavour has this)."""
    if FLAVOUR != "linux" or _libc is None:
        return False
    return bool(_libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) == 0)


def preload() -> None:
    """Import now what the tree functions need where there is no ``/proc`` to read
    (psutil), so that the forks of this process (a zygote's workers) do not pay for the
    import in their first kill (15-18 ms, measured on a stopped task's clean-up)."""
    if FLAVOUR != "linux":
        import psutil  # noqa: F401


def contain_descendants() -> str | None:
    """Make this process keep its descendants reachable even once their parent exits.

    Returns how: ``"subreaper"`` (``"linux"``: orphans are re-parented here, and a walk
    of the tree finds them), ``"group"`` (``"posix"``: this process leads a new process
    group, and a kill of its tree also signals the group), or ``None`` (``"windows"``).
    Not kept, on ``"posix"``: a descendant that starts a session or group of its own and
    then loses its parent.
    """
    if set_child_subreaper(True):
        return "subreaper"
    if FLAVOUR == "posix":
        os.setpgid(0, 0)
        return "group"
    return None


def kill_remains(pid: int) -> bool:
    """After the process ``pid`` (which :func:`contain_descendants` made a group leader)
    died: SIGKILL what is left of its process group. Returns whether anything was.

    ``"posix"`` only (elsewhere ``False``: on ``"linux"`` the remains are re-parented to
    the subreaper, which kills them as strays). A process group keeps its id while any
    member lives, so no other process can have been given it meanwhile.
    """
    if FLAVOUR != "posix" or pid <= 1 or pid == os.getpgrp():
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


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


def _pread(fd: int, size: int) -> bytes:
    """``os.pread(fd, size, 0)``, keeping the GIL where libc can be called that way.

    A read of a ``/proc`` file never blocks; releasing the GIL around it (as ``os.pread``
    does) lets a busy thread take the GIL, and getting it back can cost a switch
    interval (5 ms): long enough, right after a SIGKILL, for the process to be gone
    before it is read (see :meth:`ProcessView.childless`)."""
    if _libc_keeping_gil is None:
        return os.pread(fd, size, 0)
    buffer = ctypes.create_string_buffer(size)
    count = _libc_keeping_gil.pread(fd, buffer, ctypes.c_size_t(size), ctypes.c_long(0))
    if count < 0:
        raise OSError(f"pread of descriptor {fd} failed")
    return buffer.raw[:count]


class ProcessView:
    """Descriptors held open on one process's ``/proc`` entries (``"linux"`` only), so that
    a kill of its tree reads the process's children without looking up a path.

    A cold ``open()`` of ``/proc/<pid>/task/<pid>/children`` took most of a kill's
    time before the SIGKILL on the test VM (about 100 µs; a ``pread`` of an open one,
    about 25). The descriptors belong to the process, not to its pid: once it is gone
    they read nothing, so a reused pid is never read through them. Elsewhere (and if
    the files cannot be opened) :meth:`children` returns ``None``: walk as usual.
    """

    __slots__ = ("_children", "_stat", "pid")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._stat = self._children = -1
        if FLAVOUR != "linux":
            return
        try:
            self._stat = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
            self._children = os.open(f"/proc/{pid}/task/{pid}/children", os.O_RDONLY)
        except OSError:
            self.close()

    def children(self) -> list[int] | None:
        """The process's children while it has one thread; ``None`` if it has more (the
        other threads' children are not in this file), is gone, or cannot be read."""
        if self._children < 0:
            return None
        try:
            stat = _pread(self._stat, 4096)
            # Field 20 is num_threads: the 18th after the ")" that ends the name.
            if stat[stat.rindex(b")") + 2 :].split()[17] != b"1":
                return None
            data = _pread(self._children, 65536)
        except (OSError, ValueError, IndexError):
            return None
        if len(data) == 65536:
            return None  # maybe cut short: read it the long way
        return [int(pid) for pid in data.split()]

    @property
    def open(self) -> bool:
        """Whether the descriptors are open (``"linux"``, the process was there)."""
        return self._children >= 0

    def still_parent(self) -> bool:
        """Whether the process still holds its children: ``True`` while it lives, and
        while it dies until its exit hands them to a reaper (the kernel does so just
        before the process turns a zombie); ``False`` once it is a zombie or reaped, or
        when that cannot be read. A walk of its children that ended before this returned
        ``True`` saw all of them."""
        if self._stat < 0:
            return False
        try:
            stat = _pread(self._stat, 4096)
            state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
        except (OSError, ValueError):
            return False
        return state not in (b"Z", b"X", b"x", b"")

    def childless(self) -> bool:
        """Whether the process, read now, has one thread and no child, and still holds
        its children (:meth:`still_parent`, read after). For a process that can fork no
        more (SIGKILLed: the kernel fails a fork once a fatal signal is pending, and
        lists a child before it checks) ``True`` is final: its tree is itself alone.
        ``False`` when any of that cannot be told."""
        return self.children() == [] and self.still_parent()

    def close(self) -> None:
        """Close the descriptors (idempotent)."""
        fds = (self._stat, self._children)
        self._stat = self._children = -1  # (first: a fork now must not close them again)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _children_of(pid: int, view: ProcessView | None = None) -> list[int]:
    if view is not None and view.pid == pid:
        found = view.children()
        if found is not None:
            return found
    if FLAVOUR != "linux":
        return _children_psutil(pid)
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


def private_memory(pids: list[int]) -> int:
    """A quick estimate of the bytes the processes ``pids`` hold, summed.

    Per process, its resident set minus its file-backed shared pages (on Linux
    ``rss - shared`` from ``/proc/<pid>/statm``, one short read); where there is no
    ``/proc``, psutil's. Counts a fork's copy-on-write pages in every process that maps
    them, so it overstates a zygote and its forks: use :func:`proportional_memory` to
    decide. A process that exits meanwhile counts 0.
    """
    if FLAVOUR != "linux":
        return sum(_resident_psutil(pid) for pid in pids)
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as handle:
                fields = handle.read().split()
            total += max(0, int(fields[1]) - int(fields[2])) * _PAGE_SIZE
        except FileNotFoundError:
            if os.path.isdir("/proc"):
                continue  # it exited
            total += _resident_psutil(pid)
        except (OSError, ValueError, IndexError):
            total += _resident_psutil(pid)
    return total


def proportional_memory(pids: list[int]) -> int:
    """The bytes the processes ``pids`` hold, summed, each shared page split between
    the processes that map it (Linux: ``Pss`` of ``/proc/<pid>/smaps_rollup``).

    Summed over a zygote and its forks, a page they share counts once: the memory the
    group really holds. Costs a walk of each process's mappings (a few hundred µs);
    where ``smaps_rollup`` is missing, :func:`private_memory`. A process that exits
    meanwhile counts 0.
    """
    if FLAVOUR != "linux":
        return private_memory(pids)
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
                for line in handle:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                continue  # it exited
            total += private_memory([pid])
        except (OSError, ValueError, IndexError):
            total += private_memory([pid])
    return total


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_psutil(pid: int) -> int:
    import psutil

    try:
        info = psutil.Process(pid).memory_info()
    except psutil.Error:
        return 0
    return max(0, int(info.rss) - int(getattr(info, "shared", 0)))


def kill_tree(
    pid: int, *, include_root: bool = False, watch: bool = False, view: ProcessView | None = None
) -> dict[int, int | None]:
    """SIGKILL every descendant of ``pid`` (and ``pid`` itself if ``include_root``).

    The one kill sequence of cancelflow. It freezes before it kills, so that nothing forks
    past it: the root first (if included), then the descendants, in rounds (SIGSTOP every
    process the walk finds, walk again) until a round finds nothing new; then SIGKILL
    every frozen descendant, and the root last.

    With ``watch``, a pidfd is opened for each descendant *while it is frozen* (a frozen
    process cannot exit, so its pid cannot be reaped and reused before the descriptor
    exists); each becomes readable once that process is gone.

    Returns ``{pid: pidfd or None}`` for every descendant killed (the root is not in it).
    On ``"posix"``, a process of the tree that leads a process group of its own (see
    :func:`contain_descendants`) has its whole group frozen when it is, and killed.

    ``view`` (of ``pid``) lets the walk read the root's children through descriptors
    opened beforehand (see :class:`ProcessView`).

    The caller owns the descriptors. Not promised: a process forked in the instant between
    a walk and its parent's freeze escapes the walk (it is re-parented to the nearest
    subreaper once its parent dies, where a sweep finds it; on ``"posix"`` its group's
    kill reaches it); a root that is not ours or
    gone is skipped (:func:`send_signal` returns ``False``); a root that
    :func:`send_signal` refuses (pid <= 1, this process) raises ``UnsafeSignalTarget``
    before anything is sent.
    """
    if include_root:
        send_signal(pid, signal.SIGSTOP)
    # "posix": a process of the tree that leads a group of its own (contain_descendants:
    # a pool's worker) has its group frozen and killed with it, which also reaches the
    # members that lost their parent (they went to init, out of the walk's reach).
    groups: list[int] = []
    if FLAVOUR == "posix" and include_root:
        _freeze_group(pid, groups)
    killed: dict[int, int | None] = {}
    if FLAVOUR == "linux":
        _freeze_by_walking(pid, killed, watch, view)
    else:
        _freeze_by_snapshots(pid, killed, groups)
    for child in killed:
        with contextlib.suppress(ValueError):
            send_signal(child, signal.SIGKILL)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    if include_root:
        send_signal(pid, signal.SIGKILL)
    return killed


def _freeze_by_walking(
    pid: int, killed: dict[int, int | None], watch: bool, view: ProcessView | None
) -> None:
    """Freeze the descendants of ``pid`` in rounds, reading ``/proc`` children lists."""
    # Each process is frozen the moment it is found, and only then are its children
    # read; the next round reads them once more (a fork that was in flight when SIGSTOP
    # came completes first), and the root's in every round (orphans are re-parented to
    # it, a subreaper). Nothing found before is walked again: a round costs what is new,
    # not the whole tree (a tree of thousands of zombies under a forking chain was
    # re-walked every round, so the chain kept outrunning the rounds).
    to_read = [pid]
    for _ in range(_FREEZE_ROUNDS):
        frozen: list[int] = []
        stack = list(to_read)
        while stack:
            for child in _children_of(stack.pop(), view):
                if child in killed or child == pid:
                    continue
                with contextlib.suppress(ValueError):  # refused: never ours to signal
                    send_signal(child, signal.SIGSTOP)
                killed[child] = pidfd_open(child) if watch else None
                frozen.append(child)
                stack.append(child)
        if not frozen:
            break
        to_read = [pid, *frozen]


def _freeze_by_snapshots(pid: int, killed: dict[int, int | None], groups: list[int]) -> None:
    """Freeze the descendants of ``pid`` in rounds, each round one snapshot of the process
    table (psutil; a scan of every process, so one per round, not one per process).

    A round whose new processes were all in a group frozen before its snapshot is the
    last: none of them could fork since.
    """
    import psutil

    # This process's own tree, where it leads its group: the other members of the group
    # too (a task's orphans went to init; the group cannot be signalled without us).
    own_group = pid == os.getpid() and os.getpgrp() == pid
    for _ in range(_FREEZE_ROUNDS):
        try:
            found = [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return
        if own_group:
            found += _members_of_group(pid)
        new = [child for child in found if child not in killed and child != pid]
        frozen_groups = set(groups)
        moving = False  # found running: it may have forked since the snapshot
        for child in new:
            try:
                moving = moving or os.getpgid(child) not in frozen_groups
            except OSError:
                continue  # gone since the snapshot
            with contextlib.suppress(ValueError):  # refused: never ours to signal
                send_signal(child, signal.SIGSTOP)
            _freeze_group(child, groups)
            killed[child] = None
        if not moving:
            return  # all of them were frozen (by their group) before the snapshot


def kill_group_members() -> int:
    """SIGKILL every other member of the process group this process leads (frozen first);
    return how many there were. ``0`` at once where it leads none (``"linux"`` workers).
    One scan of the process table: a task's orphans on ``"posix"``, which went to init."""
    me = os.getpid()
    if FLAVOUR != "posix" or os.getpgrp() != me:
        return 0
    members = _members_of_group(me)
    for signum in (signal.SIGSTOP, signal.SIGKILL):
        for pid in members:
            with contextlib.suppress(ValueError):
                send_signal(pid, signum)
    return len(members)


def _members_of_group(group: int) -> list[int]:
    """Every process of process group ``group`` but this one (a scan of every process)."""
    import psutil

    me = os.getpid()
    members = []
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            if os.getpgid(pid) == group:
                members.append(pid)
        except OSError:
            continue  # gone, or not ours to ask
    return members


def _freeze_group(pid: int, groups: list[int]) -> None:
    """If ``pid`` leads a process group that is not this process's, SIGSTOP the whole
    group and note it in ``groups``."""
    try:
        leads = os.getpgid(pid) == pid
    except OSError:
        return
    if not leads or pid <= 1 or pid == os.getpgrp():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGSTOP)
        groups.append(pid)
