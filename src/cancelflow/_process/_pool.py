"""`ProcessPool`: a process pool that can stop a *running* task, reap everything it
started, and heal — the public API. The work is done by the pool's supervisor thread
(:mod:`._supervisor`), its zygote (:mod:`._zygote`) and its workers (:mod:`._worker`)."""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .._async import wait_for_callback
from .._exceptions import CancelledException
from .._fate import Fate
from .._map import ordered_map
from .._platform import require_process_pools
from .._pool_calls import check_call, check_initializer, future_done, ladder_seconds, usable_cpus
from .._token import CancellationToken
from .._validate import check_seconds as _seconds
from . import _supervisor, _zygote
from ._pickling import dump_call, prepare_by_value, unpicklable_part
from ._task import Task, TaskFuture
from ._worker import run_chunk

__all__ = ("ProcessPool", "ProcessPoolStatistics", "TaskFuture")

_seq = itertools.count(1)


@dataclass(frozen=True)
class ProcessPoolStatistics:
    """A snapshot of a :class:`ProcessPool` (for debugging and tests).

    ``queued`` counts the tasks not started yet: in the pool's queue, or handed to a
    busy worker to start after its running task (their futures say ``running()``, as
    the stdlib's call-queue items do; one its worker is just starting may be counted).
    A task on its way between the queue and a worker is counted once.
    """

    workers: int
    idle: int
    busy: int
    queued: int
    worker_pids: tuple[int, ...]
    replaced_total: int
    killed_total: int
    crashed_total: int
    completed_total: int
    #: the pool's zygote process (``None`` between a zygote's death and its successor)
    zygote_pid: int | None = None


class _UnsendableError(TypeError):
    """A task's callable or argument cannot be pickled (``__cause__`` says why)."""


class ProcessPool(concurrent.futures.Executor):
    """A pool of long-lived worker processes that stops running tasks on demand.

    A drop-in for :class:`concurrent.futures.ProcessPoolExecutor` (same arguments, same
    future states, ``map`` with ``chunksize``, the worker's traceback as ``__cause__``,
    ``BrokenProcessPool`` where the stdlib raises it, queued and running work finished at
    interpreter exit), except where stopping running work needs more:

    * cancelling works on a task that is already running (:meth:`TaskFuture.cancel`), and
      a worker's death fails only the task it was running (:class:`WorkerCrashedError`,
      also a ``BrokenProcessPool``): the pool replaces the worker (a fork of a warm
      zygote, a few milliseconds) and keeps its size, where the stdlib's pool breaks;
    * a task's arguments are pickled in :meth:`submit`, so one that cannot be sent is
      known there, before anything runs: the future :meth:`submit` returns has already
      failed with the pickling error, as the stdlib's does later (a note names the part),
      and :meth:`submit_task` raises ``TypeError``;
    * a result the parent cannot unpickle fails that task alone
      (:class:`UnreadableResultError`), where the stdlib's whole pool breaks.

    Each worker has its own channel; no lock is shared between processes.

    Stopping a running task is a ladder, each step taken only if the previous one did not
    end the task:

    1. its token is cancelled (``ctx.token`` / ``cancelflow.current_token()`` in the
       worker sees it at once) and the task has ``grace_period`` seconds to return;
    2. the worker gets SIGTERM, which becomes an exception in the task so that its
       ``finally`` blocks and context managers run; ``term_grace_period`` seconds;
    3. the worker and every process the task started (children, grandchildren, also
       ones that changed process group or session, also ones forked during the kill) are
       frozen and SIGKILLed, and the pool waits, event-driven (a pidfd each), until
       each one is confirmed gone; the zygote reaps them (its sweep), which the caller
       of a stopped task does not wait for.

    A task inside :func:`cancelflow.critical_section` defers steps 2 and 3 until the block
    ends, for at most the time it declared. The caller's exception comes once the stop is
    complete (the task returned, or its worker and tree are gone), so the partial results
    it carries are final; it does not wait for the replacement worker.

    Every task starts in a clean worker: signal dispositions and mask, resource limits,
    the working directory and the environment are put back after each task; a worker whose
    task left threads running (or changed what cannot be put back) is replaced. Not put
    back: file descriptors the task left open and module state it changed
    (``max_tasks_per_child`` bounds those).

    If the zygote itself dies, the pool kills what its workers were running (those tasks
    fail with :class:`WorkerCrashedError`), starts a new zygote and goes on with the
    queued tasks. A process that forks the owner gets a pool it cannot use
    (:class:`PoolClosedError` from every method, :meth:`shutdown` returns at once); the
    child holds none of the pool's descriptors, so the pool's life does not depend on it.

    Not promised: a task inside a long C call that ignores signals is only stopped by
    SIGKILL (step 3); code in a ``finally`` block does not run after SIGKILL. Partial
    results are only what the task stored before it was stopped.

    Args:
        max_workers: number of workers (default: the CPUs, as in
            :class:`~concurrent.futures.ProcessPoolExecutor`: ``os.process_cpu_count()``
            from Python 3.13, ``os.cpu_count()`` before).
        mp_context: only ``None`` (the pool starts its own workers, see the module
            :mod:`cancelflow._process`); anything else raises ``ValueError``.
        initializer: called as ``initializer(*initargs)`` in each worker before it takes a
            task; if it raises, the pool is broken (:class:`BrokenPoolError`), as in the
            stdlib. Must be picklable.
        initargs: positional arguments for ``initializer`` (any iterable).
        max_tasks_per_child: a worker ends and is replaced after this many tasks
            (``None``: never).
        grace_period: default seconds between the token and SIGTERM (0: skip to the next
            step at once).
        term_grace_period: default seconds between SIGTERM and SIGKILL (0: no SIGTERM
            step; SIGKILL right after the grace period).
        name: a label for log lines.

    Raises:
        TypeError / ValueError: for a bad argument, before any process starts.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        *,
        max_tasks_per_child: int | None = None,
        grace_period: float = 0.1,
        term_grace_period: float = 1.0,
        name: str | None = None,
    ) -> None:
        require_process_pools("ProcessPool")
        if max_workers is None:
            max_workers = usable_cpus()
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if mp_context is not None:
            raise ValueError(
                f"mp_context={mp_context!r} is not supported: ProcessPool starts its own "
                "workers (forked from a fresh zygote interpreter that imports __main__ "
                "the way spawn does), so it cannot use a multiprocessing context; pass None"
            )
        initargs = check_initializer(initializer, initargs)
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an int or None")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._grace = _seconds(grace_period, "grace_period")
        self._term_grace = _seconds(term_grace_period, "term_grace_period")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        if _zygote.importing_main:
            raise RuntimeError(
                "a ProcessPool was created while a pool's worker process imported the "
                "program's __main__ (as spawn does): protect the program's entry point "
                "with `if __name__ == '__main__':`"
            )
        init_payload: bytes | None = None
        if initializer is not None:
            try:
                init_payload = dump_call((initializer, initargs), None)
            except Exception as exc:
                raise TypeError(f"initializer cannot be sent to a process: {exc}") from exc
        self.name = name or f"process-pool-{id(self):x}"
        prepare_by_value()  # (a submit from a signal handler must not import it)
        options: dict[str, Any] = {"initializer": init_payload, "max_tasks": max_tasks_per_child}
        self._supervisor = _supervisor.Supervisor(self.name, max_workers, options)
        # A pool dropped without shutdown() ends once its work is done, as the stdlib's
        # (its supervisor holds no reference to this object; an iterator of map() does).
        weakref.finalize(self, self._supervisor.shutdown, False).atexit = False

    # == public API ==========================================================================
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Schedule ``fn(*args, **kwargs)`` in a worker; see :meth:`submit_task` for options.

        As :meth:`concurrent.futures.Executor.submit`: a callable or argument that cannot
        be pickled does not raise here; the returned future has already failed with the
        pickling error (a note names the part), and nothing was sent. (:meth:`submit_task`
        raises ``TypeError`` instead.)
        """
        try:
            return self.submit_task(fn, args, kwargs)
        except _UnsendableError as exc:
            original = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            if original is not exc:
                original.add_note(str(exc))
            future = TaskFuture()
            future.fate = Fate.FAILED
            future.set_exception(original)
            return future

    def submit_task(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        token: CancellationToken | None = None,
        timeout: float | None = None,
        grace_period: float | None = None,
        term_grace_period: float | None = None,
        partial_sink: Callable[[str, Any], None] | None = None,
    ) -> TaskFuture:
        """Schedule ``fn(*args, **kwargs)`` in a worker and return its :class:`TaskFuture`.

        ``fn``, ``args`` and ``kwargs`` are pickled here, in the caller's thread, so an
        unpicklable callable or argument raises at once and nothing is sent. Inside the
        task, :func:`cancelflow.current_token` is the worker's view of ``token`` (passing
        ``token`` itself in ``args`` also works: it arrives as that view).

        If cancelled while it waits or runs: ``token`` (or :meth:`TaskFuture.cancel`) is
        checked on entry (an already-cancelled token fails the future at once, taking no
        worker); a queued task is dropped; a running one is stopped by the ladder (see
        the class), using this call's ``grace_period`` and ``term_grace_period`` if given.
        The future then fails with :class:`CancelledException` (or, for
        :meth:`TaskFuture.cancel`, ends cancelled); after ``timeout`` seconds of running it
        fails with :class:`PipelineTimeoutException` the same way. The task's own token
        (``current_token()`` in the worker) is a child of ``token``: a cancel made inside
        the task stops the task the same way but leaves ``token`` alone, as in every pool.

        Safe to call from a signal handler, and from any thread.

        Args:
            fn: a picklable callable (module-level function or class instance).
            token: cancelling it stops the task.
            timeout: seconds the task may run before it is stopped.
            grace_period: override the pool's grace period for this task.
            term_grace_period: override the pool's SIGTERM grace for this task.
            partial_sink: called as ``sink(key, value)`` for each ``store_partial`` the
                task makes, on the pool's supervisor thread; must be quick and thread-safe.

        Raises:
            BrokenPoolError: the pool is broken (an initializer failed, ...).
            PoolClosedError: the pool was shut down, or this is a forked child of its owner.
            RuntimeError: the interpreter is exiting.
            TypeError: ``fn`` is not callable, or it or an argument cannot be pickled.
            ValueError: a negative timeout or grace period.
        """
        check_call(fn, args, kwargs, token, partial_sink)
        timeout = None if timeout is None else _seconds(timeout, "timeout", positive=True)
        grace = ladder_seconds(grace_period, self._grace, "grace_period")
        term_grace = ladder_seconds(term_grace_period, self._term_grace, "term_grace_period")
        supervisor = self._supervisor
        supervisor.check_open()
        call = (fn, tuple(args), dict(kwargs or {}))
        try:
            payload = dump_call(call, token)
        except Exception as exc:
            part = unpicklable_part(call, token)
            raise _UnsendableError(f"{part} cannot be sent to a process: {exc}") from exc
        future = TaskFuture()
        task = Task(
            supervisor, next(_seq), payload, future, token, grace, term_grace, timeout, partial_sink
        )
        future.attach(task)
        if token is not None and token.is_cancelled:
            task.stop_kind, task.stop_reason = "cancel", token.cancel_reason
            supervisor.finish(task, Fate.CANCELLED)
            return future
        supervisor.enqueue(task)
        return future

    async def run_sync(
        self,
        fn: Callable[..., Any],
        *args: Any,
        token: CancellationToken | None = None,
        timeout: float | None = None,
        grace_period: float | None = None,
        term_grace_period: float | None = None,
        partial_sink: Callable[[str, Any], None] | None = None,
    ) -> Any:
        """Run ``fn(*args)`` in a worker and return its result, from asyncio.

        Behaves like :meth:`submit_task` (same arguments and errors) except that it is
        awaited. Cancellation: ``token`` is checked on entry (raises
        :class:`CancelledException` without taking a worker); cancelling it while the task
        runs raises :class:`CancelledException` with the task's partial results once the
        stop is complete. If the awaiting asyncio task is itself cancelled, the worker task
        is stopped the same way and, once that is complete, ``asyncio.CancelledError``
        propagates.

        Raises:
            CancelledException: ``token`` was cancelled.
            PipelineTimeoutException: ``timeout`` passed.
            WorkerCrashedError: the worker died by itself.
            Exception: whatever ``fn`` raised.
        """
        check_call(fn, args, None, token, partial_sink)
        if token is not None and token.is_cancelled:
            reason = token.cancel_reason
            raise CancelledException(reason or "operation cancelled", reason=reason)
        future = self.submit_task(
            fn,
            args,
            token=token,
            timeout=timeout,
            grace_period=grace_period,
            term_grace_period=term_grace_period,
            partial_sink=partial_sink,
        )
        # Cancelling the awaiting task stops the task down the ladder and waits until the
        # stop is complete before asyncio.CancelledError propagates.
        await wait_for_callback(future_done(future), future.cancel, finish_after_cancel=True)
        return future.result()

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.ProcessPoolExecutor.map`.

        Every call is submitted before this returns (the iterables are consumed here),
        unless ``buffersize`` bounds the tasks in flight (Python 3.14's argument, here on
        every version: the first ``buffersize`` tasks are submitted here, one more each
        time a result is asked for); results come in order. With ``chunksize`` > 1 the
        calls travel to the workers in chunks of that many (one task per chunk, so a
        cancel or a crash stops a whole chunk; ``buffersize`` then counts chunks).
        ``timeout`` bounds the wait for all results, counted from this call; when it
        passes (``TimeoutError``), or a call raises, or the iterator is closed early, the
        tasks not yet collected are stopped, running ones included.

        Raises:
            ValueError: ``chunksize`` < 1 or ``buffersize`` < 1 (``TypeError`` if either is
                not an int).
            PoolClosedError, TypeError: as :meth:`submit` (with ``buffersize``, also from
                ``next()``, as is an error of an iterable).
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return ordered_map(self.submit, fn, iterables, timeout=timeout, buffersize=buffersize)
        chunks = _chunks(zip(*iterables, strict=False), chunksize)
        return ordered_map(
            self.submit,
            functools.partial(run_chunk, fn),
            (chunks,),
            timeout=timeout,
            buffersize=buffersize,
            chunked=True,
        )

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, cancel_running: bool = False
    ) -> None:
        """Stop accepting tasks; once the last task is over, end every process of the pool.

        Tasks already submitted still run (a pool shut down right after :meth:`submit`
        runs them all), exactly as ``ProcessPoolExecutor``, unless asked otherwise.

        Args:
            wait: block until every task is over and every process and the supervisor
                thread are gone. With ``False``, return at once; the work still runs.
            cancel_futures: pending futures are cancelled: queued tasks never start,
                but for one per worker that is not busy (idle or still starting), which
                runs, as the stdlib fills its call queue before it cancels the rest.
                Futures that say ``running()`` (those handed to a busy worker too)
                are left to finish.
            cancel_running: stop the tasks running now with the ladder (not part of the
                stdlib's API); combine with ``cancel_futures`` to stop everything. Tasks
                handed to a busy worker to start after its task (their futures say
                ``running()``) are stopped too: they never start (fate ``cancelled``).

        Idempotent. Everything the pool started (workers, their process trees, the zygote,
        pipes, the shared-memory chunk) is released; nothing is left running. In a forked
        child of the pool's owner this returns at once: the pool is the parent's.

        From a signal handler: safe, and it waits as asked, also when the handler
        interrupted a :meth:`submit` in the same thread (that submit then raises
        :class:`PoolClosedError` unless its task was already queued, and the task is
        never left behind). It cannot wait when the handler interrupted this thread
        inside one of the pool's futures (a ``cancel()``, a done-callback): the
        supervisor needs that future to end its task; then it logs a warning and returns
        as with ``wait=False``.
        """
        self._supervisor.shutdown(
            wait, cancel_futures=cancel_futures, running="ladder" if cancel_running else None
        )

    def terminate_workers(self) -> None:
        """Shut the pool down now: queued tasks never start, running ones get SIGTERM at once.

        Python 3.14's :meth:`ProcessPoolExecutor.terminate_workers`, on every version: as
        ``shutdown(wait=False, cancel_futures=True)``, and each running task skips the
        grace period of the ladder: its token is cancelled and its worker gets SIGTERM now
        (the task's ``finally`` blocks run, see the class), and SIGKILL with its whole
        tree if it still runs ``term_grace_period`` seconds later (at once if that is 0).
        A task inside :func:`cancelflow.critical_section` gets them when the block ends
        or its declared time runs out, as on the ladder; a task already past its token
        step keeps its ladder. Idle workers end with the pool. Returns at once;
        :meth:`shutdown` (``wait=True``) then waits until every process of the pool is
        gone.

        Unlike the stdlib, where the pool breaks and every running future fails with
        ``BrokenProcessPool``: a running task's future fails with
        :class:`CancelledException` (``fate`` ``terminated`` or ``killed``, reason
        ``"pool shut down (terminate)"``), and a task that finished first keeps its result.
        After this, :meth:`submit` raises :class:`PoolClosedError` (a ``RuntimeError``).
        Idempotent; a no-op in a forked child of the owner and on a broken pool.
        """
        self._supervisor.shutdown(False, cancel_futures=True, running="terminate")

    def kill_workers(self) -> None:
        """Shut the pool down now: queued tasks never start, running ones are killed at once.

        Python 3.14's :meth:`ProcessPoolExecutor.kill_workers`, on every version: as
        :meth:`terminate_workers`, but each running task's worker and whole process tree
        are frozen and SIGKILLed now, inside a critical section too, as
        :meth:`TaskFuture.kill` (no ``finally`` block of the task runs); its future
        fails with :class:`CancelledException` (``fate`` ``killed``, reason
        ``"pool shut down (kill)"``) once each of those processes is gone.
        """
        self._supervisor.shutdown(False, cancel_futures=True, running="kill")

    def statistics(self) -> ProcessPoolStatistics:
        """A snapshot of the pool's workers, queue and counters."""
        supervisor = self._supervisor
        workers = list(supervisor.workers.values())
        # The queue, then what the workers hold, then the queue again: the supervisor
        # moves a task between them by adding it where it goes before it takes it from
        # where it was (see Supervisor._give, _steal), so a task on its way is in one of
        # these reads (or two: it counts once).
        queued = {id(t): t for t in list(supervisor.queue)}
        queued.update((id(t), t) for w in workers for t in tuple(w.behind))
        queued.update((id(t), t) for t in list(supervisor.queue))
        return ProcessPoolStatistics(
            workers=sum(1 for w in workers if w.state in ("starting", "idle", "busy")),
            idle=sum(1 for w in workers if w.state == "idle"),
            busy=sum(1 for w in workers if w.state == "busy"),
            queued=sum(1 for t in queued.values() if not (t.dropped or t.done)),
            worker_pids=tuple(w.pid for w in workers if w.pid and w.state in ("idle", "busy")),
            replaced_total=supervisor.stats["replaced"],
            killed_total=supervisor.stats["killed"],
            crashed_total=supervisor.stats["crashed"],
            completed_total=supervisor.stats["completed"],
            zygote_pid=supervisor.zygote_pid,
        )

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker has started (``False`` if ``timeout`` passed first)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            stats = self.statistics()
            if stats.idle + stats.busy >= self._supervisor.size:
                return True
            if self._supervisor.shutting_down or (
                deadline is not None and time.monotonic() > deadline
            ):
                return False
            self._supervisor.ready_event.wait(0.05)
            self._supervisor.ready_event.clear()

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        supervisor = self._supervisor
        if os.getpid() != supervisor.owner:
            state = f"of process {supervisor.owner}"
        elif supervisor.broken is not None:
            state = "broken"
        elif supervisor.shutting_down:
            state = "shut down"
        else:
            state = "open"
        return f"<ProcessPool {self.name} workers={supervisor.size} {state}>"


def _chunks(calls: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk = list(itertools.islice(calls, size))
    while chunk:
        yield chunk
        chunk = list(itertools.islice(calls, size))
