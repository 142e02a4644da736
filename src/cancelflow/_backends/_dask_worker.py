"""The worker and scheduler side of cancelflow's Dask backend.

Imported only where ``distributed`` is installed: by :class:`~cancelflow.DaskRunner` in
the client, and by Dask itself on the workers (to unpickle the plugin) and on the
scheduler (to run the few functions the runner sends there).

On each worker, :class:`CancelflowWorkerPlugin` keeps:

* a warm :class:`~cancelflow.ProcessPool` with one child per Dask thread, in which
  ``run_in="process"`` nodes run. The Dask task supervises its child and blocks on it; a
  killed child is replaced by the pool (a fork of its zygote, a few ms). Children exit by
  themselves when their worker dies: the pool's zygote sees its channel to the worker hit
  end-of-file (also on SIGKILL) and kills every child tree; children have
  ``PR_SET_PDEATHSIG`` tied to the zygote;
* the executing tasks of cancelflow (keys starting ``cancelflow-``), each with a local
  :class:`~cancelflow.CancellationToken`, so ``ctx.token.is_cancelled`` in a node is a
  local read;
* one watcher per run (a long-poll on the run's ``distributed.Event``, through the
  worker's own connection to the scheduler), which cancels the run's local token when the
  client sets the event.

Hard cancel: when the scheduler releases one of our executing tasks (``future.cancel()``,
``client.cancel``, or the runner's own stop), the worker's state machine moves it from
``executing`` to ``cancelled`` and :meth:`CancelflowWorkerPlugin.transition` freezes and
SIGKILLs the child that runs it with its whole process tree, at once. The Dask thread then
returns (once every process of the tree is confirmed gone), the worker forgets the task,
and keeps its other tasks and data. The release comes first, so the scheduler never runs
the task again. The runner's own stops also reach the plugin as direct calls from the
scheduler to the worker handler ``"cancelflow"`` (``signal``: set the task's token;
``doom``: kill now, and publish ``ended`` once the worker has forgotten the task), which
avoids the batching delay of the scheduler's stream to the worker.

What goes back to the client travels as worker events (``log_event``) on the runner's
topic, in one ordered stream: ``partial`` (a stored partial result), ``stopped`` (the
node was stopped and nothing of it is left; carries the error) and ``ended`` (a task the
runner stopped has left the worker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dask.config
from distributed import SchedulerPlugin, WorkerPlugin, get_worker
from tornado.ioloop import PeriodicCallback

from .._context import task_scope
from .._exceptions import (
    CancelledException,
    MemoryLimitError,
    PipelineTimeoutException,
    WorkerCrashedError,
)
from .._fate import Fate
from .._platform import descendants, private_memory, proportional_memory
from .._process import ProcessPool, TaskFuture
from .._token import CancellationToken
from .._version import __version__
from . import _dask_child

__all__ = (
    "KEY_PREFIX",
    "PLUGIN_NAME",
    "RESOURCE",
    "CancelflowSchedulerPlugin",
    "CancelflowWorkerPlugin",
    "cancel_run_on_scheduler",
    "end_run_on_scheduler",
    "forget_topic_on_scheduler",
    "run_task",
    "stop_task_on_scheduler",
    "topic_of",
)

PLUGIN_NAME = "cancelflow"
KEY_PREFIX = "cancelflow-"
#: The worker handler (an RPC the scheduler calls directly: no batching delay).
HANDLER = "cancelflow"
#: Scheduler metadata path under which a run's cancel reason is kept while it runs.
REASON_PATH = "cancelflow-run-reason"
#: Seconds one long-poll of a run's Event may block on the scheduler before it is renewed.
LONG_POLL = 10.0
#: The Dask resource a worker offers once this version's plugin runs there. While some
#: worker does not, the runner's tasks ask for one unit of it (see
#: :class:`CancelflowSchedulerPlugin`), so none is sent to a worker that lacks cancelflow
#: (or has another version): such a worker is refused the runner's tasks, not poisoned.
RESOURCE = f"cancelflow-{__version__}"
#: How much of it each worker offers: never the limit on how many tasks run there.
RESOURCE_SUPPLY = 1_000_000_000
#: The share of the memory cap past which the quick estimate is checked exactly.
_SCREEN = 0.8


def topic_of(key: str) -> str:
    """The topic of the runner that made ``key`` (keys end with the runner's id)."""
    return KEY_PREFIX + key.rsplit("-", 1)[-1]


@dataclass(eq=False)
class _Remote:
    """One executing cancelflow task on this worker."""

    key: str
    mode: str
    token: CancellationToken
    run: _RunWatch | None
    pool_future: TaskFuture | None = None  # once submitted
    killed: bool = False
    kill_reason: str | None = None
    memory_error: MemoryLimitError | None = None  # killed for taking the worker past its limit
    timed_out: bool = False
    grace: float = 0.0
    term_grace: float = 0.0
    partials: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class _RunWatch:
    """A run seen on this worker: its local token and the tasks of it running here."""

    name: str
    token: CancellationToken
    active: int = 0


class CancelflowWorkerPlugin(WorkerPlugin):  # type: ignore[misc,unused-ignore]
    """Runs cancelflow tasks on a Dask worker and kills their process tree on cancel.

    Registered by :class:`~cancelflow.DaskRunner` (idempotently, under the name
    ``"cancelflow"``). Keeps a warm process pool of ``nthreads`` children.

    Args:
        warm: start the process pool when the plugin is set up (otherwise at the first
            process node on the worker).
    """

    idempotent = True
    name = PLUGIN_NAME

    def __init__(self, *, warm: bool = True) -> None:
        self.warm = warm

    # -- lifecycle (worker event loop) ------------------------------------------------------
    async def setup(self, worker: Any) -> None:
        self.worker = worker
        self.lock = threading.Lock()
        self.tasks: dict[str, _Remote] = {}
        self.runs: dict[str, _RunWatch] = {}
        self.presignalled: dict[str, str | None] = {}
        self.doomed: dict[str, str] = {}  # key -> topic to tell when it is gone
        self.pool: ProcessPool | None = None
        self.closing = False
        self.memory_watch: PeriodicCallback | None = None
        worker.handlers[HANDLER] = self._on_message
        if self.warm:
            self._get_pool()
        self._watch_memory()
        # Last: only now may the scheduler send the runner's tasks here.
        await worker.set_resources(**{RESOURCE: RESOURCE_SUPPLY})

    def teardown(self, worker: Any) -> None:
        worker.handlers.pop(HANDLER, None)
        if self.memory_watch is not None:
            self.memory_watch.stop()
        with self.lock:
            self.closing = True
            pool, self.pool = self.pool, None
            remotes = list(self.tasks.values())
            runs = list(self.runs.values())
        for remote in remotes:
            remote.token.cancel("the Dask worker is closing")
        for run in runs:
            run.token.cancel("the Dask worker is closing")
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)

    def _get_pool(self) -> ProcessPool:
        with self.lock:
            if self.closing:
                raise RuntimeError("the Dask worker is closing")
            if self.pool is None:
                self.pool = ProcessPool(
                    max_workers=max(1, int(self.worker.state.nthreads)),
                    name=f"dask-{self.worker.name}",
                )
            return self.pool

    # -- hooks (worker event loop) ---------------------------------------------------------
    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
            return
        if start == "executing" and finish in ("released", "cancelled", "forgotten"):
            with self.lock:
                remote = self.tasks.get(key)
            if remote is not None:
                self._stop_now(remote, "the Dask task was cancelled")
        if finish == "forgotten":
            with self.lock:
                self.presignalled.pop(key, None)
                topic = self.doomed.pop(key, None)
            if topic is not None:
                self._emit(topic, {"op": "ended", "key": key})

    def _on_message(
        self, action: str = "", key: str = "", reason: str | None = None, topic: str = ""
    ) -> bool:
        """A message the runner sent through the scheduler (see the ``*_on_scheduler``)."""
        if action == "signal":
            with self.lock:
                remote = self.tasks.get(key)
                if remote is None:
                    self.presignalled[key] = reason
            if remote is not None:
                remote.token.cancel(reason)  # the pool's ladder starts (process nodes)
                if remote.mode == "process" and remote.grace == 0 and remote.term_grace == 0:
                    # No grace to give: kill from here, without waiting for the pool's
                    # thread to get the GIL from this busy event loop.
                    self._stop_now(remote, reason)
        elif action == "doom":
            with self.lock:
                remote = self.tasks.get(key)
                known = key in self.worker.state.tasks
                if known:
                    self.doomed[key] = topic
            if remote is not None:
                self._stop_now(remote, reason)
            if not known:  # already forgotten here: nothing of it runs
                self._emit(topic, {"op": "ended", "key": key})
        return True

    def _emit(self, topic: str, message: dict[str, Any]) -> None:
        # Always through the loop's callback queue, in order with messages sent from the
        # pool's thread: a partial result is never overtaken by the "ended" that follows it.
        with contextlib.suppress(Exception):
            self.worker.loop.add_callback(self.worker.log_event, topic, message)

    # -- stopping ------------------------------------------------------------------------
    def _stop_now(self, remote: _Remote, reason: str | None) -> None:
        """Stop a task at once: kill its child's whole tree (process mode), or set its
        token (thread and loop modes, which can only be asked)."""
        with self.lock:
            first = not remote.killed
            remote.killed = True
            if remote.kill_reason is None:
                remote.kill_reason = reason
            future = remote.pool_future
        remote.token.cancel(reason)
        if first and future is not None:
            self._kill_child(remote, future)

    def _kill_child(self, remote: _Remote, future: TaskFuture) -> None:
        """Kill the child's whole tree now (the pool's one kill path, no grace): the
        future settles once the child and every process of its tree are gone."""
        future.kill(remote.kill_reason)

    # -- memory (worker event loop) --------------------------------------------------------
    def _watch_memory(self) -> None:
        """Count the processes of the worker's pool against its memory limit.

        Dask's monitors (the worker's and the nanny's) measure the worker process alone;
        a process node's memory is in its child. Every ``monitor-interval`` while a
        process node runs, this adds the memory of every process of the pool (pages
        shared between the zygote and its forks counted once) to the worker's resident
        set; past ``memory_limit`` times the fraction
        ``distributed.worker.memory.terminate`` (the limit itself when that is off), the
        running node whose tree holds the most is killed with its whole tree
        (:class:`~cancelflow.MemoryLimitError`, fate ``killed``). The worker, its other
        tasks and its data stay.
        """
        limit = getattr(getattr(self.worker, "memory_manager", None), "memory_limit", None)
        if not limit:
            return
        fraction = dask.config.get("distributed.worker.memory.terminate", 0.95)
        interval = dask.config.get("distributed.worker.memory.monitor-interval", "100ms")
        from dask.utils import parse_timedelta

        self.memory_limit = int(limit)
        self.memory_cap = int(limit * fraction) if fraction else int(limit)
        seconds = parse_timedelta(interval, default="ms") or 0.1
        self.memory_watch = PeriodicCallback(self._check_memory, seconds * 1000)
        self.memory_watch.start()

    def _check_memory(self) -> None:
        with self.lock:
            running = [r for r in self.tasks.values() if r.pool_future is not None and not r.killed]
            pool = self.pool
        if not running or pool is None:
            return
        zygote = pool.statistics().zygote_pid
        if not zygote:
            return
        group = [zygote, *descendants(zygote)]
        worker_memory = self.worker.monitor.get_process_memory()
        # The quick estimate counts the forks' shared pages once per fork (too high):
        # only near the cap is the exact split worth its cost.
        if worker_memory + private_memory(group) <= self.memory_cap * _SCREEN:
            return
        used = worker_memory + proportional_memory(group)
        if used <= self.memory_cap:
            return
        trees: list[tuple[int, _Remote]] = []
        for remote in running:
            pid = remote.pool_future.pid if remote.pool_future is not None else None
            if pid:
                trees.append((proportional_memory([pid, *descendants(pid)]), remote))
        if not trees:
            return
        tree_memory, victim = max(trees, key=lambda item: item[0])
        mib = 1 << 20
        reason = (
            f"memory: the node's processes held {tree_memory / mib:.0f} MiB; with the Dask "
            f"worker ({worker_memory / mib:.0f} MiB) and its pool, {used / mib:.0f} MiB passed "
            f"{self.memory_cap / mib:.0f} MiB (the worker's memory_limit of "
            f"{self.memory_limit / mib:.0f} MiB times distributed.worker.memory.terminate)"
        )
        victim.memory_error = MemoryLimitError(
            f"node tree killed: {reason}", reason=reason, used=tree_memory, limit=self.memory_cap
        )
        self._stop_now(victim, reason)

    # -- runs ----------------------------------------------------------------------------
    def _join_run(self, name: str) -> _RunWatch:
        with self.lock:
            run = self.runs.get(name)
            new = run is None
            if run is None:
                run = self.runs[name] = _RunWatch(name, CancellationToken(name=f"dask-run-{name}"))
            run.active += 1
        if new:
            self.worker.loop.add_callback(self._watch, run)
        return run

    def _leave_run(self, run: _RunWatch) -> None:
        with self.lock:
            run.active -= 1
            if run.active == 0 and self.runs.get(run.name) is run:
                del self.runs[run.name]

    async def _watch(self, run: _RunWatch) -> None:
        """The run's one long-poll on this worker: its Event set -> its local token cancelled."""
        scheduler = self.worker.scheduler
        while run.active > 0 and not run.token.is_cancelled:
            try:
                fired = await scheduler.event_wait(name=run.name, timeout=LONG_POLL)
                if not fired or run.active <= 0:
                    continue
                reason = await scheduler.get_metadata(keys=[REASON_PATH, run.name], default=None)
            except Exception:  # noqa: BLE001 - the worker or scheduler is closing
                return
            run.token.cancel(reason if isinstance(reason, str) else "the run was cancelled")
            return

    # -- running (a Dask worker thread) --------------------------------------------------
    def execute(self, spec: dict[str, Any]) -> Any:
        key: str = spec["key"]
        run = self._join_run(spec["run"]) if spec.get("run") else None
        token = run.token.child(name=key) if run is not None else CancellationToken(name=key)
        remote = _Remote(
            key, spec["mode"], token, run, grace=spec["grace"], term_grace=spec["term_grace"]
        )
        with self.lock:
            self.tasks[key] = remote
            presignalled = key in self.presignalled
            reason = self.presignalled.pop(key, None)
        timeout_token: CancellationToken | None = None
        stopped: CancelledException | None = None
        try:
            if presignalled:
                token.cancel(reason)
            if token.is_cancelled:
                raise _cancelled(token.cancel_reason, {})
            topic: str = spec["topic"]

            def sink(name: str, value: Any) -> None:
                remote.partials[name] = value
                if spec["partials"]:
                    blob = _dask_child.dump_value(value)
                    self._emit(topic, {"op": "partial", "key": key, "name": name, "value": blob})

            if remote.mode == "process":
                return self._run_in_child(remote, spec, sink)
            timeout = spec.get("timeout")
            if timeout is not None:
                timeout_token = CancellationToken(timeout=timeout, name=f"{key}-timeout")

                def on_timeout() -> None:
                    remote.timed_out = True
                    token.cancel(f"timeout after {timeout:g}s")

                timeout_token.on_cancel(on_timeout)
            return self._run_here(remote, spec, sink)
        except CancelledException as exc:
            ours = token.is_cancelled or remote.killed or remote.timed_out
            if isinstance(exc, PipelineTimeoutException) and exc.timeout == spec.get("timeout"):
                ours = True
            if ours:
                stopped = exc
                raise _Stopped(exc) from None
            raise
        finally:
            if timeout_token is not None:
                timeout_token.close()
            with self.lock:
                self.tasks.pop(key, None)
            if run is not None:
                self._leave_run(run)
            token.close()
            if stopped is not None:
                # Nothing of the node is left (its tree is confirmed gone): tell the client
                # now, rather than let it wait for the result to travel and be gathered.
                with contextlib.suppress(Exception):
                    blob = _dask_child.dump_value(stopped)
                    self._emit(spec["topic"], {"op": "stopped", "key": key, "error": blob})

    def _run_in_child(
        self, remote: _Remote, spec: dict[str, Any], sink: Callable[[str, Any], None]
    ) -> Any:
        pool = self._get_pool()
        future = pool.submit_task(
            _dask_child.run_payload,
            (spec["payload"],),
            token=remote.token,
            timeout=spec.get("timeout"),
            grace_period=spec["grace"],
            term_grace_period=spec["term_grace"],
            partial_sink=sink,
        )
        with self.lock:
            remote.pool_future = future
            kill = remote.killed
        if kill:
            self._kill_child(remote, future)
        try:
            blob = future.result()
        except (concurrent.futures.CancelledError, WorkerCrashedError, CancelledException) as exc:
            error = self._stop_error(remote, future, exc)
            if error is exc:
                raise
            raise error from None
        return _dask_child.load_value(blob)

    @staticmethod
    def _stop_error(remote: _Remote, future: TaskFuture, exc: BaseException) -> BaseException:
        """What the caller gets for a child task that ended with ``exc``: the memory
        error if the watch killed it, a kill if we stopped it, else ``exc`` itself."""
        partials = future.partial_results
        if remote.memory_error is not None:
            remote.memory_error.partial_results.update(partials)
            return remote.memory_error
        if isinstance(exc, concurrent.futures.CancelledError) or (
            remote.killed and not isinstance(exc, PipelineTimeoutException)
        ):
            return _cancelled(remote.kill_reason, partials, Fate.KILLED)
        return exc

    def _run_here(
        self, remote: _Remote, spec: dict[str, Any], sink: Callable[[str, Any], None]
    ) -> Any:
        token = remote.token
        try:
            with task_scope(token, sink):
                fn, args, kwargs = _dask_child.load_payload(spec["payload"])
                if remote.mode == "loop":
                    return asyncio.run(_run_coroutine(fn, args, kwargs, token))
                return fn(*args, **kwargs)
        except CancelledException as exc:
            if not token.is_cancelled or isinstance(exc, PipelineTimeoutException):
                raise
            if remote.timed_out:
                timeout = spec.get("timeout")
                raise PipelineTimeoutException(
                    f"task timed out after {timeout:g}s",
                    remote.partials,
                    reason=token.cancel_reason,
                    timeout=timeout,
                ) from None
            raise _cancelled(token.cancel_reason, remote.partials) from None


async def _run_coroutine(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], token: CancellationToken
) -> Any:
    task = asyncio.ensure_future(fn(*args, **kwargs))
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(task.cancel)

    handle = token.on_cancel(interrupt)
    try:
        return await task
    except asyncio.CancelledError:
        if token.is_cancelled:
            raise CancelledException(
                token.cancel_reason or "task cancelled", reason=token.cancel_reason
            ) from None
        raise
    finally:
        handle.remove()


class _Stopped(Exception):
    """cancelflow stopped the node; carries the error the caller gets."""

    def __init__(self, error: CancelledException) -> None:
        super().__init__(str(error))
        self.error = error


def _cancelled(
    reason: str | None, partials: dict[str, Any], fate: Fate = Fate.CANCELLED
) -> CancelledException:
    error = CancelledException(
        f"task {fate}: {reason}" if reason else f"task {fate}", partials, reason=reason
    )
    error.fate = fate
    return error


def run_task(spec: dict[str, Any]) -> tuple[str, Any]:
    """The function every cancelflow Dask task runs (in a Dask worker thread).

    Returns ``("ok", value)``, ``("stopped", CancelledException)`` when cancelflow
    stopped the node, or ``("failed", MemoryLimitError)`` when its tree was killed for
    memory (returned, not raised, so that Dask does not log them as failed tasks). The
    node's own exceptions are raised, as for any Dask task.
    """
    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CancelflowWorkerPlugin):
        raise RuntimeError(
            "the cancelflow worker plugin is not registered on this worker "
            "(DaskRunner registers it; was the task submitted by hand?)"
        )
    try:
        return "ok", plugin.execute(spec)
    except _Stopped as stopped:
        return "stopped", stopped.error
    except MemoryLimitError as error:
        return "failed", error


class CancelflowSchedulerPlugin(SchedulerPlugin):  # type: ignore[misc,unused-ignore]
    """The runner's part on the scheduler: where its tasks may run, and lost attempts.

    *Where*: while every worker offers :data:`RESOURCE` (this version's plugin runs
    there), the runner's tasks are placed as any Dask task. While some worker does not
    (it lacks cancelflow, has another version, or is still starting), each task of a
    runner that enters the graph, or goes back to waiting, is restricted to the workers
    that offer it, so no such task reaches a worker that cannot run it. The check is two
    ``len`` calls per task: the common case costs nothing else and keeps Dask's placement.

    *Lost attempts*: Dask runs a task again elsewhere when its worker leaves mid-run (up to
    ``distributed.scheduler.allowed-failures`` times when the worker died; always when it
    was retired), without telling the client. For each task of a runner that leaves
    ``processing`` because its worker is gone, this publishes ``{"op": "lost", "key": ...,
    "worker": ...}`` on the runner's topic, in order with the task's partial results, so
    the client closes that attempt before anything of the next one arrives.

    Registered (idempotently) by every runner.
    """

    idempotent = True
    name = PLUGIN_NAME

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.running_on: dict[str, str] = {}  # key -> address of the worker running it

    def update_graph(self, scheduler: Any, *, keys: Any = (), **kwargs: Any) -> None:
        if self._all_workers_ready():
            return
        for key in kwargs.get("tasks") or keys:
            if isinstance(key, str) and key.startswith(KEY_PREFIX):
                self._restrict(key)

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
            return
        if finish == "processing":
            ts = self.scheduler.tasks.get(key)
            worker = getattr(getattr(ts, "processing_on", None), "address", None)
            if worker is not None:
                self.running_on[key] = worker
        elif start == "processing":
            worker = self.running_on.pop(key, None)
            lost = finish in ("released", "erred") and worker not in self.scheduler.workers
            if worker is not None and lost:
                message = {"op": "lost", "key": key, "worker": worker}
                self.scheduler.log_event(topic_of(key), message)
                if finish == "released" and not self._all_workers_ready():
                    self._restrict(key)  # before it is placed again

    def _all_workers_ready(self) -> bool:
        offering = self.scheduler.resources.get(RESOURCE, ())
        return len(offering) >= len(self.scheduler.workers)

    def _restrict(self, key: str) -> None:
        ts = self.scheduler.tasks.get(key)
        if ts is not None:
            ts.resource_restrictions = {**(ts.resource_restrictions or {}), RESOURCE: 1}


# -- what the runner relies on inside distributed ----------------------------------------------
#: Parameters of ``Scheduler.stimulus_cancel`` as the runner calls it (positionally).
_STIMULUS_CANCEL = ("keys", "client", "force", "reason", "msg")


def missing_scheduler_internals(*, dask_scheduler: Any) -> list[str]:
    """What the runner uses of the scheduler's internals and this scheduler lacks
    (``[]``: all there). Run on the scheduler when a runner starts, and by the tests."""
    missing = []
    cancel = getattr(dask_scheduler, "stimulus_cancel", None)
    try:
        names = tuple(inspect.signature(cancel).parameters)[: len(_STIMULUS_CANCEL)]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        names = ()
    if names != _STIMULUS_CANCEL:
        missing.append(f"Scheduler.stimulus_cancel{_STIMULUS_CANCEL} (found {names or 'none'})")
    if not isinstance(getattr(getattr(dask_scheduler, "_broker", None), "_topics", None), dict):
        missing.append("Scheduler._broker._topics (a dict of topics)")
    events = getattr(dask_scheduler, "extensions", {}).get("events")
    if not all(hasattr(events, name) for name in ("event_set", "event_clear")):
        missing.append("Scheduler.extensions['events'].event_set / event_clear")
    for name in ("tasks", "workers", "rpc", "set_metadata", "get_metadata", "log_event"):
        if not hasattr(dask_scheduler, name):
            missing.append(f"Scheduler.{name}")
    if not isinstance(getattr(dask_scheduler, "resources", None), dict):
        missing.append("Scheduler.resources (a dict of resource -> {worker: amount})")
    from distributed.scheduler import TaskState

    if "resource_restrictions" not in getattr(TaskState, "__slots__", ()):
        missing.append("TaskState.resource_restrictions")
    return missing


def missing_worker_internals(*, dask_worker: Any) -> list[str]:
    """What the worker plugin uses of a worker's internals and this worker lacks."""
    missing = []
    state = getattr(dask_worker, "state", None)
    for name in ("nthreads", "tasks"):
        if not hasattr(state, name):
            missing.append(f"Worker.state.{name}")
    for name in ("handlers", "log_event", "loop", "scheduler"):
        if not hasattr(dask_worker, name):
            missing.append(f"Worker.{name}")
    return missing


# -- run on the scheduler (``client.run_on_scheduler``); each is one atomic step there --------
async def _send_to_worker(dask_scheduler: Any, address: str, message: dict[str, Any]) -> None:
    """Call the worker plugin's handler directly (a pooled connection, no batching)."""
    if address not in dask_scheduler.workers:
        return
    with contextlib.suppress(Exception):  # the worker is gone: its children go with it
        await dask_scheduler.rpc(address).cancelflow(**message)


def _state_of(dask_scheduler: Any, key: str) -> tuple[str, str | None]:
    ts = dask_scheduler.tasks.get(key)
    if ts is None:
        return "forgotten", None
    worker = ts.processing_on.address if ts.processing_on is not None else None
    return ts.state, worker


async def stop_task_on_scheduler(
    key: str, client: str, reason: str | None, topic: str, hard: bool, *, dask_scheduler: Any
) -> tuple[str, str | None]:
    """Signal or stop one task; return ``(what happened, worker)``.

    ``"signalled"``: it is on a worker, whose local token for it was cancelled (soft).
    ``"dropped"``: it had not reached a worker; it was released and never runs.
    ``"doomed"``: it was on a worker; it was released (so it never runs again), the
    worker kills its tree, and will publish ``ended`` on ``topic`` once it is gone.
    ``"memory"`` / ``"erred"`` / ``"forgotten"``: it was already over; nothing done.
    """
    state, worker = _state_of(dask_scheduler, key)
    if state in ("memory", "erred", "forgotten"):
        return state, worker
    if worker is not None and not hard:
        message = {"action": "signal", "key": key, "reason": reason}
        await _send_to_worker(dask_scheduler, worker, message)
        return "signalled", worker
    # Released first (in this same step, before any await): the scheduler forgets the
    # task before anything is killed, so it never runs it again.
    dask_scheduler.stimulus_cancel([key], client, False, reason or "cancelled", "cancelflow")
    if worker is None:
        return "dropped", None
    message = {"action": "doom", "key": key, "reason": reason, "topic": topic}
    await _send_to_worker(dask_scheduler, worker, message)
    return "doomed", worker


async def cancel_run_on_scheduler(
    name: str, reason: str | None, keys: list[str], client: str, *, dask_scheduler: Any
) -> list[str]:
    """Cancel a run: keep its reason, set its Event, signal its running tasks' workers,
    drop its tasks not on a worker yet.

    Returns the keys that were dropped (they never run).
    """
    dask_scheduler.set_metadata(keys=[REASON_PATH, name], value=reason)
    dask_scheduler.extensions["events"].event_set(name=name)
    dropped = []
    signals = []
    for key in keys:
        state, worker = _state_of(dask_scheduler, key)
        if worker is None and state not in ("memory", "erred", "forgotten"):
            dropped.append(key)
        elif worker is not None:
            # Running now: tell its worker directly, ahead of the Event (whose watchers
            # first fetch the reason); the Event covers the run's tasks that start later.
            message = {"action": "signal", "key": key, "reason": reason}
            signals.append(_send_to_worker(dask_scheduler, worker, message))
    if dropped:
        dask_scheduler.stimulus_cancel(dropped, client, False, reason or "cancelled", "cancelflow")
    await asyncio.gather(*signals)
    return dropped


def end_run_on_scheduler(name: str, *, dask_scheduler: Any) -> None:
    """A run is over: release its watchers (set), then clear its Event and its reason."""
    events = dask_scheduler.extensions["events"]
    events.event_set(name=name)
    events.event_clear(name=name)
    with contextlib.suppress(Exception):
        metadata = dask_scheduler.get_metadata(keys=[REASON_PATH], default=None)
        if isinstance(metadata, dict):
            metadata.pop(name, None)


def forget_topic_on_scheduler(topic: str, *, dask_scheduler: Any) -> None:
    """Drop a closed runner's topic (and the partial results kept in it) from the scheduler."""
    broker = getattr(dask_scheduler, "_broker", None)
    topics = getattr(broker, "_topics", None)
    if isinstance(topics, dict):
        topics.pop(topic, None)
