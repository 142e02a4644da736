"""What a running task can ask about itself: its token and where its partial results go.

Pools set a :class:`TaskScope` around every task they run (in a thread, or inside a
process worker), and the task reads it through :func:`current_token`,
:func:`check_cancelled` and :func:`store_partial`. The same calls work in every place a
task can run, so a function does not need to know whether it was sent to a thread or to
a process.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ._log import safe_log
from ._token import CancellationToken
from ._validate import seconds_error

__all__ = (
    "TaskScope",
    "check_cancelled",
    "critical_section",
    "current_token",
    "store_partial",
    "task_scope",
)

PartialSink = Callable[[str, Any], None]


def deliver_partial(
    store: dict[str, Any], sink: PartialSink | None, key: str, value: Any, /, **ids: object
) -> None:
    """Keep ``value`` as the latest partial result under ``key`` and hand it to ``sink``.

    For the pools and backends that receive a task's partial results away from the task
    (a supervisor thread, a client loop): a sink that raises is logged (with ``ids``
    bound) and never breaks the stream of results.
    """
    store[key] = value
    if sink is not None:
        try:
            sink(key, value)
        except Exception as exc:  # noqa: BLE001 - a sink must not break the stream
            safe_log("ERROR", "partial_sink raised", exception=exc, **ids)


def report_lost_attempt(
    sink: PartialSink | None,
    attempt: int,
    where: str,
    partials: dict[str, Any],
    /,
    **ids: object,
) -> None:
    """Tell ``sink`` that attempt number ``attempt`` of its task was lost (its worker, at
    ``where``, left) and the task runs again, with what that attempt stored.

    For backends that may run a task more than once (Dask). A sink that can keep attempts
    apart has an ``attempt_lost(attempt, where, partials)`` method (the pipeline's node
    sink does); any other sink is not told. A sink that raises is logged.
    """
    hook = getattr(sink, "attempt_lost", None)
    if hook is None:
        return
    try:
        hook(attempt, where, partials)
    except Exception as exc:  # noqa: BLE001 - a sink must not break the stream
        safe_log("ERROR", "partial_sink.attempt_lost raised", exception=exc, **ids)


@dataclass(frozen=True, slots=True)
class TaskScope:
    """The token and partial-result sink of the task running in this context."""

    token: CancellationToken
    partial_sink: PartialSink | None = None


class _LazyTaskScope(TaskScope):
    """A scope whose token is made on first read of ``token`` (by ``make_token``).

    The slot stays unset until then, so the first read falls through to
    :meth:`__getattr__`; every later read is the plain slot read of :class:`TaskScope`
    (``check_cancelled()`` costs the same). ``make_token`` must return the same token to
    every caller (two threads may both read first).
    """

    __slots__ = ("_make_token",)

    def __init__(
        self, make_token: Callable[[], CancellationToken], partial_sink: PartialSink | None
    ) -> None:
        object.__setattr__(self, "_make_token", make_token)
        object.__setattr__(self, "partial_sink", partial_sink)

    def __getattr__(self, name: str) -> Any:
        if name != "token":
            raise AttributeError(name)
        token = self._make_token()
        object.__setattr__(self, "token", token)
        return token


_scope: ContextVar[TaskScope | None] = ContextVar("cancelflow_task_scope", default=None)


class task_scope:  # lower case: used like the function it replaced
    """Make ``token`` (and ``partial_sink``) the current task's for the ``with`` body.

    A class, not a generator: an asynchronous exception (a thread interrupt, the
    ``Terminated`` of a SIGTERM) that lands while the scope is entered or left can leave
    the variable set in the task's own context, but never a half-finished generator
    whose later finalization resets it from another context.
    """

    __slots__ = ("_reset", "scope")

    def __init__(self, token: CancellationToken, partial_sink: PartialSink | None = None) -> None:
        self.scope = TaskScope(token, partial_sink)

    def __enter__(self) -> TaskScope:
        self._reset = _scope.set(self.scope)
        return self.scope

    def __exit__(self, *exc_info: object) -> None:
        _scope.reset(self._reset)


def lazy_scope(
    make_token: Callable[[], CancellationToken], partial_sink: PartialSink | None = None
) -> TaskScope:
    """A scope whose token is ``make_token()``, called only when the task first reads it
    (``check_cancelled``, ``current_token``); ``make_token`` must give every caller the
    same token."""
    return _LazyTaskScope(make_token, partial_sink)


def enter_scope_for_good(scope: TaskScope) -> None:
    """Make ``scope`` current without a way back: only for a task that runs in a
    :class:`contextvars.Context` of its own, dropped when the task ends (the thread
    pool's tasks), where there is nothing to reset (cheaper than :class:`task_scope`)."""
    _scope.set(scope)


def run_in_scope(
    scope: TaskScope, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Call ``fn(*args, **kwargs)`` with ``scope`` current in this thread's context, and
    the scope that was current before restored when it returns or raises (a thread
    pool's task run in its worker thread's own context, as ``ThreadPoolExecutor`` does)."""
    reset = _scope.set(scope)
    try:
        return fn(*args, **kwargs)
    finally:
        _scope.reset(reset)


def current_scope() -> TaskScope | None:
    """The running task's scope, or ``None`` outside a cancelflow task."""
    return _scope.get()


def current_token() -> CancellationToken:
    """Return the token of the cancelflow task running in this thread or process.

    Raises:
        RuntimeError: not called from inside a task run by a cancelflow pool or pipeline.
    """
    scope = _scope.get()
    if scope is None:
        raise RuntimeError("current_token() called outside a cancelflow task")
    return scope.token


def check_cancelled() -> None:
    """Raise :class:`CancelledException` if the current task was asked to stop.

    A cheap poll for CPU-bound loops in threads and process workers (one shared-memory
    read when not cancelled). Outside a cancelflow task it does nothing.
    """
    scope = _scope.get()
    if scope is not None and scope.token.is_cancelled:
        scope.token.raise_if_cancelled()


def store_partial(key: str, value: Any) -> None:
    """Record a partial result of the current task; it survives the task being killed.

    In a process worker the value is pickled and handed to the parent before this returns,
    so what was stored before a kill is in the ``CancelledException``'s
    ``partial_results``.

    Raises:
        RuntimeError: outside a cancelflow task, or the task has no partial-result store.
        TypeError: ``key`` is not a string.
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {type(key).__name__}")
    scope = _scope.get()
    if scope is None or scope.partial_sink is None:
        raise RuntimeError("store_partial() called outside a cancelflow task with a result store")
    scope.partial_sink(key, value)


#: Set by a process worker while it runs a task: makes critical sections defer kills.
_critical_hook: Callable[[float], AbstractContextManager[None]] | None = None


def set_critical_hook(hook: Callable[[float], AbstractContextManager[None]] | None) -> None:
    """Package-internal (the process worker): what :func:`critical_section` does inside a
    task of this process from now on; ``None``: nothing (a plain no-op block)."""
    global _critical_hook
    _critical_hook = hook


def critical_section(max_seconds: float) -> AbstractContextManager[None]:
    """Defer a forced stop of this task while the ``with`` body runs, for at most
    ``max_seconds``.

    Inside a process worker, the pool's SIGTERM and SIGKILL steps wait until the block
    ends or its declared time runs out, whichever is first; a SIGTERM that arrives
    meanwhile is delivered as soon as the block exits, or once the declared time has
    run out if the block is still running then. Once the pool has decided to SIGKILL the
    task (at once, or when the block open then ends), no block starts any more: entering
    one raises :class:`CancelledException` instead, so the kill never lands inside a
    block that began after the decision. Cooperative cancellation is not affected (the
    token is still set at once). Elsewhere (threads, the event loop) there is nothing to
    defer and this is a plain no-op context manager.

    Raises:
        TypeError / ValueError: ``max_seconds`` is not a positive finite number.
        CancelledException: in a process worker whose task the pool is killing.
    """
    error = seconds_error(max_seconds, "max_seconds", positive=True, noun="a number")
    if error is not None:
        raise error
    hook = _critical_hook
    if hook is None or _scope.get() is None:
        return nullcontext()
    return hook(float(max_seconds))
