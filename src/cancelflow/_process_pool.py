"""`ProcessPool`: a process pool that can stop a *running* task, reap everything it
started, and heal."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import heapq
import io
import itertools
import multiprocessing.spawn
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from dataclasses import dataclass, field
from typing import Any

from . import _cell, _interpreter_exit, _worker
from ._channel import FrameReader, encode
from ._exceptions import (
    BrokenPoolError,
    CancelledException,
    PipelineTimeoutException,
    PoolClosedError,
    UnreadableResultError,
    WorkerCrashedError,
)
from ._fate import Fate
from ._log import safe_log
from ._platform import pidfd_open, send_signal
from ._token import CancellationToken
from ._validate import check_seconds as _seconds
from ._worker import TASK_TOKEN_ID, Control, kill_tree_of, recv_seq_fds, run_chunk, send_seq

try:  # the stdlib's own class, so that code (and tests) written for it keep working
    from concurrent.futures.process import _RemoteTraceback
except ImportError:  # pragma: no cover - every CPython since 3.4 has it

    class _RemoteTraceback(Exception):  # type: ignore[no-redef]
        def __init__(self, tb: str) -> None:
            self.tb = tb

        def __str__(self) -> str:
            return self.tb

__all__ = ("ProcessPool", "ProcessPoolStatistics", "TaskFuture")

_SLOT = _cell.SLOT_SIZE
_seq = itertools.count(1)
_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()



@dataclass(frozen=True)
class ProcessPoolStatistics:
    """A snapshot of a :class:`ProcessPool` (for debugging and tests)."""

    workers: int
    idle: int
    busy: int
    queued: int
    worker_pids: tuple[int, ...]
    replaced_total: int
    killed_total: int
    crashed_total: int
    completed_total: int


class TaskFuture(concurrent.futures.Future[Any]):
    """The future of one :class:`ProcessPool` task, whose :meth:`cancel` works while it runs.

    Attributes:
        fate: how the task ended (a :class:`Fate`): ``finished``, ``failed`` (raised),
            ``cancelled`` (stopped before starting, or returned/raised after being asked
            through its token), ``terminated`` (SIGTERM became an exception in the task and
            its ``finally`` blocks ran), ``killed`` (SIGKILL, with its process tree),
            ``crashed`` (the worker died by itself).
        cancel_reason: why it was stopped, if it was.
        partial_results: what the task stored with ``store_partial`` (final once done).
        pid: the worker process that ran it, once it started.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fate = Fate.PENDING
        self.cancel_reason: str | None = None
        self.partial_results: dict[str, Any] = {}
        self.pid: int | None = None
        self._task: _Task | None = None
        #: made by a pool: once ``_task`` is gone the task is settled or being settled
        self._pooled = False

    def cancel(self) -> bool:
        """Stop the task: a queued one never starts; a running one goes down the ladder.

        Returns ``True`` if the future will end cancelled: not when the task already
        finished, nor when another stop (its token, its timeout) got there first, which
        ends it with :class:`CancelledException`. For a queued task the future is
        cancelled before this returns. For a running task this only starts the stop:
        the future becomes cancelled (and ``result()`` raises
        :class:`concurrent.futures.CancelledError`) once the task returned or its worker
        and process tree are confirmed gone, never before.
        """
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            if self._state == FINISHED:
                return False
        task = self._task
        if task is None:
            return super().cancel() if not self._pooled else self.cancelled()
        task.pool._request_stop(task, "future", "future cancelled")
        # True only if this call's stop is the one that ends the task (a token's or a
        # timeout's stop that won the race ends it with CancelledException instead).
        return task.stop_kind == "future" and self._state != FINISHED

    def kill(self, reason: str | None = "killed") -> bool:
        """Stop the task at once: SIGKILL its worker and whole process tree, no grace.

        Like :meth:`cancel` (a queued task never starts; the future ends cancelled once
        the worker and its tree are confirmed gone), but skipping the token and SIGTERM
        steps: no ``finally`` block of the task runs. Returns ``False`` if it already
        finished.
        """
        with self._condition:
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            if self._state == FINISHED:
                return False
        task = self._task
        if task is None:
            return super().cancel() if not self._pooled else self.cancelled()
        task.pool._request_stop(task, "future", reason, kill=True)
        return self._state != FINISHED

    def _settle_cancelled(self) -> None:
        """End this future cancelled, whether it was pending or running."""
        with self._condition:
            if self._state not in (PENDING, RUNNING, CANCELLED):
                return
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]


@dataclass(eq=False)
class _Task:
    pool: ProcessPool
    seq: int
    payload: bytes
    future: TaskFuture
    token: CancellationToken | None
    grace: float
    term_grace: float
    timeout: float | None
    partial_sink: Callable[[str, Any], None] | None
    worker: _WorkerHandle | None = None
    stop_kind: str | None = None  # "cancel" | "timeout" | "future" | "shutdown"
    stop_reason: str | None = None
    stage: int = 0  # 1 token set, 2 SIGTERM sent, 3 SIGKILL sent
    done: bool = False
    #: dropped before it was dispatched (decided under the future's lock, see _claim)
    dropped: bool = False
    handle: Any = None
    partials: dict[str, Any] = field(default_factory=dict)
    #: an error that ends the task whatever it returns (a message that could not be read)
    error: BaseException | None = None


class _WorkerHandle:
    def __init__(self, pool: ProcessPool, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.reader = FrameReader()
        self.pid = 0
        self.pidfd: int | None = None
        self.state = "starting"  # starting, idle, busy, retiring, dying, dead
        self.task: _Task | None = None
        self.waiting: set[int] = set()  # pidfds of the tree being killed
        self.status: int | None = None
        self.gone = False
        self.ready = False  # said "ready" (its initializer ran)
        self.outbox = bytearray()  # frames the socket could not take yet
        self.feeding = False  # its frames are being handled (see ProcessPool._feed)
        #: the zygote reaped it and killed what was left of its tree (or cannot any more)
        self.swept = False
        #: why it is being ended by the pool itself (the zygote died), if so
        self.lost: str | None = None
        self.slot = pool._slot_tokens[index]
        self.control = pool._controls[index]

    def drop_views(self) -> None:
        """Forget this worker's views of the shared chunk (so it can be unmapped)."""
        with contextlib.suppress(AttributeError):
            del self.slot, self.control


class _UnsendableError(TypeError):
    """A task's callable or argument cannot be pickled (``__cause__`` says why)."""


class _TaskPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, tokens: tuple[CancellationToken, ...]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._tokens = tokens

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, CancellationToken):
            if any(obj is t for t in self._tokens):
                return TASK_TOKEN_ID
            raise TypeError(
                "only the task's own token (the token= argument) can be sent to a process "
                "worker; inside the task use cancelflow.current_token()"
            )
        return None


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
    * a task's arguments are pickled in :meth:`submit`, so one that cannot be sent raises
      ``TypeError`` there, before anything runs (the stdlib fails the future later);
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
       frozen and SIGKILLed, and the pool waits, event-driven (pidfd, then the zygote's
       sweep), until each one is confirmed gone and reaped.

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
        max_workers: number of workers (default: the CPU count).
        mp_context: only ``None`` (the pool starts its own workers, see the module
            :mod:`cancelflow._worker`); anything else raises ``ValueError``.
        initializer: called as ``initializer(*initargs)`` in each worker before it takes a
            task; if it raises, the pool is broken (:class:`BrokenPoolError`), as in the
            stdlib. Must be picklable.
        initargs: arguments for ``initializer``.
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
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        grace_period: float = 0.1,
        term_grace_period: float = 1.0,
        name: str | None = None,
    ) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
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
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if not isinstance(initargs, tuple):
            raise TypeError(f"initargs must be a tuple, not {type(initargs).__name__}")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an int or None")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._grace = _seconds(grace_period, "grace_period")
        self._term_grace = _seconds(term_grace_period, "term_grace_period")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        if _worker.importing_main:
            raise RuntimeError(
                "a ProcessPool was created while a pool's worker process imported the "
                "program's __main__ (as spawn does): protect the program's entry point "
                "with `if __name__ == '__main__':`"
            )
        init_payload: bytes | None = None
        if initializer is not None:
            try:
                init_payload = pickle.dumps((initializer, initargs), pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise TypeError(f"initializer cannot be sent to a process: {exc}") from exc
        self.name = name or f"process-pool-{id(self):x}"
        self._size = max_workers
        self._options: dict[str, Any] = {
            "initializer": init_payload,
            "max_tasks": max_tasks_per_child,
        }
        # Re-entrant: a signal handler may submit while the interrupted code holds it.
        self._lock = threading.RLock()
        self._queue: collections.deque[_Task] = collections.deque()
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        #: no new tasks (shutdown() was called, or the pool broke)
        self._shutdown = False
        #: why the pool cannot run tasks any more, once it broke
        self._broken: BaseException | None = None
        self._closed = threading.Event()
        self._owner = os.getpid()
        self._forked = False  # set in a forked child of the owner (see _forget_in_child)
        # One receive buffer, reused: recv(1 MiB) would allocate (mmap) a new one each time.
        self._inbox = bytearray(1 << 16)
        self._timers: list[
            tuple[float, int, Callable[[_Task], None], weakref.ref[_Task]]
        ] = []
        self._timer_ids = itertools.count()
        self._stats = collections.Counter[str]()
        self._workers: dict[int, _WorkerHandle] = {}
        self._crash_streak = 0
        self._zygote_streak = 0
        self._zygote_ready = False
        self._ready_event = threading.Event()
        self._wake_pending = False

        self._chunk = _cell.Chunk(2 * max_workers + 1, pinned=True, label="cancelflow-pool")
        self._chunk.mark_shared()
        self._slot_tokens = [
            CancellationToken._on_slot(self._chunk, (1 + 2 * i) * _SLOT, name=f"{self.name}-slot-{i}")
            for i in range(max_workers)
        ]
        self._controls = [
            Control.from_buffer(self._chunk.mm, (2 + 2 * i) * _SLOT) for i in range(max_workers)
        ]
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake",))
        self._zygote_sock: socket.socket | None = None
        try:
            self._start_zygote()
        except BaseException:  # nothing may be left behind by a pool that never started
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._release_chunk()
            raise
        self._thread = threading.Thread(
            target=self._run, name=f"cancelflow-{self.name}", daemon=True
        )
        self._thread.start()
        _pools.add(self)
        _interpreter_exit.register(self)

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
        fails with :class:`PipelineTimeoutException` the same way. A cancel made inside the
        worker (``current_token().cancel()``) cancels ``token`` in this process too.

        Safe to call from a signal handler, and from any thread.

        Args:
            fn: a picklable callable (module-level function or class instance).
            token: cancelling it stops the task.
            timeout: seconds the task may run before it is stopped.
            grace_period / term_grace_period: override the pool's ladder for this task.
            partial_sink: called as ``sink(key, value)`` for each ``store_partial`` the
                task makes, on the pool's supervisor thread; must be quick and thread-safe.

        Raises:
            BrokenPoolError: the pool is broken (an initializer failed, ...).
            PoolClosedError: the pool was shut down, or this is a forked child of its owner.
            RuntimeError: the interpreter is exiting.
            TypeError: ``fn`` is not callable, or it or an argument cannot be pickled.
            ValueError: a negative timeout or grace period.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if isinstance(args, (str, bytes)) or not isinstance(args, Iterable):
            raise TypeError(f"args must be an iterable of arguments, not {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a mapping or None, not {type(kwargs).__name__}")
        if token is not None and not isinstance(token, CancellationToken):
            raise TypeError(f"token must be a CancellationToken, not {type(token).__name__}")
        timeout = None if timeout is None else _seconds(timeout, "timeout", positive=True)
        grace = self._grace if grace_period is None else _seconds(grace_period, "grace_period")
        term_grace = (
            self._term_grace
            if term_grace_period is None
            else _seconds(term_grace_period, "term_grace_period")
        )
        if partial_sink is not None and not callable(partial_sink):
            raise TypeError(f"partial_sink must be callable, not {type(partial_sink).__name__}")
        self._check_open()
        call = (fn, tuple(args), dict(kwargs or {}))
        try:
            try:  # fast path: nothing in the call needs translating
                payload = pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
            except TypeError:
                if token is None:
                    raise
                buffer = io.BytesIO()
                _TaskPickler(buffer, (token,)).dump(call)
                payload = buffer.getvalue()
        except Exception as exc:
            part = _unpicklable_part(call, token)
            raise _UnsendableError(f"{part} cannot be sent to a process: {exc}") from exc
        future = TaskFuture()
        task = _Task(
            self, next(_seq), payload, future, token, grace, term_grace, timeout, partial_sink
        )
        future._task = task
        future._pooled = True
        if token is not None and token.is_cancelled:
            task.stop_kind, task.stop_reason = "cancel", token.cancel_reason
            self._finish(task, Fate.CANCELLED)
            return future
        with self._lock:
            self._check_open()
            self._queue.append(task)
        self._post(("dispatch",))
        if token is not None:
            task.handle = token.on_cancel(
                lambda: self._request_stop(task, "cancel", token.cancel_reason)
            )
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
        if token is not None and not isinstance(token, CancellationToken):
            raise TypeError(f"token must be a CancellationToken, not {type(token).__name__}")
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
        waiter = _AsyncWaiter(future)
        try:
            await asyncio.shield(waiter.result)
        except asyncio.CancelledError:
            future.cancel()
            while not waiter.result.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(waiter.result)
            raise
        return future.result()

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.ProcessPoolExecutor.map`.

        The iterables are consumed and every call submitted at once; results come in
        order. With ``chunksize`` > 1 the calls travel to the workers in chunks of that
        many (one task per chunk, so a cancel or a crash stops a whole chunk).
        ``timeout`` bounds the wait for all results, counted from this call; when it
        passes (``TimeoutError``), or a call raises, or the iterator is closed early, the
        tasks not yet collected are stopped, running ones included.

        Raises:
            ValueError: ``chunksize`` < 1 (``TypeError`` if it is not an int).
            PoolClosedError, TypeError: as :meth:`submit`.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        chunks = _chunks(zip(*iterables, strict=False), chunksize)
        results = super().map(functools.partial(run_chunk, fn), chunks, timeout=timeout)
        return _flatten(results)

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, cancel_running: bool = False
    ) -> None:
        """Stop accepting tasks; once the last task is over, end every process of the pool.

        Tasks already submitted still run (a pool shut down right after :meth:`submit`
        runs them all), exactly as ``ProcessPoolExecutor``, unless asked otherwise.

        Args:
            wait: block until every task is over and every process and the supervisor
                thread are gone. With ``False``, return at once; the work still runs.
            cancel_futures: queued tasks never start (their futures end cancelled).
            cancel_running: stop the tasks running now with the ladder (not part of the
                stdlib's API); combine with ``cancel_futures`` to stop everything.

        Idempotent. Everything the pool started (workers, their process trees, the zygote,
        pipes, the shared-memory chunk) is released; nothing is left running. In a forked
        child of the pool's owner this returns at once: the pool is the parent's.
        """
        if os.getpid() != self._owner:
            return
        with self._lock:
            self._shutdown = True
            queued = list(self._queue) if cancel_futures else []
        for task in queued:
            self._drop_queued(task, "future", "pool shut down")
        self._post(("close", cancel_running))
        if wait and threading.current_thread() is not self._thread:
            self._closed.wait()
            self._thread.join()

    def statistics(self) -> ProcessPoolStatistics:
        """A snapshot of the pool's workers, queue and counters."""
        workers = list(self._workers.values())
        return ProcessPoolStatistics(
            workers=sum(1 for w in workers if w.state in ("starting", "idle", "busy")),
            idle=sum(1 for w in workers if w.state == "idle"),
            busy=sum(1 for w in workers if w.state == "busy"),
            queued=sum(1 for t in list(self._queue) if not (t.dropped or t.done)),
            worker_pids=tuple(w.pid for w in workers if w.pid and w.state in ("idle", "busy")),
            replaced_total=self._stats["replaced"],
            killed_total=self._stats["killed"],
            crashed_total=self._stats["crashed"],
            completed_total=self._stats["completed"],
        )

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker has started (``False`` if ``timeout`` passed first)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            stats = self.statistics()
            if stats.idle + stats.busy >= self._size:
                return True
            if self._shutdown or (deadline is not None and time.monotonic() > deadline):
                return False
            self._ready_event.wait(0.05)
            self._ready_event.clear()

    def _check_open(self) -> None:
        """Raise what a new task must hear if the pool cannot take it."""
        if self._forked:
            raise PoolClosedError(
                f"{self.name} belongs to process {self._owner}; this process "
                f"({os.getpid()}) is a fork of it and cannot use it: make a new pool here"
            )
        if self._broken is not None:
            raise self._broken
        _interpreter_exit.check_open()  # before: the exit hook shuts every pool down
        if self._shutdown:
            raise PoolClosedError(f"{self.name} is shut down")

    # == cross-thread requests =================================================================
    def _post(self, command: tuple[Any, ...]) -> None:
        self._commands.append(command)
        wake = self._wake_w
        if wake >= 0 and not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(OSError):
                os.write(wake, b"\0")

    def _request_stop(
        self, task: _Task, kind: str, reason: str | None, *, kill: bool = False
    ) -> None:
        """Stop a task from any thread, or from a signal handler: takes no pool lock.

        A task not dispatched yet is dropped here and now (its future is settled before
        this returns); a dispatched one is stopped by the supervisor.
        """
        if task.done or (task.stop_kind is not None and not kill):
            return
        if self._drop_queued(task, kind, reason):
            return
        with task.future._condition:  # the first stop asked for decides how it ends
            first = task.stop_kind is None and not task.done
            if first:
                task.stop_kind, task.stop_reason = kind, reason
        if first or kill:
            self._post(("kill" if kill else "stop", task, kind, reason))

    def _drop_queued(self, task: _Task, kind: str, reason: str | None) -> bool:
        """Settle a task that no worker took yet as cancelled; ``False`` if one did."""
        with task.future._condition:  # re-entrant, and the one lock _claim takes
            if task.worker is not None or task.done:
                return False
            if task.dropped:
                return True
            task.dropped = True
            task.stop_kind, task.stop_reason = kind, reason
        self._finish(task, Fate.CANCELLED)
        return True

    def _claim(self, task: _Task, worker: _WorkerHandle) -> bool:
        """Give a queued task to ``worker``, unless it was dropped meanwhile."""
        future = task.future
        with future._condition:
            if task.dropped or task.done or future._state != PENDING:
                return False
            task.worker = worker
            future._state = RUNNING
        return True

    # == supervisor thread ===================================================================
    def _run(self) -> None:
        try:
            while not self._loop_once():
                pass
        except BaseException as exc:  # noqa: BLE001 - the pool breaks, loudly, everywhere
            safe_log("CRITICAL", "process pool supervisor crashed", exception=exc, pool=self.name)
            broken = BrokenPoolError(f"{self.name} is broken: its supervisor failed: {exc!r}")
            broken.__cause__ = exc
            self._break(broken)
        finally:
            self._teardown()

    def _break(self, error: BaseException) -> None:
        """The pool cannot go on: refuse new tasks, and fail every pending one (after
        teardown has ended their processes) with ``error``."""
        with self._lock:
            if self._broken is None:
                self._broken = error
            self._shutdown = True

    def _loop_once(self) -> bool:
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        for key, mask in self._selector.select(timeout):
            kind = key.data[0]
            if kind == "wake":
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 65536)
                # Only after draining: a post that lands before this line skipped its write
                # but its command is already queued and is handled below; a post after it
                # writes a fresh byte. Clearing first could swallow that byte for good.
                self._wake_pending = False
            elif kind == "zygote":
                self._on_zygote()
            elif kind == "sock":
                worker = key.data[1]
                if mask & selectors.EVENT_WRITE:
                    self._guarded(worker.task, self._flush, worker)
                if mask & selectors.EVENT_READ:
                    self._guarded(worker.task, self._on_socket, worker)
            elif kind == "pidfd":
                self._guarded(key.data[1].task, self._on_pidfd, key.data[1], key.data[2])
        while self._commands:
            command = self._commands.popleft()
            task = command[1] if len(command) > 1 and isinstance(command[1], _Task) else None
            self._guarded(task, self._on_command, command)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, action, ref = heapq.heappop(self._timers)
            timed = ref()
            if timed is not None and not timed.done:
                self._guarded(timed, action, timed)
        self._guarded(None, self._dispatch)
        return self._closing_done()

    def _guarded(self, task: _Task | None, action: Callable[..., None], *args: Any) -> None:
        """Run one step of the supervisor; an error in it fails ``task`` alone.

        Only a failure that concerns no task (or a second failure while failing one)
        reaches :meth:`_run`, which breaks the pool.
        """
        try:
            action(*args)
        except BaseException as exc:  # even SystemExit from a user's __reduce__
            if task is None or task.done:
                raise
            safe_log("ERROR", f"handling task {task.seq} failed", exception=exc, pool=self.name)
            self._fail_task(task, exc)

    def _fail_task(self, task: _Task, error: BaseException) -> None:
        """End ``task`` with ``error``: stop it if it still runs, fail its future once
        the stop is complete."""
        if task.error is None:
            task.error = error
        if task.worker is None or task.worker.task is not task:
            self._finish(task, Fate.FAILED, error=task.error)
        else:
            self._stop(task, "error", f"the pool could not handle the task: {error!r}")

    def _on_command(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "stop":
            self._stop(command[1], command[2], command[3])
        elif kind == "kill":
            task = command[1]
            self._stop(task, command[2], command[3])
            worker = task.worker
            if not task.done and worker is not None and worker.task is task and task.stage < 3:
                task.stage = 3
                self._kill(worker)
        elif kind == "close":
            if command[1]:
                for worker in list(self._workers.values()):
                    if worker.task is not None:
                        self._stop(worker.task, "shutdown", "pool shut down")

    def _at(self, delay: float, action: Callable[[_Task], None], task: _Task) -> None:
        """Call ``action(task)`` on this thread after ``delay`` seconds, if the task is
        still referenced then (a weak reference: a finished task's timer keeps nothing
        alive, so a long ``timeout`` does not hold its result)."""
        entry = (time.monotonic() + delay, next(self._timer_ids), action, weakref.ref(task))
        heapq.heappush(self._timers, entry)

    # -- the zygote -----------------------------------------------------------------------------
    def _start_zygote(self) -> None:
        """Start a zygote (a fresh interpreter) and send it what spawn would send."""
        parent_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # -P: the current directory is not put first on sys.path, so a file there named
        # like a module the zygote imports (selectors.py) is not run; the package's own
        # location goes last, for a cancelflow that is importable only from here.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(_cell.__file__)))
        try:
            prep = multiprocessing.spawn.get_preparation_data(self.name)
            prep["authkey"] = bytes(prep["authkey"])
            prep.pop("start_method", None)
            # The setup travels in a file (its descriptor passed once): initargs may be
            # larger than one SOCK_SEQPACKET record.
            with tempfile.TemporaryFile() as setup:
                pickle.dump((prep, self._options), setup, pickle.HIGHEST_PROTOCOL)
                setup.flush()
                setup.seek(0)
                self._zygote = subprocess.Popen(
                    [
                        multiprocessing.spawn.get_executable() or sys.executable,
                        # the interpreter's flags (-O, -W, -X ...), as spawn passes them
                        *subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
                        "-P",
                        "-c",
                        f"import sys; sys.path.append({package_root!r}); "
                        "from cancelflow._worker import zygote_main; "
                        f"zygote_main({zygote_end.fileno()}, {self._chunk.fd})",
                    ],
                    pass_fds=(zygote_end.fileno(), self._chunk.fd),
                    stdin=subprocess.DEVNULL,
                )
                send_seq(parent_end, ("setup",), [setup.fileno()])
        except BaseException:
            parent_end.close()
            zygote = getattr(self, "_zygote", None)
            if zygote is not None:
                zygote.kill()
                zygote.wait()
            raise
        finally:
            zygote_end.close()
        self._zygote_sock = parent_end
        self._zygote_ready = False
        self._selector.register(parent_end, selectors.EVENT_READ, ("zygote",))

    def _on_zygote(self) -> None:
        sock = self._zygote_sock
        assert sock is not None
        try:
            message, fds = recv_seq_fds(sock)
        except OSError:
            message, fds = None, []
        for fd in fds:
            os.close(fd)
        if message is None:
            self._on_zygote_death()
            return
        kind = message[0]
        if kind == "zygote-ready":
            self._zygote_ready = True
            for index in range(self._size):
                worker = self._workers.get(index)
                if worker is None or worker.state == "dead":
                    self._spawn(index)
        elif kind == "spawned":
            _, index, pid = message
            worker = self._workers.get(index)
            if worker is not None and not worker.pid:
                self._know_pid(worker, pid)
        elif kind == "swept":
            _, pid, status, swept = message
            if swept:
                self._stats["swept"] += swept
                safe_log("INFO", f"killed {swept} strays of worker {pid}", pool=self.name)
            for worker in self._workers.values():
                if worker.pid == pid and worker.gone and not worker.swept:
                    worker.status = status
                    worker.swept = True
                    self._guarded(worker.task, self._retire, worker)
        elif kind == "prepare-failed":
            safe_log("WARNING", f"workers could not import __main__: {message[1]}", pool=self.name)

    def _on_zygote_death(self) -> None:
        """The zygote died: end what its workers run, start a new zygote, go on.

        Each worker froze when the zygote died (its parent-death signal is SIGSTOP), so
        its tree is still under it; it is killed here like any stopped worker. Tasks that
        were running fail with :class:`WorkerCrashedError`; queued ones run on the new
        zygote's workers.
        """
        sock = self._zygote_sock
        assert sock is not None
        self._selector.unregister(sock)
        sock.close()
        self._zygote_sock = None
        try:
            self._zygote.wait(timeout=5)
        except subprocess.TimeoutExpired:  # it closed its end but lives on: end it
            self._zygote.kill()
            self._zygote.wait()
        was_ready, self._zygote_ready = self._zygote_ready, False
        why = "the pool's zygote process died"
        for worker in list(self._workers.values()):
            if worker.state == "dead":
                continue
            worker.lost = why
            worker.swept = True  # nobody can sweep now; the pool waits on pidfds instead
            if worker.gone:  # it was waiting for its sweep
                self._retire(worker)
                continue
            if not worker.pid:
                pid = worker.control.pid if hasattr(worker, "control") else 0
                if pid > 1:  # forked and froze before its pid reached us
                    self._know_pid(worker, pid)
            if worker.pid and not worker.gone:
                if worker.state != "dying":
                    self._kill(worker)
            elif not worker.pid:  # never forked, or exited by itself at once
                worker.gone = True
                self._retire(worker)
        if self._shutdown and self._closing_done():
            return
        self._zygote_streak = 0 if was_ready else self._zygote_streak + 1
        if self._zygote_streak >= 3:
            safe_log("CRITICAL", "the pool's zygote keeps dying at start", pool=self.name)
            self._break(BrokenPoolError(f"{self.name}: its zygote process keeps dying at start"))
            return
        safe_log("ERROR", f"{why}; starting a new one", pool=self.name)
        self._stats["zygotes_replaced"] += 1
        self._start_zygote()

    def _know_pid(self, worker: _WorkerHandle, pid: int) -> None:
        """Record a worker's pid (from the zygote or from the worker, whichever is first)."""
        worker.pid = pid
        worker.pidfd = pidfd_open(pid)
        if worker.pidfd is None:
            self._on_gone(worker)
        else:
            self._selector.register(worker.pidfd, selectors.EVENT_READ, ("pidfd", worker, pid))

    def _spawn(self, index: int) -> None:
        if self._broken is not None or self._zygote_sock is None or not self._zygote_ready:
            return  # a new zygote spawns every missing worker once it is ready
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slot = self._slot_tokens[index]
        slot.reset()
        control = self._controls[index]
        control.critical_until = 0.0
        control.pid = 0
        worker = _WorkerHandle(self, index, parent_end)
        self._workers[index] = worker
        parent_end.setblocking(False)  # never block the supervisor on a frozen worker
        self._selector.register(parent_end, selectors.EVENT_READ, ("sock", worker))
        try:
            send_seq(
                self._zygote_sock,
                ("spawn", index, (1 + 2 * index) * _SLOT, (2 + 2 * index) * _SLOT),
                [child_end.fileno()],
            )
        except OSError:
            pass  # the zygote is dying: its EOF comes next and starts a new one
        finally:
            child_end.close()

    # -- worker channel ------------------------------------------------------------------------
    def _send_to(self, worker: _WorkerHandle, frame: bytes) -> None:
        """Send a frame without blocking: what the socket cannot take now waits in the
        worker's outbox and goes when the socket is writable (see :meth:`_flush`)."""
        if worker.outbox:
            worker.outbox += frame
            return
        try:
            sent = worker.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the worker is dying; its pidfd will tell
        if sent < len(frame):
            worker.outbox += memoryview(frame)[sent:]
            self._watch_writable(worker, True)

    def _flush(self, worker: _WorkerHandle) -> None:
        if worker.sock.fileno() < 0:  # retired by an earlier event of the same select
            return
        try:
            sent = worker.sock.send(worker.outbox)
        except BlockingIOError:
            return
        except OSError:
            sent = len(worker.outbox)  # dying: what it did not read is lost with it
        del worker.outbox[:sent]
        if not worker.outbox:
            self._watch_writable(worker, False)

    def _watch_writable(self, worker: _WorkerHandle, writable: bool) -> None:
        """Have the selector report the worker's socket writable too, or no longer."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
        with contextlib.suppress(KeyError, ValueError):  # no longer watched: it is gone
            self._selector.modify(worker.sock, events, ("sock", worker))

    def _on_socket(self, worker: _WorkerHandle) -> None:
        if worker.sock.fileno() < 0:  # retired by an earlier event of the same select
            return
        try:
            size = worker.sock.recv_into(self._inbox)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if not size:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.sock)
            return
        self._feed(worker, memoryview(self._inbox)[:size])

    def _feed(self, worker: _WorkerHandle, data: bytes | memoryview) -> None:
        worker.feeding = True  # a handler that drains this worker must not re-enter
        try:
            for message in worker.reader.feed(data):
                self._guarded(worker.task, self._on_message, worker, message)
        finally:
            worker.feeding = False

    def _on_message(self, worker: _WorkerHandle, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            if not worker.pid:  # before the zygote's "spawned": the pid is known now
                self._know_pid(worker, message[1])
            worker.ready = True
            if worker.state == "starting" and not worker.gone:
                worker.state = "idle"
                self._crash_streak = 0
                self._ready_event.set()
            return
        if kind == "init-failed":
            _, pid, text, tb = message
            broken = BrokenPoolError(f"{self.name} is broken: a worker's initializer raised {text}")
            broken.__cause__ = _RemoteTraceback(tb)
            safe_log("ERROR", f"worker {pid}: initializer failed: {text}", pool=self.name)
            self._break(broken)
            return
        if kind == "retire":
            # The task changed the worker's process for good (see _worker._ProcessState):
            # it gets no more tasks and is replaced once it has exited.
            if worker.state == "busy":
                worker.state = "retiring"
            safe_log("INFO", f"worker {worker.pid} retires: {message[2]}", pool=self.name)
            return
        task = worker.task
        if task is None or task.seq != message[1]:
            return
        if kind == "partial":
            _, _, key, blob, type_name = message
            try:
                value = pickle.loads(blob)
            except BaseException as exc:  # even SystemExit: this task fails
                raise UnreadableResultError(
                    f"partial result {key!r} of task {task.seq} could not be unpickled here: "
                    f"{exc!r}",
                    what=f"partial result {key!r}",
                    remote_text=f"a {type_name} value",
                ) from exc
            task.partials[key] = value
            if task.partial_sink is not None:
                try:
                    task.partial_sink(key, value)
                except Exception as exc:  # noqa: BLE001 - a sink must not break the pool
                    safe_log("ERROR", "partial_sink raised", exception=exc, pool=self.name)
        elif kind == "cancel":
            # The task cancelled its own token: the caller's token hears it too.
            reason = message[2]
            if task.token is not None:
                task.token.cancel(reason)
            else:
                self._stop(task, "cancel", reason)
        elif kind == "result":
            _, _, outcome, blob, text = message
            worker.task = None
            if worker.state == "busy":
                worker.state = "idle"
            self._stats["completed"] += 1
            if outcome == "terminated":
                self._finish(task, Fate.TERMINATED)
                return
            try:
                value = pickle.loads(blob)
            except BaseException as exc:  # noqa: BLE001 - even SystemExit: this task fails
                what = "result" if outcome == "ok" else "exception"
                error = UnreadableResultError(
                    f"the {what} of task {task.seq} could not be unpickled here: {exc!r}",
                    what=what,
                    remote_text=text if outcome != "ok" else f"a {text} value",
                )
                error.__cause__ = exc
                self._finish(task, Fate.FAILED, error=error)
                return
            if outcome == "ok":
                if task.stop_kind == "future":
                    self._finish(task, Fate.CANCELLED)
                else:
                    self._finish(task, Fate.FINISHED, value=value)
            elif isinstance(value, CancelledException) and (
                task.stop_kind is not None or worker.slot.is_cancelled
            ):
                if task.stop_kind is None:
                    task.stop_kind, task.stop_reason = "cancel", worker.slot.cancel_reason
                self._finish(task, Fate.CANCELLED)
            else:
                if text and isinstance(value, BaseException):
                    value.__cause__ = _RemoteTraceback(text)
                self._finish(task, Fate.FAILED, error=value)

    # -- dispatch ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if not self._queue or self._broken is not None:
            return
        for worker in self._workers.values():
            if worker.state != "idle" or worker.pid <= 1:
                continue
            while self._queue:
                task = self._queue.popleft()
                if self._claim(task, worker):
                    break
            else:
                return
            worker.state = "busy"
            worker.task = task
            worker.slot.reset()
            task.future.pid = worker.pid
            task.future.fate = Fate.RUNNING
            self._send_to(worker, encode(("task", task.seq, task.payload)))
            if task.timeout is not None:
                self._at(task.timeout, self._on_timeout, task)
            if task.stop_kind is None and task.token is not None and task.token.is_cancelled:
                self._stop(task, "cancel", task.token.cancel_reason)

    def _on_timeout(self, task: _Task) -> None:
        self._stop(task, "timeout", f"timeout after {task.timeout:g}s")

    # -- the ladder ----------------------------------------------------------------------------
    def _stop(self, task: _Task, kind: str, reason: str | None) -> None:
        if task.done:
            return
        if task.worker is None:
            self._request_stop(task, kind, reason)
            return
        if task.stop_kind is None:
            task.stop_kind, task.stop_reason = kind, reason
        if task.stage >= 1:
            if kind in ("shutdown",) and task.stage < 3:
                self._escalate(task)
            return
        task.stage = 1
        task.worker.slot.cancel(reason)
        if task.grace <= 0:
            self._escalate(task)
        else:
            self._at(task.grace, self._escalate, task)

    def _escalate(self, task: _Task) -> None:
        worker = task.worker
        if task.done or worker is None or worker.task is not task or worker.state != "busy":
            return
        critical = worker.control.critical_until
        now = time.monotonic()
        if critical > now:
            self._at(critical - now, self._escalate, task)
            return
        if task.stage < 2 and task.term_grace > 0:
            task.stage = 2
            send_signal(worker.pid, signal.SIGTERM)
            self._at(task.term_grace, self._escalate, task)
            return
        if task.stage < 3:
            task.stage = 3
            self._kill(worker)

    def _kill(self, worker: _WorkerHandle) -> None:
        """Freeze the worker, kill its whole tree and the worker, watch each one go."""
        worker.state = "dying"
        self._stats["killed"] += 1
        send_signal(worker.pid, signal.SIGSTOP)
        tree = kill_tree_of(worker.pid)
        send_signal(worker.pid, signal.SIGKILL)
        for pid in tree:
            fd = pidfd_open(pid)
            if fd is not None:
                worker.waiting.add(fd)
                self._selector.register(fd, selectors.EVENT_READ, ("pidfd", worker, pid))

    def _on_pidfd(self, worker: _WorkerHandle, pid: int) -> None:
        if pid != worker.pid:  # a member of a killed tree is gone
            for fd in list(worker.waiting):
                key = self._selector.get_key(fd)
                if key.data[2] == pid:
                    self._selector.unregister(fd)
                    os.close(fd)
                    worker.waiting.discard(fd)
            self._retire(worker)
            return
        if worker.pidfd is None:  # already handled by an earlier event of the same select
            return
        self._selector.unregister(worker.pidfd)
        os.close(worker.pidfd)
        worker.pidfd = None
        self._on_gone(worker)

    def _on_gone(self, worker: _WorkerHandle) -> None:
        """The worker process exited: collect what it sent, have the zygote sweep up
        after it, then settle its task (in :meth:`_retire`, once the sweep is done)."""
        worker.gone = True
        self._drain(worker)
        zygote = self._zygote_sock
        if zygote is None:
            worker.swept = True
        elif not worker.swept:
            try:
                send_seq(zygote, ("sweep", worker.pid))
            except OSError:
                worker.swept = True  # the zygote is dying; its EOF is handled next
        self._retire(worker)

    def _drain(self, worker: _WorkerHandle) -> None:
        sock = worker.sock
        if sock.fileno() < 0 or worker.feeding:
            return
        sock.setblocking(False)
        while True:
            try:
                size = sock.recv_into(self._inbox)
            except (BlockingIOError, OSError):
                break
            if not size:
                break
            self._feed(worker, memoryview(self._inbox)[:size])

    def _retire(self, worker: _WorkerHandle) -> None:
        if worker.state == "dead" or not worker.gone or worker.waiting or not worker.swept:
            return
        task = worker.task
        worker.task = None
        worker.state = "dead"
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.sock)
        worker.sock.close()
        if task is not None and not task.done:
            if worker.lost is not None and task.stop_kind in (None, "shutdown", "error"):
                self._stats["crashed"] += 1
                error = WorkerCrashedError(
                    f"worker {worker.pid} was stopped: {worker.lost}", pid=worker.pid
                )
                self._finish(task, Fate.CRASHED, error=error)
            elif task.stage >= 2 or (task.stop_kind is not None and worker.status is None):
                # Stopped by us, and it never said "terminated": its finally did not run.
                self._finish(task, Fate.KILLED)
            elif task.stop_kind is not None and task.stop_kind != "shutdown":
                self._finish(task, Fate.KILLED)
            else:
                self._stats["crashed"] += 1
                self._finish(task, Fate.CRASHED, error=_crash_error(worker))
        worker.drop_views()
        if self._workers.get(worker.index) is worker and self._broken is None:
            self._stats["replaced"] += 1
            if worker.ready:
                self._crash_streak = 0
            elif worker.lost is None:  # the pool ended it itself: not a failure to start
                self._crash_streak += 1
            if self._crash_streak > 10:
                safe_log("CRITICAL", "workers keep dying at start; pool broken", pool=self.name)
                self._break(BrokenPoolError(f"{self.name} is broken: workers keep dying at start"))
                return
            self._spawn(index=worker.index)

    # -- endings -------------------------------------------------------------------------------
    def _finish(
        self, task: _Task, fate: Fate, *, value: Any = None, error: BaseException | None = None
    ) -> None:
        if task.done:
            return
        task.done = True
        if task.handle is not None:
            task.handle.remove()
        # Release what the finished task no longer needs (tokens, payload, the link back).
        task.handle = None
        task.token = None
        task.payload = b""
        future = task.future
        if task.error is not None:  # a message of the task could not be handled
            error = task.error
            if fate in (Fate.FINISHED, Fate.FAILED, Fate.CANCELLED) and task.stop_kind in (None, "error"):
                fate = Fate.FAILED
        future.fate = fate
        future.partial_results = dict(task.partials)
        future.cancel_reason = task.stop_reason
        if fate not in (Fate.FINISHED, Fate.FAILED):
            safe_log(
                "INFO",
                f"task {task.seq} {fate}" + (f": {task.stop_reason}" if task.stop_reason else ""),
                pool=self.name,
                worker_pid=task.worker.pid if task.worker is not None else None,
            )
        if task.error is not None:
            future.set_exception(task.error)
        elif fate == Fate.FINISHED:
            future.set_result(value)
        elif fate in (Fate.FAILED, Fate.CRASHED):
            assert error is not None
            future.set_exception(error)
        elif task.stop_kind == "future":
            future._settle_cancelled()
        else:
            stopped: CancelledException
            if task.stop_kind == "timeout":
                stopped = PipelineTimeoutException(
                    f"task timed out after {task.timeout:g}s ({fate})",
                    task.partials,
                    reason=task.stop_reason,
                    timeout=task.timeout,
                )
            else:
                reason = task.stop_reason
                stopped = CancelledException(
                    f"task {fate}: {reason}" if reason else f"task {fate}",
                    task.partials,
                    reason=reason,
                )
            stopped.fate = fate
            future.set_exception(stopped)
        future._task = None  # last: a racing cancel() sees the task until it is settled

    def _fail_all(self, error: BaseException) -> None:
        """Fail every task that is not over (called once their processes are gone)."""
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        for task in queued:
            with task.future._condition:  # a caller's cancel may race us for it
                if task.worker is not None or task.done or task.dropped:
                    continue
                task.dropped = True
            self._finish(task, Fate.FAILED, error=error)
        for worker in list(self._workers.values()):
            if worker.task is not None:
                self._finish(worker.task, Fate.FAILED, error=error)

    def _closing_done(self) -> bool:
        """Whether the supervisor can end: shut down (or broken) and no task left."""
        if not self._shutdown:
            return False
        if self._broken is not None:
            return True
        if any(not (t.dropped or t.done) for t in self._queue):
            return False
        return all(w.task is None or w.task.done for w in self._workers.values()) and all(
            not w.waiting for w in self._workers.values()
        )

    def _teardown(self) -> None:
        try:
            for worker in self._workers.values():
                if worker.state != "dead":
                    with contextlib.suppress(OSError):
                        worker.sock.close()
                for fd in ([worker.pidfd] if worker.pidfd is not None else []) + list(worker.waiting):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            if self._zygote_sock is not None:
                self._zygote_sock.close()  # EOF: the zygote kills every worker tree and exits
                self._zygote_sock = None
            try:
                self._zygote.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_tree_of(self._zygote.pid)
                self._zygote.kill()
                self._zygote.wait()
            self._selector.close()
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
            os.close(wake_r)
            os.close(wake_w)
            # Every process of the pool is gone: only now may a pending task hear of it.
            self._fail_all(self._broken or PoolClosedError(f"{self.name} is shut down"))
            self._release_chunk()
        finally:
            with self._lock:
                self._shutdown = True
            self._closed.set()

    def _release_chunk(self) -> None:
        """Drop every view of the shared chunk so that its mapping (and fd) go now."""
        for worker in self._workers.values():
            worker.drop_views()
        self._workers.clear()
        self._slot_tokens.clear()
        self._controls.clear()
        chunk = self._chunk
        chunk.live = 0
        chunk.close()
        if not chunk.mm.closed:
            import gc

            gc.collect()  # views caught in reference cycles (task <-> worker)
            chunk.header = None
            with contextlib.suppress(BufferError):
                chunk.mm.close()

    def _forget_in_child(self) -> None:
        """In a forked child of the owner: close the pool's descriptors, touch nothing else.

        The child must not keep the zygote's channel open (the zygote would outlive the
        owner as long as the child lives) nor wait for a supervisor thread it does not
        have. The pool stays the parent's: every method here refuses or returns.
        """
        self._shutdown = True
        self._forked = True
        sockets = [w.sock for w in self._workers.values()]
        if self._zygote_sock is not None:
            sockets.append(self._zygote_sock)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        fds = [self._wake_r, self._wake_w]
        for worker in self._workers.values():
            fds += ([worker.pidfd] if worker.pidfd is not None else []) + list(worker.waiting)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        with contextlib.suppress(Exception):
            self._selector.close()
        self._closed.set()

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        if os.getpid() != self._owner:
            state = f"of process {self._owner}"
        elif self._broken is not None:
            state = "broken"
        elif self._shutdown:
            state = "shut down"
        else:
            state = "open"
        return f"<ProcessPool {self.name} workers={self._size} {state}>"


class _AsyncWaiter:
    """Resolves an asyncio future on the caller's loop when a TaskFuture is done."""

    def __init__(self, future: TaskFuture) -> None:
        loop = asyncio.get_running_loop()
        self.result: asyncio.Future[None] = loop.create_future()

        def done(_: concurrent.futures.Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._set)

        future.add_done_callback(done)

    def _set(self) -> None:
        if not self.result.done():
            self.result.set_result(None)


def _unpicklable_part(call: tuple[Any, tuple[Any, ...], dict[str, Any]], token: Any) -> str:
    """Name the part of a task that does not pickle: ``fn``, ``args[i]`` or ``kwargs[k]``."""
    fn, args, kwargs = call
    parts = [("fn", fn)]
    parts += [(f"args[{index}]", value) for index, value in enumerate(args)]
    parts += [(f"kwargs[{key!r}]", value) for key, value in kwargs.items()]
    tokens = (token,) if token is not None else ()
    for name, value in parts:
        try:
            _TaskPickler(io.BytesIO(), tokens).dump(value)
        except Exception:  # noqa: BLE001 - this is the part that does not pickle
            return name
    return "the task"


def _crash_error(worker: _WorkerHandle) -> WorkerCrashedError:
    status = worker.status
    if status is None:
        return WorkerCrashedError(
            f"worker {worker.pid} died (exit status unknown)", pid=worker.pid
        )
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        return WorkerCrashedError(
            f"worker {worker.pid} was killed by signal {signum} ({name})", signal=signum, pid=worker.pid
        )
    code = os.WEXITSTATUS(status)
    return WorkerCrashedError(f"worker {worker.pid} exited with code {code}", exitcode=code, pid=worker.pid)



def _chunks(calls: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk = list(itertools.islice(calls, size))
    while chunk:
        yield chunk
        chunk = list(itertools.islice(calls, size))


def _flatten(results: Iterator[list[Any]]) -> Iterator[Any]:
    """Yield each chunk's results in order; closing this stops the chunks not collected."""
    try:
        for chunk in results:
            yield from chunk
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._forget_in_child()
    _pools.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
