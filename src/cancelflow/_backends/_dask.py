"""`DaskRunner`: run cancelflow nodes on a Dask ``distributed`` cluster, and stop them.

Dask cannot stop a running task: ``future.cancel()`` marks it cancelled while the worker
thread keeps running it (dask/distributed #2617, #3681, #4694), and the only built-in way
out is restarting the worker, which loses every result it holds. This backend runs
``run_in="process"`` nodes in a child process supervised by the Dask task, so that a
cancel kills the child's whole process tree in milliseconds and the worker goes on.

How a node travels (see ``_dask_worker`` for the worker side):

* the client pickles ``(fn, args)`` with cloudpickle (functions from ``__main__`` work)
  and submits one Dask task under a unique key ``cancelflow-<node>-<uuid>`` (a
  resubmitted key would resume the old task);
* on the worker the task takes a child of the plugin's warm process pool (process
  nodes), or runs the callable in the Dask worker thread itself (thread nodes,
  cooperative), or ``asyncio.run``\\s it there (coroutine functions, cooperative);
* partial results (``ctx.store_partial``) go from the child to the Dask worker at once,
  and from there to the client as worker events (``log_event``) on the runner's topic.
  They share the worker's ordered stream with the end-of-task report, so everything a
  node stored before it was killed reaches ``partial_sink`` before ``run_sync`` raises.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import inspect
import pkgutil
import re
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._async import shielded, until_done
from .._context import PartialSink, deliver_partial, report_lost_attempt
from .._exceptions import (
    CancelledException,
    ClusterConnectionError,
    MemoryLimitError,
    PoolClosedError,
    WorkerCrashedError,
)
from .._log import safe_log
from .._node import NodeContext
from .._token import CallbackHandle, CancellationToken
from .._validate import check_optional_seconds, check_seconds as _seconds
from .._version import __version__

__all__ = ("DaskRunner", "LostAttempt")

_RUN_IN = ("process", "thread", "loop")
#: Seconds past a task's own stop ladder before the client stops it through the scheduler.
_BACKSTOP = 2.0
#: Seconds the client waits for a killed task's tree to be reported gone.
_ENDED_PATIENCE = 15.0
#: Lost attempts a runner keeps (the oldest go first).
_LOST_KEPT = 100


@dataclass(frozen=True)
class LostAttempt:
    """A run of a node that Dask gave up because its worker left (died, or was retired)
    before the node ended; Dask runs the node again on another worker.

    Attributes:
        key: the Dask key of the call.
        attempt: which attempt was lost (1 for the first run of the node).
        worker: the address of the worker that left.
        partial_results: what that attempt stored before it was lost (the next attempt
            starts with none).
    """

    key: str
    attempt: int
    worker: str
    partial_results: dict[str, Any]


@dataclass(eq=False)
class _Run:
    """One run (all nodes sharing a run token) as the client sees it."""

    name: str
    token: CancellationToken
    active: int = 0
    keys: set[str] = field(default_factory=set)
    handle: CallbackHandle | None = None
    cancelling: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Call:
    """One ``run_sync`` call: a Dask task and what the client knows of it."""

    key: str
    mode: str
    spec: dict[str, Any]
    token: CancellationToken | None
    run_token: CancellationToken | None
    sink: PartialSink | None
    grace: float
    term_grace: float
    timeout: float | None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    partials: dict[str, Any] = field(default_factory=dict)
    aborted: bool = False
    dropped: bool = False
    run: _Run | None = None
    submit_options: dict[str, Any] = field(default_factory=dict)
    stopped: BaseException | None = None
    lost: list[LostAttempt] = field(default_factory=list)


class _Core:
    """What every view of one runner shares: the client, the topic, the runs, the calls."""

    def __init__(self, client_or_address: Any, warm_pool: bool) -> None:
        self.client: Any = None if isinstance(client_or_address, str) else client_or_address
        self.address = client_or_address if isinstance(client_or_address, str) else None
        self.owns_client = self.client is None
        self.warm_pool = warm_pool
        #: ends every key of the runner, so the scheduler knows its topic from a key alone
        self.id = uuid.uuid4().hex
        self.topic = f"cancelflow-{self.id}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.starting: asyncio.Task[None] | None = None
        self.closed = False
        self.calls: dict[str, _Call] = {}
        self.runs: dict[int, _Run] = {}
        self.background: set[asyncio.Task[Any]] = set()
        self.driving: set[asyncio.Task[Any]] = set()
        #: calls still running when aclose()'s timeout passed, since the runner was made
        self.abandoned_calls = 0
        self.lost_attempts: collections.deque[LostAttempt] = collections.deque(maxlen=_LOST_KEPT)
        if self.client is not None:
            self.loop = self.client.loop.asyncio_loop

    # -- the client's loop -------------------------------------------------------------------
    async def on_loop(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await ``coro`` on the client's loop, from whatever loop the caller is on."""
        loop = self.loop
        assert loop is not None
        if loop is asyncio.get_running_loop():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def soon(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the client's loop (any thread; signal-safe enough)."""
        loop = self.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(callback, *args)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def ensure_started(self) -> None:
        if self.closed:
            raise PoolClosedError("the DaskRunner is closed")
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        lost = self.connection_error()  # a client of the caller's, closed before we start
        if lost is None:
            await self.on_loop(self._ensure_started())
            lost = self.connection_error()
        if lost is not None:
            raise lost

    async def _ensure_started(self) -> None:
        starting = self.starting
        if starting is not None and starting.done() and starting.exception() is not None:
            starting = None  # a failed start is not kept: the cluster may be fixed since
        if starting is None:
            starting = self.starting = asyncio.ensure_future(self._start())
        await shielded(starting)

    async def _start(self) -> None:
        import cloudpickle
        from distributed import Client

        from . import _dask_loader
        from ._dask_worker import (
            PLUGIN_NAME,
            CancelflowSchedulerPlugin,
            missing_scheduler_internals,
        )

        if self.client is None:
            self.client = await Client(  # type: ignore[no-untyped-call,unused-ignore]
                self.address, asynchronous=True
            )
        client = self.client
        await _check_installed(client)
        missing = await client.run_on_scheduler(missing_scheduler_internals)
        if missing:
            from importlib.metadata import version

            raise RuntimeError(
                f"DaskRunner cannot stop tasks on this scheduler: distributed "
                f"{version('distributed')} lacks {'; '.join(missing)}. cancelflow is tested "
                "with the versions its 'dask' extra allows (pip install 'cancelflow[dask]')."
            )
        client.subscribe_topic(self.topic, self._on_event)
        await client.register_plugin(CancelflowSchedulerPlugin(), name=PLUGIN_NAME)
        # By value: a worker that joins later without cancelflow still unpickles it, and
        # starts (refused the runner's tasks) instead of failing to start.
        cloudpickle.register_pickle_by_value(_dask_loader)
        loader = _dask_loader.PluginLoader(__version__, self.warm_pool)
        await client.register_plugin(loader, name=PLUGIN_NAME)

    async def aclose(self, timeout: float | None) -> None:
        self.closed = True
        if self.loop is None or self.starting is None:
            return
        await self.on_loop(self._close(timeout))

    async def wait_for_calls(self, timeout: float | None = None) -> int:
        """Return once every call made so far, and the background work behind it, is over,
        or ``timeout`` seconds have passed; the number of calls still running then."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        for tasks in (self.driving, self.background):
            while tasks:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                _, pending = await asyncio.wait(list(tasks), timeout=left)
                if pending and deadline is not None and deadline - loop.time() <= 0:
                    return len(self.driving)
        return 0

    async def _close(self, timeout: float | None) -> None:
        from ._dask_worker import forget_topic_on_scheduler

        running = await self.wait_for_calls(timeout)
        if running:
            self.abandoned_calls += running
            safe_log(
                "WARNING",
                f"DaskRunner closed with {running} call(s) still running after {timeout:g}s: "
                "abandoned (their callers get ClusterConnectionError once the client closes)",
                topic=self.topic,
            )
        client = self.client
        if client is None or client.status not in ("running", "connecting", "newly-created"):
            return
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(self.topic)
            await client.run_on_scheduler(forget_topic_on_scheduler, self.topic)
        if self.owns_client:
            await client.close()

    # -- events from the workers (client loop) -----------------------------------------------
    def _on_event(self, event: tuple[float, Any]) -> None:
        message = event[1]
        if not isinstance(message, dict):
            return
        call = self.calls.get(message.get("key", ""))
        if call is None:
            return
        op = message.get("op")
        if op == "ended":
            call.ended.set()
        elif op == "lost":
            self._attempt_lost(call, str(message.get("worker")))
        elif op == "stopped":
            # The worker stopped the node and its tree is gone: no need to wait for the
            # task's result to travel the scheduler and be gathered.
            from ._dask_child import load_value

            try:
                call.stopped = load_value(message["error"])
            except Exception:  # noqa: BLE001 - the task's result still brings it
                return
            call.wake.set()
        elif message.get("op") == "partial":
            from ._dask_child import load_value

            name = message["name"]
            try:
                value = load_value(message["value"])
            except Exception as exc:  # noqa: BLE001 - a bad value must not break the stream
                safe_log("ERROR", f"partial result {name!r} could not be loaded", exception=exc)
                return
            deliver_partial(call.partials, call.sink, name, value, key=call.key)

    def _attempt_lost(self, call: _Call, worker: str) -> None:
        """A worker left while running ``call``'s task; Dask will run it again."""
        lost = LostAttempt(call.key, len(call.lost) + 1, worker, call.partials)
        call.lost.append(lost)
        call.partials = {}
        self.lost_attempts.append(lost)
        safe_log(
            "WARNING",
            f"attempt {lost.attempt} of a Dask task was lost with its worker; Dask runs it "
            f"again (at-least-once); {len(lost.partial_results)} partial result(s) kept "
            "with the lost attempt",
            key=call.key,
            worker=worker,
        )
        report_lost_attempt(call.sink, lost.attempt, worker, lost.partial_results, key=call.key)

    # -- runs (client loop) ------------------------------------------------------------------
    def _join_run(self, call: _Call) -> None:
        token = call.run_token
        if token is None:
            return
        run = self.runs.get(id(token))
        if run is None:
            run = _Run(f"cancelflow-run-{uuid.uuid4().hex}", token)
            self.runs[id(token)] = run
            run.handle = token.on_cancel(lambda: self.soon(self._on_run_cancelled, run))
        run.active += 1
        run.keys.add(call.key)
        call.run = run
        call.spec["run"] = run.name

    def _leave_run(self, call: _Call) -> None:
        run = call.run
        if run is None:
            return
        run.active -= 1
        run.keys.discard(call.key)
        if run.active == 0:
            if self.runs.get(id(run.token)) is run:
                del self.runs[id(run.token)]
            if run.handle is not None:
                run.handle.remove()
            self.spawn(self._end_run(run))

    async def _end_run(self, run: _Run) -> None:
        from ._dask_worker import end_run_on_scheduler

        if run.cancelling is not None:
            with contextlib.suppress(Exception):
                await run.cancelling
        with contextlib.suppress(Exception):
            await self.client.run_on_scheduler(end_run_on_scheduler, run.name)

    def _on_run_cancelled(self, run: _Run) -> None:
        if run.cancelling is None and run.active > 0:
            run.cancelling = asyncio.ensure_future(self._cancel_run(run))
        for key in list(run.keys):
            call = self.calls.get(key)
            if call is not None:
                call.wake.set()

    async def _cancel_run(self, run: _Run) -> None:
        from ._dask_worker import cancel_run_on_scheduler

        reason = run.token.cancel_reason
        try:
            dropped = await self.client.run_on_scheduler(
                cancel_run_on_scheduler, run.name, reason, sorted(run.keys), self.client.id
            )
        except Exception as exc:  # noqa: BLE001 - each call's backstop still stops it
            safe_log("ERROR", "cancelling a run on Dask failed", exception=exc)
            return
        for key in dropped:
            call = self.calls.get(key)
            if call is not None:
                call.dropped = True
                call.wake.set()

    # -- one call (client loop) --------------------------------------------------------------
    async def drive(self, call: _Call) -> Any:
        from ._dask_worker import run_task

        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        if me is not None:
            self.driving.add(me)
        self.calls[call.key] = call
        self._join_run(call)
        handle = None
        if call.token is not None:
            handle = call.token.on_cancel(lambda: self.soon(call.wake.set))
        result: asyncio.Future[Any] | None = None
        future: Any = None
        try:
            future = self.client.submit(
                run_task, call.spec, key=call.key, pure=False, **call.submit_options
            )
            result = asyncio.ensure_future(self.client.gather(future))
            deadline: float | None = None
            signalled = False
            while not result.done():
                waker = asyncio.ensure_future(call.wake.wait())
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait(
                    (result, waker), timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                waker.cancel()
                if result.done():
                    break
                call.wake.clear()
                if call.stopped is not None:
                    raise self._stopped_from_worker(call, call.stopped)
                if deadline is not None and loop.time() >= deadline:
                    return await self._stop_hard(call, result)
                token = call.token
                # The awaiting coroutine cancelled (aborted) stops the task as a cancel of
                # its token does: asked first, forced after the grace period.
                stopping = call.aborted or (token is not None and token.is_cancelled)
                if call.dropped or not stopping or signalled:
                    continue
                signalled = True
                if call.mode == "process":  # the worker runs the ladder; this is a backstop
                    deadline = loop.time() + call.grace + call.term_grace + _BACKSTOP
                else:  # only asked: after its grace, the task is released
                    deadline = loop.time() + call.grace
                run_token = call.run_token
                if run_token is not None and run_token.is_cancelled:
                    continue  # the run's Event carries it to every worker
                await self._signal(call, self._reason(call))
            return self._outcome(call, result)
        finally:
            if handle is not None:
                handle.remove()
            if result is not None and not result.done():
                # Its end is near (the task ended or was released): let it settle, then
                # release the key. Cancelling a gather in flight upsets distributed.
                self.spawn(self._settle_late(result, future))
            else:
                if result is not None and not result.cancelled():
                    result.exception()  # retrieved: never logged as unhandled
                if future is not None:
                    future.release()  # the key goes now, not when the Future is collected
            self._leave_run(call)
            self.calls.pop(call.key, None)
            call.ended.set()
            if me is not None:
                self.driving.discard(me)

    async def _settle_late(self, result: asyncio.Future[Any], future: Any) -> None:
        done, _ = await asyncio.wait((result,), timeout=_ENDED_PATIENCE)
        if done:
            if not result.cancelled():
                result.exception()
        else:
            result.cancel()
        if future is not None:
            future.release()

    def _stopped_from_worker(self, call: _Call, error: BaseException) -> BaseException:
        if isinstance(error, (CancelledException, MemoryLimitError)):
            for name, item in call.partials.items():
                error.partial_results.setdefault(name, item)
        return error

    async def _signal(self, call: _Call, reason: str | None) -> None:
        from ._dask_worker import stop_task_on_scheduler

        client = self.client
        try:
            outcome, _ = await client.run_on_scheduler(
                stop_task_on_scheduler, call.key, client.id, reason, self.topic, False
            )
        except Exception as exc:  # noqa: BLE001 - the backstop still stops it
            safe_log("ERROR", "signalling a Dask task failed", exception=exc, key=call.key)
            return
        if outcome == "dropped":
            call.dropped = True

    async def _stop_hard(self, call: _Call, result: asyncio.Future[Any]) -> Any:
        """Release the task at the scheduler, have its worker kill it, wait until it is gone."""
        from ._dask_worker import stop_task_on_scheduler

        client = self.client
        reason = self._reason(call)
        outcome, worker = await client.run_on_scheduler(
            stop_task_on_scheduler, call.key, client.id, reason, self.topic, True
        )
        # The scheduler reports the release (or the end) to this client at once.
        await asyncio.wait((result,), timeout=_ENDED_PATIENCE)
        if outcome in ("memory", "erred") and result.done() and not call.aborted:
            return self._outcome(call, result)
        if outcome == "doomed":
            patience = _ENDED_PATIENCE if call.mode == "process" else call.term_grace
            if not await self._await_ended(call, worker, patience):
                safe_log(
                    "WARNING",
                    f"Dask task not confirmed gone after {patience:g}s"
                    + ("" if call.mode == "process" else " (a thread node ignores its token)"),
                    key=call.key,
                    worker=worker,
                )
        raise self._stopped_error(call)

    async def _await_ended(self, call: _Call, worker: str | None, patience: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call.ended.wait(), min(remaining, 1.0))
                return True
            if worker is not None:
                with contextlib.suppress(Exception):
                    identity = await self.client.scheduler.identity()
                    if worker not in identity.get("workers", {}):
                        return True  # it died: its children die with it (zygote EOF, PDEATHSIG)

    def _reason(self, call: _Call) -> str | None:
        if call.token is not None and call.token.is_cancelled:
            return call.token.cancel_reason
        if call.run_token is not None and call.run_token.is_cancelled:
            return call.run_token.cancel_reason
        if call.aborted:
            return "the task awaiting the node was cancelled"
        return None

    def connection_error(
        self, call: _Call | None = None, error: BaseException | None = None
    ) -> ClusterConnectionError | None:
        """The error for a call that cannot reach the cluster, or ``None`` if it can.

        The client was closed (by its owner, or by the runner), or it lost the scheduler
        (Dask then cancels every future with reason ``scheduler-connection-lost`` and tries
        to reconnect). ``error``: what Dask raised for ``call``, if anything.
        """
        client = self.client
        status = getattr(client, "status", "running")
        reason = getattr(error, "reason", None)
        if status == "running" and reason != "scheduler-connection-lost":
            return None
        where = self.address or getattr(getattr(client, "scheduler", None), "address", None)
        what = (
            "the connection to the Dask scheduler was lost"
            if reason == "scheduler-connection-lost" or status == "connecting"
            else f"the Dask client is {status}"
        )
        if call is None:
            return ClusterConnectionError(f"{what} ({where}); no new call is sent")
        return ClusterConnectionError(
            f"{what} ({where}) while {call.key} ran; whether it ran to its end is unknown",
            call.partials,
        )

    def _stopped_error(self, call: _Call) -> CancelledException:
        reason = self._reason(call)
        return CancelledException(
            f"task cancelled: {reason}" if reason else "task cancelled",
            call.partials,
            reason=reason,
        )

    def _outcome(self, call: _Call, result: asyncio.Future[Any]) -> Any:
        from distributed.client import FutureCancelledError
        from distributed.scheduler import KilledWorker

        error = result.exception()
        if error is None:
            kind, value = result.result()
            if kind == "ok":
                return value
            raise self._stopped_from_worker(call, value)  # "stopped" or "failed"
        if isinstance(error, FutureCancelledError):
            if call.dropped or self._reason(call) is not None:
                raise self._stopped_error(call) from None
            lost = self.connection_error(call, error)
            if lost is not None:
                raise lost from error
            raise CancelledException(
                "the Dask task was cancelled outside cancelflow", call.partials
            ) from error
        if isinstance(error, (OSError, asyncio.CancelledError, concurrent.futures.CancelledError)):
            # How a closing client or a lost scheduler shows (CommClosedError is an OSError);
            # a node's own error is never taken for it.
            lost = self.connection_error(call, error)
            if lost is not None:
                raise lost from error
        if isinstance(error, KilledWorker):
            raise WorkerCrashedError(
                f"the Dask worker running {call.key} died ({error})"
            ) from error
        raise error


class DaskRunner:
    """Runs callables (pipeline nodes) on a Dask ``distributed`` cluster, stoppably.

    It has the awaitable interface of cancelflow's pools (:meth:`run_sync`), so a
    :class:`PipelineExecutor` can run its nodes on Dask: pass it as ``process_pool`` (and
    ``runner.with_run_in("thread")`` as ``thread_pool``). Where a call runs on the worker
    depends on ``run_in``:

    * ``"process"``: in a child of a warm per-worker pool (one child per Dask thread),
      supervised by the Dask task. Stopping it really stops it: its token is set, then
      after ``grace_period`` SIGTERM (which becomes an exception in the node, so its
      ``finally`` blocks run), then after ``term_grace_period`` SIGKILL of the child and
      its whole process tree. Cancelling the Dask future itself (``future.cancel()``,
      ``client.cancel``) kills the tree at once. The worker keeps its other tasks and
      data; the pool replaces the killed child in a few milliseconds.
    * ``"thread"``: in the Dask worker thread, **cooperatively**: a cancel sets
      ``ctx.token`` and the node must return (or raise) by itself. Dask cannot stop a
      thread; one that ignores its token keeps its Dask thread busy until it returns.
    * ``"loop"`` (coroutine functions, chosen automatically for them): ``asyncio.run``
      in the Dask worker thread, cancelled at its next ``await``; cooperative as well.

    The token on Dask: all calls whose tokens share one *run token* (a token's parent,
    for the node tokens that :class:`PipelineExecutor` makes with ``.child()``, or the
    ``run_token=`` argument) form one run, with one ``distributed.Event``. Each worker
    watches it with a single long-poll and sets a local token, so ``ctx.token.is_cancelled``
    in a node is a local memory read, never a scheduler round trip. Cancelling the run
    sets the Event (and its reason) in one step on the scheduler, which also messages the
    workers of the run's running tasks directly (faster than the watchers, which first
    fetch the reason) and drops the run's tasks that have not reached a worker; the Event
    catches every task of the run that starts later. The Event is cleared when the run's
    last call ends. A token cancelled on its own (not its run) reaches its task the same
    way, as a message to that task's worker.

    Partial results stored by a node reach ``partial_sink`` in this process as Dask worker
    events on the runner's own topic, before the call returns or raises, also when the
    node is killed. They pass through the scheduler's event log (``log_event``), which
    keeps the last ``distributed.admin.low-level-log-length`` events of a topic until the
    runner closes: keep partial values small (ids, counts, paths).

    Dask settings to know: a process node needs cloudpickle-able arguments and result;
    functions and classes from ``__main__`` work. The runner starts its children with
    ``subprocess`` (not ``multiprocessing``), so it works with Dask's default daemonic
    workers; a *thread* node that itself starts ``multiprocessing`` children needs
    ``distributed.worker.daemon: False``. If a worker dies while it runs a node, Dask
    re-runs the task elsewhere up to ``distributed.scheduler.allowed-failures`` times (at
    least once semantics); past that, or with ``allowed-failures: 0``, the call raises
    :class:`WorkerCrashedError`. Timeouts are measured on the worker, from the node's start.

    Args:
        client_or_address: a ``distributed.Client`` (synchronous or asynchronous; it is
            used, never closed) or a scheduler address (the runner opens its own
            asynchronous client on the first call's event loop and closes it in
            :meth:`aclose`).
        grace_period: default seconds between a node's token and SIGTERM (process
            nodes), or before the runner stops waiting for a thread node.
        term_grace_period: default seconds between SIGTERM and SIGKILL (0: SIGKILL right
            after the grace period).
        run_in: where calls run by default: ``"process"``, ``"thread"`` or ``"loop"``.
        warm_pool: start each worker's process pool as soon as the runner registers its
            worker plugin (otherwise at the worker's first process node).
        submit_options: extra keyword arguments for every ``client.submit`` (e.g.
            ``workers``, ``resources``, ``priority``); not ``key`` or ``pure``.

    Raises:
        TypeError / ValueError: for a bad argument (nothing is contacted).
    """

    def __init__(
        self,
        client_or_address: Any,
        *,
        grace_period: float = 0.1,
        term_grace_period: float = 1.0,
        run_in: str = "process",
        warm_pool: bool = True,
        submit_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(client_or_address, str) and not hasattr(client_or_address, "submit"):
            raise TypeError(
                "client_or_address must be a distributed.Client or a scheduler address, "
                f"not {type(client_or_address).__name__}"
            )
        self._grace = _seconds(grace_period, "grace_period")
        self._term_grace = _seconds(term_grace_period, "term_grace_period")
        self._run_in = _check_run_in(run_in)
        options = dict(submit_options or {})
        reserved = {"key", "pure"} & set(options)
        if reserved:
            raise ValueError(f"submit_options may not set {sorted(reserved)}: the runner does")
        self._submit_options = options
        self._core = _Core(client_or_address, bool(warm_pool))

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` in use (``None`` until an address is connected)."""
        return self._core.client

    @property
    def run_in(self) -> str:
        """Where calls run unless ``run_sync(run_in=...)`` says otherwise."""
        return self._run_in

    def with_run_in(self, run_in: str) -> DaskRunner:
        """A view of this runner (same client, runs and plugin) with another default
        ``run_in``; closing either closes both."""
        view = copy.copy(self)
        view._run_in = _check_run_in(run_in)
        return view

    async def start(self) -> None:
        """Connect (for an address), register the worker plugin and subscribe to the
        runner's topic. Optional: the first :meth:`run_sync` does it.

        Raises:
            PoolClosedError: the runner was closed.
        """
        await self._core.ensure_started()

    async def run_sync(
        self,
        fn: Callable[..., Any],
        *args: Any,
        token: CancellationToken | None = None,
        timeout: float | None = None,
        grace_period: float | None = None,
        term_grace_period: float | None = None,
        partial_sink: PartialSink | None = None,
        run_in: str | None = None,
        run_token: CancellationToken | None = None,
    ) -> Any:
        """Run ``fn(*args)`` on a Dask worker and return its result.

        Behaves like ``fn(*args)`` except that it runs on the cluster (see the class for
        where). ``fn`` and ``args`` are pickled here with cloudpickle, so an unpicklable
        one raises ``TypeError`` before anything is sent. A :class:`NodeContext` in
        ``args`` is rebuilt on the worker with the task's own token and partial-result
        sink; ``token`` itself may appear in ``args`` and arrives as that token.

        If cancelled: ``token`` is checked on entry (an already-cancelled token raises
        :class:`CancelledException` and submits nothing). Cancelling it while the task
        waits in the scheduler drops the task; while it runs, sets its token on the worker
        and (process nodes) runs the ladder there: ``grace_period``, SIGTERM,
        ``term_grace_period``, SIGKILL of the child's process tree. The call raises
        :class:`CancelledException` once the child's tree is confirmed gone, with every
        partial result the node stored (they were also given to ``partial_sink``). A
        thread or loop node is only asked; if it has not ended ``grace_period`` seconds
        after the cancel, its Dask task is released, the call waits ``term_grace_period``
        more for the thread to return, then raises anyway (the thread, which Dask cannot
        stop, runs on until it returns). If the awaiting asyncio task is cancelled, the
        node is stopped as for a cancel of ``token`` (asked, then forced as above), and
        ``asyncio.CancelledError`` propagates once that stop is complete. Nothing of the call is left on the
        scheduler: its key is released when the call ends.

        Args:
            fn: a callable; coroutine functions run with ``asyncio.run`` on the worker.
            token: cancelling it stops the task.
            timeout: seconds the task may run on its worker before it is stopped the
                same way (raises :class:`PipelineTimeoutException`).
            grace_period: override the runner's grace period for this call.
            term_grace_period: override the runner's SIGTERM grace for this call.
            partial_sink: called as ``sink(key, value)`` for each ``store_partial`` of
                the node, on the client's event-loop thread; must be quick and
                thread-safe.
            run_in: ``"process"``, ``"thread"`` or ``"loop"`` (default: the runner's).
            run_token: the run this call belongs to (default: ``token``'s parent if it
                has exactly one, else ``token``); see the class.

        Returns:
            What ``fn`` returned, as cloudpickle carried it back.

        Raises:
            CancelledException: ``token`` (or its run) was cancelled, or the Dask task was
                cancelled from outside.
            PipelineTimeoutException: ``timeout`` passed.
            WorkerCrashedError: the node's child process died by itself, or the Dask
                worker died and Dask gave up re-running the task.
            PoolClosedError: the runner was closed.
            TypeError / ValueError: a bad argument, or ``fn``/``args`` cannot be pickled.
            Exception: whatever ``fn`` raised.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        if token is not None and not isinstance(token, CancellationToken):
            raise TypeError(f"token must be a CancellationToken, not {type(token).__name__}")
        if run_token is not None and not isinstance(run_token, CancellationToken):
            raise TypeError(
                f"run_token must be a CancellationToken, not {type(run_token).__name__}"
            )
        if timeout is not None:
            timeout = _seconds(timeout, "timeout", positive=True)
        grace = self._grace if grace_period is None else _seconds(grace_period, "grace_period")
        term_grace = (
            self._term_grace
            if term_grace_period is None
            else _seconds(term_grace_period, "term_grace_period")
        )
        if partial_sink is not None and not callable(partial_sink):
            raise TypeError("partial_sink must be callable")
        mode = _check_run_in(run_in) if run_in is not None else self._run_in
        if inspect.iscoroutinefunction(fn):
            mode = "loop"
        elif mode == "loop":
            mode = "thread"
        if token is not None and token.is_cancelled:
            reason = token.cancel_reason
            raise CancelledException(reason or "operation cancelled", reason=reason)
        if self._core.closed:
            raise PoolClosedError("the DaskRunner is closed")
        from ._dask_child import dump_payload

        payload = dump_payload(fn, args, {}, token)
        if run_token is None and token is not None:
            run_token = _run_token_of(token)
        label = args[0].node_id if args and isinstance(args[0], NodeContext) else _name_of(fn)
        key = f"cancelflow-{_slug(label)}-{uuid.uuid4().hex}-{self._core.id}"
        spec = {
            "key": key,
            "mode": mode,
            "payload": payload,
            "run": None,
            "topic": self._core.topic,
            "timeout": timeout,
            "grace": grace,
            "term_grace": term_grace,
            "partials": partial_sink is not None,
        }
        core = self._core
        await core.ensure_started()
        call = await core.on_loop(
            _make_call(key, mode, spec, token, run_token, partial_sink, grace, term_grace, timeout)
        )
        call.submit_options = self._submit_options
        driving: asyncio.Future[Any]
        if core.loop is asyncio.get_running_loop():
            driving = asyncio.ensure_future(core.drive(call))
        else:
            assert core.loop is not None
            driving = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(core.drive(call), core.loop)
            )
        try:
            return await shielded(driving)
        except asyncio.CancelledError:
            if driving.done():
                raise
            call.aborted = True
            core.soon(call.wake.set)
            while not driving.done():
                with contextlib.suppress(BaseException):
                    await until_done(driving)
            raise

    async def aclose(self, timeout: float | None = 30.0) -> None:
        """Refuse new calls, wait for running ones, drop the runner's topic on the
        scheduler, and close the client if the runner opened it. Idempotent. The worker
        plugin stays registered (other runners may use it); Dask closes it with its workers.

        The wait is bounded by ``timeout`` seconds (``None``: no bound): calls still running
        then (a thread node that ignores its token, a long node nobody cancelled) are
        abandoned — logged as a warning and counted in :attr:`abandoned_calls` — and the
        closing goes on. An abandoned call's caller gets
        :class:`~cancelflow.ClusterConnectionError` once the client is closed; with a
        client of your own, it runs on until the cluster ends it. ``async with`` uses the
        default.

        Raises:
            TypeError, ValueError: ``timeout`` is not a number of seconds >= 0 or ``None``.
        """
        seconds = check_optional_seconds(timeout, "timeout")
        await self._core.aclose(seconds)

    @property
    def abandoned_calls(self) -> int:
        """Calls that were still running when :meth:`aclose`'s timeout passed."""
        return self._core.abandoned_calls

    @property
    def lost_attempts(self) -> list[LostAttempt]:
        """The runs of nodes that Dask gave up because their worker left (the latest
        100, oldest first). Dask runs such a node again elsewhere: a Dask task runs *at
        least* once. Each lost attempt is also logged as a warning, and a pipeline keeps
        its partial results apart (see ``PipelineResult.node_attempts``). For at most once,
        set ``distributed.scheduler.allowed-failures`` to 0 on the scheduler: the call
        then fails with :class:`~cancelflow.WorkerCrashedError` instead (a worker retired
        on purpose still hands its tasks on)."""
        return list(self._core.lost_attempts)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with ``wait``, return once every call already made is over
        (the synchronous half of :meth:`aclose`, for the pool protocol).

        Running calls go on (cancel their tokens to stop them); their tasks' partial
        results have all reached their sinks when this returns. It blocks: call it from
        a thread other than the event loop the runner's calls are driven on (or await
        :meth:`aclose`, which also releases the client). ``cancel_futures`` changes
        nothing: a call is sent to the scheduler as soon as it is made.

        Raises:
            RuntimeError: ``wait`` asked on the thread of the loop that drives the calls
                (it would wait for itself); the runner is closed all the same.
        """
        core = self._core
        core.closed = True
        loop = core.loop
        if not wait or loop is None or not loop.is_running():
            return  # no loop runs: no call is being driven
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError(
                "DaskRunner.shutdown(wait=True) cannot wait on the loop that drives its "
                "calls: await runner.aclose(), or call shutdown from another thread"
            )
        asyncio.run_coroutine_threadsafe(core.wait_for_calls(), loop).result()

    async def __aenter__(self) -> DaskRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        target = self._core.address or self._core.client
        return f"<DaskRunner {target!r} run_in={self._run_in}>"


async def _check_installed(client: Any) -> None:
    """Refuse a cluster whose scheduler or workers cannot import this version of
    cancelflow, naming each: the scheduler runs the runner's stop requests, the workers
    the plugin and the nodes. Asked with :func:`pkgutil.resolve_name`, which a process
    without cancelflow can run (it then fails to import it)."""
    mine = __version__
    name = "cancelflow._version:__version__"
    problems = []
    try:
        theirs = await client.run_on_scheduler(pkgutil.resolve_name, name)
    except Exception as exc:  # noqa: BLE001 - reported below, with the others
        theirs = exc
    problems += _version_problem("the scheduler", theirs, mine)
    found = await client.run(pkgutil.resolve_name, name, on_error="return")
    for address, version in sorted(found.items()):
        problems += _version_problem(f"worker {address}", version, mine)
    if problems:
        raise RuntimeError(
            f"DaskRunner needs cancelflow {mine} on the scheduler and on every worker: "
            + "; ".join(problems)
        )


def _version_problem(who: str, found: object, mine: str) -> list[str]:
    if isinstance(found, BaseException):
        return [f"{who} cannot import cancelflow ({type(found).__name__}: {found})"]
    if found != mine:
        return [f"{who} has cancelflow {found}"]
    return []


async def _make_call(
    key: str,
    mode: str,
    spec: dict[str, Any],
    token: CancellationToken | None,
    run_token: CancellationToken | None,
    sink: PartialSink | None,
    grace: float,
    term_grace: float,
    timeout: float | None,
) -> _Call:
    # Made on the client's loop: its asyncio.Events belong there.
    return _Call(key, mode, spec, token, run_token, sink, grace, term_grace, timeout)


def _run_token_of(token: CancellationToken) -> CancellationToken:
    """The token's run: its one parent (a ``parent.child()`` token), else itself."""
    parents = [getattr(link, "_token", None) for link in getattr(token, "_links", ())]
    if len(parents) == 1 and isinstance(parents[0], CancellationToken):
        return parents[0]
    return token


def _name_of(fn: Callable[..., Any]) -> str:
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)[:40] or "task"


def _check_run_in(run_in: object) -> str:
    if run_in not in _RUN_IN:
        raise ValueError(f"run_in must be one of {_RUN_IN}, got {run_in!r}")
    return str(run_in)
