"""What each flavour supports, and the one error for what it does not."""

from __future__ import annotations

import sys

from .._exceptions import UnsupportedPlatformError
from ._flavour import FLAVOUR

__all__ = ("PROCESS_POOLS", "require_process_pools")

#: whether cancelflow's process pool (and so local process nodes) runs on this flavour
PROCESS_POOLS: bool = FLAVOUR != "windows"

_NEEDS = {"windows": "fork and POSIX signals"}


def require_process_pools(what: str) -> None:
    """Raise :class:`~cancelflow.UnsupportedPlatformError` if ``what`` needs a process pool
    that this platform cannot run; nothing otherwise."""
    if PROCESS_POOLS:
        return
    raise UnsupportedPlatformError(
        f"{what} needs cancelflow's process pool, which needs {_NEEDS[FLAVOUR]}; this is "
        f"{sys.platform} (cancelflow's {FLAVOUR!r} implementation). Instead: ThreadPool or "
        "cancelflow.to_thread for I/O or code that releases the GIL; for CPU-bound work, "
        "concurrent.futures.ProcessPoolExecutor with token.remote() passed to the task (it "
        "cancels cooperatively), or DaskRunner with workers on Linux",
        platform=sys.platform,
        implementation=FLAVOUR,
    )
