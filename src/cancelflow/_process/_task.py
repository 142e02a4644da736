"""One task of a :class:`~cancelflow.ProcessPool`: its future and the supervisor's record."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .. import _futures
from .._fate import Fate
from .._token import CancellationToken

if TYPE_CHECKING:
    from ._supervisor import Supervisor, WorkerHandle

__all__ = ("StopKind", "Task", "TaskFuture")

#: Who stopped a task: its token (or the task itself), its timeout, its future
#: (``cancel()``/``kill()``), the pool's shutdown, or the pool (a message it could not read).
StopKind = Literal["cancel", "timeout", "future", "shutdown", "error"]


class TaskFuture(_futures.PoolFuture[Any]):
    """The future of one :class:`ProcessPool` task, whose :meth:`cancel` works while it runs.

    Its done-callbacks run on the pool's supervisor thread (as the stdlib's run on its
    executor's management thread), at the end of the turn that read the task's end (or,
    for a stop a caller blocked in :meth:`result` heard from the task's worker, of the
    turn after): a callback must be quick, and must not wait for another task of the
    same pool.

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
        self._task: Task | None = None
        #: made by a pool: once ``_task`` is gone the task is settled or being settled
        self._pooled = False

    def result(self, timeout: float | None = None) -> Any:
        """As :meth:`concurrent.futures.Future.result`. A caller blocked here while the
        task runs is woken by its worker when the task ends stopped (see
        :meth:`cancel`), not only by the pool's thread."""
        return super().result(self._wait_on_worker(timeout))

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As :meth:`concurrent.futures.Future.exception` (woken as :meth:`result` is)."""
        return super().exception(self._wait_on_worker(timeout))

    def _wait_on_worker(self, timeout: float | None) -> float | None:
        """Wait as :meth:`Supervisor.wait_on_worker` does, if it applies; return what is
        left of ``timeout`` for the stdlib's own wait (which also raises for a bad one)."""
        task = self._task
        if task is None or self.done():
            return timeout
        if timeout is not None and not (
            isinstance(timeout, int | float) and math.isfinite(timeout)
        ):
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        task.supervisor.wait_on_worker(task, deadline)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def cancel(self) -> bool:
        """Stop the task: a queued one never starts; a running one goes down the ladder.

        Returns ``True`` if the future will end cancelled: not when the task already
        finished, nor when another stop (its token, its timeout) got there first, which
        ends it with :class:`CancelledException`, nor in a forked child of the pool's
        owner (the task is the parent's). For a queued task the future is
        cancelled before this returns; so it is for a task handed to a busy worker to
        start after its running one (the future says running), unless the worker has
        just started it. For a running task this only starts the stop:
        the future becomes cancelled (and ``result()`` raises
        :class:`concurrent.futures.CancelledError`) once the task returned or its worker
        and process tree are confirmed gone, never before.
        """
        if self.done():
            return self.cancelled()
        task = self._task
        if task is None:
            return super().cancel() if not self._pooled else self.cancelled()
        if task.supervisor.forked:
            return False  # a forked child of the pool's owner cannot stop its tasks
        task.supervisor.request_stop(task, "future", "future cancelled")
        # True only if this call's stop is the one that ends the task (a token's or a
        # timeout's stop that won the race ends it with CancelledException instead).
        # (done() first: a future resolved between the two reads is cancelled by now.)
        return task.stop_kind == "future" and (not self.done() or self.cancelled())

    def kill(self, reason: str | None = "killed") -> bool:
        """Stop the task at once: SIGKILL its worker and whole process tree, no grace.

        Like :meth:`cancel` (a queued task never starts; the future ends cancelled once
        the worker and its tree are confirmed gone), but skipping the token and SIGTERM
        steps: no ``finally`` block of the task runs. Returns ``False`` if it already
        finished.
        """
        if self.done():
            return self.cancelled()
        task = self._task
        if task is None:
            return super().cancel() if not self._pooled else self.cancelled()
        if task.supervisor.forked:
            return False  # a forked child of the pool's owner cannot stop its tasks
        task.supervisor.request_stop(task, "future", reason, kill=True)
        return not self.done() or self.cancelled()

    # -- the supervisor's handle (package-internal) ---------------------------------------
    @property
    def decision_lock(self) -> Any:
        """The re-entrant lock under which a task is dropped, claimed or first stopped
        (the future's own, so that those decisions are atomic with its state)."""
        return _futures.lock(self)

    def start_running(self) -> bool:
        """Mark a pending future running (call with :attr:`decision_lock` held); ``False``
        if it is not pending any more."""
        return _futures.start_locked(self)

    def attach(self, task: Task) -> None:
        """Link this future, made by a pool, to the supervisor's record of its task."""
        self._task = task
        self._pooled = True

    def forget_task(self) -> None:
        """Drop the link to the supervisor's record: the task is over and its future
        resolved."""
        self._task = None


@dataclass(eq=False)
class Task:
    """The supervisor's record of one submitted task (mutated on its thread only, but
    for the two decisions taken under the future's lock: drop and claim)."""

    supervisor: Supervisor
    seq: int
    payload: bytes
    future: TaskFuture
    token: CancellationToken | None
    grace: float
    term_grace: float
    timeout: float | None
    partial_sink: Callable[[str, Any], None] | None
    worker: WorkerHandle | None = None
    #: which of ``worker``'s token slots is its token (from dispatch on)
    slot: int = 0
    #: handed to a worker that ended before it claimed the task, and queued again
    requeued: bool = False
    #: how many times it became its worker's task (more than once: handed back, see
    #: Supervisor._started): a timeout armed for an earlier time is stale
    starts: int = 0
    #: a kill was asked while it waited behind its worker's running task
    kill_asked: bool = False
    stop_kind: StopKind | None = None
    stop_reason: str | None = None
    stage: int = 0  # 1 token set, 2 SIGTERM sent, 3 SIGKILL sent
    #: the next step waits for the task's critical section to end (see Supervisor._escalate)
    deferred: bool = False
    done: bool = False
    #: dropped before it was dispatched (decided under the future's lock, see _claim)
    dropped: bool = False
    handle: Any = None
    #: the timer that wakes the supervisor when its grace period ends, for a stop whose
    #: first step the asking thread took (see Supervisor._post_by_grace_end)
    wake: Any = None
    partials: dict[str, Any] = field(default_factory=dict)
    #: how many of its frames sent before its result (partial results, its own cancel, a
    #: critical section's end) the pool has handled (changed under the future's lock)
    frames: int = 0
    #: an error that ends the task whatever it returns (a message that could not be read)
    error: BaseException | None = None
