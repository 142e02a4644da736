"""Private directories of cancelflow processes in the temporary directory, and the sweep
of those whose makers are gone.

Two things need a directory of their own that other processes can reach by path: a shared
chunk's doorbell (``_doorbell``: one datagram socket per listening process) and the
server of :class:`~cancelflow.RemoteToken` handles (one socket and one flag file per
served token). Both are made here (:func:`make_directory`: mode 0700, named ``cf-*``, in
a temporary directory short enough for a Unix socket's path), and every entry a process
puts in one is named after that process: ``<maker>.<anything>`` (:func:`entry_name`),
where the maker is the pid and, where the system has them (Linux), the pid namespace:
``<pid>-<namespace>`` (a process of another namespace, a container sharing ``/tmp``,
sees other pids: it must not judge these).

Their makers remove them when they close, and at interpreter exit. A directory is left
behind when its makers could not: every one was SIGKILLed, or ended with ``os._exit`` (a
forked ``multiprocessing`` child does). The first :func:`make_directory` of each process
sweeps those (:func:`sweep`).

Guaranteed: the sweep removes only this user's ``cf-*`` directories (not symbolic links)
with mode 0700, only entries made in its own pid namespace whose process is gone (no
process has its pid), and a directory only once it is empty. Not promised: a directory
whose maker's pid was taken by another process since stays until that process is gone
too; two processes of different pid namespaces that both cannot read
``/proc/self/ns/pid`` look alike; on Windows (no POSIX modes, and entries that are not
sockets) nothing is swept.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile

from ._flavour import FLAVOUR

__all__ = ("entry_name", "make_directory", "sweep")

#: longest socket path every POSIX system accepts (macOS: 104 bytes with the NUL)
MAX_SOCKET_PATH = 100
#: the longest entry name a directory made here must leave room for
_LONGEST_ENTRY = 40
#: the prefix of every directory made here
_PREFIX = "cf-"
#: temporary directories already swept by this process
_swept: set[str] = set()


def make_directory() -> str:
    """Make a new private directory (mode 0700) and return its path; the first time in a
    process, sweep the directories left behind in the same place first.

    Raises:
        OSError: no temporary directory can be written, or none leaves room for an entry's
            socket path (``ENAMETOOLONG``).
    """
    # (On "windows" the local endpoints are TCP: no path limit, and no "/tmp" to fall back to.)
    bases = (tempfile.gettempdir(),) if FLAVOUR == "windows" else (tempfile.gettempdir(), "/tmp")
    for base in bases:
        if base not in _swept:
            _swept.add(base)
            sweep(base)
        path = tempfile.mkdtemp(prefix=_PREFIX, dir=base)
        if FLAVOUR == "windows" or len(os.fsencode(path)) + _LONGEST_ENTRY <= MAX_SOCKET_PATH:
            return path  # (the limit is in bytes, not characters)
        os.rmdir(path)
    raise OSError(errno.ENAMETOOLONG, "no temporary directory with a short enough path")


def entry_name(suffix: str) -> str:
    """The name of an entry this process puts in a directory made here
    (``<maker>.suffix``), which tells :func:`sweep` whose it is."""
    return f"{_maker()}.{suffix}"


def _maker() -> str:
    """This process's mark (see :func:`_mark_of`)."""
    return _mark_of(os.getpid())


def _mark_of(pid: int) -> str:
    """The mark of process ``pid`` of this process's pid namespace: ``<pid>-<namespace>``,
    or ``<pid>`` where the namespace cannot be read (no ``/proc``). The namespace is
    looked up once per process (a fork looks again: it may be in a new one)."""
    me = os.getpid()
    namespace = _namespaces.get(me)
    if namespace is None:
        try:
            namespace = _namespaces[me] = str(os.stat("/proc/self/ns/pid").st_ino)
        except OSError:
            namespace = _namespaces[me] = ""
    return f"{pid}-{namespace}" if namespace else str(pid)


#: this process's pid namespace (its inode number, "" if unknown), by pid (see _mark_of)
_namespaces: dict[int, str] = {}


def sweep(base: str) -> int:
    """Remove the directories in ``base`` that nobody can use any more; return how many.

    Only this user's ``cf-*`` directories (not symbolic links) with mode 0700 are looked
    at. An entry whose maker (the pid in its name) is gone is removed, and then the
    directory if that left it empty. A directory that is empty already is removed too:
    its users make it again when they need it (a doorbell's listeners do). Never raises.
    """
    removed = 0
    try:
        entries = [entry for entry in os.scandir(base) if entry.name.startswith(_PREFIX)]
    except OSError:
        return 0
    me = os.getuid() if hasattr(os, "getuid") else None
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if not entry.is_dir(follow_symlinks=False) or info.st_mode & 0o777 != 0o700:
                continue
            if me is not None and info.st_uid != me:
                continue
            for name in os.listdir(entry.path):
                if not _maker_alive(name):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(entry.path, name))
            os.rmdir(entry.path)  # fails while a live process has an entry in it
        except OSError:
            continue
        removed += 1
    return removed


def _maker_alive(name: str) -> bool:
    """Whether the process that made the entry ``name`` (``<maker>.<...>``) may still run:
    ``True`` unless it is of this pid namespace and no process has its pid."""
    maker = name.split(".", 1)[0]
    pid_text, _, namespace = maker.partition("-")
    if namespace != _maker().partition("-")[2]:
        return True  # another namespace's pids mean other processes: not judged here
    try:
        pid = int(pid_text)
    except ValueError:
        return True  # not one of ours: leave it (and so its directory)
    if pid <= 0:
        return True
    import psutil  # (not os.kill(pid, 0): on Windows that would end the process)

    return bool(psutil.pid_exists(pid))
