"""The C library, loaded once on Linux (``None`` elsewhere: cancelflow calls it there only)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ("libc",)


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


libc = _load_libc()
