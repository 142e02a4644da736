"""`ProcessPool`: a process pool that can stop a *running* task, reap everything it
started, and heal."""

from __future__ import annotations

import asyncio
import atexit
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
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED
from dataclasses import dataclass, field
from typing import Any

from . import _cell
from ._channel import FrameReader, encode
from ._exceptions import (
    CancelledException,
    PipelineTimeoutException,
    PoolClosedError,
    WorkerCrashedError,
)
from ._log import safe_log
from ._platform import descendants, pidfd_open
from ._token import CancellationToken
from ._validate import check_seconds as _seconds
from ._worker import TASK_TOKEN_ID, Control, kill_tree_of, recv_seq_fds, send_seq

__all__ = ("ProcessPool", "ProcessPoolStatistics", "TaskFuture")

_SLOT = _cell.SLOT_SIZE
_seq = itertools.count(1)
_pools: weakref.WeakSet[ProcessPool] = weakref.WeakSet()

#: Fates a task can end with (``TaskFuture.fate``).
FATES = ("pending", "running", "finished", "failed", "cancelled", "terminated", "killed", "crashed")


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
        fate: how the task ended (one of ``FATES``): ``finished``, ``failed`` (raised),
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
        self.fate = "pending"
        self.cancel_reason: str | None = None
        self.partial_results: dict[str, Any] = {}
        self.pid: int | None = None
        self._task: _Task | None = None

    def cancel(self) -> bool:
        """Stop the task: a queued one never starts; a running one goes down the ladder.

        Returns ``True`` unless the task already finished. For a queued task the future
        is cancelled before this returns. For a running task this only starts the stop:
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
            return super().cancel()
        task.pool._request_stop(task, "future", "future cancelled")
        return True

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
            return super().cancel()
        task.pool._request_stop(task, "future", reason, kill=True)
        return True

    def running(self) -> bool:
        return self.fate == "running"

    def _cancel_now(self) -> None:
        super().cancel()
        self.set_running_or_notify_cancel()


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
    handle: Any = None
    partials: dict[str, Any] = field(default_factory=dict)


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
        self.slot = pool._slot_tokens[index]
        self.control = pool._controls[index]

    def drop_views(self) -> None:
        """Forget this worker's views of the shared chunk (so it can be unmapped)."""
        with contextlib.suppress(AttributeError):
            del self.slot, self.control


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

    Unlike :class:`concurrent.futures.ProcessPoolExecutor`, cancelling works on a task
    that is already running, and a worker's death fails only the task it was running:
    the pool replaces the worker (a fork of a warm zygote, a few milliseconds) and keeps
    its size. Each worker has its own channel; no lock is shared between processes.

    Stopping a running task is a ladder, each step taken only if the previous one did not
    end the task:

    1. its token is cancelled (``ctx.token`` / ``cancelflow.current_token()`` in the
       worker sees it at once) and the task has ``grace_period`` seconds to return;
    2. the worker gets SIGTERM, which becomes an exception in the task so that its
       ``finally`` blocks and context managers run; ``term_grace_period`` seconds;
    3. the worker and every process the task started (children, grandchildren, also
       ones that changed process group or session) are frozen and SIGKILLed, and the
       pool waits, event-driven (pidfd), until each one is confirmed gone.

    A task inside :func:`cancelflow.critical_section` defers steps 2 and 3 until the block
    ends, for at most the time it declared. The caller's exception comes once the stop is
    complete (the task returned, or its worker and tree are gone), so the partial results
    it carries are final; it does not wait for the replacement worker.

    Not promised: a task inside a long C call that ignores signals is only stopped by
    SIGKILL (step 3); code in a ``finally`` block does not run after SIGKILL. Partial
    results are only what the task stored before it was stopped.

    Args:
        max_workers: number of workers (default: the CPU count).
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
        *,
        grace_period: float = 0.1,
        term_grace_period: float = 1.0,
        name: str | None = None,
    ) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._grace = _seconds(grace_period, "grace_period")
        self._term_grace = _seconds(term_grace_period, "term_grace_period")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        self.name = name or f"process-pool-{id(self):x}"
        self._size = max_workers
        self._lock = threading.Lock()
        self._queue: collections.deque[_Task] = collections.deque()
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._closing = False
        self._closed = threading.Event()
        self._cancel_running_on_close = False
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_ids = itertools.count()
        self._stats = collections.Counter[str]()
        self._workers: dict[int, _WorkerHandle] = {}
        self._zygote_ready = False
        self._crash_streak = 0
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
        parent_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._zygote_sock = parent_end
        try:
            self._zygote = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from cancelflow._worker import zygote_main; "
                    f"zygote_main({zygote_end.fileno()}, {self._chunk.fd})",
                ],
                pass_fds=(zygote_end.fileno(), self._chunk.fd),
                stdin=subprocess.DEVNULL,
            )
        finally:
            zygote_end.close()
        prep = multiprocessing.spawn.get_preparation_data(self.name)
        prep["authkey"] = bytes(prep["authkey"])
        prep.pop("start_method", None)
        send_seq(self._zygote_sock, prep)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake",))
        self._selector.register(self._zygote_sock, selectors.EVENT_READ, ("zygote",))
        self._thread = threading.Thread(
            target=self._run, name=f"cancelflow-{self.name}", daemon=True
        )
        self._thread.start()
        _pools.add(self)

    # == public API ==========================================================================
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Schedule ``fn(*args, **kwargs)`` in a worker; see :meth:`submit_task` for options."""
        return self.submit_task(fn, args, kwargs)

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

        Args:
            fn: a picklable callable (module-level function or class instance).
            token: cancelling it stops the task.
            timeout: seconds the task may run before it is stopped.
            grace_period / term_grace_period: override the pool's ladder for this task.
            partial_sink: called as ``sink(key, value)`` for each ``store_partial`` the
                task makes, on the pool's supervisor thread; must be quick and thread-safe.

        Raises:
            PoolClosedError: the pool was shut down.
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
        if self._closing:
            raise PoolClosedError(f"{self.name} is shut down")
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
            raise TypeError(f"{part} cannot be sent to a process: {exc}") from exc
        future = TaskFuture()
        task = _Task(
            self, next(_seq), payload, future, token, grace, term_grace, timeout, partial_sink
        )
        future._task = task
        if token is not None and token.is_cancelled:
            task.stop_kind, task.stop_reason = "cancel", token.cancel_reason
            self._finish(task, "cancelled")
            return future
        with self._lock:
            if self._closing:
                raise PoolClosedError(f"{self.name} is shut down")
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
        """Like :meth:`concurrent.futures.Executor.map`; ``timeout`` bounds the wait for
        each result (not the task) and stops the tasks not yet collected when it passes."""
        return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, cancel_running: bool = False
    ) -> None:
        """Stop accepting tasks, then end every worker, the zygote and the supervisor.

        Args:
            wait: block until every process and the supervisor thread are gone.
            cancel_futures: drop queued tasks (their futures end cancelled).
            cancel_running: also stop running tasks with the ladder; otherwise they are
                allowed to finish first.

        Idempotent. Everything the pool started (workers, their process trees, the zygote,
        pipes, the shared-memory chunk) is released; nothing is left running.
        """
        with self._lock:
            first = not self._closing
            self._closing = True
            dropped: list[_Task] = []
            if cancel_futures:
                dropped = list(self._queue)
                self._queue.clear()
        for task in dropped:
            task.stop_kind, task.stop_reason = "future", "pool shut down"
            self._finish(task, "cancelled")
        if first or cancel_running:
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
            queued=len(self._queue),
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
            if self._closing or (deadline is not None and time.monotonic() > deadline):
                return False
            self._ready_event.wait(0.05)
            self._ready_event.clear()

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
        if task.done or (task.stop_kind is not None and not kill):
            return
        with self._lock:
            queued = task.worker is None and task in self._queue
            if queued:
                self._queue.remove(task)
                task.stop_kind, task.stop_reason = kind, reason
        if queued:
            self._finish(task, "cancelled")
        else:
            self._post(("kill" if kill else "stop", task, kind, reason))

    # == supervisor thread ===================================================================
    def _run(self) -> None:
        try:
            while not self._loop_once():
                pass
        except BaseException as exc:  # noqa: BLE001 - report, then release everything
            safe_log("CRITICAL", "process pool supervisor crashed", exception=exc, pool=self.name)
        finally:
            self._teardown()

    def _loop_once(self) -> bool:
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        for key, _ in self._selector.select(timeout):
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
                self._on_socket(key.data[1])
            elif kind == "pidfd":
                self._on_pidfd(key.data[1], key.data[2])
        while self._commands:
            self._on_command(self._commands.popleft())
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, action = heapq.heappop(self._timers)
            action()
        self._dispatch()
        return self._closing_done()

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
                self._cancel_running_on_close = True
                for worker in list(self._workers.values()):
                    if worker.task is not None:
                        self._stop(worker.task, "shutdown", "pool shut down")

    def _at(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_ids), action))

    # -- the zygote -----------------------------------------------------------------------------
    def _on_zygote(self) -> None:
        try:
            message, fds = recv_seq_fds(self._zygote_sock)
        except OSError:
            message, fds = None, []
        for fd in fds:
            os.close(fd)
        if message is None:
            self._selector.unregister(self._zygote_sock)
            if not self._closing:
                safe_log("CRITICAL", "the pool's zygote process died", pool=self.name)
                self._closing = True
                self._fail_all(PoolClosedError(f"{self.name}: its zygote process died"))
            return
        kind = message[0]
        if kind == "zygote-ready":
            self._zygote_ready = True
            for index in range(self._size):
                self._spawn(index)
        elif kind == "spawned":
            _, index, pid = message
            worker = self._workers.get(index)
            if worker is None or worker.pid:
                return
            worker.pid = pid
            worker.pidfd = pidfd_open(pid)
            if worker.pidfd is None:
                self._on_gone(worker)
            else:
                self._selector.register(worker.pidfd, selectors.EVENT_READ, ("pidfd", worker, pid))
        elif kind == "exited":
            _, pid, status = message
            for worker in self._workers.values():
                if worker.pid == pid:
                    worker.status = status
                    if worker.gone:
                        self._retire(worker)
        elif kind == "prepare-failed":
            safe_log("WARNING", f"workers could not import __main__: {message[1]}", pool=self.name)

    def _spawn(self, index: int) -> None:
        if self._closing:
            return
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slot = self._slot_tokens[index]
        slot.reset()
        self._controls[index].critical_until = 0.0
        worker = _WorkerHandle(self, index, parent_end)
        self._workers[index] = worker
        self._selector.register(parent_end, selectors.EVENT_READ, ("sock", worker))
        try:
            send_seq(
                self._zygote_sock,
                ("spawn", index, (1 + 2 * index) * _SLOT, (2 + 2 * index) * _SLOT),
                [child_end.fileno()],
            )
        finally:
            child_end.close()

    # -- worker channel ------------------------------------------------------------------------
    def _on_socket(self, worker: _WorkerHandle) -> None:
        try:
            data = worker.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self._selector.unregister(worker.sock)
            return
        for message in worker.reader.feed(data):
            self._on_message(worker, message)

    def _on_message(self, worker: _WorkerHandle, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            if worker.state == "starting":
                worker.state = "idle"
                self._crash_streak = 0
                self._ready_event.set()
            return
        if kind == "retire":
            # The task changed the worker's process for good (see _worker._ProcessState):
            # it gets no more tasks and is replaced once it has exited.
            if worker.state == "busy":
                worker.state = "retiring"
            safe_log("WARNING", f"worker {worker.pid} retires: {message[2]}", pool=self.name)
            return
        task = worker.task
        if task is None or task.seq != message[1]:
            return
        if kind == "partial":
            _, _, key, value = message
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
            _, _, outcome, value = message
            worker.task = None
            if worker.state == "busy":
                worker.state = "idle"
            self._stats["completed"] += 1
            if outcome == "ok":
                if task.stop_kind == "future":
                    self._finish(task, "cancelled")
                else:
                    self._finish(task, "finished", value=value)
            elif outcome == "terminated":
                self._finish(task, "terminated")
            elif isinstance(value, CancelledException) and (
                task.stop_kind is not None or worker.slot.is_cancelled
            ):
                if task.stop_kind is None:
                    task.stop_kind, task.stop_reason = "cancel", worker.slot.cancel_reason
                self._finish(task, "cancelled")
            else:
                self._finish(task, "failed", error=value)

    # -- dispatch ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        if not self._queue:
            return
        for worker in self._workers.values():
            if worker.state != "idle":
                continue
            with self._lock:
                if not self._queue:
                    return
                task = self._queue.popleft()
                task.worker = worker
            worker.state = "busy"
            worker.task = task
            worker.slot.reset()
            task.future.pid = worker.pid
            task.future.fate = "running"
            try:
                worker.sock.sendall(encode(("task", task.seq, task.payload)))
            except OSError:
                pass  # the worker is dying; its pidfd will tell
            if task.timeout is not None:
                self._at(task.timeout, functools.partial(self._on_timeout, task))
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
            self._at(task.grace, lambda: self._escalate(task))

    def _escalate(self, task: _Task) -> None:
        worker = task.worker
        if task.done or worker is None or worker.task is not task or worker.state != "busy":
            return
        critical = worker.control.critical_until
        now = time.monotonic()
        if critical > now:
            self._at(critical - now, lambda: self._escalate(task))
            return
        if task.stage < 2 and task.term_grace > 0:
            task.stage = 2
            with contextlib.suppress(OSError):
                os.kill(worker.pid, signal.SIGTERM)
            self._at(task.term_grace, lambda: self._escalate(task))
            return
        if task.stage < 3:
            task.stage = 3
            self._kill(worker)

    def _kill(self, worker: _WorkerHandle) -> None:
        worker.state = "dying"
        self._stats["killed"] += 1
        with contextlib.suppress(OSError):
            os.kill(worker.pid, signal.SIGSTOP)
        tree = descendants(worker.pid)
        kill_tree_of(worker.pid)
        with contextlib.suppress(OSError):
            os.kill(worker.pid, signal.SIGKILL)
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
            if worker.gone and not worker.waiting:
                self._retire(worker)
            return
        assert worker.pidfd is not None
        self._selector.unregister(worker.pidfd)
        os.close(worker.pidfd)
        worker.pidfd = None
        self._on_gone(worker)

    def _on_gone(self, worker: _WorkerHandle) -> None:
        """The worker process exited: collect what it sent, then settle its task."""
        worker.gone = True
        self._drain(worker)
        task = worker.task
        if task is not None and task.stage < 3 and worker.state != "dying":
            # Died by itself: the task's exit status decides the error.
            if worker.status is None:
                self._at(2.0, lambda: self._retire(worker))  # the zygote is slow or dead
                return
        if not worker.waiting:
            self._retire(worker)

    def _drain(self, worker: _WorkerHandle) -> None:
        sock = worker.sock
        if sock.fileno() < 0:
            return
        sock.setblocking(False)
        while True:
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            for message in worker.reader.feed(data):
                self._on_message(worker, message)

    def _retire(self, worker: _WorkerHandle) -> None:
        if worker.state == "dead" or not worker.gone or worker.waiting:
            return
        task = worker.task
        worker.task = None
        worker.state = "dead"
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.sock)
        worker.sock.close()
        if task is not None and not task.done:
            if task.stage >= 3:
                self._finish(task, "killed")
            elif task.stage == 2:
                self._finish(task, "terminated")
            elif task.stop_kind is not None and task.stop_kind != "shutdown" and worker.status is None:
                self._finish(task, "killed")
            else:
                self._stats["crashed"] += 1
                self._finish(task, "crashed", error=_crash_error(worker))
        worker.drop_views()
        if self._workers.get(worker.index) is worker and not self._closing:
            self._stats["replaced"] += 1
            self._crash_streak += 1 if task is None or task.stage == 0 else 0
            if self._crash_streak > 10:
                safe_log("CRITICAL", "workers keep dying at start; pool closed", pool=self.name)
                self._closing = True
                self._fail_all(PoolClosedError(f"{self.name}: workers keep dying at start"))
                return
            self._spawn(worker.index)

    # -- endings -------------------------------------------------------------------------------
    def _finish(
        self, task: _Task, fate: str, *, value: Any = None, error: BaseException | None = None
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
        future._task = None
        future.fate = fate
        future.partial_results = dict(task.partials)
        future.cancel_reason = task.stop_reason
        if fate not in ("finished", "failed"):
            safe_log(
                "INFO",
                f"task {task.seq} {fate}" + (f": {task.stop_reason}" if task.stop_reason else ""),
                pool=self.name,
                worker_pid=task.worker.pid if task.worker is not None else None,
            )
        if fate == "finished":
            future.set_result(value)
        elif fate in ("failed", "crashed"):
            assert error is not None
            if fate == "crashed":
                error.fate = "crashed"  # type: ignore[attr-defined]
            future.set_exception(error)
        elif task.stop_kind == "future":
            future._cancel_now()
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

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        for task in queued:
            self._finish(task, "failed", error=error)
        for worker in list(self._workers.values()):
            if worker.task is not None:
                self._finish(worker.task, "failed", error=error)

    def _closing_done(self) -> bool:
        if not self._closing:
            return False
        if self._queue and not self._fail_if_no_workers():
            return False
        return all(w.task is None or w.task.done for w in self._workers.values()) and all(
            not w.waiting for w in self._workers.values()
        )

    def _fail_if_no_workers(self) -> bool:
        if any(w.state in ("idle", "busy", "starting") for w in self._workers.values()):
            return False
        self._fail_all(PoolClosedError(f"{self.name} has no workers left"))
        return True

    def _teardown(self) -> None:
        try:
            self._fail_all(PoolClosedError(f"{self.name} is shut down"))
            for worker in self._workers.values():
                if worker.state != "dead":
                    with contextlib.suppress(OSError):
                        worker.sock.close()
                for fd in ([worker.pidfd] if worker.pidfd is not None else []) + list(worker.waiting):
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._zygote_sock.close()  # EOF: the zygote kills every worker tree and exits
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
            self._release_chunk()
        finally:
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

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
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



@atexit.register
def _shutdown_all() -> None:
    for pool in list(_pools):
        with contextlib.suppress(Exception):
            pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)
