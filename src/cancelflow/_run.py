"""One pipeline run as a state machine: causes claimed from anywhere, acted on by the loop.

:class:`Run` drives the waves of one run on its event loop, applies cancels in the run's
mode, stops nodes, decides the ending (the first cause claimed wins), cleans up through
its :class:`~cancelflow._registry.RunHandle` and reports a :class:`RunOutcome`. The
facade, :class:`~cancelflow._executor.PipelineExecutor`, checks the arguments, makes a
:class:`Run` and turns its outcome into an exception or a ``PipelineResult``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._async import shielded, until_done
from ._backends._base import PoolBackend
from ._events import EventBus, PipelineEvent
from ._exceptions import (
    CancelledException,
    PipelineFailedException,
    PipelineTimeoutException,
)
from ._fate import Fate
from ._log import safe_log
from ._node import Node, NodeContext
from ._registry import RunHandle
from ._token import CallbackHandle, CancellationToken

__all__ = ("Mode", "Run", "RunOutcome")

Mode = Literal["graceful", "interrupt"]

# While interrupted coroutine nodes refuse to end, they are cancelled again this often.
_RECANCEL_INTERVAL = 1.0


@dataclass
class RunOutcome:
    """How a run ended (the facade makes the exception or ``PipelineResult`` of it)."""

    pipeline_id: str
    outputs: dict[str, Any]
    partial_results: dict[str, Any]
    wave_num: int
    error: CancelledException | PipelineFailedException | None
    cleanup_errors: tuple[BaseException, ...] = ()
    node_fates: dict[str, Fate] = field(default_factory=dict)
    node_attempts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Claim:
    """One cause of an ending; the first one claimed decides the ending."""

    kind: Literal["completed", "cancelled", "timed_out", "failed"]
    reason: str | None = None
    node_id: str | None = None
    error: BaseException | None = None
    wave_num: int | None = None


class _NodeRun:
    """One node of a run; also the node's partial-result sink (``self(key, value)``)."""

    __slots__ = ("node", "run", "started", "task", "timed_out", "timer", "token", "wave_num")

    def __init__(self, run: Run, node: Node, wave_num: int, token: CancellationToken) -> None:
        self.run = run
        self.node = node
        self.wave_num = wave_num
        self.token = token
        self.task: asyncio.Task[None] | None = None
        self.started = False
        self.timed_out: PipelineTimeoutException | None = None
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self, key: str, value: Any) -> None:
        """Store a partial result as ``"{node_id}.{key}"`` (any thread)."""
        run = self.run
        if run.closed:
            safe_log(
                "DEBUG",
                f"partial result {key!r} stored after the run ended; dropped",
                pipeline_id=run.pipeline_id,
                node_id=self.node.id,
            )
            return
        run.handle.store_partial(f"{self.node.id}.{key}", value)

    def attempt_lost(self, attempt: int, where: str, partials: dict[str, Any]) -> None:
        """The backend lost attempt ``attempt`` of this node (its worker at ``where``
        left) and runs it again: keep what that attempt stored as
        ``"{node_id}@{attempt}.{key}"`` (the next attempt's values take the plain keys)
        and count the attempt (any thread)."""
        run = self.run
        if run.closed:
            return
        node_id = self.node.id
        run.attempts[node_id] = max(run.attempts.get(node_id, 1), attempt + 1)
        for key, value in partials.items():
            run.handle.store_partial(f"{node_id}@{attempt}.{key}", value)
        safe_log(
            "WARNING",
            f"node {node_id!r}: attempt {attempt} lost with its worker {where}; running again",
            pipeline_id=run.pipeline_id,
            node_id=node_id,
        )


class Run:
    """The state of one pipeline run; lives on the loop that runs it.

    Causes (cancel requests, the deadline, node failures) may be claimed from any thread
    or a signal handler: a claim is one ``list.append`` (atomic), the first element of
    ``claims`` is the ending, and the loop is woken with ``call_soon_threadsafe`` to act.
    """

    def __init__(
        self,
        handle: RunHandle,
        waves: list[list[Node]],
        context: Mapping[str, Any],
        mode: Mode,
        graceful_timeout: float | None,
        timeout: float | None,
        *,
        events: EventBus,
        pool_for: Callable[[str], PoolBackend],
    ) -> None:
        self.handle = handle
        self.events = events
        #: the pool for a node's ``run_in`` ("thread" / "process"), made on first use
        self.pool_for = pool_for
        self.pipeline_id = handle.pipeline_id
        self.waves = waves
        self.context = context
        self.mode = mode
        self.graceful_timeout = graceful_timeout
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.claims: list[_Claim] = []
        #: how each node ended: finished / failed / cancelled / terminated / killed /
        #: crashed / abandoned / timed_out; nodes that never started are absent
        self.fates: dict[str, Fate] = {}
        #: nodes a backend ran more than once (their worker left mid-run): attempts made
        self.attempts: dict[str, int] = {}
        self.interrupt = CancellationToken(name=f"{self.pipeline_id}:interrupt")
        self.interrupted = False
        self.outputs: dict[str, Any] = {}
        self.running: dict[str, _NodeRun] = {}
        self.remaining = 0  # nodes of the current wave not yet ended
        self.wave_done: asyncio.Future[None] = self.loop.create_future()
        self.escalation: asyncio.TimerHandle | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.caller_cancelled = False
        self.closed = False
        self.done: asyncio.Future[None] = self.loop.create_future()

    # -- causes ----------------------------------------------------------------------------
    def claim(self, claim: _Claim) -> None:
        """Record a cause (any thread, signal-safe) and let the loop act on it."""
        if self.closed:
            return
        self.claims.append(claim)
        try:
            self.loop.call_soon_threadsafe(self._act, claim)
        except RuntimeError:  # the loop is closed; the run is long over
            pass

    def request_cancel(self, reason: str | None) -> None:
        """Cancel the run as the registry would (any thread)."""
        self.handle.token.cancel(reason)

    def request_interrupt(self, reason: str | None) -> None:
        """Cancel the run and interrupt its nodes now, in any mode (any thread)."""
        self.handle.token.cancel(reason)
        try:
            self.loop.call_soon_threadsafe(self._interrupt_if_open)
        except RuntimeError:  # the loop is closed; the run is long over
            pass

    def _interrupt_if_open(self) -> None:
        if not self.closed:
            self._interrupt()

    def _on_registry_cancel(self) -> None:
        self.claim(_Claim("cancelled", self.handle.token.cancel_reason))

    def _act(self, claim: _Claim) -> None:
        if self.closed:
            return
        if claim.kind == "cancelled":
            if self.mode == "interrupt":
                self._interrupt()
            elif self.escalation is None and self.graceful_timeout is not None:
                self.escalation = self.loop.call_later(self.graceful_timeout, self._escalate)
        elif claim.kind in ("timed_out", "failed"):
            # The pipeline's token tells the outside (and cleanup) that the run is ending.
            self.handle.token.cancel(self.claims[0].reason)
            self._interrupt()

    def _escalate(self) -> None:
        safe_log(
            "WARNING",
            f"graceful cancel not done after {self.graceful_timeout:g}s; interrupting",
            pipeline_id=self.pipeline_id,
        )
        self._interrupt()

    def _on_deadline(self) -> None:
        assert self.timeout is not None
        self.claim(
            _Claim("timed_out", f"pipeline {self.pipeline_id!r} timed out after {self.timeout:g}s")
        )

    def _interrupt(self) -> None:
        """Tell every running node to stop now (idempotent; loop thread)."""
        if self.interrupted:
            return
        self.interrupted = True
        reason = self.claims[0].reason if self.claims else None
        self.interrupt.cancel(reason)
        for node_run in list(self.running.values()):
            if node_run.started and node_run.task is not None and node_run.node.run_in == "loop":
                node_run.task.cancel()

    def _on_node_timeout(self, node_run: _NodeRun) -> None:
        node = node_run.node
        assert node.timeout is not None
        reason = f"node {node.id!r} timed out after {node.timeout:g}s"
        error = PipelineTimeoutException(
            reason, None, node_run.wave_num, reason=reason, timeout=node.timeout
        )
        node_run.timed_out = error
        node_run.token.cancel(reason)
        if node_run.task is not None and node.run_in == "loop":
            node_run.task.cancel()  # started: its timer is armed inside the task
        self.claim(_Claim("failed", reason, node.id, error, node_run.wave_num))

    # -- driving ---------------------------------------------------------------------------
    async def drive(self, cancel_token: CancellationToken | None) -> RunOutcome:
        handles: list[CallbackHandle] = [self.handle.token.on_cancel(self._on_registry_cancel)]
        if cancel_token is not None:
            registry_token = self.handle.token
            handles.append(
                cancel_token.on_cancel(lambda: registry_token.cancel(cancel_token.cancel_reason))
            )
        if self.timeout is not None:
            self.deadline = self.loop.call_later(self.timeout, self._on_deadline)
        try:
            await self._emit(
                "pipeline_started",
                None,
                total_waves=len(self.waves),
                node_count=sum(len(wave) for wave in self.waves),
                mode=self.mode,
            )
            safe_log(
                "DEBUG", f"pipeline started ({len(self.waves)} waves)", pipeline_id=self.pipeline_id
            )
            for wave_num, wave in enumerate(self.waves):
                if self.claims:
                    break
                await self._run_wave(wave_num, wave)
            if not self.claims:
                self.claims.append(_Claim("completed"))
            if self.claims[0].kind == "completed":
                self.handle.mark_completed()  # late cancels find it finished
        except asyncio.CancelledError:
            # Cancelled outside any wave (e.g. during an event): nothing runs; end it.
            self._on_caller_cancelled()
        finally:
            for handle in handles:
                handle.remove()
        return await _uncancellable(self._finish(), self)

    async def _run_wave(self, wave_num: int, wave: list[Node]) -> None:
        loop = self.loop
        self.remaining = len(wave)
        self.wave_done = wave_done = loop.create_future()
        for node in wave:
            token = (
                self.interrupt.child(name=f"{self.pipeline_id}/{node.id}")
                if (node.timeout is not None or node.run_in != "loop")
                else self.interrupt
            )
            node_run = _NodeRun(self, node, wave_num, token)
            self.running[node.id] = node_run
            node_run.task = loop.create_task(self._run_node(node_run))
        while not wave_done.done():
            try:
                await until_done(wave_done, _RECANCEL_INTERVAL if self.interrupted else None)
            except asyncio.CancelledError:
                self._on_caller_cancelled()
                continue
            if not wave_done.done() and self.interrupted:
                self._recancel()

    def _on_caller_cancelled(self) -> None:
        self.caller_cancelled = True
        reason = "the task awaiting the pipeline was cancelled"
        self.claim(_Claim("cancelled", reason))
        self.handle.token.cancel(reason)
        self._interrupt()

    def _recancel(self) -> None:
        for node_run in list(self.running.values()):
            safe_log(
                "WARNING",
                "interrupted node has not stopped yet",
                pipeline_id=self.pipeline_id,
                node_id=node_run.node.id,
            )
            if node_run.node.run_in == "loop" and node_run.started and node_run.task is not None:
                node_run.task.cancel()

    async def _run_node(self, node_run: _NodeRun) -> None:
        # A node task is only ever cancelled once started (see _interrupt), so this body,
        # and its finally, always runs: the wave's count of running nodes stays exact.
        node_run.started = True
        node = node_run.node
        node_id = node.id
        try:
            if self.interrupted:
                raise asyncio.CancelledError  # interrupted before it could start
            ctx = NodeContext(
                node_run.token,
                {dep: self.outputs[dep] for dep in node.deps} if node.deps else {},
                self.context,
                self.pipeline_id,
                node_id,
                node_run,
            )
            if node.timeout is not None:
                node_run.timer = self.loop.call_later(node.timeout, self._on_node_timeout, node_run)
            emitting = self.events.has_subscribers()
            if emitting:
                await self._emit(
                    "node_started", node_id, wave_num=node_run.wave_num, run_in=node.run_in
                )
            if node.run_in == "loop":
                value = await node.fn(ctx)
            else:
                pool = self.pool_for(node.run_in)
                value = await pool.run_sync(
                    node.fn, ctx, token=node_run.token, partial_sink=node_run
                )
        except asyncio.CancelledError as exc:
            self.fates[node_id] = (
                Fate.TIMED_OUT if node_run.timed_out is not None else Fate.CANCELLED
            )
            if self.interrupted or node_run.timed_out is not None:
                await self._node_stopped(node_run, "interrupted")
            else:  # not cancelled by us: something inside the node was cancelled
                await self._node_failed(node_run, exc)
        except CancelledException as exc:
            self.fates[node_id] = exc.fate or Fate.CANCELLED
            if node_run.timed_out is not None and self.fates[node_id] == Fate.CANCELLED:
                self.fates[node_id] = Fate.TIMED_OUT
            if node_run.timed_out is None and not node_run.token.is_cancelled:
                await self._node_failed(node_run, exc)  # raised by the node on its own
            else:
                await self._node_stopped(node_run, exc.reason)
        except Exception as exc:  # noqa: BLE001 - a node's error ends the run, reported
            self.fates[node_id] = Fate(getattr(exc, "fate", None) or Fate.FAILED)
            await self._node_failed(node_run, exc)
        else:
            self.fates[node_id] = Fate.FINISHED
            self.outputs[node_id] = value
            self.handle.store_partial(node_id, value)
            if emitting:
                await self._emit(
                    "node_finished", node_id, wave_num=node_run.wave_num, run_in=node.run_in
                )
        finally:
            if node_run.timer is not None:
                node_run.timer.cancel()
            if node_run.token is not self.interrupt:
                node_run.token.close()
            del self.running[node_id]
            self.remaining -= 1
            if self.remaining == 0 and not self.wave_done.done():
                self.wave_done.set_result(None)

    async def _node_stopped(self, node_run: _NodeRun, reason: str | None) -> None:
        if node_run.timed_out is not None:
            await self._node_failed(node_run, node_run.timed_out)
            return
        node = node_run.node
        if self.events.has_subscribers():
            await self._emit(
                "node_cancelled",
                node.id,
                wave_num=node_run.wave_num,
                run_in=node.run_in,
                reason=self.interrupt.cancel_reason or reason,
                fate=self.fates.get(node.id, Fate.CANCELLED),
            )

    async def _node_failed(self, node_run: _NodeRun, error: BaseException) -> None:
        node = node_run.node
        if node_run.timed_out is None:
            self.claim(
                _Claim(
                    "failed",
                    f"node {node.id!r} failed: {error!r}",
                    node.id,
                    error,
                    node_run.wave_num,
                )
            )
        safe_log(
            "WARNING",
            f"node failed: {type(error).__name__}: {error}",
            pipeline_id=self.pipeline_id,
            node_id=node.id,
        )
        if self.events.has_subscribers():
            await self._emit(
                "node_failed",
                node.id,
                wave_num=node_run.wave_num,
                run_in=node.run_in,
                error=error,
                fate=self.fates.get(node.id, Fate.FAILED),
            )

    # -- ending ----------------------------------------------------------------------------
    async def _finish(self) -> RunOutcome:
        """Everything has stopped: decide, clean up, unregister, report (uncancellable)."""
        for handle in (self.deadline, self.escalation):
            if handle is not None:
                handle.cancel()
        cause = self.claims[0]
        partial = self.handle.partial_results()
        self.closed = True
        self.interrupt.close()
        wave_num = self._first_incomplete_wave()
        error: CancelledException | PipelineFailedException | None
        if cause.kind == "completed":
            error = None
        elif cause.kind == "timed_out":
            error = PipelineTimeoutException(
                f"pipeline {self.pipeline_id!r} timed out after {self.timeout:g}s",
                partial,
                wave_num,
                reason=cause.reason,
                timeout=self.timeout,
            )
        elif cause.kind == "cancelled":
            what = f": {cause.reason}" if cause.reason else ""
            error = CancelledException(
                f"pipeline {self.pipeline_id!r} cancelled{what}",
                partial,
                wave_num,
                reason=cause.reason,
            )
        else:
            assert cause.error is not None
            error = PipelineFailedException(
                f"pipeline {self.pipeline_id!r} failed: node {cause.node_id!r} raised "
                f"{type(cause.error).__name__}: {cause.error}",
                node_id=cause.node_id,
                partial_results=partial,
                wave_num=cause.wave_num if cause.wave_num is not None else wave_num,
            )
            error.__cause__ = cause.error
        if error is not None:
            error.node_fates = dict(self.fates)
            error.node_attempts = dict(self.attempts)
        if isinstance(error, CancelledException):
            await self._emit(
                "execution_cancelled",
                None,
                wave_num=wave_num,
                total_waves=len(self.waves),
                partial_results_count=len(partial),
                cancel_reason=error.reason,
            )
        # Cleanup: exactly once, now that nothing runs; dropped on success.
        cleanup_errors = await self.handle.end(run_handlers=error is not None)
        outcome_name = cause.kind
        # Text for people counts waves from 1; wave_num (the data) is the 0-based index.
        where = (
            f"in wave {wave_num + 1} of {len(self.waves)}"
            if wave_num < len(self.waves)
            else f"after all {len(self.waves)} waves"
        )
        safe_log(
            "WARNING" if outcome_name in ("timed_out", "failed") else "INFO",
            f"pipeline ended: {outcome_name} {where}",
            pipeline_id=self.pipeline_id,
            reason=cause.reason,
            wave_num=wave_num,
        )
        await self._emit(
            "pipeline_finished",
            None,
            outcome=outcome_name,
            wave_num=wave_num,
            total_waves=len(self.waves),
            results_count=len(self.outputs),
            reason=cause.reason,
        )
        return RunOutcome(
            self.pipeline_id,
            self.outputs,
            partial,
            wave_num,
            error,
            cleanup_errors,
            dict(self.fates),
            dict(self.attempts),
        )

    def _first_incomplete_wave(self) -> int:
        for wave_num, wave in enumerate(self.waves):
            if any(node.id not in self.outputs for node in wave):
                return wave_num
        return len(self.waves)

    async def _emit(self, name: str, node_id: str | None, **data: Any) -> None:
        if self.events.has_subscribers():
            await self.events.emit(PipelineEvent(name, self.pipeline_id, node_id, data))


async def _uncancellable(aw: Awaitable[RunOutcome], run: Run) -> RunOutcome:
    """Await ``aw`` to its end even if our task is cancelled meanwhile; then re-raise."""
    task = asyncio.ensure_future(aw)
    cancelled = run.caller_cancelled
    while True:
        try:
            outcome = await shielded(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return outcome
