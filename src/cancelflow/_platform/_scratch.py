"""Private directories of cancelflow processes in the temporary directory, and the sweep
of those whose makers are gone.

Two things need a directory of their own that other processes can reach by path: a shared
chunk's doorbell (``_doorbell``: one datagram socket per listening process) and the
server of :class:`~cancelflow.RemoteToken` handles (one socket and one flag file per
served token). Both are made here (:func:`make_directory`: mode 0700, named ``cf-*``, in
a temporary directory short enough for a Unix socket's path), and every entry a process
puts in one is named after that process: ``<pid>.<anything>`` (:func:`entry_name`).

Their makers remove them when they close, and at interpreter exit. A directory is left
behind when its makers could not: every one was SIGKILLed, or ended with ``os._exit`` (a
forked ``multiprocessing`` child does). The first :func:`make_directory` of each process
sweeps those (:func:`sweep`).

Guaranteed: the sweep removes only this user's ``cf-*`` directories (not symbolic links)
with mode 0700, only entries whose process is gone (no process has its pid), and a
directory only once it is empty. Not promised: a directory whose maker's pid was taken
by another process since stays until that process is gone too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile

__all__ = ("entry_name", "make_directory", "sweep")

#: longest socket path every POSIX system accepts (macOS: 104 bytes with the NUL)
MAX_SOCKET_PATH = 100
#: the longest entry name a directory made here must leave room for
_LONGEST_ENTRY = 24
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
    for base in (tempfile.gettempdir(), "/tmp"):
        if base not in _swept:
            _swept.add(base)
            sweep(base)
        path = tempfile.mkdtemp(prefix=_PREFIX, dir=base)
        if len(os.fsencode(path)) + _LONGEST_ENTRY <= MAX_SOCKET_PATH:  # bytes, not chars
            return path
        os.rmdir(path)
    raise OSError(errno.ENAMETOOLONG, "no temporary directory with a short enough path")


def entry_name(suffix: str) -> str:
    """The name of an entry this process puts in a directory made here (``<pid>.suffix``),
    which tells :func:`sweep` whose it is."""
    return f"{os.getpid()}.{suffix}"


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
    """Whether the process that made the entry ``name`` (``<pid>.<...>``) may still run."""
    try:
        pid = int(name.split(".", 1)[0])
    except ValueError:
        return True  # not one of ours: leave it (and so its directory)
    if pid <= 0:
        return True
    import psutil  # (not os.kill(pid, 0): on Windows that would end the process)

    return bool(psutil.pid_exists(pid))
