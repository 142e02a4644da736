"""The supervisor of a :class:`~cancelflow.ProcessPool`: one thread that owns every
process of the pool, every descriptor, and the stop ladder.

All pool state is mutated on the supervisor thread, with two exceptions decided under the
task future's (re-entrant) lock so that a stop needs no pool lock and is safe from a
signal handler: dropping a task no worker took yet (:meth:`Supervisor.request_stop`), and
claiming it for a worker (``_claim``). Other threads talk to the thread only through
:meth:`Supervisor.post` (a typed :data:`Command` and one byte on a wake pipe).

The loop (``_loop_once``): a ``selectors`` wait over the wake pipe, the zygote's channel,
each worker's socket and pidfds, bounded by its own deadline heap (grace periods,
timeouts); then queued commands, due timers, and dispatch. Each step is guarded: an error
while handling one task fails that task alone; only an error that concerns no task breaks
the pool.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import heapq
import itertools
import os
import pickle
import selectors
import signal
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .. import _cell, _futures, _interpreter_exit, _timer
from .._context import deliver_partial
from .._exceptions import (
    BrokenPoolError,
    CancelledException,
    PipelineTimeoutException,
    PoolClosedError,
    UnreadableResultError,
    WorkerCrashedError,
)
from .._fate import Fate
from .._log import safe_log
from .._platform import (
    HAVE_FUTEX,
    HAVE_PIDFD,
    ProcessView,
    at_fork,
    children,
    futex_wait,
    futex_wake,
    kill_tree,
    pidfd_open,
    preload_tree_functions,
    send_signal,
    signal_name,
)
from .._token import CancellationToken, token_on_slot
from . import _zygote
from ._channel import FrameReader, encode
from ._protocol import (
    DEEP_BYTES,
    DEPTH,
    QUICK_TASK,
    SHALLOW,
    WORKER_SLOTS,
    Cancel,
    Control,
    CriticalEnded,
    Exited,
    Held,
    InitFailed,
    Partial,
    PrepareFailed,
    Ready,
    Release,
    Result,
    Retire,
    RunTask,
    Spawn,
    Spawned,
    Sweep,
    SweepStrays,
    Swept,
    WorkerMessage,
    ZygoteReady,
    full_barrier,
    read,
    recv_record,
    send_record,
    wire,
)
from ._task import StopKind, Task, TaskFuture


def _remote_traceback(text: str) -> BaseException:
    """The worker's traceback text as the stdlib's own ``_RemoteTraceback`` (what code
    written for ``ProcessPoolExecutor`` finds as ``__cause__``)."""
    from concurrent.futures.process import _RemoteTraceback

    return _RemoteTraceback(text)  # type: ignore[arg-type]  # typeshed: TracebackType; it is the text


__all__ = ("Close", "Command", "Dispatch", "KillTask", "StopTask", "Supervisor", "WorkerHandle")

# Fates the per-task path uses, read once: a member access on an Enum class costs ~0.2 µs
# on Python 3.11, several times per task.
_RUNNING, _FINISHED, _FAILED = Fate.RUNNING, Fate.FINISHED, Fate.FAILED
_SETTLED_PLAINLY = (_FINISHED, _FAILED)
#: how a running task can be asked to stop (an "error" stop is the pool's own failure)
_ASKED_TO_STOP = ("cancel", "timeout", "future", "shutdown")

_SLOT = _cell.SLOT_SIZE
_supervisors: weakref.WeakSet[Supervisor] = weakref.WeakSet()

#: starting (forked, not ready) -> idle <-> busy -> retiring (no more tasks) -> dying
#: (being killed) -> dead (gone, swept, settled)
WorkerState = Literal["starting", "idle", "busy", "retiring", "dying", "dead"]


#: seconds from a stopped task to the look for a sibling it left (see _sweep_strays)
_STRAYS_DELAY = 0.02
#: the most frames one ``sendmsg`` carries (Linux and macOS take 1024 buffers)
_IOV_MAX = 512
#: the longest a stop asked from another thread waits for a worker's slot lock (see
#: _revoke_from_here): far beyond the instant the supervisor holds it
_SLOT_WAIT = 0.05
#: the longest a caller blocked in a task's result() sleeps on its worker's word at once
#: (see Supervisor.wait_on_worker: a guard, never what wakes it)
_LONGEST_SLEEP = 1.0
#: the longest a closing pool waits for its idle workers to exit on their own (see
#: Supervisor._let_idle_workers_exit): each takes about a millisecond
_IDLE_EXIT_WAIT = 0.5
#: what a worker sends about its running task before its result (counted: Task.frames)
_TASK_FRAMES = (Partial, Cancel, CriticalEnded)


# -- commands to the supervisor thread -----------------------------------------------------
@dataclass(frozen=True, slots=True)
class Dispatch:
    """A task was queued: hand it to an idle worker."""


@dataclass(frozen=True, slots=True)
class StopTask:
    """Stop a dispatched task with the ladder (token, SIGTERM, SIGKILL); ``at``: when the
    stop was asked (``time.monotonic()``), from which its grace period runs."""

    task: Task
    kind: StopKind
    reason: str | None
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class KillTask:
    """Stop a dispatched task at once: SIGKILL its worker and whole tree."""

    task: Task
    kind: StopKind
    reason: str | None


#: How a shutdown stops the tasks running then: down the whole ladder (``"ladder"``), with
#: SIGTERM now (``"terminate"``: ``term_grace_period`` later SIGKILL), or with SIGKILL of
#: each tree now (``"kill"``).
Force = Literal["ladder", "terminate", "kill"]


@dataclass(frozen=True, slots=True)
class Close:
    """The pool was shut down: end once idle (stop running tasks if ``running`` says how)."""

    running: Force | None


@dataclass(frozen=True, slots=True)
class RunCallbacks:
    """Run the done-callbacks of a future another thread resolved (see ``finish``)."""

    future: TaskFuture


@dataclass(frozen=True, slots=True)
class LooseEnds:
    """What :meth:`Supervisor.finish` leaves to the pool's thread when another thread
    (a caller in ``result()``) settled the task: drop the task's link to its token and
    its grace timer, and log how it ended. Posted without waking the pool's thread: the
    task's result, which its worker sends next, starts its next turn."""

    task: Task
    fate: Fate


Command = Dispatch | StopTask | KillTask | Close | RunCallbacks | LooseEnds


class WorkerHandle:
    """The supervisor's view of one worker process (its channel, pid, state, task)."""

    def __init__(
        self,
        index: int,
        sock: socket.socket,
        slots: tuple[CancellationToken, ...],
        slot_lock: threading.Lock,
        control: Control,
    ) -> None:
        self.index = index
        self.sock = sock
        self.reader = FrameReader()
        self.pid = 0
        self.pidfd: int | None = None
        #: its /proc entries, held open for a fast kill (see ProcessView), while it lives
        self.view: ProcessView | None = None
        #: SIGKILLed by the thread that asked for the stop, before the supervisor's walk
        #: of its tree (see Supervisor._kill_from_here)
        self.killed_early = False
        #: read by that thread just after its SIGKILL: it had no child then, and can have
        #: none since (see ProcessView.childless): its tree is itself
        self.killed_alone = False
        #: that walk may have come after its exit handed its children to the zygote: the
        #: caller is released once the zygote's sweep is done, not before
        self.walk_late = False
        self.state: WorkerState = "starting"
        #: the task it runs (or is about to claim: see _worker._Worker.claim)
        self.task: Task | None = None
        #: the tasks handed to it behind ``task``, which it starts in this order once
        #: ``task`` ended (unless a stop revoked one first: see Supervisor._revoke);
        #: changed under ``slot_lock``
        self.behind: collections.deque[Task] = collections.deque()
        #: when its ``task`` became its task (time.monotonic()), and whether the one
        #: before took less than QUICK_TASK (see Supervisor._may_queue_behind)
        self.task_since = 0.0
        self.quick = False
        #: seq -> token slot of each task taken back from it before it claimed it
        #: (Supervisor._steal): the slot is reserved until it said it did not start it
        self.moving: dict[int, int] = {}
        #: pid -> pidfd of each member of the tree being killed, until it is gone
        self.waiting: dict[int, int] = {}
        self.status: int | None = None
        self.gone = False
        self.ready = False  # said "ready" (its initializer ran)
        #: frames not sent yet: queued this turn of the loop, or the socket was full
        self.outbox: list[bytes | memoryview] = []
        self.writable_watched = False  # the outbox waits for the socket to be writable
        self.feeding = False  # its frames are being handled (see Supervisor._feed)
        #: the zygote reaped it and killed what was left of its tree (or cannot any more)
        self.swept = False
        #: why it is being ended by the pool itself (the zygote died), if so
        self.lost: str | None = None
        #: its token slots (DEPTH of them): each task it holds has its own
        self.slots = slots
        #: held while a slot or ``task`` changes hands (see Supervisor._cancel_slot_now)
        self.slot_lock = slot_lock
        self.control = control

    def close_descriptors(self) -> None:
        """Close every descriptor held on this worker's processes (the owner's teardown,
        a forked child's): its pidfd, those of a tree being killed, its ``/proc`` view.
        Idempotent: a fork of the owner after the pool's teardown must not close the
        numbers again (by then they may be another library's descriptors)."""
        fds = ([self.pidfd] if self.pidfd is not None else []) + list(self.waiting.values())
        self.pidfd = None
        self.waiting.clear()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.view is not None:
            self.view.close()

    def drop_views(self) -> None:
        """Forget this worker's views of the shared chunk (so it can be unmapped)."""
        with self.slot_lock, contextlib.suppress(AttributeError):
            del self.slots, self.control


def _ack_stopped(control: Control, base: int, seq: int) -> None:
    """Tell the worker whose ``Control`` is at ``base`` that the stopped task ``seq`` was
    settled by its caller (see ``_Worker.tell_callers_stopped``): a store, which the
    worker polls for a moment, and a wake-up only if it said it went to sleep on the word
    (read after the store, as the worker writes that before its last read of the word)."""
    control.acked = seq & 0xFFFFFFFF
    full_barrier()
    if control.ack_sleeping == seq:
        futex_wake(base + Control.acked.offset)


class Supervisor:
    """Runs a pool's processes from one thread; see the module docstring.

    Package-internal: :class:`~cancelflow.ProcessPool` (the public API) and
    :class:`~cancelflow.TaskFuture` talk to it through :meth:`enqueue`,
    :meth:`request_stop`, :meth:`finish` (of a task never queued), :meth:`shutdown`,
    :meth:`check_open` and the read-only attributes ``workers``, ``queue``, ``stats``,
    ``ready_event``, ``shutting_down``, ``broken``, ``owner``, ``size``.
    """

    def __init__(self, name: str, size: int, options: dict[str, Any]) -> None:
        self.name = name
        self.size = size
        self._options = options
        # Re-entrant: a signal handler may submit while the interrupted code holds it.
        # Taken by the API only, never by the supervisor thread (see enqueue).
        self.lock = threading.RLock()
        self.queue: collections.deque[Task] = collections.deque()
        self._commands: collections.deque[Command] = collections.deque()
        #: no new tasks (shutdown() was called, or the pool broke)
        self.shutting_down = False
        #: why the pool cannot run tasks any more, once it broke
        self.broken: BaseException | None = None
        #: the teardown's last sweep of the queue has begun (see enqueue)
        self.final = False
        self.closed = threading.Event()
        self.owner = os.getpid()
        self.forked = False  # set in a forked child of the owner (see forget_in_child)
        # One receive buffer, reused: recv(1 MiB) would allocate (mmap) a new one each time.
        self._inbox = bytearray(1 << 16)
        self._timers: list[tuple[float, int, Callable[[Task], None], weakref.ref[Task]]] = []
        #: the supervisor thread's ident while it is in a turn of its loop, else 0
        self._turn = 0
        #: the futures this turn decided, to resolve at its end (see _settle)
        self._settling: list[tuple[TaskFuture, Any, BaseException | None, bool]] = []
        #: futures another thread resolved, whose done-callbacks run at this turn's end
        self._callbacks_due: list[TaskFuture] = []
        #: workers with frames queued this turn of the loop (see _send_to)
        self._unsent: dict[WorkerHandle, None] = {}
        self._timer_ids = itertools.count()
        self.stats = collections.Counter[str]()
        self.workers: dict[int, WorkerHandle] = {}
        self._crash_streak = 0
        self._zygote_streak = 0
        self._zygote_ready = False
        #: when to look for strays after a stopped task (see _sweep_strays), else None
        self._strays_due: float | None = None
        self.ready_event = threading.Event()
        self._wake_pending = False
        #: how a shutdown stops running tasks (Close.running), once one asked
        self._force: Force | None = None
        #: a shutdown cancelled the queue: a task handed back by a worker is dropped too
        self._queue_cancelled = False

        preload_tree_functions()  # a first kill must not wait for an import
        # Per worker: its DEPTH token slots, then its control block.
        self._chunk = _cell.Chunk(WORKER_SLOTS * size + 1, pinned=True, label="cancelflow-pool")
        self._chunk.mark_shared()
        self._slot_tokens = [
            tuple(
                token_on_slot(
                    self._chunk, _token_offset(i) + j * _SLOT, name=f"{name}-slot-{i}.{j}"
                )
                for j in range(DEPTH)
            )
            for i in range(size)
        ]
        self._slot_locks = [threading.Lock() for _ in range(size)]
        self._controls = [
            Control.from_buffer(self._chunk.mm, _token_offset(i) + DEPTH * _SLOT)
            for i in range(size)
        ]
        self._wake_r, self._wake_w = os.pipe()  # not inherited by what Python starts
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
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
        #: the timer thread kept up while the pool is open: a stop taken from the asking
        #: thread wakes this one through it (see _post_by_grace_end), never starting it
        self._timer_hold = _timer.hold(self)
        self.thread = threading.Thread(target=self._run, name=f"cancelflow-{name}", daemon=True)
        self.thread.start()
        _supervisors.add(self)
        _interpreter_exit.register(self)

    @property
    def zygote_pid(self) -> int | None:
        """The zygote's pid while its channel is open."""
        return self._zygote.pid if self._zygote_sock is not None else None

    # == requests from the pool's API ===========================================================
    def enqueue(self, task: Task) -> None:
        """Queue ``task`` (raises what :meth:`check_open` raises) and watch its token.

        The supervisor thread never takes :attr:`lock`, so a signal handler that
        interrupted this very call (which holds it) may shut the pool down and wait for
        the end. If the pool's teardown swept its queue meanwhile (:attr:`final`) and this
        task is in no one's hands, it is taken back and this raises
        :class:`PoolClosedError`: a task is never left queued in a pool that is gone.
        """
        with self.lock:
            self.check_open()
            self.queue.append(task)
            if self.final:
                with task.future.decision_lock:  # the sweep may be settling it right now
                    mine = task.worker is None and not task.done and not task.dropped
                    if mine:
                        task.dropped = True
                if mine:
                    with contextlib.suppress(ValueError):
                        self.queue.remove(task)
                    raise PoolClosedError(f"{self.name} is shut down")
        self.post(Dispatch())
        token = task.token
        if token is not None:
            task.handle = token.on_cancel(
                lambda: self.request_stop(task, "cancel", token.cancel_reason)
            )

    def shutdown(
        self, wait: bool = True, *, cancel_futures: bool = False, running: Force | None = None
    ) -> None:
        """See :meth:`cancelflow.ProcessPool.shutdown` (``running``: how to stop the tasks
        running now, if at all; see :data:`Force`)."""
        if os.getpid() != self.owner:
            return
        with self.lock:
            self.shutting_down = True
            queued: list[Task] = []
            if cancel_futures:
                self._queue_cancelled = True
                queued = [t for t in list(self.queue) if not (t.dropped or t.done)]
                if running is None:
                    # As the stdlib's (whose call queue is filled before it cancels the
                    # rest): one task per worker that is not busy is not pending any more.
                    busy = sum(1 for w in list(self.workers.values()) if w.state == "busy")
                    starting = max(0, self.size - busy)  # (idle, or not started yet)
                    queued = queued[starting:]
        for task in queued:
            self._drop_queued(task, "future", "pool shut down")
        self.post(Close(running))
        if not wait or threading.current_thread() is self.thread:
            return
        if self._holds_a_task():
            # A signal handler that interrupted this thread inside a task's future (a
            # cancel, a settle): the supervisor needs that lock to end the task.
            safe_log(
                "WARNING",
                "shutdown(wait=True) called while this thread holds a task's future "
                "(from a signal handler?): not waiting; the pool still ends",
                pool=self.name,
            )
            return
        self.closed.wait()
        self.thread.join()

    def _holds_a_task(self) -> bool:
        """Whether the calling thread holds the future lock of a task not over yet."""
        workers = list(self.workers.values())
        tasks = list(self.queue) + [t for w in workers for t in (w.task, *w.behind) if t]
        return any(not task.done and _futures.held_here(task.future) for task in tasks)

    def check_open(self) -> None:
        """Raise what a new task must hear if the pool cannot take it."""
        if self.forked:
            raise PoolClosedError(
                f"{self.name} belongs to process {self.owner}; this process "
                f"({os.getpid()}) is a fork of it and cannot use it: make a new pool here"
            )
        if self.broken is not None:
            raise self.broken
        _interpreter_exit.check_open()  # before: the exit hook shuts every pool down
        if self.shutting_down:
            raise PoolClosedError(f"{self.name} is shut down")

    # == requests from any thread (lock-free stop path) =========================
    def post(self, command: Command) -> None:
        """Hand ``command`` to the supervisor thread (any thread, a signal handler too)."""
        self._commands.append(command)
        self._kick()

    def _kick(self) -> None:
        """Wake the supervisor thread for its next turn (any thread, a signal handler too)."""
        wake = self._wake_w
        if wake >= 0 and not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(OSError):
                os.write(wake, b"\0")

    def request_stop(
        self, task: Task, kind: StopKind, reason: str | None, *, kill: bool = False
    ) -> None:
        """Stop a task from any thread, or from a signal handler: takes no pool lock.

        A task not dispatched yet is dropped here and now (its future is settled before
        this returns); a dispatched one is stopped by the supervisor.
        """
        if task.done or (task.stop_kind is not None and not kill):
            return
        if self._drop_queued(task, kind, reason):
            return
        with task.future.decision_lock:  # the first stop asked for decides how it ends
            first = task.stop_kind is None and not task.done
            if first:
                task.stop_kind, task.stop_reason = kind, reason
        if not (first or kill):
            return
        command: Command
        if kill:
            command = KillTask(task, kind, reason)
        else:
            command = StopTask(task, kind, reason, time.monotonic())
        quiet = False
        try:
            if self._revoke_from_here(task):
                pass  # it never starts: settled here (the supervisor's step is a no-op)
            elif kill or (task.grace <= 0 and task.term_grace <= 0):  # (first, or a kill)
                self._kill_from_here(task, unconditional=kill)
            elif first and task.grace > 0:  # (no grace: the next step comes at once)
                quiet = self._cancel_slot_now(task, reason)
        finally:  # even if interrupted there (Ctrl-C): the stop is recorded, so it must go
            if quiet and isinstance(command, StopTask):  # (a kill is never quiet)
                self._post_by_grace_end(command, task)
            else:
                self.post(command)

    def _post_by_grace_end(self, command: StopTask, task: Task) -> None:
        """Hand the stop ``command`` of a task whose token was just cancelled here to the
        supervisor thread without waking it: it takes the command at its next turn,
        which the task's result starts if the task ends within its grace period (as a
        cooperative task does), and at the latest when that period ends (a timer wakes
        it then; :meth:`finish` drops the timer). Until then the supervisor thread takes
        no CPU and no GIL from the task ending and from its caller."""
        self._commands.append(command)
        try:
            task.wake = wake = _timer.call_at(command.at + task.grace, self._kick)
        except BaseException:  # (a signal handler raised): the command must not wait
            self._kick()
            raise
        if task.done:  # settled meanwhile (a caller's thread, without a GIL): no timer
            wake.cancel()

    def _cancel_slot_now(self, task: Task, reason: str | None) -> bool:
        """Take the ladder's first step here and now: cancel the running task's token;
        ``True`` if this did.

        The task then sees its cancel without waiting for the supervisor thread (which
        takes the step again, a no-op, and goes on down the ladder). Skipped, leaving the
        step to the supervisor, when the task has no grace period (the supervisor kills it
        at once: the kill must not wait for this), is not running on a worker, or when its
        slot is changing hands at this moment (see :meth:`_lock_running_worker`; the
        supervisor resets a slot for its next task under that lock).
        """
        worker = self._lock_running_worker(task)
        if worker is None:
            return False
        try:
            worker.slots[task.slot].cancel(reason)
        finally:
            worker.slot_lock.release()
        return True

    def _revoke_from_here(self, task: Task) -> bool:
        """Settle a stopped task that waits behind its worker's running task here and
        now, if the worker has not claimed it (as the supervisor would: see
        :meth:`_revoke`): ``True`` if it ended cancelled. ``False`` when it is not
        waiting, the worker claimed it (its ladder runs once it is the worker's task), this
        is a fork of the owner, or its slot stays busy longer than :data:`_SLOT_WAIT`
        (then the supervisor decides, a moment later).

        The supervisor holds the slot lock for an instant at a time (handing the worker a
        task): this waits for it, so that the caller's cancel() keeps its promise (the
        future is cancelled before it returns). Bounded, never forever: the holder may be
        the frame a signal handler interrupted (this very thread), or the supervisor may
        wait there for a future's lock that this thread holds."""
        worker = task.worker
        if worker is None or self.forked or task is worker.task:
            return False  # (read again under the lock; no wait for a task that runs)
        # Not "not in worker.behind": a task on its way there (claimed, under the lock)
        # is not in it yet, and must be waited for as one that waits already.
        if not worker.slot_lock.acquire(timeout=_SLOT_WAIT):
            return False
        try:
            if task.done or task not in worker.behind:
                return False
            try:
                slot, control = worker.slots[task.slot], worker.control
            except AttributeError:  # the views are gone: the pool is closing
                return False
            slot.cancel(task.stop_reason)
            full_barrier()
            if control.running == task.seq:
                return False
        finally:
            worker.slot_lock.release()
        self.finish(task, Fate.CANCELLED)
        return True

    def wait_on_worker(self, task: Task, deadline: float | None) -> None:
        """Block the calling thread (in ``result()`` or ``exception()`` of ``task``'s
        future) until the future is done, ``deadline`` (``time.monotonic()``) passes, or
        this way of waiting stops applying (the caller then waits on the future's
        condition, as the stdlib does).

        The way: sleep on the futex word ``Control.ended`` of the worker running the
        task, which the worker bumps when the task ends stopped (``Control.stopped``),
        and the future's condition bumps when anyone resolves the future (the caller's
        address is registered under the future's lock, read with the word's value, so
        no bump is missed). In the first case, once the pool has handled every frame
        the task sent before its result (its partial results: ``Task.frames``), this
        thread settles the future itself, as the supervisor would once it reads that
        result, then tells the worker (``Control.acked``), which holds its result
        until then (see :meth:`_Worker.tell_callers_stopped`): the caller of a
        cooperative stop hears it with one wake-up across processes instead of two,
        and without waiting for the supervisor thread's turn. Applies on ``"linux"``
        (futex across processes), to a task running on a worker, outside the
        supervisor thread and a fork of the owner.
        """
        if not HAVE_FUTEX or self.forked or threading.current_thread() is self.thread:
            return
        future = task.future
        condition = _futures.lock(future)
        waited_on: WorkerHandle | None = None  # whose Control.waiting names the task
        try:
            while not future.done():
                left = _LONGEST_SLEEP
                if deadline is not None:
                    left = min(left, deadline - time.monotonic())
                    if left <= 0:
                        return
                worker = task.worker
                if worker is None or not worker.slot_lock.acquire(timeout=min(left, _SLOT_WAIT)):
                    return
                try:
                    if worker.task is not task or worker.state != "busy":
                        return  # waiting behind another, or moving: the condition tells
                    try:
                        control, slot = worker.control, worker.slots[task.slot]
                    except AttributeError:  # the views are gone: the pool is closing
                        return
                    # (the views cannot go while the slot lock is held: the word is mapped;
                    # and ``control``, a view, keeps the mapping while this frame holds it,
                    # so the words slept on and bumped below are never another mapping's)
                    base = ctypes.addressof(control)
                    address = base + Control.ended.offset
                    control.waiting = task.seq
                    waited_on = worker
                    full_barrier()  # written before ``stopped`` is read: the worker waits
                    with condition:
                        if future.done():
                            return
                        expected = control.ended
                        sleepers = _futures.sleepers(future)
                        sleepers.append(address)
                    full_barrier()  # the word read before ``stopped``: see tell_callers_stopped
                    stopped = control.stopped == task.seq
                    if stopped:
                        full_barrier()  # (written before ``stopped``)
                        frames, reason = control.stopped_frames, slot.cancel_reason
                finally:
                    worker.slot_lock.release()
                registered = True
                try:
                    if stopped:
                        with condition:
                            handled = task.frames == frames  # its partial results are in
                            if handled:
                                sleepers.remove(address)  # (the settle below need not wake us)
                                registered = False
                        if handled:
                            waited_on = None  # (the worker reads it no more)
                            self.finish(
                                task,
                                Fate.CANCELLED,
                                stopped_by=("cancel", reason),
                                callbacks_on_pool=True,
                            )
                        _ack_stopped(control, base, task.seq)  # the worker sends its result
                        if handled:
                            return
                        # (else the pool has yet to read some of its frames: it settles it)
                    futex_wait(address, expected, left)
                finally:
                    if registered:
                        with condition:
                            sleepers.remove(address)
        finally:
            if waited_on is not None and not future.done():  # (done: no stop will come)
                self._stop_waiting(waited_on, task)

    def _stop_waiting(self, worker: WorkerHandle, task: Task) -> None:
        """A caller leaves :meth:`wait_on_worker` before ``task`` is over (its timeout, an
        interrupt): unless another caller still sleeps on
        it, clear ``Control.waiting``, so that the worker does not hold the result of a
        later stop for a caller that is gone. Best effort (a busy slot lock skips it:
        the worker then holds that result for at most its head start)."""
        if not worker.slot_lock.acquire(timeout=_SLOT_WAIT):
            return
        try:
            with _futures.lock(task.future):
                others = bool(_futures.sleepers(task.future))
            try:
                control = worker.control
            except AttributeError:
                return
            if not others and control.waiting == task.seq:
                control.waiting = 0
        finally:
            worker.slot_lock.release()

    def _lock_running_worker(self, task: Task) -> WorkerHandle | None:
        """For a step taken by the asking thread: the worker running ``task``, returned
        with its slot lock held (the caller releases it), or ``None`` (no lock held) if
        the task runs on no worker, this is a fork of the owner, or the slot is changing
        hands at this moment (a non-blocking try: a signal handler that interrupted the
        holder must not wait for it). Under the lock the worker still runs ``task`` if
        it says so: the supervisor gives it its next task under the same lock."""
        worker = task.worker
        if worker is None or self.forked or not worker.slot_lock.acquire(blocking=False):
            return None
        if worker.task is task and worker.state == "busy":
            return worker
        worker.slot_lock.release()
        return None

    def _kill_from_here(self, task: Task, *, unconditional: bool) -> None:
        """Take the ladder's SIGKILL step here and now, for a task stopped with no grace
        at all (or killed): SIGKILL its worker without waiting for the supervisor thread.

        The supervisor then walks and kills the rest of the tree as for any kill
        (:meth:`_kill`): the worker, SIGKILLed, can fork no more, and keeps its children
        until its exit hands them to the zygote, about a millisecond later (the kernel
        tears the worker down first); if the walk came too late for that
        (:meth:`ProcessView.still_parent`), the caller is released after the zygote's
        sweep instead. Right after the signal this thread reads whether the worker has
        any child (:meth:`ProcessView.childless`): if it has none, it can have none
        later, and there is nothing to walk, however late the supervisor comes.
        Where the worker's ``/proc`` cannot be read (``"posix"``) the
        step is left to the supervisor, as it is when the task is not running on a worker,
        is inside a critical section (unless ``unconditional``: :meth:`TaskFuture.kill`),
        or when its slot is changing hands at this moment (see
        :meth:`_lock_running_worker`).
        """
        worker = self._lock_running_worker(task)
        if worker is None:
            return
        try:
            view = worker.view
            if worker.gone or worker.pid <= 1 or view is None or not view.open:
                return
            if not self._may_signal(worker, task):
                return  # over: the worker runs the task after it (see _may_signal)
            if not unconditional and _open_section_end(worker.control):
                return  # the supervisor defers the step (see _escalate)
            worker.killed_early = True  # before the signal: see _kill
            send_signal(worker.pid, signal.SIGKILL)
            worker.killed_alone = view.childless()
        finally:
            worker.slot_lock.release()

    def _drop_queued(self, task: Task, kind: StopKind, reason: str | None) -> bool:
        """Settle a task that no worker took yet as cancelled; ``False`` if one did."""
        with task.future.decision_lock:  # re-entrant, and the one lock _claim takes
            if task.worker is not None or task.done:
                return False
            if task.dropped:
                return True
            task.dropped = True
            if task.stop_kind is None:  # (else stopped while a worker handed it back)
                task.stop_kind, task.stop_reason = kind, reason
        self.finish(task, Fate.CANCELLED)
        return True

    def _claim(self, task: Task, worker: WorkerHandle) -> bool:
        """Give a queued task to ``worker``, unless it was dropped meanwhile."""
        with task.future.decision_lock:
            # (stop_kind: stopped while its worker handed it back: see _stop)
            if task.dropped or task.done or task.stop_kind is not None:
                return False
            if not task.requeued and not task.future.start_running():
                return False
            task.worker = worker
        return True

    # == the supervisor thread ==================================================
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
        if self.broken is None:
            self.broken = error
        self.shutting_down = True

    def _loop_once(self) -> bool:
        """One turn of the loop: wait for what comes (results, commands, timers), handle
        it, hand out queued tasks; the futures it decided are resolved at its end."""
        self._turn = threading.get_ident()
        try:
            self._handle_events()
            return self._closing_done()
        finally:
            self._turn = 0
            self._settle_turn()

    def _handle_events(self) -> None:
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        if self._strays_due is not None:
            due = max(0.0, self._strays_due - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
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
            task = command.task if isinstance(command, StopTask | KillTask) else None
            self._guarded(task, self._on_command, command)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, action, ref = heapq.heappop(self._timers)
            timed = ref()
            if timed is not None and not timed.done:
                self._guarded(timed, action, timed)
        if self._strays_due is not None and self._strays_due <= now:
            self._strays_due = None
            self._guarded(None, self._sweep_strays)
        self._guarded(None, self._dispatch)
        self._send_queued()

    def _guarded(self, task: Task | None, action: Callable[..., None], *args: Any) -> None:
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

    def _fail_task(self, task: Task, error: BaseException) -> None:
        """End ``task`` with ``error``: stop it if it still runs, fail its future once
        the stop is complete."""
        if task.error is None:
            task.error = error
        worker = task.worker
        if worker is None or (worker.task is not task and task not in worker.behind):
            self.finish(task, Fate.FAILED, error=task.error)
        else:
            self._stop(task, "error", f"the pool could not handle the task: {error!r}")

    def _on_command(self, command: Command) -> None:
        match command:
            case StopTask(task, kind, reason, at):
                self._stop(task, kind, reason, since=at)
            case KillTask(task, kind, reason):
                task.kill_asked = True  # (for a task waiting behind another: see _started)
                self._kill_now(task)  # first: then _stop finds the ladder under way
                self._stop(task, kind, reason)
            case RunCallbacks(future):
                self._callbacks_due.append(future)
            case LooseEnds(task, fate):
                self._tie_loose_ends(task, fate)
            case Close(running=how):
                # (without ``how``, the tasks handed to busy workers, whose futures say
                # running, run on: as the stdlib's call-queue items)
                if how is None:
                    return
                self._force = how
                for worker in list(self.workers.values()):
                    for waiting in list(worker.behind) if self._queue_cancelled else ():
                        # Stop everything: not started, it ends as the queued tasks do.
                        self._stop(waiting, "future", "pool shut down")
                    for held in (worker.task, *worker.behind):  # (futures say running)
                        if held is not None:
                            self._stop_for_shutdown(held, how)
            case Dispatch():
                pass  # dispatching follows every turn of the loop

    def _stop_for_shutdown(self, task: Task, how: Force) -> None:
        """Stop a running task for a shutdown: down the ladder, or from its SIGTERM or
        SIGKILL step at once (``terminate_workers``, ``kill_workers``)."""
        if how == "ladder" or task.done or task.worker is None or task in task.worker.behind:
            self._stop(task, "shutdown", "pool shut down")  # (one not started: revoked)
            return
        if task.stop_kind is None:
            task.stop_kind, task.stop_reason = "shutdown", f"pool shut down ({how})"
        if how == "terminate":  # (with no term_grace_period, _escalate kills at once)
            if task.stage >= 2:
                return  # SIGTERM was sent: its term_grace_period runs on
            if task.stage < 1:  # the token step, without its grace period
                task.stage = 1
                task.worker.slots[task.slot].cancel(task.stop_reason)
            self._escalate(task)
        else:
            self._kill_now(task)

    def _kill_now(self, task: Task) -> None:
        """The ladder's last step at once, if the task still runs and was not killed yet
        (a worker already being killed, by the zygote's death, is not killed twice)."""
        worker = task.worker
        if task.done or worker is None or worker.task is not task or task.stage >= 3:
            return
        task.stage = 3
        if worker.state != "dying" and self._may_signal(worker, task):
            self._kill(worker)

    def _at(self, delay: float, action: Callable[[Task], None], task: Task) -> None:
        """Call ``action(task)`` on this thread after ``delay`` seconds, if the task is
        still referenced then (a weak reference: a finished task's timer keeps nothing
        alive, so a long ``timeout`` does not hold its result)."""
        entry = (time.monotonic() + delay, next(self._timer_ids), action, weakref.ref(task))
        heapq.heappush(self._timers, entry)

    # -- the zygote -----------------------------------------------------------
    def _start_zygote(self) -> None:
        """Start a zygote and watch its channel."""
        self._zygote, self._zygote_sock = _zygote.start(self.name, self._options, self._chunk.fd)
        self._zygote_ready = False
        self._selector.register(self._zygote_sock, selectors.EVENT_READ, ("zygote",))

    def _on_zygote(self) -> None:
        sock = self._zygote_sock
        assert sock is not None
        try:
            message, fds = recv_record(sock)
        except OSError:
            message, fds = None, []
        for fd in fds:
            os.close(fd)
        match message:
            case None:
                self._on_zygote_death()
            case ZygoteReady():
                self._zygote_ready = True
                for index in range(self.size):
                    worker = self.workers.get(index)
                    if worker is None or worker.state == "dead":
                        self._spawn(index)
            case Spawned(index, pid):
                worker = self.workers.get(index)
                if worker is not None and not worker.pid:
                    self._know_pid(worker, pid)
            case Swept(pid, status, count):
                if count:
                    self.stats["swept"] += count
                    safe_log("INFO", f"killed {count} strays of worker {pid}", pool=self.name)
                for worker in self.workers.values():
                    if worker.pid == pid and worker.gone and not worker.swept:
                        worker.status = status
                        worker.swept = True
                        self._guarded(worker.task, self._retire, worker)
            case Exited(pid):  # only where there is no pidfd (HAVE_PIDFD is False)
                for worker in list(self.workers.values()):
                    if worker.pid == pid and not worker.gone:
                        self._guarded(worker.task, self._on_gone, worker)
            case PrepareFailed(text):
                safe_log("WARNING", f"workers could not import __main__: {text}", pool=self.name)

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
        for worker in list(self.workers.values()):
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
                if not HAVE_PIDFD:
                    # Nobody can report its exit now (its parent is gone); killed while
                    # frozen, it cannot run again.
                    self._on_gone(worker)
            elif not worker.pid:  # never forked, or exited by itself at once
                worker.gone = True
                self._retire(worker)
        if self.shutting_down and self._closing_done():
            return
        self._zygote_streak = 0 if was_ready else self._zygote_streak + 1
        if self._zygote_streak >= 3:
            safe_log("CRITICAL", "the pool's zygote keeps dying at start", pool=self.name)
            self._break(BrokenPoolError(f"{self.name}: its zygote process keeps dying at start"))
            return
        safe_log("ERROR", f"{why}; starting a new one", pool=self.name)
        self.stats["zygotes_replaced"] += 1
        self._start_zygote()

    def _know_pid(self, worker: WorkerHandle, pid: int) -> None:
        """Record a worker's pid (from the zygote or from the worker, whichever is first)."""
        worker.pid = pid
        worker.view = ProcessView(pid)
        if not HAVE_PIDFD:
            return  # the zygote says when it exits (Exited)
        worker.pidfd = pidfd_open(pid)
        if worker.pidfd is None:  # already gone
            self._on_gone(worker)
        else:
            self._selector.register(worker.pidfd, selectors.EVENT_READ, ("pidfd", worker, pid))

    def _spawn(self, index: int) -> None:
        if self.broken is not None or self._zygote_sock is None or not self._zygote_ready:
            return  # a new zygote spawns every missing worker once it is ready
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        slots, slot_lock = self._slot_tokens[index], self._slot_locks[index]
        with slot_lock:
            for slot in slots:
                slot.reset()
        control = self._controls[index]
        control.critical_until = 0.0
        control.pid = 0
        control.step_waits = 0
        control.kill_pending = 0
        control.running = 0
        control.started = 0
        control.stop_for = 0
        control.serves = 0
        for index_ in range(DEPTH):
            control.steal_for[index_] = 0
        worker = WorkerHandle(index, parent_end, slots, slot_lock, control)
        self.workers[index] = worker
        parent_end.setblocking(False)  # never block the supervisor on a frozen worker
        self._selector.register(parent_end, selectors.EVENT_READ, ("sock", worker))
        try:
            send_record(
                self._zygote_sock,
                Spawn(index, _token_offset(index), _token_offset(index) + DEPTH * _SLOT),
                [child_end.fileno()],
            )
        except OSError:
            pass  # the zygote is dying: its EOF comes next and starts a new one
        finally:
            child_end.close()

    # -- worker channels ------------------------------------------------------
    def _send_to(self, worker: WorkerHandle, frame: bytes) -> None:
        """Queue a frame for ``worker``; it goes, with every other frame queued for that
        worker in the same turn of the loop, in one ``sendmsg`` at the end of the turn
        (:meth:`_send_queued`), without blocking: what the socket cannot take then waits
        until the socket is writable (:meth:`_flush`)."""
        worker.outbox.append(frame)
        if not worker.writable_watched:
            self._unsent[worker] = None

    def _send_queued(self) -> None:
        """Send what this turn queued (see :meth:`_send_to`)."""
        unsent, self._unsent = self._unsent, {}
        for worker in unsent:
            if not worker.writable_watched:
                self._guarded(worker.task, self._flush, worker)

    def _flush(self, worker: WorkerHandle) -> None:
        """Send as much of ``worker``'s outbox as its socket takes now; watch the socket
        for writability while something is left."""
        outbox = worker.outbox
        if worker.sock.fileno() < 0:  # retired by an earlier event of the same turn
            outbox.clear()
            return
        while outbox:
            try:
                sent = worker.sock.sendmsg(outbox[:_IOV_MAX])
            except BlockingIOError:
                break
            except OSError:  # dying: what it did not read is lost with it
                outbox.clear()
                break
            done = 0
            for frame in outbox:
                if sent < len(frame):
                    break
                sent -= len(frame)
                done += 1
            del outbox[:done]
            if sent:
                outbox[0] = memoryview(outbox[0])[sent:]
                break  # the socket took part of a frame: it is full
        if bool(outbox) != worker.writable_watched:
            self._watch_writable(worker, bool(outbox))

    def _watch_writable(self, worker: WorkerHandle, writable: bool) -> None:
        """Have the selector report the worker's socket writable too, or no longer."""
        worker.writable_watched = writable
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
        with contextlib.suppress(KeyError, ValueError):  # no longer watched: it is gone
            self._selector.modify(worker.sock, events, ("sock", worker))

    def _on_socket(self, worker: WorkerHandle) -> None:
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

    def _feed(self, worker: WorkerHandle, data: bytes | memoryview) -> None:
        worker.feeding = True  # a handler that drains this worker must not re-enter
        try:
            for raw in worker.reader.feed(data):
                message, task = read(raw), worker.task
                self._guarded(task, self._on_message, worker, message)
                if type(message) in _TASK_FRAMES and task is not None and task.seq == message.seq:
                    with task.future.decision_lock:  # handled: see wait_on_worker
                        task.frames += 1
        finally:
            worker.feeding = False

    def _on_message(self, worker: WorkerHandle, message: WorkerMessage) -> None:
        if type(message) is Result:  # the one message of every task: the shortest way
            if worker.moving.pop(message.seq, None) is not None:  # not started: slot free
                return
            task = worker.task
            if task is not None and task.seq == message.seq:
                stopped = worker.slots[task.slot].is_cancelled
                self._on_result(worker, task, message)
                if (message.outcome == "terminated" or stopped) and self._strays_due is None:
                    self._strays_due = time.monotonic() + _STRAYS_DELAY
            return
        match message:
            case Held(seq):
                self._release(worker, seq)
                return
            case Ready(pid):
                if not worker.pid:  # before the zygote's "spawned": the pid is known now
                    self._know_pid(worker, pid)
                worker.ready = True
                if worker.state == "starting" and not worker.gone:
                    worker.state = "idle"
                    self._crash_streak = 0
                    self.ready_event.set()
                return
            case InitFailed(pid, text, tb):
                broken = BrokenPoolError(
                    f"{self.name} is broken: a worker's initializer raised {text}"
                )
                broken.__cause__ = _remote_traceback(tb)
                safe_log("ERROR", f"worker {pid}: initializer failed: {text}", pool=self.name)
                self._break(broken)
                return
            case Retire(_, why):
                # The task changed the worker's process for good (see _worker._ProcessState):
                # it gets no more tasks and is replaced once it has exited.
                if worker.state == "busy":
                    worker.state = "retiring"
                safe_log("INFO", f"worker {worker.pid} retires: {why}", pool=self.name)
                return
        task = worker.task
        if task is None or task.seq != message.seq:
            return  # a late message of a task that is already settled
        match message:
            case Partial(_, key, blob, type_name):
                try:
                    value = pickle.loads(blob)
                except BaseException as exc:  # even SystemExit: this task fails
                    raise UnreadableResultError(
                        f"partial result {key!r} of task {task.seq} could not be unpickled "
                        f"here: {exc!r}",
                        what=f"partial result {key!r}",
                        remote_text=f"a {type_name} value",
                    ) from exc
                deliver_partial(task.partials, task.partial_sink, key, value, pool=self.name)
            case Cancel(_, reason):
                # The task cancelled its own token (a child of the caller's, as in every
                # backend): the task is stopped; the caller's token is left alone.
                self._stop(task, "cancel", reason)
            case CriticalEnded():
                self._resume_deferred(task)

    def _on_result(self, worker: WorkerHandle, task: Task, result: Result) -> None:
        self._promote(worker)
        outcome, blob, text = result.outcome, result.blob, result.text
        if outcome == "moved":  # see _steal: it never started
            self._requeue(task)
            return
        slot = worker.slots[task.slot]
        if outcome == "revoked":  # see _revoke: it never started
            self.finish(task, Fate.CANCELLED, stopped_by=("cancel", slot.cancel_reason))
            return
        self.stats["completed"] += 1
        if outcome == "terminated":
            if task.stop_kind is None:  # a SIGTERM the pool did not send: from outside
                self.stats["crashed"] += 1
                outside = WorkerCrashedError(
                    f"worker {worker.pid} got a SIGTERM from outside the pool; its task "
                    "ended (its finally blocks ran)",
                    signal=signal.SIGTERM,
                    pid=worker.pid,
                )
                self.finish(task, Fate.CRASHED, error=outside)
            else:
                self.finish(task, Fate.TERMINATED)
            return
        try:
            # (a "stopped" task sends no blob: the worker saw its slot cancelled)
            value = None if outcome == "stopped" else pickle.loads(blob)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - even SystemExit: this task fails
            what = "result" if outcome == "ok" else "exception"
            error = UnreadableResultError(
                f"the {what} of task {task.seq} could not be unpickled here: {exc!r}",
                what=what,
                remote_text=text if outcome != "ok" else f"a {text} value",
            )
            error.__cause__ = exc
            self.finish(task, Fate.FAILED, error=error)
            return
        # Returned or raised after it was asked to stop: it ends stopped, as documented
        # (what it returned or raised then is dropped, as in ThreadPool).
        if outcome == "ok":
            self.finish(task, _FINISHED, value=value, unless_asked=True)
        elif outcome == "stopped" or (
            isinstance(value, CancelledException)
            and (task.stop_kind is not None or slot.is_cancelled)
        ):
            self.finish(task, Fate.CANCELLED, stopped_by=("cancel", slot.cancel_reason))
        else:
            if text and isinstance(value, BaseException):
                value.__cause__ = _remote_traceback(text)
            self.finish(task, Fate.FAILED, error=value, unless_asked=True)

    # -- dispatch -------------------------------------------------------------
    def _dispatch(self) -> None:
        """Hand queued tasks to workers: first to idle ones, then one to each busy worker
        whose running task was not asked to stop, to start as soon as that task ends
        (no wake-up of a sleeping worker per task: the pool's throughput on short
        tasks). A worker holds at most :data:`DEPTH` tasks, each on its own token slot; a
        worker that goes idle with nothing queued takes a waiting task from another
        worker (:meth:`_steal`), so a task never waits behind a long one while a worker
        idles."""
        if self.broken is not None:
            return
        for worker in list(self.workers.values()):
            if worker.state == "idle" and self._can_take(worker):
                if not self.queue:
                    self._steal()
                if not self.queue or not self._give(worker, queue_behind=False):
                    return
        busy = [w for w in self.workers.values() if self._may_queue_behind(w)]
        while busy and self.queue:  # one each in turn: the queue spread over the workers
            for worker in busy:
                if not self._give(worker, queue_behind=True):
                    return
            busy = [w for w in busy if self._may_queue_behind(w)]

    def _may_queue_behind(self, worker: WorkerHandle) -> bool:
        """Whether the first queued task may be handed to busy ``worker`` to start after
        those it holds: its running task was not asked to stop, and it holds fewer than
        :data:`SHALLOW` behind it, or (its last task took less than :data:`QUICK_TASK`)
        fewer than :data:`DEPTH` - 1 whose calls and the queued one's total at most
        :data:`DEEP_BYTES`."""
        task = worker.task
        if not (
            worker.state == "busy"
            and task is not None
            and task.stop_kind is None
            and self._can_take(worker)
        ):
            return False
        held = len(worker.behind) + len(worker.moving)
        if held < SHALLOW:
            return True
        if held >= DEPTH - 1 or not worker.quick or not self.queue:
            return False
        waiting = sum(len(t.payload) for t in worker.behind)
        return waiting + len(self.queue[0].payload) <= DEEP_BYTES

    @staticmethod
    def _can_take(worker: WorkerHandle) -> bool:
        """Whether the worker may be handed a task (its slots free, not being killed)."""
        return worker.pid > 1 and not worker.killed_early

    def _give(self, worker: WorkerHandle, *, queue_behind: bool) -> bool:
        """Hand the first queued task that is still wanted to ``worker``, to run now
        (the worker is idle) or, ``queue_behind``, after those it holds; ``False`` if
        none is left."""
        # Under the slot lock, which an asking thread holds while it kills a worker
        # whose task it saw running (_kill_from_here): a worker killed after its task
        # returned, before this thread read the result, is never given the next one.
        with worker.slot_lock:
            if worker.killed_early:
                return True
            while self.queue:
                task = self.queue[0]
                if self._claim(task, worker):
                    break
                self._unqueue(task)
            else:
                return False
            held = [t.slot for t in worker.behind]
            held.extend(worker.moving.values())
            if worker.task is not None and queue_behind:
                held.append(worker.task.slot)
            index = next(slot for slot in range(DEPTH) if slot not in held)
            task.slot = index
            worker.slots[index].reset()
            # (free: a task taken back from this slot was answered for, see _steal)
            worker.control.steal_for[index] = 0
            if not queue_behind:
                worker.state = "busy"
                worker.task = task
                worker.task_since = time.monotonic()
                control = worker.control
                # Raised for its last task, see _escalate and _may_signal: any signal
                # decided for it was sent (under this lock) and heard by now.
                control.kill_pending = 0
                control.stop_for = 0
            else:
                worker.behind.append(task)
            # Off the queue only now that the worker holds it: statistics() reads the
            # queue, then what the workers hold, so a task on its way is seen there.
            self._unqueue(task)
        task.future.pid = worker.pid
        task.future.fate = _RUNNING
        self._send_to(worker, encode(wire(RunTask(task.seq, task.payload, index))))
        if not queue_behind:
            self._started(task)
        elif task.stop_kind is None and task.token is not None and task.token.is_cancelled:
            self._stop(task, "cancel", task.token.cancel_reason)
        return True

    def _steal(self) -> None:
        """Queue again (first) the last task waiting behind a busy worker's running task,
        if that worker has not claimed it (``Control.steal_for`` of its slot written,
        then ``running`` read: see _worker._Worker.claim): it never starts there, and
        its slot stays reserved until that worker has said so (``moving``). If the
        worker claimed it, it runs there, unless the worker saw ``steal_for`` too: then
        it answers "moved", and the task is queued again then (:meth:`_on_result`)."""
        for worker in sorted(self.workers.values(), key=lambda w: -len(w.behind)):
            if not worker.behind:
                return
            task = worker.behind[-1]  # the last to be claimed
            if task.done or task.stop_kind is not None:
                continue
            control = worker.control
            if control.steal_for[task.slot] == task.seq:
                continue  # asked already: its worker's answer tells
            control.steal_for[task.slot] = task.seq
            full_barrier()
            if control.running == task.seq:
                continue
            # First in the queue before it leaves the worker's hands: statistics()
            # reads the queue again after what the workers hold (see _give).
            self._requeue(task)
            with worker.slot_lock:
                worker.behind.pop()
                worker.moving[task.seq] = task.slot
            self.stats["moved"] += 1
            return

    def _unqueue(self, task: Task) -> None:
        """Take ``task`` off the queue (this thread alone takes tasks off its front: it
        is there still, first unless an enqueue taken back at the pool's end removed
        one before it)."""
        if self.queue and self.queue[0] is task:
            self.queue.popleft()
        else:
            with contextlib.suppress(ValueError):
                self.queue.remove(task)

    def _started(self, task: Task) -> None:
        """``task`` became its worker's task (dispatched to an idle worker, or the task
        before it ended): its timeout runs from now, and a stop asked while it waited
        (or the shutdown's force) starts its ladder now."""
        if task.done:
            return
        task.starts += 1
        if task.timeout is not None:
            # (only for this start: a worker that dies before it claims the task hands
            # it back, and its timeout runs again from its next start)
            start = task.starts
            self._at(
                task.timeout,
                lambda task: self._on_timeout(task) if task.starts == start else None,
                task,
            )
        if task.kill_asked:
            self._kill_now(task)
        if self._force is not None and task.stop_kind == "shutdown":
            self._stop_for_shutdown(task, self._force)  # (claimed before it was revoked)
        elif task.stop_kind is not None:
            self._stop(task, task.stop_kind, task.stop_reason)
        elif task.token is not None and task.token.is_cancelled:
            self._stop(task, "cancel", task.token.cancel_reason)

    def _promote(self, worker: WorkerHandle) -> None:
        """The worker's task ended (its result is being read): the first task behind it,
        if any, is its task now. A worker retiring or dying keeps them behind: it never
        starts them, and :meth:`_retire` queues them again."""
        now = time.monotonic()
        worker.quick, worker.task_since = now - worker.task_since < QUICK_TASK, now
        if worker.behind and worker.state == "busy":
            with worker.slot_lock:  # see _lock_running_worker
                following = worker.task = worker.behind.popleft()
            self._started(following)
            # Topped up now: it must not wait for this loop's end.
            while self.queue and self._may_queue_behind(worker):
                if not self._give(worker, queue_behind=True):
                    break
            return
        worker.task = None
        if worker.state == "busy":
            worker.state = "idle"

    def _release(self, worker: WorkerHandle, seq: int) -> None:
        """The worker holds task ``seq`` (see :class:`Held`): let it go on unless it is
        being killed. Every signal decided for the task before it was sent under the
        slot lock (or by this thread), so none can reach ``seq`` now."""
        with worker.slot_lock:
            if worker.state in ("dying", "dead") or worker.killed_early or worker.gone:
                return
            control = worker.control
            if control.stop_for != seq:  # (else the task itself is stopped: it never starts)
                control.stop_for = 0
            control.kill_pending = 0
            control.step_waits = 0
        self._send_to(worker, encode(wire(Release())))

    def _revoke(self, task: Task) -> None:
        """Stop a task that waits behind its worker's running task: if the worker has
        not claimed it, it never will (its token slot is cancelled first, and the worker
        reads the slot after its claim: see _worker._Worker.claim), and it ends cancelled
        now; if it has, the task before it is over and its ladder starts once it is the
        worker's task (:meth:`_started`)."""
        worker = task.worker
        assert worker is not None
        worker.slots[task.slot].cancel(task.stop_reason)
        full_barrier()
        if worker.control.running != task.seq:
            self.finish(task, Fate.CANCELLED)

    @staticmethod
    def _may_signal(worker: WorkerHandle, task: Task) -> bool:
        """Whether a signal step for ``task``, its worker's task (SIGTERM, the freeze and
        SIGKILL of its tree), may go to the worker: ``False`` once the worker has
        claimed the task after it (``task`` is over: its result is on its way). Not
        started yet, ``task`` never starts (the worker, claiming it, sees ``stop_for``
        name it): a signal then ends at most a worker that runs nothing, and a worker
        that ends before it claimed a task hands it back (:meth:`_retire`).

        ``Control.stop_for`` is written before ``running`` is read, the worker doing the
        reverse (see _worker._Worker.claim), so a signal sent after ``True`` never
        reaches the task after ``task``: the worker holds that one until
        :meth:`_release`."""
        control = worker.control
        control.stop_for = task.seq
        full_barrier()
        running = control.running
        return all(following.seq != running for following in tuple(worker.behind))

    def _on_timeout(self, task: Task) -> None:
        self._stop(task, "timeout", f"timeout after {task.timeout:g}s")

    # -- the ladder -----------------------------------------------------------
    def _stop(self, task: Task, kind: StopKind, reason: str | None, *, since: float = 0.0) -> None:
        """Start the ladder of ``task`` (asked ``since``, ``time.monotonic()``; 0: now)."""
        if task.done:
            return
        if task.worker is None:  # queued, or handed back by a worker (see _requeue)
            self._drop_queued(task, kind, reason)
            return
        if task.stop_kind is None:
            task.stop_kind, task.stop_reason = kind, reason
        if task in task.worker.behind:
            self._revoke(task)
            return
        if task.stage >= 1:
            return  # already on its ladder, which goes on as it is
        task.stage = 1
        slot = task.worker.slots[task.slot]
        if task.grace <= 0 and task.term_grace <= 0:
            # Straight to SIGKILL, before the token's cancel (~85 µs of a kill's path on
            # the test VM), which a task killed now never reads: only a step deferred by a
            # critical section (or a worker not busy any more) leaves the token to tell.
            self._escalate(task)
            if task.stage < 3:
                slot.cancel(reason)
            return
        slot.cancel(reason)
        if task.grace <= 0:
            self._escalate(task)
        else:
            grace = task.grace
            if since:  # (a command taken late: see _post_by_grace_end)
                grace = max(0.0, since + grace - time.monotonic())
            self._escalate_later(grace, task)

    def _escalate(self, task: Task) -> None:
        worker = task.worker
        if task.done or worker is None or worker.task is not task or worker.state != "busy":
            return
        if not self._may_signal(worker, task):
            return  # over: its result is on its way, its worker runs the next task
        control = worker.control
        control.step_waits = 1  # before the read: a section ending after it is told
        if task.stage >= 2 or task.term_grace <= 0:  # the step is SIGKILL
            critical = _open_section_end(control)
        else:  # SIGTERM: inside a section, the worker's handler defers it itself
            critical = control.critical_until
            if critical <= time.monotonic():
                critical = 0.0
        if critical:
            # Until the section's declared end, or sooner: the worker says when the task
            # leaves it (CriticalEnded).
            task.deferred = True
            self._at(max(0.0, critical - time.monotonic()), self._resume_deferred, task)
            return
        control.step_waits = 0
        task.deferred = False  # taken now: a deferral's timer or CriticalEnded is stale
        if task.stage < 2 and task.term_grace > 0:
            task.stage = 2
            send_signal(worker.pid, signal.SIGTERM)
            self._escalate_later(task.term_grace, task)
            return
        if task.stage < 3:
            task.stage = 3
            self._kill(worker)

    def _escalate_later(self, delay: float, task: Task) -> None:
        """Take the task's next step after ``delay``, unless it moved on meanwhile (a
        ``terminate_workers()`` during its grace period arms its own next step)."""
        stage = task.stage
        self._at(delay, lambda task: self._escalate(task) if task.stage == stage else None, task)

    def _resume_deferred(self, task: Task) -> None:
        """Take the step deferred for a critical section, once (the section ended, or its
        declared time ran out, whichever is first: the later one finds nothing to do)."""
        if task.deferred:
            task.deferred = False
            self._escalate(task)

    def _kill(self, worker: WorkerHandle) -> None:
        """Freeze the worker, kill its whole tree and the worker, watch each one go."""
        worker.state = "dying"
        self.stats["killed"] += 1
        if (
            worker.gone
            or worker.killed_alone
            or (worker.killed_early and not self._still_parent(worker))
        ):
            # Gone, SIGKILLed with no child to walk, or its exit is handing its children
            # to the zygote: its pid may be another process's soon, so it is not
            # signalled; in that last case what is left of its tree is the zygote's,
            # whose sweep ends it (the caller is released after that).
            worker.walk_late = worker.killed_early and not worker.killed_alone
            if worker.gone and worker.killed_alone:
                # Its pidfd came first, and it had no tree: nothing else would release
                # the caller before the sweep. (Gone with a tree, the orphans are the
                # zygote's: the caller waits for the sweep.)
                self._settle_killed(worker)
            return
        tree = kill_tree(worker.pid, include_root=True, watch=True, view=worker.view)
        for pid, fd in tree.items():
            if fd is not None:
                worker.waiting[pid] = fd
                self._selector.register(fd, selectors.EVENT_READ, ("pidfd", worker, pid))
        # Read after the walk and after the flag (set before the early SIGKILL): if the
        # worker was SIGKILLed before the walk began, the walk saw every child only if
        # the worker had not handed them on when it ended.
        if worker.killed_early and not self._still_parent(worker):
            worker.walk_late = True

    @staticmethod
    def _still_parent(worker: WorkerHandle) -> bool:
        return worker.view is not None and worker.view.still_parent()

    def _on_pidfd(self, worker: WorkerHandle, pid: int) -> None:
        if pid != worker.pid:  # a member of a killed tree is gone
            fd = worker.waiting.pop(pid, None)
            if fd is not None:
                self._selector.unregister(fd)
                os.close(fd)
            self._retire(worker)
            return
        if worker.pidfd is None:  # already handled by an earlier event of the same select
            return
        pidfd, worker.pidfd = worker.pidfd, None  # (first: a fork now must not close it)
        self._selector.unregister(pidfd)
        os.close(pidfd)
        self._on_gone(worker)

    def _on_gone(self, worker: WorkerHandle) -> None:
        """The worker process exited: collect what it sent, have the zygote sweep up
        after it, then settle its task (in :meth:`_retire`, once the sweep is done)."""
        worker.gone = True
        if worker.view is not None:
            worker.view.close()
        self._drain(worker)
        if not worker.waiting and not worker.swept:
            self._settle_killed(worker)  # first: the caller need not wait for the sweep
        zygote = self._zygote_sock
        if zygote is None:
            worker.swept = True
        elif not worker.swept:
            try:
                send_record(zygote, Sweep(worker.pid))
            except OSError:
                worker.swept = True  # the zygote is dying; its EOF is handled next
        self._retire(worker)

    def _sweep_strays(self) -> None:
        """After a stopped task (whose worker killed the task's tree): have the zygote
        kill what the task started outside that tree, as its worker's sibling (see
        :class:`SweepStrays`).

        Run :data:`_STRAYS_DELAY` after the stop, once for every stop in that time, so
        that neither the look at the zygote's children nor the zygote's wake-up holds up
        the stopped task's caller; the zygote is asked only when it has a child that is
        not a known worker.
        """
        zygote = self._zygote_sock
        if zygote is None:
            return
        known = {worker.pid for worker in self.workers.values()}
        if known.issuperset(children(self._zygote.pid)):
            return
        with contextlib.suppress(OSError):  # the zygote is dying: its EOF is handled
            send_record(zygote, SweepStrays())

    def _drain(self, worker: WorkerHandle) -> None:
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

    def _retire(self, worker: WorkerHandle) -> None:
        if worker.state == "dead" or not worker.gone or worker.waiting:
            return
        if not worker.swept:
            self._settle_killed(worker)
            return
        task, following = worker.task, list(worker.behind)
        # (without its control block, at the pool's end: its task is taken as started)
        claimed = (
            worker.control.started if hasattr(worker, "control") else (task.seq if task else 0)
        )
        # What it never started runs elsewhere (see _hand_back). It claims in the order
        # it was handed tasks (a task handed back comes again, so seqs are not in that
        # order): ``started`` names the last task it started. Queued again before they
        # leave the worker's hands: statistics() reads the queue again after them.
        handed = [t for t in (task, *following) if t is not None]
        started = next((i + 1 for i, t in enumerate(handed) if t.seq == claimed), 0)
        unstarted = handed[started:]
        for waiting in reversed(unstarted):  # (each goes first: they keep their order)
            if not waiting.done:
                self._hand_back(waiting)
        with worker.slot_lock:  # (the asking threads read them under it)
            worker.task = None
            worker.behind.clear()
        worker.state = "dead"
        if task in unstarted:
            task = None
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(worker.sock)
        worker.sock.close()
        if task is not None and not task.done:
            if worker.lost is not None and task.stop_kind in (None, "shutdown", "error"):
                self.stats["crashed"] += 1
                error = WorkerCrashedError(
                    f"worker {worker.pid} was stopped: {worker.lost}", pid=worker.pid
                )
                self.finish(task, Fate.CRASHED, error=error)
            elif task.stage >= 2 or (task.stop_kind is not None and worker.status is None):
                # Stopped by us, and it never said "terminated": its finally did not run.
                self.finish(task, Fate.KILLED)
            elif task.stop_kind is not None and task.stop_kind != "shutdown":
                self.finish(task, Fate.KILLED)
            else:
                self.stats["crashed"] += 1
                self.finish(task, Fate.CRASHED, error=_crash_error(worker))
        worker.drop_views()
        if self.workers.get(worker.index) is worker and self.broken is None:
            self.stats["replaced"] += 1
            if worker.ready:
                self._crash_streak = 0
            elif worker.lost is None:  # the pool ended it itself: not a failure to start
                self._crash_streak += 1
            if self._crash_streak > 10:
                safe_log("CRITICAL", "workers keep dying at start; pool broken", pool=self.name)
                self._break(BrokenPoolError(f"{self.name} is broken: workers keep dying at start"))
                return
            self._spawn(index=worker.index)

    def _hand_back(self, task: Task) -> None:
        """A worker ended before it claimed ``task`` (it retired, crashed or was killed
        during the task before it, or the zygote died): the task never started. It
        runs on another worker, first in the queue, unless it was asked to stop or the
        shutdown cancelled the queue (then it ends cancelled)."""
        if self._queue_cancelled or self.broken is not None:
            with task.future.decision_lock:  # (a caller's stop may race us)
                if task.stop_kind is None:
                    task.stop_kind, task.stop_reason = "shutdown", "pool shut down"
        self._requeue(task)

    def _requeue(self, task: Task) -> None:
        """Put a task that never started first in the queue again; one asked to stop
        meanwhile ends cancelled instead."""
        with task.future.decision_lock:  # _drop_queued decides by task.worker under it
            stopped = task.stop_kind is not None or task.done
            if not stopped:
                task.worker = None
                task.requeued = True
        if stopped:
            self.finish(task, Fate.CANCELLED)
            return
        task.future.pid = None
        task.future.fate = Fate.PENDING
        self.queue.appendleft(task)

    def _settle_killed(self, worker: WorkerHandle) -> None:
        """Release the caller of a task the pool killed as soon as the whole tree is
        known dead, before the zygote's sweep comes back (the worker's slot is replaced
        only after it).

        Known dead: the worker's pidfd and the pidfd of every member of the tree that
        ``kill_tree`` froze and killed have fired (``worker.waiting`` is empty), and what
        the worker sent before it died was read (``_on_gone`` drained its socket). Only
        for a task stopped by a cancel, a timeout or ``future.cancel()`` at the last rung:
        its fate is "killed" whatever exit status the zygote reports; every other end
        waits for that status (a crash is named by it).
        """
        task = worker.task
        if (
            task is not None
            and not task.done
            and not worker.walk_late
            and task.stage >= 3
            and task.stop_kind in ("cancel", "timeout", "future")
        ):
            self.finish(task, Fate.KILLED)

    # -- endings --------------------------------------------------------------
    def finish(
        self,
        task: Task,
        fate: Fate,
        *,
        value: Any = None,
        error: BaseException | None = None,
        unless_asked: bool = False,
        stopped_by: tuple[StopKind, str | None] | None = None,
        callbacks_on_pool: bool = False,
    ) -> None:
        """Decide that ``task`` is over, as ``fate``, once (the first call decides), and
        resolve its future (see :meth:`_settle`).

        Decided under the future's lock, which a stop asked from another thread takes
        too (``request_stop``), so what the caller's ``cancel()`` returned is how the
        future ends: ``unless_asked``, a task that returned or raised after it was asked
        to stop ends cancelled instead (as in every pool); ``stopped_by`` names the stop
        of a task that ended stopped, if none was asked. ``callbacks_on_pool``: called
        from another thread, which resolves the future, but its done-callbacks run on
        this pool's thread, as the class promises (see :meth:`wait_on_worker`).

        Called from another thread and cut short by an exception (a signal handler's)
        before the future is resolved, the decision is undone: the next call (the
        supervisor's, on the task's result) decides, so the future never stays pending.
        """
        with task.future.decision_lock:  # the asking thread may settle it too
            if task.done:
                return
            task.done = True
            if stopped_by is not None and task.stop_kind is None:
                task.stop_kind, task.stop_reason = stopped_by
            if unless_asked and task.stop_kind in _ASKED_TO_STOP:
                fate = Fate.CANCELLED
        try:
            self._conclude(task, fate, value, error, callbacks_on_pool)
        except BaseException:
            if self._turn != threading.get_ident() and not task.future.done():
                with task.future.decision_lock:
                    task.done = False
            raise

    def _conclude(
        self,
        task: Task,
        fate: Fate,
        value: Any,
        error: BaseException | None,
        callbacks_on_pool: bool,
    ) -> None:
        """The rest of :meth:`finish`, once it decided: release, resolve, log. Called
        from another thread (``callbacks_on_pool``), it resolves the future and leaves
        the rest to the pool's thread (:class:`LooseEnds`): the caller it releases does
        not wait for it."""
        if not callbacks_on_pool:
            self._release_links(task)
        future = task.future
        if task.error is not None:  # a message of the task could not be handled
            error = task.error
            if fate in (Fate.FINISHED, Fate.FAILED, Fate.CANCELLED) and task.stop_kind in (
                None,
                "error",
            ):
                fate = Fate.FAILED
        future.fate = fate
        if task.partials:
            future.partial_results = dict(task.partials)
        future.cancel_reason = task.stop_reason
        if task.error is not None:
            self._settle(future, exception=task.error, on_pool=callbacks_on_pool)
        elif fate is _FINISHED:
            self._settle(future, result=value, on_pool=callbacks_on_pool)
        elif fate in (Fate.FAILED, Fate.CRASHED):
            assert error is not None
            self._settle(future, exception=error, on_pool=callbacks_on_pool)
        elif task.stop_kind == "future":
            self._settle(future, cancelled=True, on_pool=callbacks_on_pool)
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
            self._settle(future, exception=stopped, on_pool=callbacks_on_pool)
        if callbacks_on_pool:
            self._commands.append(LooseEnds(task, fate))
        elif fate not in _SETTLED_PLAINLY:  # (after: the caller need not wait for the log)
            self._log_end(task, fate)

    @staticmethod
    def _release_links(task: Task) -> None:
        """Drop what a task that is over no longer needs: its link to its token, its
        grace timer, its payload."""
        if task.handle is not None:
            task.handle.remove()
        if task.wake is not None:
            task.wake.cancel()
            task.wake = None
        task.handle = None
        task.token = None
        task.payload = b""

    def _log_end(self, task: Task, fate: Fate) -> None:
        safe_log(
            "INFO",
            f"task {task.seq} {fate}" + (f": {task.stop_reason}" if task.stop_reason else ""),
            pool=self.name,
            worker_pid=task.worker.pid if task.worker is not None else None,
        )

    def _tie_loose_ends(self, task: Task, fate: Fate) -> None:
        """The pool's thread: what a caller's settle left (see :class:`LooseEnds`)."""
        self._release_links(task)
        if fate not in _SETTLED_PLAINLY:
            self._log_end(task, fate)

    def _settle(
        self,
        future: TaskFuture,
        *,
        result: Any = None,
        exception: BaseException | None = None,
        cancelled: bool = False,
        on_pool: bool = False,
    ) -> None:
        """Resolve the future of a task :meth:`finish` decided is done. On this pool's
        thread, in a turn of its loop, at the end of the turn (:meth:`_settle_turn`),
        all at once: the threads blocked on them woken one result at a time would each
        wait for the GIL this thread holds, then hold it while this thread waits (the
        owner's throughput on short tasks). Elsewhere, now, and its done-callbacks run
        now, or, ``on_pool``, at the end of this pool's next turn (``RunCallbacks``).

        Until then the future is not done and keeps its link to the task, so a racing
        ``cancel()`` still says how it will end (``True`` only if cancelled); then the
        link goes. A future the caller settled itself with ``set_result()`` keeps what
        it was given."""
        outcome = (future, result, exception, cancelled)
        if self._turn == threading.get_ident():
            self._settling.append(outcome)
        elif self._resolve(*outcome):
            if not on_pool:
                _futures.run_callbacks(future)
            elif _futures.has_callbacks(future):
                self.post(RunCallbacks(future))

    def _settle_turn(self) -> None:
        """Resolve the futures this turn decided (see :meth:`_settle`), then run their
        done-callbacks, and those of the futures other threads resolved (RunCallbacks)."""
        settling, self._settling = self._settling, []
        settled = [outcome[0] for outcome in settling if self._resolve(*outcome)]
        due, self._callbacks_due = self._callbacks_due, []
        for future in (*settled, *due):
            _futures.run_callbacks(future)

    @staticmethod
    def _resolve(
        future: TaskFuture, result: Any, exception: BaseException | None, cancelled: bool
    ) -> bool:
        """Resolve ``future`` (waking its waiters) unless the caller did, then drop its
        link to the task; whether this resolved it (its callbacks are then to run)."""
        with _futures.lock(future):
            resolved = not future.done()
            if resolved:
                _futures.settle_locked(
                    future, result=result, exception=exception, cancelled=cancelled
                )
        future.forget_task()
        return resolved

    def _fail_all(self, error: BaseException) -> None:
        """Fail every task that is not over (called once their processes are gone).

        The queue is emptied one atomic pop at a time, after :attr:`final` is set: a task
        queued meanwhile is either popped here or taken back by :meth:`enqueue`."""
        self.final = True
        while True:
            try:
                task = self.queue.popleft()
            except IndexError:
                break
            with task.future.decision_lock:  # a caller's cancel may race us for it
                if task.worker is not None or task.done or task.dropped:
                    continue
                task.dropped = True
            self.finish(task, Fate.FAILED, error=error)
        for worker in list(self.workers.values()):
            for held in (worker.task, *worker.behind):
                if held is not None:
                    self.finish(held, Fate.FAILED, error=error)

    def _closing_done(self) -> bool:
        """Whether the supervisor can end: shut down (or broken) and no task left."""
        if not self.shutting_down:
            return False
        if self.broken is not None:
            return True
        # (A copy: an enqueue interrupted by the shutdown may append while we look.)
        if any(not (t.dropped or t.done) for t in list(self.queue)):
            return False
        return all(
            (w.task is None or w.task.done) and all(t.done for t in w.behind)
            for w in self.workers.values()
        ) and all(not w.waiting for w in self.workers.values())

    def _teardown(self) -> None:
        try:
            for worker in self.workers.values():
                if worker.state != "dead":
                    with contextlib.suppress(OSError):
                        worker.sock.close()
            self._let_idle_workers_exit()
            for worker in self.workers.values():
                worker.close_descriptors()
            if self._zygote_sock is not None:
                self._zygote_sock.close()  # EOF: the zygote kills every worker tree and exits
                self._zygote_sock = None
            try:
                self._zygote.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_tree(self._zygote.pid)
                self._zygote.kill()
                self._zygote.wait()
            self._selector.close()
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
            os.close(wake_r)
            os.close(wake_w)
            # Every process of the pool is gone: only now may a pending task hear of it.
            self._fail_all(self.broken or PoolClosedError(f"{self.name} is shut down"))
            # (what other threads left after the last turn: callbacks, loose ends)
            left: list[Command] = []
            while self._commands:
                left.append(self._commands.popleft())
            due = [c.future for c in left if isinstance(c, RunCallbacks)]
            for future in (*self._callbacks_due, *due):
                _futures.run_callbacks(future)
            for command in left:
                if isinstance(command, LooseEnds):
                    self._tie_loose_ends(command.task, command.fate)
            self._release_chunk()
        finally:
            self.shutting_down = True
            self._timer_hold.release()
            self.closed.set()

    def _let_idle_workers_exit(self) -> None:
        """Wait, for at most :data:`_IDLE_EXIT_WAIT` seconds, until every idle worker
        that serves other processes (``Control.serves``: a ``RemoteToken`` server a task
        started) has exited on its own, its channel just closed, before the zygote ends
        what is left: the worker's own exit ends that server and removes its socket
        directory (see ``_worker._end_services``), which the zygote's SIGKILL would leave
        for a later sweep. The other workers are not waited for. Where exits are not
        watched (no pidfd), the zygote ends every worker at once."""
        pidfds = [
            worker.pidfd
            for worker in self.workers.values()
            if worker.state == "idle" and worker.pidfd is not None and _serves(worker)
        ]
        if not pidfds:
            return
        deadline = time.monotonic() + _IDLE_EXIT_WAIT
        with selectors.DefaultSelector() as exits:  # (not select(): descriptors >= 1024)
            for fd in pidfds:
                exits.register(fd, selectors.EVENT_READ)
            waiting = len(pidfds)
            while waiting and (left := deadline - time.monotonic()) > 0:
                for key, _ in exits.select(left):
                    exits.unregister(key.fileobj)
                    waiting -= 1

    def _release_chunk(self) -> None:
        """Drop every view of the shared chunk so that its mapping (and fd) go now."""
        for worker in self.workers.values():
            worker.drop_views()
        self.workers.clear()
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

    def forget_in_child(self) -> None:
        """In a forked child of the owner: close the pool's descriptors, touch nothing else.

        The child must not keep the zygote's channel open (the zygote would outlive the
        owner as long as the child lives) nor wait for a supervisor thread it does not
        have. The pool stays the parent's: every method here refuses or returns.
        """
        self.shutting_down = True
        self.forked = True
        sockets = [w.sock for w in self.workers.values()]
        if self._zygote_sock is not None:
            sockets.append(self._zygote_sock)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for worker in self.workers.values():
            worker.close_descriptors()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        with contextlib.suppress(Exception):
            self._selector.close()
        self.closed.set()


def _serves(worker: WorkerHandle) -> bool:
    """Whether the worker said a task left it serving other processes (``False`` once
    its views are gone)."""
    try:
        return bool(worker.control.serves)
    except AttributeError:
        return False


def _open_section_end(control: Control) -> float:
    """Before a SIGKILL: the declared end of the critical section the worker's task is
    in, or ``0.0`` if none is open, and then the kill may go.

    ``kill_pending`` is raised before the read and stays raised until the worker's next
    task (``_dispatch`` lowers it): a section open now runs to its end, and no section
    the task enters after the read starts (see ``_worker._critical_section``), so a task
    going from section to section is killed in the first gap, never inside one.
    """
    control.kill_pending = 1
    full_barrier()
    critical = float(control.critical_until)
    return critical if critical > time.monotonic() else 0.0


def _token_offset(index: int) -> int:
    """Where worker ``index``'s first token slot is in the pool's chunk (slot 0 is the
    chunk's header)."""
    return (1 + WORKER_SLOTS * index) * _SLOT


def _crash_error(worker: WorkerHandle) -> WorkerCrashedError:
    status = worker.status
    if status is None:
        return WorkerCrashedError(f"worker {worker.pid} died (exit status unknown)", pid=worker.pid)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal_name(signum)
        return WorkerCrashedError(
            f"worker {worker.pid} was killed by signal {signum} ({name})",
            signal=signum,
            pid=worker.pid,
        )
    code = os.WEXITSTATUS(status)
    return WorkerCrashedError(
        f"worker {worker.pid} exited with code {code}", exitcode=code, pid=worker.pid
    )


def _after_fork_in_child() -> None:
    for supervisor in list(_supervisors):
        supervisor.forget_in_child()
    _supervisors.clear()


at_fork(after_in_child=_after_fork_in_child)
