"""Run blocking callables in worker threads from asyncio, cancellably.

``await cancelflow.to_thread.run_sync(fn, *args, token=...)`` is
:func:`asyncio.to_thread` with a cancellation token: cancelling the token or the awaiting
task asks the thread to stop (through :func:`cancelflow.check_cancelled` /
:func:`cancelflow.current_token` inside ``fn``) and releases the caller once ``fn`` is
over: it returned, or was abandoned after the grace period.
Calls share one process-wide :class:`~cancelflow.ThreadPool`, created on first use.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

from ._context import PartialSink
from ._thread_pool import ThreadPool
from ._token import CancellationToken

__all__ = ("current_default_thread_pool", "run_sync", "shutdown_default_pool")

T = TypeVar("T")
PosArgsT = TypeVarTuple("PosArgsT")

_lock = threading.Lock()
_default_pool: ThreadPool | None = None


def current_default_thread_pool() -> ThreadPool:
    """Return the process-wide pool that :func:`run_sync` uses, creating it if needed.

    The pool has the default size (``min(32, os.cpu_count() + 4)`` threads) and a 0.1 s
    grace period. It is created on first use, and again after
    :func:`shutdown_default_pool`. Thread-safe.
    """
    global _default_pool
    with _lock:
        if _default_pool is None:
            _default_pool = ThreadPool(name="default-thread-pool")
        return _default_pool


def shutdown_default_pool(
    *, wait: bool = True, cancel_futures: bool = True, cancel_running: bool = True
) -> None:
    """Shut the process-wide pool down; the next :func:`run_sync` starts a new one.

    Registered with :mod:`atexit` (by then the interpreter-exit hook has already let the
    pool's work finish, as every pool's). Idempotent, and a no-op if no pool was created.
    By default every unfinished task is cancelled: queued ones (``cancel_futures``) and
    running ones (``cancel_running``); see :meth:`ThreadPool.shutdown`.

    If cancelled while blocked: nothing cancels this wait; with ``wait`` it returns once
    every worker ended except threads abandoned after their grace period, which are left
    running as daemon threads.
    """
    global _default_pool
    with _lock:
        pool, _default_pool = _default_pool, None
    if pool is not None:
        pool.shutdown(wait=wait, cancel_futures=cancel_futures, cancel_running=cancel_running)


atexit.register(shutdown_default_pool)


async def run_sync(
    fn: Callable[[*PosArgsT], T],
    *args: *PosArgsT,
    token: CancellationToken | None = None,
    timeout: float | None = None,
    grace_period: float | None = None,
    partial_sink: PartialSink | None = None,
    interrupt_on_cancel: bool = False,
) -> T:
    """Call ``fn(*args)`` in a worker thread of the default pool and return its result.

    Behaves like calling ``fn(*args)`` except that it runs in another thread, leaving the
    event loop free. Inside ``fn``, :func:`cancelflow.current_token` is the task's own
    token (a child of ``token``) and :func:`cancelflow.check_cancelled` polls it; ``fn``
    runs in a copy of the caller's :mod:`contextvars` context.

    If cancelled while blocked: ``token`` is checked on entry, and if it is already
    cancelled :class:`~cancelflow.CancelledException` is raised before a worker thread is
    taken. If ``token`` is cancelled (from any thread, a signal handler or another
    process) or ``timeout`` passes while ``fn`` runs, the thread gets ``grace_period``
    seconds to return; one that does not is abandoned (logged, counted) and its slot goes
    at once to a new worker thread, so stuck threads never block later calls. This raises
    once ``fn`` is over (returned, or abandoned), with every partial result it stored and
    its fate. If the awaiting task is cancelled, the task's token is cancelled and
    :class:`asyncio.CancelledError` propagates, in the same way. A thread is never killed:
    an abandoned one keeps running until ``fn`` returns.

    Warning: pure-Python CPU-bound work holds the GIL and gains nothing from threads; it
    should call ``check_cancelled()`` in its loops.

    Args:
        fn: the blocking callable.
        *args: positional arguments for ``fn`` (use :func:`functools.partial` for keywords).
        token: the caller's token; cancelling it cancels ``fn``.
        timeout: seconds ``fn`` may run once started; ``None`` for no limit.
        grace_period: seconds a cancelled ``fn`` gets before its thread is abandoned;
            ``None`` for the pool's 0.1 s.
        partial_sink: called as ``partial_sink(key, value)`` for each ``store_partial``.
        interrupt_on_cancel: raise ``CancelledException`` inside a thread that ignores its
            cancellation for the grace period (pure-Python code only; see
            :meth:`ThreadPool.submit_task` for the limits).

    Returns:
        What ``fn`` returned.

    Raises:
        CancelledException: ``token`` was cancelled, before or during the call.
        PipelineTimeoutException: ``fn`` ran longer than ``timeout``.
        PoolClosedError: the default pool was shut down while this call was being made.
        TypeError, ValueError: invalid arguments (named in the message).
    """
    return await current_default_thread_pool().run_sync(
        fn,
        *args,
        token=token,
        timeout=timeout,
        grace_period=grace_period,
        partial_sink=partial_sink,
        interrupt_on_cancel=interrupt_on_cancel,
    )
