"""`CancellationRegistry`: every running pipeline's token, cleanup handlers and partial results."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future as ConcurrentFuture
from typing import Any

from ._async import shielded
from ._exceptions import PipelineDefinitionError
from ._log import safe_log
from ._token import CancellationToken, check_reason
from ._validate import seconds_error

__all__ = ("CancellationRegistry", "CleanupHandler", "RunHandle")

#: A cleanup handler takes no argument; it may be a plain or a coroutine function.
CleanupHandler = Callable[[], "Awaitable[object] | object"]

DEFAULT_CLEANUP_TIMEOUT = 5.0

# The pipeline whose cleanup handlers run in this context (their tasks and threads): a
# handler that cancels its own pipeline again must not wait for its own cleanup.
_cleaning: contextvars.ContextVar[_Entry | None] = contextvars.ContextVar(
    "cancelflow_cleaning", default=None
)


class _Entry:
    """One registered pipeline. Mutated on its event loop only (except as noted)."""

    __slots__ = (
        "cleanup_errors",
        "cleanup_started",
        "cleanup_task",
        "cleanup_timeout",
        "finished",
        "handlers",
        "loop",
        "partials",
        "pipeline_id",
        "released",
        "run_handlers",
        "token",
    )

    def __init__(
        self,
        pipeline_id: str,
        token: CancellationToken,
        loop: asyncio.AbstractEventLoop | None,
        cleanup_timeout: float,
    ) -> None:
        self.pipeline_id = pipeline_id
        self.token = token
        self.loop = loop
        self.cleanup_timeout = cleanup_timeout
        self.handlers: list[CleanupHandler] = []
        # Written from any thread (node threads, pool callbacks): single dict stores.
        self.partials: dict[str, Any] = {}
        #: set for a pipeline an executor runs: its cleanup waits until the run has stopped
        self.released: asyncio.Event | None = None
        self.run_handlers = True
        self.finished = False
        self.cleanup_task: asyncio.Task[None] | None = None
        self.cleanup_started = False
        self.cleanup_errors: list[BaseException] = []


class CancellationRegistry:
    """The registry of running pipelines: their tokens, cleanup handlers and partial results.

    A pipeline is registered under an id (:meth:`register` returns its
    :class:`CancellationToken`), may collect cleanup handlers and partial results, and is
    cancelled by :meth:`cancel` (from the event loop), :meth:`cancel_threadsafe` (from any
    thread or a signal handler) or :meth:`cancel_all` (at shutdown).
    :class:`PipelineExecutor` registers and unregisters its pipelines itself.

    Signal safety: the registry holds no lock (each step is one dict or list operation,
    atomic under the GIL), so a signal handler that interrupted any of its methods cannot
    deadlock on it. From a handler, use :meth:`cancel_threadsafe`, :meth:`get_token`,
    :meth:`store_partial_result`, :meth:`get_partial_results`,
    :meth:`active_pipelines` and ``in``. :meth:`register`, :meth:`unregister` and
    :meth:`register_cleanup_handler` take no lock either, but change state the pipeline's
    event loop owns: call them on the loop. The coroutine methods are for the loop.

    Cleanup handlers run **exactly once** per pipeline whatever the races (two cancels,
    a cancel racing a timeout or the pipeline's completion): in reverse order of
    registration, one after the other, each bounded by ``cleanup_timeout`` seconds.

    * They run when a pipeline ends in any way other than success: cancelled, timed out,
      or failed. When a pipeline succeeds (or is unregistered without having been
      cancelled) its handlers are dropped without running: they are for releasing what a
      cancelled pipeline left behind.
    * For a pipeline run by a :class:`PipelineExecutor` they run once nothing of the
      pipeline is still running (after a graceful wave has finished, or interrupted nodes
      have stopped), so a handler never pulls a resource from under a running node. For a
      pipeline registered by hand they run as soon as it is cancelled.
    * Async handlers run on the pipeline's event loop. Sync handlers run in a short-lived
      worker thread, so that one that blocks can be bounded; they must not touch objects
      bound to the event loop (use an async handler for that).
    * A handler that raises or runs past ``cleanup_timeout`` (it is then cancelled if
      async, abandoned in its thread if sync) is logged with the ``pipeline_id`` and does
      not stop the others. Errors are reported, never raised: they are logged, and a
      :class:`PipelineExecutor` returns them as ``PipelineResult.cleanup_errors`` (a
      ``TimeoutError`` stands for a handler that hung).

    The registry's event loop: a pipeline belongs to the loop that was running when it
    was registered. Handlers run there, whoever cancels.

    Not promised: that a pipeline cancelled at the very moment it completes ends as
    cancelled (see :meth:`cancel`); that an abandoned sync handler's thread stops.

    Args:
        cleanup_timeout: seconds each cleanup handler may take (default 5).
    """

    def __init__(self, *, cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT) -> None:
        self.cleanup_timeout = _check_cleanup_timeout(cleanup_timeout)
        self._entries: dict[str, _Entry] = {}

    # -- registration --------------------------------------------------------------------
    def register(
        self, pipeline_id: str, *, cleanup_timeout: float | None = None
    ) -> CancellationToken:
        """Register a pipeline and return its new, not cancelled token.

        Args:
            pipeline_id: the pipeline's id, unique among the registered ones.
            cleanup_timeout: per-handler bound for this pipeline (default: the registry's).

        Raises:
            PipelineDefinitionError: ``pipeline_id`` is already registered (a running
                pipeline with that id); also a ``ValueError``.
            TypeError: ``pipeline_id`` is not a non-empty string.
        """
        _check_id(pipeline_id)
        if pipeline_id in self._entries:
            raise PipelineDefinitionError(
                f"pipeline id {pipeline_id!r} is already registered; ids of running "
                "pipelines must be unique"
            )
        timeout = (
            self.cleanup_timeout
            if cleanup_timeout is None
            else _check_cleanup_timeout(cleanup_timeout)
        )
        token = CancellationToken(name=pipeline_id)
        self._entries[pipeline_id] = _Entry(pipeline_id, token, _running_loop(), timeout)
        safe_log("DEBUG", "pipeline registered", pipeline_id=pipeline_id)
        return token

    def unregister(self, pipeline_id: str) -> bool:
        """Forget a pipeline; ``True`` if it was registered. Idempotent.

        Handlers that have not started are dropped; a cleanup that is running goes on to
        its end (whoever awaits it still gets it).

        Raises:
            TypeError: ``pipeline_id`` is not a non-empty string.
        """
        _check_id(pipeline_id)
        entry = self._entries.get(pipeline_id)
        if entry is None:
            return False
        self._drop(entry)
        return True

    def _drop(self, entry: _Entry) -> None:
        if self._entries.get(entry.pipeline_id) is entry:
            del self._entries[entry.pipeline_id]
        entry.finished = True
        if not entry.cleanup_started:
            entry.run_handlers = False
            entry.handlers.clear()
            if entry.released is not None:
                entry.released.set()  # a cleanup task held for the executor ends now
        safe_log("DEBUG", "pipeline unregistered", pipeline_id=entry.pipeline_id)

    def register_cleanup_handler(self, pipeline_id: str, handler: CleanupHandler) -> None:
        """Add a handler run (without arguments) if the pipeline is cancelled.

        Handlers run in reverse order of registration, exactly once; see the class
        docstring for when, where, and how their errors are reported.

        Raises:
            KeyError: no pipeline ``pipeline_id`` is registered (never was, or finished).
            RuntimeError: the pipeline's cleanup has already started or it has finished.
            TypeError: ``handler`` is not callable, or ``pipeline_id`` not a string.
        """
        _check_id(pipeline_id)
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        entry = self._get(pipeline_id)
        if entry.cleanup_started or entry.finished:
            raise RuntimeError(
                f"pipeline {pipeline_id!r} has already run its cleanup or finished; "
                "a handler registered now would never run"
            )
        entry.handlers.append(handler)

    # -- reading -------------------------------------------------------------------------
    def __contains__(self, pipeline_id: object) -> bool:
        return pipeline_id in self._entries

    def active_pipelines(self) -> tuple[str, ...]:
        """The ids of the registered pipelines, in registration order."""
        return tuple(self._entries)

    def get_token(self, pipeline_id: str) -> CancellationToken:
        """The token of a registered pipeline.

        Raises:
            KeyError: no pipeline ``pipeline_id`` is registered.
        """
        return self._get(pipeline_id).token

    def store_partial_result(self, pipeline_id: str, key: str, value: Any) -> None:
        """Store a partial result of a registered pipeline. Safe from any thread.

        Raises:
            KeyError: no pipeline ``pipeline_id`` is registered.
            TypeError: ``key`` is not a string.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        self._get(pipeline_id).partials[key] = value

    def get_partial_results(self, pipeline_id: str) -> dict[str, Any]:
        """A copy of the partial results stored so far for a registered pipeline.

        Raises:
            KeyError: no pipeline ``pipeline_id`` is registered.
        """
        return dict(self._get(pipeline_id).partials)

    def _get(self, pipeline_id: str) -> _Entry:
        _check_id(pipeline_id)
        entry = self._entries.get(pipeline_id)
        if entry is None:
            raise KeyError(f"no pipeline {pipeline_id!r} is registered (unknown or finished)")
        return entry

    # -- cancelling ----------------------------------------------------------------------
    async def cancel(self, pipeline_id: str, reason: str | None = None) -> bool:
        """Cancel a pipeline's token and run its cleanup handlers; wait for them.

        Returns ``True`` if this call cancelled the token, ``False`` if it was already
        cancelled or no such pipeline is registered (it may just have finished: cancel
        and completion race freely, so an unknown id is not an error).

        While it blocks: for a pipeline run by a :class:`PipelineExecutor` this waits
        until the pipeline has stopped (in graceful mode: the running wave finishes, at
        most ``graceful_timeout`` before it is interrupted) and its handlers have run.
        If the awaiting task is itself cancelled, the cancellation and cleanup go on
        without it. Do not await this from inside a node of the same pipeline (it would
        wait for itself): use :meth:`cancel_threadsafe` there.

        A cancel that lands while the pipeline is completing may find it completed: the
        token is cancelled but the pipeline ends successfully and its handlers do not
        run.

        Raises:
            TypeError: ``reason`` is neither a string nor ``None``, or ``pipeline_id`` is
                not a non-empty string.
        """
        _check_id(pipeline_id)
        check_reason(reason)
        entry = self._entries.get(pipeline_id)
        if entry is None or entry.finished:
            safe_log("DEBUG", "cancel of an unknown or finished pipeline", pipeline_id=pipeline_id)
            return False
        won = entry.token.cancel(reason)
        if won:
            safe_log("INFO", f"pipeline cancelled: {reason}", pipeline_id=pipeline_id)
        await self._await_cleanup(entry)
        return won

    def cancel_threadsafe(self, pipeline_id: str, reason: str | None = None) -> bool:
        """Cancel a pipeline's token at once and schedule its cleanup; do not wait.

        Safe from any thread and from a signal handler: it takes no lock, sets the token
        before returning (every node and waiter sees it), and hands the cleanup to the
        pipeline's event loop with ``loop.call_soon_threadsafe``. For a pipeline
        registered outside any running loop, the handlers run at the next awaited
        :meth:`cancel` or :meth:`cancel_all`.

        Returns ``True`` if this call cancelled the token (see :meth:`cancel`).

        Raises:
            TypeError: ``reason`` is neither a string nor ``None``, or ``pipeline_id`` is
                not a non-empty string.
        """
        _check_id(pipeline_id)
        check_reason(reason)
        entry = self._entries.get(pipeline_id)
        if entry is None or entry.finished:
            return False
        won = entry.token.cancel(reason)
        loop = entry.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._request_cleanup, entry)
            except RuntimeError:  # the loop is closed: nothing is left to clean up there
                pass
        return won

    async def cancel_all(self, reason: str | None = None) -> list[str]:
        """Cancel every registered pipeline and wait for all their cleanups.

        For shutdown. Returns the ids of the pipelines whose token this call cancelled.
        Cleanups run concurrently across pipelines (in order within each).

        While it blocks: it waits, as :meth:`cancel` does, until every pipeline has
        stopped (graceful ones finish their running wave) and its handlers have run. If
        the awaiting task is cancelled, the cancellations and cleanups go on without it.

        Raises:
            TypeError: ``reason`` is neither a string nor ``None`` (nothing is cancelled).
        """
        check_reason(reason)
        cancelled: list[str] = []
        entries = [entry for entry in self._entries.values() if not entry.finished]
        for entry in entries:
            if entry.token.cancel(reason):
                cancelled.append(entry.pipeline_id)
        if cancelled:
            safe_log("INFO", f"cancelled {len(cancelled)} pipelines: {reason}")
        await asyncio.gather(*(self._await_cleanup(entry) for entry in entries))
        return cancelled

    # -- cleanup -------------------------------------------------------------------------
    async def _await_cleanup(self, entry: _Entry) -> None:
        """Make sure the entry's cleanup runs (once) and wait for it, on its own loop.

        From one of the entry's own cleanup handlers this returns at once: the cleanup
        is already running, and waiting for it would wait for the caller itself.
        """
        if _cleaning.get() is entry:
            return
        loop = asyncio.get_running_loop()
        if entry.loop is None:
            entry.loop = loop
        if entry.loop is not loop:
            future: ConcurrentFuture[None] = ConcurrentFuture()

            def start() -> None:
                task = self._request_cleanup(entry)
                task.add_done_callback(lambda _: future.set_result(None))

            try:
                entry.loop.call_soon_threadsafe(start)
            except RuntimeError:  # its loop is closed: clean up here instead
                entry.loop = loop
            else:
                await shielded(asyncio.wrap_future(future))
                return
        await shielded(self._request_cleanup(entry))

    def _request_cleanup(self, entry: _Entry) -> asyncio.Task[None]:
        """Start the entry's cleanup task unless it exists; return it (loop thread only)."""
        if entry.cleanup_task is None:
            loop = entry.loop or asyncio.get_running_loop()
            entry.loop = loop
            entry.cleanup_task = loop.create_task(
                self._run_cleanup(entry), name=f"cancelflow-cleanup-{entry.pipeline_id}"
            )
        return entry.cleanup_task

    def _release(self, entry: _Entry, *, run_handlers: bool) -> None:
        """The pipeline has stopped; its handlers run iff ``run_handlers``."""
        if not run_handlers and not entry.cleanup_started:
            entry.run_handlers = False
        if entry.released is not None:
            entry.released.set()

    async def _run_cleanup(self, entry: _Entry) -> None:
        if entry.released is not None:
            await entry.released.wait()
        if not entry.run_handlers:
            entry.handlers.clear()
            return
        entry.cleanup_started = True
        _cleaning.set(entry)  # this task's context, copied into each handler's
        handlers = entry.handlers[::-1]
        entry.handlers.clear()
        for handler in handlers:
            error = await self._call_handler(entry, handler)
            if error is not None:
                entry.cleanup_errors.append(error)
        if handlers:
            safe_log(
                "DEBUG",
                f"cleanup ran {len(handlers)} handlers, {len(entry.cleanup_errors)} failed",
                pipeline_id=entry.pipeline_id,
            )

    async def _call_handler(self, entry: _Entry, handler: CleanupHandler) -> BaseException | None:
        timeout = entry.cleanup_timeout
        try:
            if _is_async(handler):
                outcome = handler()
                if inspect.isawaitable(outcome):
                    await asyncio.wait_for(outcome, timeout)
            else:
                await asyncio.wait_for(_run_in_thread(handler, entry.pipeline_id), timeout)
        except TimeoutError:
            error: BaseException = TimeoutError(
                f"cleanup handler {handler!r} did not finish within {timeout:g}s"
            )
            safe_log(
                "ERROR",
                f"cleanup handler {handler!r} timed out after {timeout:g}s",
                pipeline_id=entry.pipeline_id,
            )
            return error
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            safe_log(
                "ERROR",
                f"cleanup handler {handler!r} was cancelled",
                exception=exc,
                pipeline_id=entry.pipeline_id,
            )
            return exc
        except Exception as exc:  # noqa: BLE001 - one handler must not stop the others
            safe_log(
                "ERROR",
                f"cleanup handler {handler!r} raised",
                exception=exc,
                pipeline_id=entry.pipeline_id,
            )
            return exc
        return None


class RunHandle:
    """One pipeline registered for a run that a :class:`PipelineExecutor` drives.

    Package-internal: for the executor (``_executor`` / ``_run``), which uses only this
    handle, never the registry's private parts. :meth:`open` registers the pipeline (with
    its cleanup handlers) and holds its cleanup until :meth:`end`: a cancel from any source
    sets :attr:`token` at once, but the handlers wait until the run has stopped.
    Every method runs on the run's event loop, except as noted.
    """

    __slots__ = ("_entry", "_registry")

    def __init__(self, registry: CancellationRegistry, entry: _Entry) -> None:
        self._registry = registry
        self._entry = entry

    @classmethod
    def open(
        cls,
        registry: CancellationRegistry,
        pipeline_id: str,
        handlers: list[CleanupHandler],
        *,
        cleanup_timeout: float | None,
    ) -> RunHandle:
        """Register ``pipeline_id`` with ``handlers``, its cleanup held until :meth:`end`.

        Raises what :meth:`CancellationRegistry.register` raises.
        """
        registry.register(pipeline_id, cleanup_timeout=cleanup_timeout)
        for handler in handlers:
            registry.register_cleanup_handler(pipeline_id, handler)
        entry = registry._get(pipeline_id)
        entry.released = asyncio.Event()
        return cls(registry, entry)

    @property
    def pipeline_id(self) -> str:
        return self._entry.pipeline_id

    @property
    def token(self) -> CancellationToken:
        """The pipeline's token: the cancel request, from whatever source."""
        return self._entry.token

    @property
    def finished(self) -> bool:
        """The run completed (:meth:`mark_completed`) or the pipeline is unregistered."""
        return self._entry.finished

    def store_partial(self, key: str, value: Any) -> None:
        """Store a partial result (any thread: one dict store)."""
        self._entry.partials[key] = value

    def partial_results(self) -> dict[str, Any]:
        """A copy of the partial results stored so far."""
        return dict(self._entry.partials)

    def mark_completed(self) -> None:
        """The run completed: a cancel that comes now finds the pipeline finished."""
        self._entry.finished = True

    async def end(self, *, run_handlers: bool) -> tuple[BaseException, ...]:
        """The run has stopped: run the cleanup handlers (exactly once) iff
        ``run_handlers``, wait for them, unregister; return the handlers' errors.

        A cleanup that a cancel already started is awaited whatever ``run_handlers`` says.
        """
        registry, entry = self._registry, self._entry
        registry._release(entry, run_handlers=run_handlers)
        if run_handlers and (entry.handlers or entry.cleanup_task is not None):
            registry._request_cleanup(entry)
        if entry.cleanup_task is not None:
            await shielded(entry.cleanup_task)
        errors = tuple(entry.cleanup_errors)
        registry._drop(entry)
        return errors

    def discard(self) -> None:
        """Unregister without running the handlers (a run that ended without :meth:`end`)."""
        self._registry._release(self._entry, run_handlers=False)
        self._registry._drop(self._entry)


def _is_async(handler: Callable[..., object]) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - objects with an async __call__
    )


async def _run_in_thread(handler: CleanupHandler, pipeline_id: str) -> None:
    """Call a sync handler in its own daemon thread; await an awaitable it returns."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[object] = loop.create_future()

    def settle(outcome: object, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)

    context = contextvars.copy_context()

    def work() -> None:
        error: BaseException | None = None
        outcome: object = None
        try:
            outcome = context.run(handler)
        except BaseException as exc:  # noqa: BLE001 - reported to the loop
            error = exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
        try:
            loop.call_soon_threadsafe(settle, outcome, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=work, name=f"cancelflow-cleanup-{pipeline_id}", daemon=True).start()
    outcome = await future
    if inspect.isawaitable(outcome):
        await outcome


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_cleanup_timeout(value: float) -> float:
    # The range is checked before converting (an int too large for a float but negative
    # is a ValueError): unlike check_seconds, which converts first.
    error = seconds_error(value, "cleanup_timeout", positive=True)
    if error is not None:
        raise error
    return float(value)


def _check_id(pipeline_id: object) -> None:
    if not isinstance(pipeline_id, str) or not pipeline_id:
        raise TypeError(f"pipeline_id must be a non-empty str, got {pipeline_id!r}")
