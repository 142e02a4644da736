"""The C library, loaded once on Linux (``None`` elsewhere: cancelflow calls it there only).

``libc`` releases the GIL around each call (for calls that may block); ``libc_keeping_gil``
keeps it, for short calls that never block (a futex wake): releasing the GIL there lets a
busy thread take it, and getting it back can cost the caller a whole switch interval.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ("libc", "libc_keeping_gil")


def _load_libc(kind: type[ctypes.CDLL]) -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return kind(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


libc = _load_libc(ctypes.CDLL)
libc_keeping_gil = _load_libc(ctypes.PyDLL)
