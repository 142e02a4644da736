"""Run callables in worker processes, stoppable while they run.

``await cancelflow.to_process.run_sync(fn, *args, token=token)`` is the process twin of
``cancelflow.to_thread.run_sync``: it runs on a process-wide default
:class:`~cancelflow.ProcessPool`, created on first use and shut down at interpreter exit
(or by :func:`shutdown_default_pool`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ._process import ProcessPool
from ._token import CancellationToken

__all__ = ("current_default_process_pool", "run_sync", "shutdown_default_pool")

_lock = threading.Lock()
_default: ProcessPool | None = None


def current_default_process_pool() -> ProcessPool:
    """The process-wide default pool (one worker per CPU), created on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = ProcessPool(name="default-process-pool")
        return _default


def shutdown_default_pool() -> None:
    """Shut the default pool down (stopping running tasks); the next use makes a new one."""
    global _default
    with _lock:
        pool, _default = _default, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)


async def run_sync(
    fn: Callable[..., Any],
    *args: Any,
    token: CancellationToken | None = None,
    timeout: float | None = None,
    grace_period: float | None = None,
    term_grace_period: float | None = None,
    partial_sink: Callable[[str, Any], None] | None = None,
) -> Any:
    """Run ``fn(*args)`` in a worker process of the default pool and return its result.

    Exactly :meth:`ProcessPool.run_sync` on :func:`current_default_process_pool`: the
    token is checked on entry; cancelling it stops the running task (token, then
    SIGTERM, then SIGKILL of the worker and its process tree) and raises
    :class:`~cancelflow.CancelledException` once the stop is complete.
    """
    return await current_default_process_pool().run_sync(
        fn,
        *args,
        token=token,
        timeout=timeout,
        grace_period=grace_period,
        term_grace_period=term_grace_period,
        partial_sink=partial_sink,
    )
