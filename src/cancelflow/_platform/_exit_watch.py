"""Watch a process exit without polling: a pidfd, readable once the process is gone."""

from __future__ import annotations

import errno
import os

from ._flavour import FLAVOUR

__all__ = ("HAVE_PIDFD", "pidfd_open")

#: whether :func:`pidfd_open` can give descriptors here (only the ``"linux"`` flavour);
#: without them a pool learns that a worker exited from the zygote, its parent
HAVE_PIDFD: bool = FLAVOUR == "linux" and hasattr(os, "pidfd_open")


def pidfd_open(pid: int) -> int | None:
    """Return a descriptor that is readable once ``pid`` has exited, or ``None``.

    ``None`` means the platform has no pidfd (only the ``"linux"`` flavour uses one) or the process is already gone
    (``ESRCH``); the caller then falls back to ``waitpid``.
    """
    opener = getattr(os, "pidfd_open", None)
    if opener is None or FLAVOUR != "linux":
        return None
    try:
        fd: int = opener(pid)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOSYS, errno.EPERM):
            return None
        raise
    return fd
