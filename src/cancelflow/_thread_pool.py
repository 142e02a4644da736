"""`ThreadPool`: a `concurrent.futures` executor whose running tasks can be cancelled.

A thread cannot be killed, so a cancelled task is *asked* to stop (its token is cancelled).
Its future is resolved at once (as ``concurrent.futures`` users expect); ``run_sync``
releases its caller once the task is over, so the partial results are final and the fate
known. A task that keeps running for ``grace_period`` seconds after the cancel is
*abandoned*: logged, counted, and no longer counted against ``max_workers``, so the pool
starts another worker for later work (and ``run_sync``'s caller is released then). An
abandoned thread that finally returns ends, or becomes an ordinary worker again if the
pool is under capacity.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, TypeVarTuple

from . import _futures, _interpreter_exit, _timer
from ._async import wait_for_callback
from ._context import PartialSink, TaskScope, enter_scope_for_good, lazy_scope, run_in_scope
from ._exceptions import (
    BrokenPoolError,
    CancelledException,
    PipelineTimeoutException,
    PoolClosedError,
)
from ._fate import Fate
from ._log import safe_log
from ._map import ordered_map
from ._platform import at_fork
from ._pool_calls import check_call, check_initializer, ladder_seconds, usable_cpus
from ._token import CancellationToken
from ._validate import check_seconds as _check_timeout

__all__ = ("ThreadTaskFuture", "ThreadPool", "ThreadPoolStatistics")

T = TypeVar("T")
P = ParamSpec("P")
PosArgsT = TypeVarTuple("PosArgsT")


_pool_ids = itertools.count(1)
_thread_ids = itertools.count(1)
_task_ids = itertools.count(1)

# After an interrupt has been sent, how long a task gets to unwind before it is abandoned.
_INTERRUPT_SETTLE = 0.1
#: fates of a task that is not over yet (see ``_WorkItem.when_over``)
_UNDER_WAY = (Fate.PENDING, Fate.RUNNING)
# Read once: a member access on an Enum class costs ~0.2 µs on Python 3.11.
_RUNNING, _FINISHED, _FAILED = Fate.RUNNING, Fate.FINISHED, Fate.FAILED

# PyThreadState_SetAsyncExc(thread_id, exc): raise exc in that thread at its next check.
_send_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


class _Discarded(BaseException):
    """Takes the place of an undelivered interrupt, to be raised and dropped at once."""


def _discard_pending_interrupt() -> None:
    """In a worker thread: drop an interrupt sent to this thread and not delivered yet.

    Not by clearing it (``PyThreadState_SetAsyncExc(id, NULL)``): on Python 3.11 that
    leaves the interpreter's "async exception pending" flag set for good, since only
    the delivery of one resets it; every thread then handles a pending event at each
    check of the eval loop, and a thread running under ``sys.settrace`` loops forever
    at the first call it makes. So the interrupt is replaced by a private exception,
    which this frame receives (the flag is reset) and drops.
    """
    try:
        # Delivered at the eval loop's next check: as the call returns, or at the latest
        # at the loop's first backward jump.
        if _send_async_exc(threading.get_ident(), _Discarded) == 1:
            while True:
                pass
    except _Discarded:
        pass


@dataclass(frozen=True, slots=True)
class ThreadPoolStatistics:
    """A snapshot of a :class:`ThreadPool`, from :meth:`ThreadPool.statistics`.

    The fields are read together under the pool's lock, so they are consistent with each
    other at one instant; they are stale as soon as they are returned.

    Attributes:
        workers: live worker threads that count against ``max_workers`` (not abandoned).
        busy: how many of those are running a task right now.
        queued: tasks submitted and not started, not counting cancelled ones.
        abandoned_total: tasks abandoned since the pool was created.
        abandoned_running: abandoned threads still stuck in their task.
        completed: tasks whose future got the task's own result or exception.
        cancelled: futures resolved by a cancellation (queued or running, timeouts too).
    """

    workers: int
    busy: int
    queued: int
    abandoned_total: int
    abandoned_running: int
    completed: int
    cancelled: int


class _Outcome:
    __slots__ = ("exc", "value")

    def __init__(self, value: object = None, exc: BaseException | None = None) -> None:
        self.value = value
        self.exc = exc


class _Worker:
    __slots__ = ("abandoned", "finishing", "ident", "item", "outcome", "retire", "thread")

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.ident = 0
        self.item: _WorkItem | None = None
        self.outcome: _Outcome | None = None
        self.finishing: _WorkItem | None = None
        self.abandoned = False
        self.retire = False


class _WorkItem:
    __slots__ = (
        "args",
        "cancel_as_future",
        "cancel_handle",
        "cancelled_at",
        "context",
        "counted",
        "error",
        "fate",
        "fn",
        "fn_name",
        "future",
        "grace",
        "grace_handle",
        "interrupt",
        "interrupt_sent",
        "kwargs",
        "name",
        "over_callbacks",
        "partials",
        "pool_name",
        "pool_ref",
        "refused",
        "returned",
        "source",
        "timed_out",
        "timeout",
        "timeout_handle",
        "token",
        "token_box",
        "user_sink",
        "worker",
    )

    def __init__(
        self,
        pool: ThreadPool,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        token: CancellationToken | None,
        timeout: float | None,
        grace: float,
        user_sink: PartialSink | None,
        interrupt: bool,
    ) -> None:
        #: weak: a future outlives its pool, which a dropped pool's threads need to end
        self.pool_ref = weakref.ref(pool)
        self.pool_name = pool._name
        self.fn = fn
        self.fn_name: str = getattr(fn, "__qualname__", None) or repr(fn)
        self.args = args
        self.kwargs = kwargs
        #: the task's token, once made: at submission when a caller's token or a timeout
        #: needs it, else on first use (see :meth:`task_token`); ``None`` until then
        self.token = token
        self.token_box: list[CancellationToken] = []
        #: the caller's token, whose cancel reaches ``token`` through a link
        self.source: CancellationToken | None = None
        self.timeout = timeout
        self.grace = grace
        self.user_sink = user_sink
        self.interrupt = interrupt
        self.name = f"task-{next(_task_ids)}"
        #: where the task runs: ``None`` for the worker thread's own context (as
        #: ``ThreadPoolExecutor`` does), else a copy of the caller's (``run_sync``)
        self.context: contextvars.Context | None = None
        self.partials: dict[str, Any] = {}
        self.future: ThreadTaskFuture[Any] = ThreadTaskFuture()
        self.future._item = self
        self.worker: _Worker | None = None
        self.fate: Fate = Fate.PENDING
        self.returned = False
        self.cancel_as_future = False
        self.timed_out = False
        #: the pool refused the submission (shut down meanwhile): its cancel counts for
        #: nothing; ``counted``: a cancel did count it (both under the future's lock)
        self.refused = self.counted = False
        self.interrupt_sent = False
        self.cancelled_at = 0.0
        self.cancel_handle: Any = None
        self.timeout_handle: _timer.TimerHandle | None = None
        self.grace_handle: _timer.TimerHandle | None = None
        self.over_callbacks: list[Callable[[], object]] | None = None
        #: the cancel's exception the future holds, once it holds one
        self.error: CancelledException | None = None

    def when_over(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` (from any thread) once the task is over: it returned or
        raised, it was dropped before it started, or its thread was abandoned. At once,
        on this thread, if it is over already."""
        with _futures.lock(self.future):
            if self.fate in _UNDER_WAY:
                if self.over_callbacks is None:
                    self.over_callbacks = []
                self.over_callbacks.append(callback)
                return
        callback()

    def settle_fate(self, fate: Fate) -> None:
        """Record how the task ended (caller holds the future's lock); a cancel's
        exception held by the future now says it too, with every partial result the task
        stored until then (its cleanup's included). Call :meth:`fire_over` after
        releasing the lock."""
        self.fate = fate
        if self.error is not None:
            self.error.fate = fate
            self.error.partial_results.update(self.partials)

    def fire_over(self) -> None:
        """Run the :meth:`when_over` callbacks once the fate is final (no lock held)."""
        with _futures.lock(self.future):
            if self.fate in _UNDER_WAY:
                return
            callbacks, self.over_callbacks = self.over_callbacks, None
        for callback in callbacks or ():
            callback()

    def task_token(self) -> CancellationToken:
        """The task's token, made now if nobody needed it so far.

        A plain ``submit`` has no caller's token and no timeout, so nothing can cancel its
        task but this pool (``cancel()``, ``shutdown``, an awaiter) or the task itself
        through its token: the token is made only when one of those needs it, which most
        tasks never do. Lock-free and safe to call from any thread, also from a signal
        handler that interrupted a call of this very method: every caller appends the
        token it made to ``token_box`` (one atomic operation) and the first one appended
        wins; a loser's token is dropped unused.
        """
        token = self.token
        if token is not None:
            return token
        made = CancellationToken(name=f"{self.pool_name}/{self.name}")
        box = self.token_box
        box.append(made)
        token = box[0]
        pool = self.pool_ref()
        if token is made and pool is not None:  # (no pool: every task of it is over)
            # Cancels made through this token by the task (or whoever it hands it to)
            # settle the future; the pool's own cancels settle it themselves as well.
            self.cancel_handle = token.on_cancel(functools.partial(pool._settle_cancelled, self))
        self.token = token
        return token

    def is_cancelled(self) -> bool:
        """Whether the task's token is cancelled (``False`` while it has none)."""
        token = self.token
        return token is not None and token.is_cancelled

    def cancel_reason(self) -> str | None:
        """The task's token's cancel reason (``None`` while it has no token)."""
        token = self.token
        return None if token is None else token.cancel_reason

    def sink(self, key: str, value: Any) -> None:
        self.partials[key] = value
        if self.user_sink is not None:
            self.user_sink(key, value)

    def run(self) -> Any:
        """Call the task with its scope current: in the worker thread's own context (what
        the thread's initializer and earlier tasks set there is seen, as with
        ``ThreadPoolExecutor``; the scope is reset when the task ends), or in
        :attr:`context`, a copy of the caller's dropped when the task ends (the scope set
        there needs no reset)."""
        token = self.token
        scope = (
            lazy_scope(self.task_token, self.sink) if token is None else TaskScope(token, self.sink)
        )
        if self.context is None:
            return run_in_scope(scope, self.fn, self.args, self.kwargs)
        enter_scope_for_good(scope)
        return self.fn(*self.args, **self.kwargs)

    def cancel_exception(self) -> CancelledException:
        reason = self.cancel_reason()
        fn_name = self.fn_name
        if self.timed_out and self.timeout is not None and reason == _timeout_reason(self.timeout):
            return PipelineTimeoutException(
                f"{self.name} ({fn_name}) timed out after {self.timeout:g}s",
                self.partials,
                reason=reason,
                timeout=self.timeout,
            )
        return CancelledException(
            f"{self.name} ({fn_name}) cancelled: {reason or 'no reason given'}",
            self.partials,
            reason=reason,
        )


def _timeout_reason(seconds: float) -> str:
    return f"timeout after {seconds:g}s"


class ThreadTaskFuture(_futures.PoolFuture[T]):
    """The future of a :class:`ThreadPool` task; unlike its base class, cancellable while running.

    :meth:`cancel` works in every state but finished: a queued task is never started, and a
    running task has its token cancelled (reason ``"future cancelled"``) while this future
    becomes cancelled at once, so :meth:`result` raises
    :class:`concurrent.futures.CancelledError` straight away and ``wait``/``as_completed``
    and done-callbacks see it done. When the task's token is cancelled any other way (the
    caller's token, the task's ``timeout``, ``shutdown(cancel_running=True)``), the future
    fails at once with :class:`CancelledException` (:class:`PipelineTimeoutException` for
    the timeout) carrying the reason and the partial results stored so far. Otherwise the
    states read as the stdlib's: ``running()`` while the task runs, ``done()`` once it
    returned, raised or was cancelled, ``cancelled()`` after :meth:`cancel` or
    ``shutdown(cancel_futures=True)``. A done future keeps the task's result or error but
    not its callable or arguments.

    Not promised: a cancelled future does not mean the thread has stopped. See :attr:`fate`
    for what the thread did: it may finish its cleanup within the grace period
    (``"cancelled"``) or be abandoned (``"abandoned"``). A result the task returns after
    its cancellation is dropped.

    Thread safety: every method may be called from any thread. :meth:`cancel` takes only
    this future's re-entrant lock, never the pool's, and schedules timers lock-free, so a
    cancel made from a signal handler (directly or through a token) cannot deadlock on the
    pool; a ``concurrent.futures`` waiter whose lock the interrupted frame holds (inside
    ``as_completed()``) is notified from the timer thread instead.
    Futures are made by the pool; a ``ThreadTaskFuture()`` made directly has no task and
    behaves as a plain :class:`concurrent.futures.Future`.
    """

    _item: _WorkItem | None = None
    _bare_fate: Fate | None = None

    def cancel(self) -> bool:
        """Cancel the task, queued or running; ``False`` only if the future was already done.

        (Done means a result, an exception, or a failure from an earlier token cancel or
        timeout.) Idempotent: a second call returns ``True`` and changes nothing. Never
        blocks on the task: the future is cancelled before this returns, whatever the
        thread does.

        If the task is blocked (in a C call, I/O, a lock) it cannot be interrupted: its
        token is cancelled, its caller released, and after the grace period the thread is
        abandoned and its worker slot handed to a new thread.
        """
        item = self._item
        if item is None:
            return super().cancel()
        pool = item.pool_ref()
        if pool is None:  # collected: it had no task left, so this one is over
            return self.cancelled()
        return pool._cancel_as_future(item, "future cancelled")

    @property
    def fate(self) -> Fate:
        """What the task's thread did, as far as is known now (read-only, never blocks).

        ``"pending"`` (queued), ``"running"``, ``"finished"`` (returned a value),
        ``"failed"`` (raised, not cancelled), ``"cancelled"`` (cancelled before it started,
        or it returned or raised after its token was cancelled, within the grace period)
        or ``"abandoned"`` (still running ``grace_period`` seconds after the cancel). A
        task that is abandoned stays ``"abandoned"`` even once its thread returns.
        """
        item = self._item
        if item is None:
            return self._bare_fate or (Fate.FINISHED if self.done() else Fate.PENDING)
        with _futures.lock(self):
            return item.fate

    @property
    def cancel_reason(self) -> str | None:
        """The reason the task's token was cancelled with, or ``None`` if it was not."""
        item = self._item
        return None if item is None else item.cancel_reason()


class ThreadPool(Executor):
    """A thread pool whose tasks can be cancelled, time out, and never starve the pool.

    A drop-in :class:`concurrent.futures.ThreadPoolExecutor`: the same constructor
    arguments (``max_workers``, ``thread_name_prefix``, ``initializer``, ``initargs``, in
    that order), :meth:`submit`, :meth:`map` and :meth:`shutdown` behave as the stdlib
    documents them, and its futures report ``running()``, ``done()`` and ``cancelled()``
    as the stdlib's do. What it adds is cancelling *running* work, so the one difference
    is that :meth:`ThreadTaskFuture.cancel` also stops a running task (see there), and
    :meth:`map` stops its running calls too when it gives up.

    Each task gets its own token: a :meth:`~CancellationToken.child` of the ``token`` given
    at submission, or a fresh one. Inside the task, :func:`cancelflow.current_token`,
    :func:`cancelflow.check_cancelled` and :func:`cancelflow.store_partial` refer to it.
    Cancelling the task (its future, the caller's token, its timeout, a shutdown with
    ``cancel_running=True``) cancels that token and resolves the future at once; the task
    is expected to notice (``check_cancelled()`` in its loops) and return.

    Invariants: at most ``max_workers`` non-abandoned worker threads exist; a task that
    still runs ``grace_period`` seconds after its cancel is *abandoned*: logged as a
    warning with its ids, counted in :meth:`statistics`, and its thread stops counting
    against ``max_workers``, so a new worker picks up later work. When an abandoned
    thread returns it ends, or rejoins the pool if the pool is under capacity: the thread
    count never grows without bound while abandoned tasks come back. A finished or
    cancelled future holds no reference to the task's callable or arguments, and an idle
    worker holds none to its last task, its arguments or its result.

    Interpreter exit (as the stdlib): when the main thread ends, every pool is shut down
    with ``wait=True`` before ``atexit`` callbacks run, so queued and running tasks
    finish; from then on submitting raises ``RuntimeError("cannot schedule new futures
    after interpreter shutdown")``.

    Dropped without :meth:`shutdown` (as the stdlib's): once nothing refers to the pool,
    its queue is empty and no task runs, it is collected and its idle threads end; work
    submitted before the drop still runs, and its futures stay usable.

    Fork: in a child made by :func:`os.fork`, a pool of the parent has none of its
    threads; it refuses work with :class:`PoolClosedError` and :meth:`shutdown` returns
    at once (futures of the parent's tasks never complete in the child).

    Signal safety: the cancel path (a token's ``cancel()``, :meth:`ThreadTaskFuture.cancel`)
    never takes the pool's lock, only the future's and the counters' re-entrant locks and
    the lock-free timer, so a signal handler that cancels a task while the main thread is
    inside any method of this pool cannot deadlock on the pool.

    Not promised: threads cannot be killed. A task blocked in C code, I/O or a lock keeps
    its thread (and whatever it holds) until it returns; abandoning only stops the pool
    from waiting for it. ``interrupt_on_cancel=True`` can stop pure-Python loops that
    never check their token (see :meth:`submit_task`).

    Workers are daemon threads named ``cancelflow-thread-N`` (``{thread_name_prefix}_{n}``,
    ``n`` counting from 0 in this pool, when a prefix is given), started on demand. Each
    task runs in its worker thread's own :mod:`contextvars` context, as in
    :class:`~concurrent.futures.ThreadPoolExecutor`: what the ``initializer`` or a task sets
    there (a ``ContextVar``, the :mod:`decimal` context) is seen by that thread's later
    tasks, and nothing of the submitter's is; :meth:`run_sync` instead runs the call in a
    copy of the awaiting coroutine's context, as :func:`asyncio.to_thread` does. Methods
    are safe to call from any thread, including from inside a task (except
    ``shutdown(wait=True)`` waiting for the task's own thread, which it skips).

    Args:
        max_workers: the most non-abandoned threads at once; ``None`` for
            ``min(32, cpus + 4)``, as in :class:`~concurrent.futures.ThreadPoolExecutor`
            (``cpus``: ``os.process_cpu_count()`` from Python 3.13, ``os.cpu_count()`` before).
        thread_name_prefix: names the workers ``{thread_name_prefix}_{n}``; ``""`` keeps
            ``cancelflow-thread-N``.
        initializer: called as ``initializer(*initargs)`` in each new worker thread before
            it takes any task. If it raises, the error is logged and the pool is *broken*,
            as in the stdlib: every task not started fails with :class:`BrokenPoolError`
            (whose ``__cause__`` is the initializer's error), and :meth:`submit` raises it
            from then on. Tasks already running finish normally.
        initargs: positional arguments for ``initializer``.
        grace_period: default seconds a cancelled running task gets to return before it is
            abandoned (``0.1``).
        name: label used in log lines and ``repr``.

    Raises:
        TypeError: ``max_workers`` is not an int, ``initializer`` is not callable
            (``"initializer must be a callable"``), ``initargs`` not iterable,
            ``thread_name_prefix`` or ``name`` not a string, ``grace_period`` not a number.
        ValueError: ``max_workers`` <= 0 (``"max_workers must be greater than 0"``), or
            ``grace_period`` negative or not finite.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        *,
        grace_period: float = 0.1,
        name: str | None = None,
    ) -> None:
        if max_workers is None:
            max_workers = min(32, usable_cpus() + 4)
        elif isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        initargs = check_initializer(initializer, initargs)
        if not isinstance(thread_name_prefix, str):
            raise TypeError(
                f"thread_name_prefix must be a str, not {type(thread_name_prefix).__name__}"
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        self._max_workers = max_workers
        self._grace = _check_timeout(grace_period, "grace_period")
        self._name = name or f"thread-pool-{next(_pool_ids)}"
        self._thread_name_prefix = thread_name_prefix
        self._thread_numbers = itertools.count()
        self._initializer = initializer
        self._initargs = initargs
        # Re-entrant so that shutdown() can tell a signal handler that interrupted this
        # thread inside the pool (it holds the lock, see shutdown) from another thread.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[_WorkItem] = deque()
        self._workers: set[_Worker] = set()
        self._exited: list[threading.Thread] = []
        self._active = 0  # live workers that are not abandoned
        self._idle = 0  # workers waiting for work
        self._shutdown = False
        #: why the pool is broken (an initializer failed), else None
        self._broken: str | None = None
        self._broken_cause: BaseException | None = None
        #: this process was forked from the one that made the pool
        self._forked = False
        self._abandoned_total = 0
        self._abandoned_running = 0
        self._completed = 0
        self._cancelled = 0
        # Re-entrant: it may be taken by a cancel callback run from a signal handler.
        self._count_lock = threading.RLock()
        #: keeps the timer thread up while the pool has workers (see _timer.hold)
        self._timer_hold: _timer.TimerHold | None = None
        # Dropped without shutdown(): its idle threads wake and end (see _worker_main).
        # (Apart from the pool: a forked child's pool has a new condition, see
        # _after_fork_in_child.)
        self._wake = _Wake(self._cond)
        weakref.finalize(self, _wake_all, self._wake).atexit = False
        _live_pools.add(self)
        _interpreter_exit.register(self)

    # -- properties ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The pool's label in log lines."""
        return self._name

    @property
    def max_workers(self) -> int:
        """The most non-abandoned worker threads the pool runs at once."""
        return self._max_workers

    @property
    def grace_period(self) -> float:
        """Default seconds a cancelled running task gets before it is abandoned."""
        return self._grace

    def __repr__(self) -> str:
        state = "broken" if self._broken else "shut down" if self._shutdown else "open"
        return f"<ThreadPool {self._name} {state} max_workers={self._max_workers}>"

    # -- submitting ---------------------------------------------------------------------
    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> ThreadTaskFuture[T]:
        """Schedule ``fn(*args, **kwargs)``; return its cancellable :class:`ThreadTaskFuture`.

        The standard :meth:`Executor.submit`, with a fresh task token, no timeout and the
        pool's grace period; use :meth:`submit_task` for those options.

        Raises:
            TypeError: ``fn`` is not callable.
            RuntimeError: the interpreter is exiting (the stdlib's message).
            BrokenPoolError: a worker's initializer failed.
            PoolClosedError: the pool was shut down, or belongs to the parent process.
        """
        return self.submit_task(fn, args, kwargs)

    def submit_task(
        self,
        fn: Callable[..., T],
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        token: CancellationToken | None = None,
        timeout: float | None = None,
        grace_period: float | None = None,
        partial_sink: PartialSink | None = None,
        interrupt_on_cancel: bool = False,
    ) -> ThreadTaskFuture[T]:
        """Schedule ``fn(*args, **kwargs)`` with cancellation options; return its future.

        The task runs with its own token, a child of ``token`` (or a fresh token), so
        cancelling ``token`` cancels the task but cancelling the task leaves ``token`` alone.

        If cancelled while blocked: ``token`` is checked on entry: if it is already
        cancelled, no worker is taken and the returned future has already failed with
        :class:`CancelledException` (fate ``"cancelled"``). A queued task whose token is
        cancelled is never started. A running task is released at once (the future fails
        or is cancelled) and its thread gets ``grace_period`` seconds to return; then it is
        abandoned and its worker slot comes back at once, as a new thread started when work
        needs one. Partial results stored with ``store_partial`` before the cancel are in
        the exception's ``partial_results``; ones stored later reach ``partial_sink`` only.

        Args:
            fn: the callable to run in a worker thread.
            args: positional arguments for ``fn``.
            kwargs: keyword arguments for ``fn``.
            token: the caller's token; the task is cancelled whenever it is.
            timeout: seconds the task may *run* (time spent queued does not count); then
                its token is cancelled with the reason ``"timeout after {timeout}s"`` and
                the future fails with :class:`PipelineTimeoutException`. ``None``: no limit.
            grace_period: seconds a cancelled running task gets before it is abandoned;
                ``None`` for the pool's default.
            partial_sink: also called as ``partial_sink(key, value)`` by each
                ``store_partial`` in the task (in the task's thread).
            interrupt_on_cancel: opt-in. If the task is still running when the grace
                period ends, raise :class:`CancelledException` inside its thread with
                ``PyThreadState_SetAsyncExc``, then give it another grace period (at least
                100 ms) before abandoning it. This stops pure-Python code that never checks
                its token. Limits: the exception is only delivered between Python bytecodes,
                so it does not interrupt a C call, ``time.sleep``, blocking I/O or a lock
                wait (it lands once that returns, if the task is still running); it may
                land anywhere in the task, including a ``finally`` or ``except`` block or a
                ``with`` exit, leaving the task's own state half-updated; a task that
                catches it (``except Exception``) keeps running. It never reaches another
                task: it is sent under the pool's lock only while the thread still runs this
                task, and the worker clears any undelivered one before taking the next.

        Returns:
            The task's :class:`ThreadTaskFuture`.

        Raises:
            TypeError: ``fn`` or ``partial_sink`` is not callable, ``token`` is not a
                :class:`CancellationToken`, ``kwargs`` not a mapping, or a number is not
                a number.
            ValueError: ``timeout`` or ``grace_period`` is negative or not finite.
            RuntimeError: the interpreter is exiting (the stdlib's message).
            BrokenPoolError: a worker's initializer failed (also ``BrokenThreadPool``).
            PoolClosedError: the pool was shut down, or belongs to the parent process.
        """
        _interpreter_exit.check_open()
        item = self._make_item(
            fn, args, kwargs, token, timeout, grace_period, partial_sink, interrupt_on_cancel
        )
        if item is None:  # the caller's token is already cancelled
            assert token is not None
            return _failed_future(token)
        self._enqueue(item)
        return item.future

    async def run_sync(
        self,
        fn: Callable[[*PosArgsT], T],
        *args: *PosArgsT,
        token: CancellationToken | None = None,
        timeout: float | None = None,
        grace_period: float | None = None,
        partial_sink: PartialSink | None = None,
        interrupt_on_cancel: bool = False,
    ) -> T:
        """Run ``fn(*args)`` in a worker thread and return its result, from asyncio.

        Behaves like calling ``fn(*args)`` except that it runs in this pool, leaving the
        event loop free; the options are those of :meth:`submit_task`. ``fn`` runs in a
        copy of the caller's :mod:`contextvars` context, as with :func:`asyncio.to_thread`.

        If cancelled while blocked: ``token`` is checked on entry, and if it is already
        cancelled :class:`CancelledException` is raised before a worker is taken. If
        ``token`` is cancelled (from any thread) or the timeout passes while the task runs,
        the task's token is cancelled and the thread gets ``grace_period`` seconds to
        return; then it is abandoned and its slot handed to a new worker. This raises
        :class:`CancelledException` / :class:`PipelineTimeoutException` once the task is
        over (it returned or raised, or was abandoned), with every partial result it
        stored (its cleanup's too) and its ``fate`` (``"cancelled"`` or
        ``"abandoned"``): the wait is bounded by the grace period (and the interrupt's
        settling time with ``interrupt_on_cancel``). If the awaiting asyncio task is
        cancelled, the task's token is cancelled too (reason ``"asyncio task
        cancelled"``) and :class:`asyncio.CancelledError` propagates once the task is
        over, in the same way. For a release at once, use :meth:`submit_task`'s future.

        Warning: CPU-bound pure-Python work holds the GIL and gains nothing from threads;
        it should check its token often (``check_cancelled()``), or it can only be
        abandoned.

        Raises:
            CancelledException: the task was cancelled (``reason`` says why).
            PipelineTimeoutException: the task ran longer than ``timeout``.
            RuntimeError: the interpreter is exiting (the stdlib's message).
            BrokenPoolError: a worker's initializer failed.
            PoolClosedError: the pool was shut down, or belongs to the parent process.
            TypeError, ValueError: as for :meth:`submit_task`.
        """
        _interpreter_exit.check_open()
        item = self._make_item(
            fn, args, None, token, timeout, grace_period, partial_sink, interrupt_on_cancel
        )
        if item is None:
            assert token is not None
            token.raise_if_cancelled()
            raise AssertionError("unreachable")  # pragma: no cover
        item.context = contextvars.copy_context()  # as asyncio.to_thread
        self._enqueue(item)
        future: ThreadTaskFuture[T] = item.future
        stop = functools.partial(self._stop_for_awaiter, item)
        # Released once the task is over (returned, raised, or its thread abandoned after
        # the grace period), so partial results are final and the fate known.
        await wait_for_callback(item.when_over, stop, finish_after_cancel=True)
        return _outcome_of(future)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        """Like :func:`map`, run in the pool; the standard :meth:`Executor.map`.

        As in the stdlib: every call is submitted before this returns (the iterables are
        consumed here), unless ``buffersize`` bounds the calls in flight (Python 3.14's
        argument, here on every version: the first ``buffersize`` are submitted here, one
        more each time a result is asked for); results are yielded in input order;
        ``chunksize`` is checked (an int >= 1) and otherwise ignored, as
        :class:`~concurrent.futures.ThreadPoolExecutor` ignores it; ``timeout`` counts
        from this call, and when a result is not ready by then ``next()`` raises
        :class:`TimeoutError`. When that happens, or a call raises, or the iterator is
        closed early, the calls not collected yet are cancelled: queued ones never start
        (they are all cancelled before any running one is stopped, so no worker freed by
        a stop can start them) and, unlike the stdlib, running ones have their tokens
        cancelled (``"future cancelled"``) and are abandoned after the grace period if
        they do not return.

        If cancelled while blocked: ``map`` takes no token; use :meth:`submit_task` with a
        token for that. Waiting for a result can be bounded only by ``timeout``; when it
        passes, the remaining calls are cancelled as above and their slots come back at
        once (cooperative tasks) or after the grace period (abandoned ones).

        Raises:
            TypeError: ``chunksize`` or ``buffersize`` is not an int.
            ValueError: ``chunksize`` < 1 (``"chunksize must be >= 1."``), ``buffersize``
                < 1 (``"buffersize must be None or > 0"``).
            RuntimeError, BrokenPoolError, PoolClosedError: as for :meth:`submit` (with
                ``buffersize``, also from ``next()``, as is an error of an iterable).
            TimeoutError: from ``next()``, a result was not ready ``timeout`` seconds
                after this call.
        """
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        return ordered_map(self.submit, fn, iterables, timeout=timeout, buffersize=buffersize)

    # -- shutting down ------------------------------------------------------------------
    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, cancel_running: bool = False
    ) -> None:
        """Refuse new work, then (if ``wait``) wait for the workers to end.

        The stdlib's :meth:`Executor.shutdown`, plus ``cancel_running``. Idempotent; a
        later call may still cancel (with ``cancel_futures`` or ``cancel_running``).

        Args:
            wait: return only once every non-abandoned worker thread has ended, that is
                once the queued tasks left and the running ones have returned, and the
                timer thread the pool kept up has ended too, unless something else in the
                process still needs it (a pending timer, another open pool).
            cancel_futures: cancel every task not started: its future becomes cancelled
                (``cancelled()`` is true; ``cancel_reason`` is ``"pool shut down"``) and it
                never runs. Running tasks are left alone, and waited for if ``wait``.
            cancel_running: stop the tasks running now: their tokens are cancelled with
                the reason ``"pool shut down"``, their futures fail at once with
                :class:`CancelledException`, and each thread gets its grace period, then
                is abandoned. Queued tasks are left to ``cancel_futures``.

        If cancelled while blocked: there is no token to cancel this wait; it ends when
        every non-abandoned worker has ended. Abandoned threads are not waited for: they
        are left running (daemon threads) and end by themselves when their task returns.
        Without ``cancel_running``, running tasks are not cancelled, so this waits for them
        to return however long that takes. Called from inside a task, it does not wait for
        that task's own thread. In a process forked from the pool's, it returns at once.

        From a signal handler: safe. One that interrupted this pool's own code in the same
        thread (a :meth:`submit` in progress, which it refuses: it raises
        :class:`PoolClosedError`) shuts the pool down and cancels as asked, but cannot
        wait (no worker can end before the handler returns): it logs a warning and
        returns, as with ``wait=False``.
        """
        if self._forked:
            return
        # A signal handler that interrupted this thread inside the pool (a submit), which
        # holds the lock: the state changes below are simple enough to make re-entrantly
        # (see _enqueue), but no worker can end before the handler returns, so no wait.
        inside = self._lock._is_owned()  # type: ignore[attr-defined]
        with self._lock:
            self._shutdown = True
            dropped: list[_WorkItem] = []
            if cancel_futures:
                dropped = list(self._queue)
                self._queue.clear()
                _queued.discard(self)
            stopping: list[_WorkItem] = []
            if cancel_running:
                stopping = [w.item for w in self._workers if w.item is not None]
            self._cond.notify_all()
            timer_hold, self._timer_hold = self._timer_hold, None
        for item in dropped:
            self._cancel_as_future(item, "pool shut down")
        for item in stopping:
            item.task_token().cancel("pool shut down")
            self._settle_cancelled(item)
        if timer_hold is not None:
            timer_hold.release()  # grace timers just scheduled keep the thread up
        if not wait:
            return
        if inside:
            safe_log(
                "WARNING",
                "shutdown(wait=True) called inside this pool's own code in the same thread "
                "(from a signal handler?): not waiting; the pool still ends",
                pool=self._name,
            )
            return
        me = threading.current_thread()
        with self._lock:
            while any(not w.abandoned and w.thread is not me for w in self._workers):
                self._cond.wait()
            exited, self._exited = self._exited, []
        for thread in exited:
            if thread is not me:
                thread.join()
        _timer.wait_idle_end()  # the timer thread this pool kept up, unless still needed

    def statistics(self) -> ThreadPoolStatistics:
        """A consistent snapshot of the pool's counters; never blocks on a task."""
        with self._count_lock:
            cancelled = self._cancelled
        with self._lock:
            return ThreadPoolStatistics(
                workers=self._active,
                busy=sum(1 for w in self._workers if w.item is not None and not w.abandoned),
                queued=sum(1 for item in self._queue if _pending(item.future)),
                abandoned_total=self._abandoned_total,
                abandoned_running=self._abandoned_running,
                completed=self._completed,
                cancelled=cancelled,
            )

    # -- internals: submission ----------------------------------------------------------
    def _make_item(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any],
        kwargs: Mapping[str, Any] | None,
        token: CancellationToken | None,
        timeout: float | None,
        grace_period: float | None,
        partial_sink: PartialSink | None,
        interrupt_on_cancel: bool,
    ) -> _WorkItem | None:
        """Validate a submission; ``None`` means ``token`` is already cancelled."""
        check_call(fn, args, kwargs, token, partial_sink)
        if not isinstance(interrupt_on_cancel, bool):
            raise TypeError(
                f"interrupt_on_cancel must be a bool, not {type(interrupt_on_cancel).__name__}"
            )
        seconds = None if timeout is None else _check_timeout(timeout, "timeout")
        grace = ladder_seconds(grace_period, self._grace, "grace_period")
        self._check_accepting(fn)
        if token is not None and token.is_cancelled:
            return None
        if token is not None:
            task_token: CancellationToken | None = token.child(name=f"{self._name}-task")
        elif seconds is not None:
            task_token = CancellationToken(name=f"{self._name}-task")
        else:
            task_token = None  # made on first use: see _WorkItem.task_token
        item = _WorkItem(
            self,
            fn,
            tuple(args),
            dict(kwargs or {}),
            task_token,
            seconds,
            grace,
            partial_sink,
            interrupt_on_cancel,
        )
        if task_token is not None:
            task_token.name = f"{self._name}/{item.name}"
        item.source = token
        return item

    def _check_accepting(self, fn: object) -> None:
        """Raise the error a submission of ``fn`` gets now, if any (no lock taken)."""
        if self._forked:
            raise PoolClosedError(
                f"{self._name} belongs to the parent process: this process was forked from "
                f"it and has none of its threads; make a new ThreadPool here (cannot submit "
                f"{fn!r})"
            )
        if self._broken is not None:
            raise self._broken_error()
        if self._shutdown:
            raise PoolClosedError(f"{self._name} is shut down; cannot submit {fn!r}")

    def _broken_error(self) -> BrokenPoolError:
        """A fresh error for a broken pool, chained from the initializer's error."""
        error = BrokenPoolError(self._broken)
        error.__cause__ = self._broken_cause
        return error

    def _enqueue(self, item: _WorkItem) -> None:
        # From here on a cancel settles the future at once (a queued one is then skipped).
        # The callback never takes self._lock, so it may run here (an already-cancelled
        # token) or from a signal handler that interrupts the block below. A task without
        # a token yet registers it when the token is made (_WorkItem.task_token).
        token, fn = item.token, item.fn  # (a cancel that settles the future drops item.fn)
        if token is not None:
            item.cancel_handle = token.on_cancel(functools.partial(self._settle_cancelled, item))
        with self._lock:
            if not self._shutdown and self._broken is None:
                self._queue.append(item)
                _queued.add(self)  # until a worker that holds the pool finds the queue empty
                if not self._shutdown:
                    if self._idle:
                        self._cond.notify()
                    self._spawn_if_needed()
                    return
                # A signal handler shut the pool down right here (see shutdown): this
                # submit is refused, as one a moment later would be.
                with contextlib.suppress(ValueError):
                    self._queue.remove(item)
                if not self._queue:
                    _queued.discard(self)
        if item.cancel_handle is not None:
            item.cancel_handle.remove()
        with _futures.lock(item.future):
            # A cancel that settled the future meanwhile counted a task that never was.
            item.refused = True
            if item.counted:
                with self._count_lock:
                    self._cancelled -= 1
        if item.token is not None:
            item.token.close()
        self._check_accepting(fn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn_if_needed(self) -> None:
        """Start workers for queued work nobody waits for. Caller holds the lock."""
        while len(self._queue) > self._idle and self._active < self._max_workers:
            if self._timer_hold is None and not self._shutdown:
                # A cancel of a running task schedules its grace timer: with the timer
                # thread up, that never starts a thread under a GIL-bound task. (Not
                # after shutdown, which released it: a worker replacing an abandoned
                # one then runs the queued tasks without holding the thread.)
                self._timer_hold = _timer.hold(self)
            worker = _Worker()
            if self._thread_name_prefix:
                name = f"{self._thread_name_prefix}_{next(self._thread_numbers)}"
            else:
                name = f"cancelflow-thread-{next(_thread_ids)}"
            thread = threading.Thread(
                target=_worker_main, args=(weakref.ref(self), worker), name=name, daemon=True
            )
            worker.thread = thread
            self._workers.add(worker)
            self._active += 1
            self._idle += 1  # counted idle until it takes an item, so we do not over-spawn
            thread.start()

    # -- internals: workers -------------------------------------------------------------
    def _begin(self, worker: _Worker) -> bool:
        """A new worker thread's first step: run the initializer; ``False`` if it failed."""
        worker.ident = threading.get_ident()
        if self._initializer is not None and not self._initialize(worker):
            return False
        with self._lock:
            self._idle -= 1  # undo the count made when spawned
        return True

    def _work(self, worker: _Worker) -> bool:
        """Run tasks while there are any (see :func:`_worker_main`, the thread's body).

        Returns ``True`` when the thread is to wait for more work: then it *holds the
        pool's lock*, counted idle (see :meth:`_take`); ``False`` when it must end.

        A thread interrupt (``interrupt_on_cancel``) may land anywhere in this loop after
        the task's own frames returned; the state kept on ``worker`` makes every step
        safe to repeat, and after ``_release`` clears the thread's item no interrupt can
        be sent to it any more (the sender checks under the lock), so the pending one, if
        any, is cleared before the next task.

        This frame keeps no local that refers to a task (the steps that handle one are
        methods whose frames are gone when they return), so an idle worker keeps nothing
        of its last task alive.
        """
        while True:
            try:
                if worker.finishing is None:
                    if worker.item is None:
                        taken = self._take(worker)
                        if taken is not True:
                            return taken is None
                    self._run_item(worker)
                self._release(worker)
            except CancelledException as exc:
                # An interrupt landed in pool code rather than in the task's frames.
                if worker.item is not None and worker.outcome is None:
                    worker.outcome = _Outcome(exc=exc)
                continue
            # From here on no interrupt can be pending for this thread.
            self._complete(worker)

    def _initialize(self, worker: _Worker) -> bool:
        """Run the initializer in a new worker; on failure break the pool, return ``False``."""
        assert self._initializer is not None
        try:
            self._initializer(*self._initargs)
        except BaseException as exc:  # noqa: BLE001 - as the stdlib: any error breaks the pool
            self._initializer_failed(worker, exc)
            return False
        return True

    def _initializer_failed(self, worker: _Worker, exc: BaseException) -> None:
        """Break the pool: this worker ends, queued tasks fail, submissions are refused."""
        with self._lock:
            self._idle -= 1
            self._active -= 1
            self._remove(worker)
            if self._broken is None:
                self._broken = (
                    f"{self._name}: a thread initializer failed, the thread pool is not "
                    "usable anymore"
                )
                self._broken_cause = exc
            dropped = list(self._queue)
            self._queue.clear()
            _queued.discard(self)
            self._cond.notify_all()  # idle workers end: no task can come any more
        safe_log(
            "CRITICAL",
            f"{self._name}: exception in initializer; the pool is broken",
            exception=exc,
            pool=self._name,
            thread=threading.current_thread().name,
        )
        for item in dropped:
            self._fail_pending(item, self._broken_error())

    def _run_item(self, worker: _Worker) -> None:
        """Run ``worker.item`` (unless it already has an outcome); make it ``finishing``."""
        item = worker.item
        assert item is not None
        if worker.outcome is None:
            worker.outcome = _call(item)
        worker.finishing = item

    def _take(self, worker: _Worker) -> bool | None:
        """Make the next queued task ``worker.item`` (``True``); ``False`` means the thread
        must end; ``None``, that there is no task now: then this returns *holding the
        lock*, the thread counted idle, for :func:`_worker_main` to wait on ``_cond``."""
        lock = self._lock
        lock.acquire()
        waits = False
        try:
            if worker.retire:
                self._remove(worker)
                return False
            while self._queue:
                item = self._queue.popleft()
                if self._start(item, worker):
                    worker.item = item
                    return True
                del item  # cancelled while queued; do not keep it while we wait
            _queued.discard(self)
            if self._shutdown or self._broken is not None:
                self._active -= 1
                self._remove(worker)
                return False
            self._idle += 1
            waits = True
            return None
        finally:
            if not waits:
                lock.release()

    def _remove(self, worker: _Worker) -> None:
        """Forget an ending worker. Caller holds the lock."""
        self._workers.discard(worker)
        self._exited = [t for t in self._exited if t.is_alive()]
        if worker.thread is not None:
            self._exited.append(worker.thread)
        self._cond.notify_all()

    def _start(self, item: _WorkItem, worker: _Worker) -> bool:
        """Mark a dequeued task running; ``False`` if it was cancelled. Caller holds the lock."""
        future = item.future
        with _futures.lock(future):
            if not _futures.start_locked(future):
                return False
            item.worker = worker
            item.fate = _RUNNING
        if item.timeout is not None:
            item.timeout_handle = _timer.call_at(
                time.monotonic() + item.timeout, functools.partial(_fire_timeout, item)
            )
        return True

    def _release(self, worker: _Worker) -> None:
        """The task's frames have returned: no interrupt may be sent for it from now on.

        Then clears any interrupt sent for it and not delivered yet. The pool's lock is
        taken only for a task that may be interrupted (``interrupt_on_cancel``): the
        sender checks under it that the thread still runs the task. For any other task
        the store needs no lock: ``_grace_expired`` racing with it either sees the item
        and abandons the thread (which :meth:`_complete` then sees under the lock, and
        takes back), or sees it gone.
        """
        item = worker.item
        if item is not None and item.interrupt:
            with self._lock:
                worker.item = None
        else:
            worker.item = None
        finishing = worker.finishing
        if finishing is not None and finishing.interrupt_sent:
            _discard_pending_interrupt()

    def _complete(self, worker: _Worker) -> None:
        """Deliver a returned task's outcome and return the thread to the pool."""
        item, outcome = worker.finishing, worker.outcome
        assert item is not None
        assert outcome is not None
        worker.finishing = worker.outcome = None
        # First: a cancel from here on (the link below, another thread) settles a task
        # that is over, with its final fate, not one it thinks still runs.
        item.returned = True
        source, token = item.source, item.token
        if source is not None and source.is_cancelled and token is not None:
            # The caller's token is cancelled, but its link may not have reached the
            # task's token yet (the canceller's thread sets the flag first, then runs the
            # links): a task that returned because of that cancel must count as
            # cancelled, not finished. Idempotent if the link got there first.
            token.cancel(source.cancel_reason)
        if item.timeout_handle is not None:
            item.timeout_handle.cancel()
        if item.cancel_handle is not None:
            item.cancel_handle.remove()
        future = item.future
        resolved = settled = False
        with _futures.lock(future):
            item.worker = None
            if item.is_cancelled():
                settled = self._settle_locked(item)
                if item.fate != Fate.ABANDONED:
                    item.settle_fate(Fate.CANCELLED)
            elif not _futures.done_locked(future):
                resolved = True
                item.fate = _FAILED if outcome.exc is not None else _FINISHED
                _futures.settle_locked(future, result=outcome.value, exception=outcome.exc)
        if item.grace_handle is not None:
            # Read only now that ``returned`` is set: a cancel racing with this return
            # stores its grace timer first and then checks ``returned``, so one of the
            # two sides cancels it. (A timer that fires meanwhile finds the thread's
            # item gone and does nothing.)
            item.grace_handle.cancel()
        if resolved or settled:
            _futures.run_callbacks(future)
        if item.over_callbacks is not None:
            item.fire_over()
        if item.token is not None:
            item.token.close()
        _drop_call(item)
        came_back = False
        with self._lock:
            if resolved:
                self._completed += 1
            if worker.abandoned:
                came_back = True
                worker.abandoned = False
                self._abandoned_running -= 1
                if self._shutdown or self._active >= self._max_workers:
                    worker.retire = True
                else:
                    self._active += 1
                self._cond.notify_all()
            else:
                # The next queued task, under the lock already held (_take's first step);
                # not one that may be interrupted: an interrupt may land only where _work
                # catches it, and the rest of this method is outside that.
                queue = self._queue
                while queue and not queue[0].interrupt:
                    queued = queue.popleft()
                    if self._start(queued, worker):
                        worker.item = queued
                        break
                del queue
        if came_back:
            safe_log(
                "INFO",
                f"abandoned {item.name} returned after "
                f"{time.monotonic() - item.cancelled_at:.3f}s; "
                + ("its thread ends" if worker.retire else "its thread rejoins the pool"),
                task=item.name,
                pool=self._name,
                thread=worker.thread.name if worker.thread is not None else None,
            )

    # -- internals: cancellation --------------------------------------------------------
    def _cancel_as_future(self, item: _WorkItem, reason: str) -> bool:
        """Cancel ``item`` so that its future reads as cancelled; ``False`` if it was done.

        Takes no pool lock (see :meth:`_settle_cancelled`).
        """
        future = item.future
        with _futures.lock(future):
            if future.cancelled():
                return True
            if _futures.done_locked(future):
                return False
            item.cancel_as_future = True
        item.task_token().cancel(reason)
        self._settle_cancelled(item)
        return future.cancelled()

    def _stop_for_awaiter(self, item: _WorkItem) -> None:
        """The asyncio task awaiting ``item`` (``run_sync``) was cancelled: cancel the
        task's token and settle its future now; the thread gets its grace period."""
        item.task_token().cancel("asyncio task cancelled")
        self._settle_cancelled(item)

    def _fail_pending(self, item: _WorkItem, error: BaseException) -> None:
        """Fail a task that will never start with ``error`` (if still pending)."""
        future = item.future
        with _futures.lock(future):
            if not _pending(future):
                return
            item.fate = Fate.FAILED
            _drop_call(item)
            _futures.settle_locked(future, exception=error)
        _futures.run_callbacks(future)
        item.fire_over()
        if item.cancel_handle is not None:
            item.cancel_handle.remove()
        if item.token is not None:
            item.token.close()

    def _after_fork_in_child(self) -> None:
        """In a forked child: the pool's threads are gone; refuse work, never wait."""
        self._forked = True
        self._shutdown = True
        # Another thread may have held these at the fork: new ones, never waited on.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._wake.cond = self._cond
        self._count_lock = threading.RLock()
        self._timer_hold = None  # the timer thread is not in the child either
        self._queue.clear()
        self._workers.clear()
        self._exited = []
        self._active = self._idle = self._abandoned_running = 0

    def _settle_cancelled(self, item: _WorkItem) -> None:
        """Resolve the future of a task whose token was cancelled; start its grace period.

        Runs in the thread that cancelled, possibly in a signal handler that interrupted
        this very pool in the same thread. So it never takes ``self._lock`` (a plain lock
        the interrupted frame may hold): only the future's re-entrant lock, the counter
        lock (re-entrant), and :func:`_timer.call_at`, which is lock-free and starts the
        timer thread without waiting on :mod:`threading`'s module lock. The future's
        done-callbacks and ``concurrent.futures`` waiters run here too.
        """
        future = item.future
        with _futures.lock(future):
            running = _futures.running_locked(future) and not item.returned
            resolved = self._settle_locked(item)
            if resolved and running:
                item.cancelled_at = time.monotonic()
        if not resolved:
            return
        _futures.run_callbacks(future)
        if not running:
            item.fire_over()  # it never ran, or already returned: over now
            return
        handle = _timer.call_at(
            item.cancelled_at + item.grace, functools.partial(self._grace_expired, item)
        )
        item.grace_handle = handle
        if item.returned:  # it returned before the handle was stored: _complete missed it
            handle.cancel()

    def _settle_locked(self, item: _WorkItem) -> bool:
        """Resolve as cancelled if still unresolved; caller holds the future's lock."""
        future = item.future
        if _futures.done_locked(future):
            return False
        if not _futures.running_locked(future):
            item.fate = Fate.CANCELLED
            _drop_call(item)  # it will never run: _start checks the state under this lock
        elif item.returned:
            item.fate = Fate.CANCELLED  # it returned already: final before anyone hears
        if item.cancel_as_future:
            _futures.settle_locked(future, cancelled=True, signal_safe=True)
        else:
            item.error = item.cancel_exception()
            if item.fate not in _UNDER_WAY:
                item.error.fate = item.fate
            _futures.settle_locked(future, exception=item.error, signal_safe=True)
        if not item.refused:
            item.counted = True
            with self._count_lock:
                self._cancelled += 1
        return True

    def _grace_expired(self, item: _WorkItem) -> None:
        """Timer thread: the cancelled task had its grace period; interrupt or abandon it."""
        with self._lock:
            worker = item.worker
            if worker is None or worker.item is not item or worker.abandoned:
                return  # it returned in time
            if item.interrupt and not item.interrupt_sent:
                item.interrupt_sent = True
                _send_async_exc(worker.ident, CancelledException)
                item.grace_handle = _timer.call_at(
                    time.monotonic() + max(item.grace, _INTERRUPT_SETTLE),
                    functools.partial(self._grace_expired, item),
                )
                interrupted = True
            else:
                interrupted = False
                worker.abandoned = True
                self._active -= 1
                self._abandoned_total += 1
                self._abandoned_running += 1
                with _futures.lock(item.future):
                    item.settle_fate(Fate.ABANDONED)
                self._spawn_if_needed()
                self._cond.notify_all()
        if not interrupted:
            item.fire_over()
        thread = worker.thread.name if worker.thread is not None else None
        fn_name = item.fn_name
        if interrupted:
            safe_log(
                "DEBUG",
                f"{item.name} ({fn_name}) ignored its cancellation for {item.grace:g}s; "
                "raising CancelledException in its thread",
                task=item.name,
                pool=self._name,
                thread=thread,
            )
        else:
            safe_log(
                "WARNING",
                f"{item.name} ({fn_name}) still running {time.monotonic() - item.cancelled_at:.3f}s "
                f"after cancel ({item.cancel_reason()!r}); thread {thread} abandoned, "
                "a new worker takes its slot",
                task=item.name,
                pool=self._name,
                thread=thread,
                cancel_reason=item.cancel_reason(),
            )


def _call(item: _WorkItem) -> _Outcome:
    try:
        context = item.context
        return _Outcome(item.run() if context is None else context.run(item.run))
    except BaseException as exc:  # noqa: BLE001 - the task's outcome, whatever it is
        return _Outcome(exc=exc)


def _fire_timeout(item: _WorkItem) -> None:
    assert item.timeout is not None
    item.timed_out = True
    item.task_token().cancel(_timeout_reason(item.timeout))


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _drop_call(item: _WorkItem) -> None:
    """Forget what a task that ran, or never will, was to call (its future outlives it)."""
    item.fn = _noop
    item.args = ()
    item.kwargs = {}
    item.context = None
    item.user_sink = None
    item.source = None


def _pending(future: Future[Any]) -> bool:
    """Neither started nor done (nor cancelled)."""
    return not (future.running() or future.done())


_live_pools: weakref.WeakSet[ThreadPool] = weakref.WeakSet()
#: Pools with queued work (added under the pool's lock as a task is queued, discarded
#: under it by a worker that finds the queue empty): a pool dropped right after a submit
#: is kept until a worker, which then holds it, has taken every queued task.
_queued: set[ThreadPool] = set()


def _worker_main(ref: weakref.ref[ThreadPool], worker: _Worker) -> None:
    """A worker thread's body: it holds its pool only while it has work.

    It waits for work holding a weak reference alone, so a pool dropped without
    ``shutdown()`` is collected once its queue is empty and no task runs (as the
    stdlib's ``ThreadPoolExecutor``), and its finalizer wakes the idle threads, which
    end. (Queued work keeps the pool alive: see ``_queued``.)

    Before it waits, it reads whether the pool was collected from the flag the finalizer
    sets under the lock this thread holds, not by calling ``ref()``: the reference that
    call makes may be the last one when another thread lets go meanwhile (on a
    free-threaded build, a reference dropped by another thread is merged by the pool's
    owner thread later, at any moment), and dropping it would run the finalizer here,
    its wake-up lost before the wait began: the thread would wait for good.
    """
    pool = ref()
    if pool is None or not pool._begin(worker):
        return
    wake = pool._wake
    while pool._work(worker):  # True: no work now, and this thread holds the lock
        cond = pool._cond
        del pool  # (if that was the last reference, the finalizer ran here: no wait)
        try:
            if not wake.collected:  # else the finalizer ran, here or before we held the lock
                cond.wait()
        finally:
            pool = ref()
            if pool is not None:
                pool._idle -= 1
            cond.release()
        if pool is None:
            return


class _Wake:
    """What the idle workers of a pool wait on, kept apart from the pool for its
    finalizer (see :func:`_wake_all`)."""

    __slots__ = ("collected", "cond")

    def __init__(self, cond: threading.Condition) -> None:
        self.cond = cond
        #: the pool was collected (set under ``cond``'s lock)
        self.collected = False


def _wake_all(wake: _Wake) -> None:
    """Wake every idle worker of a pool that was collected (they end). The one thread
    that may hold the lock then is a worker going idle or just woken, which reads
    ``collected`` before it would wait, and ends."""
    cond = wake.cond
    with cond:
        wake.collected = True
        cond.notify_all()


def _after_fork_in_child() -> None:
    _queued.clear()
    for pool in list(_live_pools):
        pool._after_fork_in_child()


at_fork(after_in_child=_after_fork_in_child)


def _failed_future(token: CancellationToken) -> ThreadTaskFuture[Any]:
    """The future of a task refused because ``token`` was already cancelled."""
    reason = token.cancel_reason
    future: ThreadTaskFuture[Any] = ThreadTaskFuture()
    future._bare_fate = Fate.CANCELLED
    future.set_exception(CancelledException(reason or "operation cancelled", reason=reason))
    return future


def _outcome_of(future: ThreadTaskFuture[T]) -> T:
    """What ``run_sync`` gives for a done task future: its result, or raise its error
    (a cancelled future raises :class:`CancelledException` with the task's reason)."""
    if future.cancelled():
        reason = future.cancel_reason
        raise CancelledException(reason or "future cancelled", reason=reason)
    exc = future.exception()
    if exc is not None:
        raise exc
    return future.result()
