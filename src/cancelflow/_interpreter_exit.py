"""What the pools do when the interpreter exits: finish their work, as the stdlib's do.

:mod:`concurrent.futures` lets queued and running work finish at interpreter exit and
refuses new work from then on. cancelflow's pools do the same through this one hook,
registered with :func:`threading._register_atexit` (the hook the stdlib's executors use):
it runs when the main thread ends, *before* ``atexit`` callbacks and before non-daemon
threads are joined, so a pool's daemon threads are still there to finish the work.

Guaranteed: after the hook has started, :func:`check_open` raises the stdlib's
``RuntimeError("cannot schedule new futures after interpreter shutdown")``; every pool
registered here is shut down with ``wait=True`` (its queued and running tasks finish);
nothing is printed. Not guaranteed: work submitted from an ``atexit``
callback or a daemon thread after the hook ran is refused, as in the stdlib.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Protocol

__all__ = ("check_open", "exiting", "register")


class _Pool(Protocol):
    def shutdown(self, wait: bool = True) -> None: ...


_pools: weakref.WeakSet[_Pool] = weakref.WeakSet()
_exiting = False


def register(pool: _Pool) -> None:
    """Shut ``pool`` down (waiting for its work) when the interpreter exits."""
    _pools.add(pool)


def exiting() -> bool:
    """Whether the interpreter has started to exit (the hook has run or is running)."""
    return _exiting


def check_open() -> None:
    """Raise the stdlib's error if the interpreter is exiting; else do nothing."""
    if _exiting:
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")


def _on_exit() -> None:
    global _exiting
    _exiting = True
    for pool in reversed(list(_pools)):
        with contextlib.suppress(Exception):
            pool.shutdown(wait=True)


threading._register_atexit(_on_exit)  # type: ignore[attr-defined]
