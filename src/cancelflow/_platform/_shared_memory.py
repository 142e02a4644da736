"""Shared memory for token slots, and a lock over a range of it that dies with its holder.

``"linux"``: a ``memfd``. ``"posix"``: a temporary file, unlinked at once (in
``/dev/shm`` where it exists, so it never touches a disk). ``"windows"``: a temporary
file deleted when closed (``O_TEMPORARY``; unlinked at once where that flag does not
exist). In every case the result is a file descriptor that :func:`mmap.mmap` maps, that
``os.fstat`` identifies, and that a child process may inherit or be sent.

:func:`lock_range` is an ``fcntl`` record lock (the kernel drops it if its holder dies)
on the POSIX flavours. On ``"windows"`` a chunk never leaves its process, so threads are
the only contenders, and those are serialised before by the token's own atomic step: it
locks nothing there.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
import time

from ._flavour import FLAVOUR

__all__ = ("lock_range", "map_shared", "shared_memory")

if FLAVOUR != "windows":
    import fcntl

#: how long lock_range retries a wait the kernel refused with EDEADLK (see there)
_DEADLOCK_PATIENCE = 2.0


def shared_memory(label: str, size: int) -> int:
    """A new descriptor of ``size`` zeroed bytes that can be mapped shared."""
    if FLAVOUR == "linux":
        fd = os.memfd_create(label, os.MFD_CLOEXEC)
    else:
        directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_TEMPORARY", 0)
        for _ in range(100):
            path = os.path.join(directory, f"{label}-{os.urandom(8).hex()}")
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                continue
            break
        else:  # pragma: no cover - 100 collisions of 64 random bits
            raise FileExistsError(f"no free name for shared memory in {directory}")
        if not hasattr(os, "O_TEMPORARY"):
            os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_shared(fd: int, size: int) -> mmap.mmap:
    """Map ``size`` bytes of ``fd`` shared, without the mapping keeping ``fd`` open.

    Where Python lets it (3.13+ on POSIX: ``trackfd=False``), the mapping holds no
    duplicate of the descriptor, so closing ``fd`` closes the file for good even while
    views of the mapping are alive (a free-threaded build may free them late). Elsewhere
    the mapping keeps a duplicate until it is closed or collected.
    """
    try:
        return mmap.mmap(fd, size, trackfd=False)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # before 3.13, or Windows
        return mmap.mmap(fd, size)


class lock_range:
    """Hold a lock on ``length`` bytes at ``offset`` of ``fd`` against other processes.

    The kernel drops it if the holder dies. A no-op on ``"windows"`` (see the module).
    A class, not a generator: it is on the path of every cross-process ``cancel()``, where
    a generator's context manager cost twice the two system calls.

    Record locks belong to processes, not threads, so the kernel's deadlock check sees a
    cycle where there is none: a thread of process A waits for a range B holds while a
    thread of B waits for another range that *another* thread of A holds for a moment, and
    one of the two waits fails with ``EDEADLK``. cancelflow's threads never wait for a
    range while holding one, so such a cycle resolves within microseconds: the wait is
    retried after a pause that doubles up to a millisecond. Only a cycle that lasts
    (signal handlers in two processes, each cancelling inside the other's held range)
    raises the ``OSError``, after :data:`_DEADLOCK_PATIENCE` seconds.
    """

    __slots__ = ("_fd", "_length", "_offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self._fd, self._offset, self._length = fd, offset, length

    def __enter__(self) -> None:
        if FLAVOUR == "windows":
            return
        pause, waited = 0.00005, 0.0
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX, self._length, self._offset)
                return
            except OSError as exc:
                if exc.errno != errno.EDEADLK or waited >= _DEADLOCK_PATIENCE:
                    raise
            time.sleep(pause)
            waited += pause
            pause = min(pause * 2, 0.001)

    def __exit__(self, *exc: object) -> None:
        if FLAVOUR != "windows":
            fcntl.lockf(self._fd, fcntl.LOCK_UN, self._length, self._offset)
