"""`PipelineExecutor`: runs a DAG of nodes wave by wave and stops it cleanly; `PipelineResult`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from ._async import shielded
from ._backends._base import PoolBackend
from ._events import EventBus, PipelineEvent
from ._exceptions import (
    CancelledException,
    PipelineFailedException,
    PipelineTimeoutException,
    PoolClosedError,
)
from ._fate import Fate
from ._node import Node, check_context_travels
from ._platform import require_process_pools
from ._registry import CancellationRegistry, CleanupHandler, RunHandle
from ._run import Mode, Run, RunOutcome
from ._supersede import DEFAULT_SUPERSEDE_REASON, Superseder
from ._token import CancellationToken, check_reason
from ._validate import check_optional_seconds
from ._waves import compute_waves, validate_pipeline

__all__ = (
    "DEFAULT_GRACEFUL_TIMEOUT",
    "Mode",
    "PipelineExecutor",
    "PipelineResult",
)

_MODES: tuple[str, ...] = ("graceful", "interrupt")
Outcome = Literal["completed", "cancelled", "timed_out", "failed"]

#: Seconds a graceful cancel waits for the running wave before interrupting it.
DEFAULT_GRACEFUL_TIMEOUT = 30.0
_UNSET: Any = object()


@dataclass(frozen=True)
class PipelineResult:
    """How a pipeline run ended, as a value: what :meth:`PipelineExecutor.run_pipeline`
    returns instead of raising: a graceful response with the partial results.

    Attributes:
        pipeline_id: the run's id.
        results: node outputs keyed by node id; after a cancellation, timeout or failure
            these are the partial results (plus values stored with ``store_partial``
            under ``"{node_id}.{key}"``).
        cancelled: the run was cancelled or timed out (a timeout is a cancellation).
        cancel_reason: the reason of the cancellation (or timeout), else ``None``.
        wave_cancelled_at: the first wave that did not complete, for a run that did not
            complete (``None`` if it completed).
        timed_out: the run ran past its ``timeout``.
        error: the exception :meth:`PipelineExecutor.execute_pipeline` would have raised
            (``CancelledException``, ``PipelineTimeoutException`` or
            ``PipelineFailedException``), else ``None``.
        failed_node: the id of the node whose error ended the run, else ``None``.
        cleanup_errors: errors of cleanup handlers that raised or hung (``TimeoutError``).
        node_fates: how each node that started ended: ``finished``, ``failed``,
            ``cancelled`` (stopped cooperatively, or a coroutine node cancelled),
            ``terminated`` (a process node's SIGTERM became an exception and its finally
            blocks ran), ``killed`` (its worker and process tree were SIGKILLed),
            ``crashed`` (its worker died by itself), ``abandoned`` (a thread node that
            ignored its token past the grace period) or ``timed_out``. The exceptions
            raised by :meth:`PipelineExecutor.execute_pipeline` carry the same dict as
            ``node_fates``.
        node_attempts: nodes that ran more than once, with how many times: a backend
            that runs a node again when its worker leaves mid-run (Dask) reports each lost
            attempt; the partial results that attempt N stored are kept under
            ``"{node_id}@{N}.{key}"`` (the last attempt's under the plain keys). Empty
            when every node ran once. The exceptions carry it too, as ``node_attempts``.

    It can also be read like a response dict, as code written for the original
    cancellation design does: ``result["cancelled"]``, ``result.get("cancel_reason")``.
    """

    pipeline_id: str
    results: dict[str, Any]
    cancelled: bool = False
    cancel_reason: str | None = None
    wave_cancelled_at: int | None = None
    timed_out: bool = False
    error: BaseException | None = None
    failed_node: str | None = None
    cleanup_errors: tuple[BaseException, ...] = ()
    node_fates: dict[str, Fate] = field(default_factory=dict)
    node_attempts: dict[str, int] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        """The run completed: every node returned."""
        return self.error is None

    @property
    def outcome(self) -> Outcome:
        """``"completed"``, ``"cancelled"``, ``"timed_out"`` or ``"failed"``."""
        if self.timed_out:
            return "timed_out"
        if self.cancelled:
            return "cancelled"
        return "failed" if self.error is not None else "completed"

    def unwrap(self) -> dict[str, Any]:
        """Return ``results`` if the run completed, else raise its ``error``."""
        if self.error is not None:
            raise self.error
        return self.results

    def __getitem__(self, key: str) -> Any:
        if key not in _RESULT_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """``result[key]`` for the field ``key``, or ``default``."""
        return getattr(self, key) if key in _RESULT_KEYS else default


_RESULT_KEYS = frozenset(
    (
        "pipeline_id",
        "results",
        "cancelled",
        "cancel_reason",
        "wave_cancelled_at",
        "timed_out",
        "error",
        "failed_node",
        "cleanup_errors",
    )
)


class PipelineExecutor:
    """Runs pipelines (DAGs of :class:`Node`) wave by wave, and stops them cleanly.

    Each run is registered in the :class:`CancellationRegistry` under its id, every
    completed node's output is stored there as a partial result, and the run is always
    unregistered at its end, whatever happened. Nodes of one wave run concurrently: on
    the event loop (coroutine functions), in the thread pool or in the process pool.

    **Endings.** A run ends in exactly one way, decided by the first cause that fires;
    later causes do not change it or its reason:

    * *completed*: every node returned; :meth:`execute_pipeline` returns the outputs.
    * *cancelled*: the registry cancelled it (:meth:`CancellationRegistry.cancel`, its
      thread-safe form, ``cancel_all``), the caller's ``cancel_token`` was cancelled, it
      was superseded, or the task awaiting it was cancelled → :class:`CancelledException`.
    * *timed out*: the run's ``timeout`` passed → :class:`PipelineTimeoutException`.
    * *failed*: a node raised, or ran past its own ``timeout`` → the other running nodes
      are interrupted and :class:`PipelineFailedException` is raised, with the node's
      error as ``__cause__`` (for a node timeout, a :class:`PipelineTimeoutException`).

    Whatever the ending, the exception is raised only once nothing of the run is still
    running: coroutine nodes have returned or unwound, process nodes are confirmed
    stopped by the process pool, and thread nodes have been released by the thread pool
    (a thread that ignores its token keeps running until it returns, abandoned after the
    pool's grace period; what it stores after the run ended is dropped, with a debug
    log). It is raised after the cleanup handlers have run, and the pipeline is
    unregistered by then, so ``partial_results`` is final. ``wave_num`` is the first
    wave that did not complete: the waves before it all completed (a graceful cancel
    during wave *k* gives *k + 1*, an interrupt gives *k*).

    **Modes** (chosen per call, default from the executor) govern how a *cancel* is
    applied, whatever its source:

    * ``"graceful"`` (the default): no new wave starts, the running wave finishes and its
      results are kept. Nodes are not told: ``ctx.token`` stays uncancelled so a
      cooperative node completes its work. If the wave has not finished
      ``graceful_timeout`` seconds (default 30) after the cancel, the run is interrupted
      as below, so a node that never returns cannot hold the pipeline forever
      (``None``: wait for the wave however long it takes).
    * ``"interrupt"``: running nodes are told at once: ``ctx.token`` is cancelled (with
      the reason), coroutine nodes are cancelled (``Task.cancel()``: they get
      ``asyncio.CancelledError`` at their next ``await``, their ``finally`` blocks run),
      thread nodes are released by the thread pool (and abandoned after its grace period
      if they ignore their token), process nodes are stopped by the process pool
      (token, then SIGTERM, then SIGKILL).

    A timeout, a node failure and the cancellation of the awaiting task always
    interrupt, in both modes: a timeout is a deadline.

    **Tokens.** The registry's token for the run is the cancel *request* (and is
    cancelled, with the ending's reason, on a timeout or failure too, so the outside
    sees the run is ending). ``ctx.token`` is a different, per-run token that is
    cancelled only when nodes must stop now (interrupt, escalation, deadline, failure;
    a node's own timeout cancels only that node's token).

    **Cleanup handlers** registered for the run run exactly once when it ends in any
    way but *completed*, after every node has stopped; on completion they are dropped.
    Their errors are logged and returned as ``PipelineResult.cleanup_errors``. A
    cancel that fires while the last wave is running still ends the run as cancelled
    (the first cause wins) with every output in ``partial_results``; one that comes
    after the last node returned finds the run completed and does nothing.

    **Events** are published on :attr:`events` (see :mod:`cancelflow._events`). A
    subscriber that raises is logged and does not affect the run.

    **Pools.** Pools passed in are used and never shut down by the executor; pools it
    creates itself (lazily, at the first thread or process node) are shut down by
    :meth:`aclose` (or ``async with``). Pools never need to exist for loop-only pipelines.

    **Signal safety.** The executor holds no lock. What a cancel reaches of a run (the
    callback on the pipeline's token, and on the caller's ``cancel_token``) records a
    cause with one ``list.append`` and wakes the loop with ``call_soon_threadsafe``; the
    nodes are interrupted later, on the loop. So :meth:`interrupt`, the registry's
    ``cancel_threadsafe`` and ``cancel_token.cancel()`` are safe from a signal handler,
    whatever the interrupted thread was doing in the executor or the registry. (Locks of
    the pools, reached when the loop stops thread and process nodes, are not on that
    path.) The coroutine methods are for the loop, not for a handler.

    Args:
        registry: the registry to register runs in (default: a new one).
        thread_pool: the pool for ``run_in="thread"`` nodes.
        process_pool: the pool for ``run_in="process"`` nodes.
        mode: the default cancel mode, ``"graceful"`` or ``"interrupt"``.
        graceful_timeout: seconds a graceful cancel waits for the running wave before
            interrupting it (``None``: no bound). Default 30.
        cleanup_timeout: per-handler bound on cleanup handlers of runs of this executor
            (default: the registry's, 5 s).
        events: the event bus to publish on (default: a new one).

    Raises:
        ValueError: an unknown ``mode``, a non-positive timeout.
    """

    def __init__(
        self,
        registry: CancellationRegistry | None = None,
        *,
        thread_pool: PoolBackend | None = None,
        process_pool: PoolBackend | None = None,
        mode: Mode = "graceful",
        graceful_timeout: float | None = DEFAULT_GRACEFUL_TIMEOUT,
        cleanup_timeout: float | None = None,
        events: EventBus | None = None,
    ) -> None:
        if registry is not None and not isinstance(registry, CancellationRegistry):
            raise TypeError(
                f"registry must be a CancellationRegistry, not {type(registry).__name__}"
            )
        if events is not None and not isinstance(events, EventBus):
            raise TypeError(f"events must be an EventBus, not {type(events).__name__}")
        for what, pool in (("thread_pool", thread_pool), ("process_pool", process_pool)):
            if pool is not None and not callable(getattr(pool, "run_sync", None)):
                raise TypeError(
                    f"{what} must be a pool with an async run_sync() (a ThreadPool or "
                    f"ProcessPool), not {type(pool).__name__}"
                )
        self.registry = registry if registry is not None else CancellationRegistry()
        self.events = events if events is not None else EventBus()
        self.mode: Mode = _check_mode(mode)
        self.graceful_timeout = check_optional_seconds(
            graceful_timeout, "graceful_timeout", positive=True
        )
        self.cleanup_timeout = check_optional_seconds(
            cleanup_timeout, "cleanup_timeout", positive=True
        )
        self._thread_pool = thread_pool
        self._process_pool = process_pool
        self._owned_pools: list[PoolBackend] = []
        self._runs: set[Run] = set()
        self._closed = False
        self._superseder = Superseder()

    # -- running ---------------------------------------------------------------------------
    async def execute_pipeline(
        self,
        pipeline_id: str,
        nodes: Iterable[Node],
        context: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        cancel_token: CancellationToken | None = None,
        mode: Mode | None = None,
        graceful_timeout: float | None = _UNSET,
        cleanup_handlers: Iterable[CleanupHandler] = (),
    ) -> dict[str, Any]:
        """Run a pipeline to its end and return ``{node_id: output}``.

        Args:
            pipeline_id: the run's id in the registry (unique among running pipelines).
            nodes: the pipeline's nodes; checked as a whole before anything runs.
            context: a mapping every node reads as ``ctx.context`` (default: empty).
            timeout: the run's deadline in seconds from now (``None``: none).
            cancel_token: a token whose cancellation cancels the run (its reason is the
                run's reason).
            mode: ``"graceful"`` or ``"interrupt"`` for this run (default: the
                executor's).
            graceful_timeout: overrides the executor's for this run.
            cleanup_handlers: handlers registered for this run before any node starts
                (same rules as ``registry.register_cleanup_handler``).

        Cancellation while it blocks: a cancel from any source (this is checked on
        entry: a pre-cancelled ``cancel_token`` runs no node) is applied in the run's
        mode; see the class docstring. If the task awaiting this call is cancelled, the
        run is interrupted, cleaned up and unregistered before ``asyncio.CancelledError``
        propagates. Partial results that survive: every completed node's output and
        every value stored with ``ctx.store_partial``, including by a process node that
        was killed.

        Raises:
            CancelledException: the run was cancelled.
            PipelineTimeoutException: the run passed its ``timeout``.
            PipelineFailedException: a node raised or passed its own timeout.
            PipelineDefinitionError: a bad pipeline (nothing ran), or ``pipeline_id`` is
                already running.
            PoolClosedError: the executor was closed.
            ValueError / TypeError: a bad argument.
        """
        outcome = await self._execute(
            pipeline_id,
            nodes,
            context,
            timeout,
            cancel_token,
            mode,
            graceful_timeout,
            cleanup_handlers,
        )
        if outcome.error is not None:
            raise outcome.error
        return outcome.outputs

    async def run_pipeline(
        self,
        pipeline_id: str,
        nodes: Iterable[Node],
        context: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        cancel_token: CancellationToken | None = None,
        mode: Mode | None = None,
        graceful_timeout: float | None = _UNSET,
        cleanup_handlers: Iterable[CleanupHandler] = (),
    ) -> PipelineResult:
        """Like :meth:`execute_pipeline`, but return every ending as a :class:`PipelineResult`.

        A cancellation or timeout is reported as ``cancelled=True`` (and published as a
        ``cancellation_handled`` event), a node failure as ``error``/``failed_node``.
        What is still raised: a bad pipeline or argument, :class:`PoolClosedError`, and
        ``asyncio.CancelledError`` when the awaiting task is cancelled.
        """
        outcome = await self._execute(
            pipeline_id,
            nodes,
            context,
            timeout,
            cancel_token,
            mode,
            graceful_timeout,
            cleanup_handlers,
        )
        return await self._to_result(outcome)

    async def run_superseding(
        self,
        key: str,
        nodes: Iterable[Node],
        context: Mapping[str, Any] | None = None,
        *,
        pipeline_id: str | None = None,
        reason: str | None = DEFAULT_SUPERSEDE_REASON,
        timeout: float | None = None,
        mode: Mode | None = None,
        graceful_timeout: float | None = _UNSET,
    ) -> PipelineResult:
        """Run a pipeline for ``key``, superseding the key's running one (a newer request
        cancels the one still being worked on).

        The key's running pipeline (started by this method) is cancelled with ``reason``
        and awaited to its end, then this one starts. A superseded run's work is thrown
        away, so these runs are **interrupted** by default, whatever the executor's mode:
        their running nodes are told at once (process nodes go down the stop ladder) and
        the newer request starts promptly instead of waiting for a wave to finish. Pass
        ``mode="graceful"`` to let a superseded run finish its running wave first. Concurrent calls for one key never run two
        pipelines at once, and each caller gets its own run's :class:`PipelineResult`:
        a superseded one has ``cancelled=True`` and ``cancel_reason=reason``. A call
        superseded before it could start runs nothing and returns a cancelled result
        with ``wave_cancelled_at=0`` and no results.

        Args:
            key: what the runs are for (e.g. a conversation id).
            pipeline_id: the run's id (default: ``key``; runs of one key never overlap).
            reason: the cancel reason given to the run this call supersedes.
            mode: how this run is stopped when a newer call supersedes it (or it is
                cancelled): ``"interrupt"`` unless given.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        check_reason(reason)
        run_id = key if pipeline_id is None else pipeline_id
        # Checked before superseding: a bad call must not cancel the key's running run.
        run_mode: Mode = "interrupt" if mode is None else mode
        spec = self._check_run(run_id, nodes, context, timeout, None, run_mode, graceful_timeout)

        async def job(token: CancellationToken) -> PipelineResult:
            return await self._to_result(await self._run_checked(spec, token))

        try:
            return await self._superseder.run(key, job, reason=reason)
        except CancelledException as exc:
            return PipelineResult(
                run_id,
                {},
                cancelled=True,
                cancel_reason=exc.reason,
                wave_cancelled_at=0,
                error=CancelledException(exc.message, {}, 0, reason=exc.reason),
            )

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called; a closed executor runs nothing more."""
        return self._closed

    async def aclose(self, reason: str = "executor closed") -> None:
        """Cancel the running pipelines, wait for their ends, and shut down owned pools.

        Idempotent. Pools passed to the constructor are left open.

        While it blocks: running pipelines are cancelled (reason ``reason``) in their own
        mode, so a graceful one finishes its running wave (at most ``graceful_timeout``)
        and an interrupted one stops its nodes; their cleanup handlers run; then owned
        pools are shut down, waiting for their workers to end (a thread abandoned by the
        thread pool is not waited for). If the awaiting task is cancelled, the runs and
        the shutdown go on without it.

        Raises:
            TypeError: ``reason`` is not a ``str`` (raised before anything changes).
        """
        if not isinstance(reason, str):
            raise TypeError(f"reason must be a str, not {type(reason).__name__}")
        self._closed = True
        runs = list(self._runs)
        for run in runs:
            run.request_cancel(reason)
        if runs:
            for run in runs:
                await shielded(run.done)
        pools, self._owned_pools = self._owned_pools, []
        for pool in pools:
            await _shutdown_pool(pool)

    def interrupt(self, pipeline_id: str, reason: str | None = None) -> bool:
        """Stop a running pipeline now, whatever its mode; return whether it was running.

        Cancels the run (``reason`` is its reason unless it was already cancelled: the
        first cause wins) and interrupts its running nodes at once, as in interrupt mode
        — also when a graceful cancel is already waiting for its wave. This is the
        "second Ctrl-C": thread-safe and safe from a signal handler.

        Raises:
            TypeError: ``reason`` is neither a ``str`` nor ``None`` (raised before anything
                changes).
        """
        check_reason(reason)
        for run in list(self._runs):
            if run.pipeline_id == pipeline_id and not run.closed:
                run.request_interrupt(reason)
                return True
        return False

    async def __aenter__(self) -> PipelineExecutor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _pool_for(self, run_in: str) -> PoolBackend:
        if self._closed:
            raise PoolClosedError("the PipelineExecutor is closed")
        if run_in == "thread":
            if self._thread_pool is None:
                from ._thread_pool import ThreadPool

                self._thread_pool = ThreadPool()
                self._owned_pools.append(self._thread_pool)
            return self._thread_pool
        if self._process_pool is None:
            from ._process import ProcessPool

            self._process_pool = ProcessPool()
            self._owned_pools.append(self._process_pool)
        return self._process_pool

    # -- internals ---------------------------------------------------------------------
    async def _execute(
        self,
        pipeline_id: str,
        nodes: Iterable[Node],
        context: Mapping[str, Any] | None,
        timeout: float | None,
        cancel_token: CancellationToken | None,
        mode: Mode | None,
        graceful_timeout: float | None,
        cleanup_handlers: Iterable[CleanupHandler] = (),
    ) -> RunOutcome:
        spec = self._check_run(
            pipeline_id,
            nodes,
            context,
            timeout,
            cancel_token,
            mode,
            graceful_timeout,
            cleanup_handlers,
        )
        return await self._run_checked(spec, cancel_token)

    def _check_run(
        self,
        pipeline_id: str,
        nodes: Iterable[Node],
        context: Mapping[str, Any] | None,
        timeout: float | None,
        cancel_token: CancellationToken | None,
        mode: Mode | None,
        graceful_timeout: float | None,
        cleanup_handlers: Iterable[CleanupHandler] = (),
    ) -> _RunSpec:
        """Check a run's arguments (raising before anything happens); no side effect."""
        if self._closed:
            raise PoolClosedError("the PipelineExecutor is closed")
        if not isinstance(pipeline_id, str) or not pipeline_id:
            raise TypeError(f"pipeline_id must be a non-empty str, got {pipeline_id!r}")
        run_mode = self.mode if mode is None else _check_mode(mode)
        bound = (
            self.graceful_timeout
            if graceful_timeout is _UNSET
            else check_optional_seconds(graceful_timeout, "graceful_timeout", positive=True)
        )
        deadline = check_optional_seconds(timeout, "timeout", positive=True)
        if cancel_token is not None and not isinstance(cancel_token, CancellationToken):
            raise TypeError(
                f"cancel_token must be a CancellationToken, not {type(cancel_token).__name__}"
            )
        if context is None:
            context = {}
        elif not isinstance(context, Mapping):
            raise TypeError(f"context must be a mapping, not {type(context).__name__}")
        by_id = validate_pipeline(nodes)
        waves = compute_waves(by_id)
        check_context_travels(context, by_id.values())
        if self._process_pool is None:
            for node in by_id.values():
                if node.run_in == "process":
                    require_process_pools(f"process node {node.id!r}")
        if isinstance(cleanup_handlers, (str, bytes)) or not isinstance(cleanup_handlers, Iterable):
            raise TypeError(
                "cleanup_handlers must be an iterable of callables, "
                f"not {type(cleanup_handlers).__name__}"
            )
        handlers = list(cleanup_handlers)
        for index, handler in enumerate(handlers):
            if not callable(handler):
                raise TypeError(
                    f"cleanup_handlers[{index}] must be callable, not {type(handler).__name__}"
                )
        return _RunSpec(pipeline_id, waves, context, run_mode, bound, deadline, handlers)

    async def _run_checked(
        self, spec: _RunSpec, cancel_token: CancellationToken | None
    ) -> RunOutcome:
        """Register and drive a run whose arguments :meth:`_check_run` accepted."""
        if self._closed:
            raise PoolClosedError("the PipelineExecutor is closed")
        pipeline_id = spec.pipeline_id
        handle = RunHandle.open(
            self.registry, pipeline_id, spec.handlers, cleanup_timeout=self.cleanup_timeout
        )
        run = Run(
            handle,
            spec.waves,
            spec.context,
            spec.mode,
            spec.graceful_timeout,
            spec.timeout,
            events=self.events,
            pool_for=self._pool_for,
        )
        self._runs.add(run)
        try:
            return await run.drive(cancel_token)
        finally:
            self._runs.discard(run)
            if not run.done.done():
                run.done.set_result(None)
            if not handle.finished:
                # Only reached on an internal error: never leave the id registered.
                handle.discard()

    async def _to_result(self, outcome: RunOutcome) -> PipelineResult:
        error = outcome.error
        result = PipelineResult(
            outcome.pipeline_id,
            outcome.outputs if error is None else outcome.partial_results,
            cancelled=isinstance(error, CancelledException),
            cancel_reason=error.reason if isinstance(error, CancelledException) else None,
            wave_cancelled_at=None if error is None else outcome.wave_num,
            timed_out=isinstance(error, PipelineTimeoutException),
            error=error,
            failed_node=error.node_id if isinstance(error, PipelineFailedException) else None,
            cleanup_errors=outcome.cleanup_errors,
            node_fates=outcome.node_fates,
            node_attempts=outcome.node_attempts,
        )
        if isinstance(error, CancelledException) and self.events.has_subscribers():
            await self.events.emit(
                PipelineEvent(
                    "cancellation_handled",
                    outcome.pipeline_id,
                    None,
                    {
                        "message": error.message,
                        "wave_num": error.wave_num,
                        "partial_results_count": len(error.partial_results),
                        "cancel_reason": error.reason,
                    },
                )
            )
        return result


@dataclass(frozen=True, slots=True)
class _RunSpec:
    """A run's checked arguments (see ``PipelineExecutor._check_run``)."""

    pipeline_id: str
    waves: list[list[Node]]
    context: Mapping[str, Any]
    mode: Mode
    graceful_timeout: float | None
    timeout: float | None
    handlers: list[CleanupHandler]


async def _shutdown_pool(pool: PoolBackend) -> None:
    closer = getattr(pool, "aclose", None)
    if closer is not None:
        await closer()
        return
    # shutdown(wait=True) blocks: run it in a thread of its own, not on the loop.
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def work() -> None:
        error: BaseException | None = None
        try:
            pool.shutdown(True)
        except Exception as exc:  # noqa: BLE001 - handed to the loop
            error = exc
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # the loop is closed
            pass

    threading.Thread(target=work, name="cancelflow-pool-shutdown", daemon=True).start()
    await shielded(done)


def _check_mode(mode: object) -> Mode:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return cast("Mode", mode)
