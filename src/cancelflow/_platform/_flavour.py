"""Which of the three implementations of this layer runs here, chosen once at import.

* ``"linux"``: ``memfd`` shared memory, ``futex`` wake-ups (also across processes),
  ``pidfd`` exit watches, ``prctl`` parent-death signals and child subreaper, ``/proc``
  for the process tree. Chosen on Linux when all of them are
  there (and the ``futex`` system call number is known for the machine).
* ``"posix"``: only what macOS and the BSDs also have: an unlinked temporary file for
  shared memory, ``fcntl`` record locks, in-process wake-ups on parked locks, a
  datagram socket per listening process for wake-ups across processes, psutil for the
  process tree; a pool's workers lead process groups (no subreaper), learn of their
  zygote's death from a pipe, and their exits are reported by the zygote (no pidfd).
* ``"windows"``: no ``fork``, no ``fcntl``, no POSIX signals: tokens, thread pools and
  pipelines within a process, and :class:`~cancelflow.RemoteToken` (served over loopback
  TCP with an authentication key) for other processes. No process pool.

``CANCELFLOW_PLATFORM`` (``linux``, ``posix`` or ``windows``) forces one, so that the
portable implementations run, and are tested, on Linux too; it is read once, when
cancelflow is imported. Forcing one whose primitives are missing raises ``ImportError``
naming them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import socket
import sys

from ._libc import libc

__all__ = ("FLAVOUR", "FLAVOURS", "FUTEX_SYSCALL", "TOKENS_CROSS_PROCESSES", "missing_for")

FLAVOURS = ("linux", "posix", "windows")
ENVIRONMENT_VARIABLE = "CANCELFLOW_PLATFORM"

#: the ``futex`` system call's number on the machines it is known for
FUTEX_SYSCALL: int | None = {"x86_64": 202, "aarch64": 98, "i686": 240, "armv7l": 240}.get(
    platform.machine()
)


def missing_for(flavour: str) -> list[str]:
    """The primitives ``flavour`` needs that this interpreter lacks (``[]``: it can run)."""
    missing: list[str] = []
    if flavour == "windows":
        return missing
    for module in ("fcntl", "resource"):
        if importlib.util.find_spec(module) is None:
            missing.append(module)
    for name in ("fork", "register_at_fork", "getpgrp", "waitpid"):
        if not hasattr(os, name):
            missing.append(f"os.{name}")
    if not hasattr(socket, "AF_UNIX"):
        missing.append("socket.AF_UNIX")
    if flavour == "linux":
        if not sys.platform.startswith("linux"):
            missing.append("Linux")
        for name in ("memfd_create", "pidfd_open", "pipe2"):
            if not hasattr(os, name):
                missing.append(f"os.{name}")
        if libc is None:
            missing.append("the C library through ctypes")
        if FUTEX_SYSCALL is None:
            missing.append(f"the futex system call number for {platform.machine()!r}")
    return missing


def _choose() -> str:
    forced = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if forced:
        if forced not in FLAVOURS:
            raise ImportError(
                f"{ENVIRONMENT_VARIABLE}={forced!r}: expected one of {', '.join(FLAVOURS)}"
            )
        missing = missing_for(forced)
        if missing:
            raise ImportError(
                f"{ENVIRONMENT_VARIABLE}={forced!r}, but this interpreter lacks "
                + ", ".join(missing)
            )
        return forced
    if sys.platform == "win32" or missing_for("posix"):
        return "windows"
    if sys.platform.startswith("linux") and not missing_for("linux"):
        return "linux"
    return "posix"


#: the implementation in use in this process: ``"linux"``, ``"posix"`` or ``"windows"``
FLAVOUR: str = _choose()

#: whether a token's shared memory reaches processes cancelflow or multiprocessing starts
#: (not on "windows": there, token.remote())
TOKENS_CROSS_PROCESSES: bool = FLAVOUR != "windows"
