"""cancelflow's exceptions: one small hierarchy, every class for one condition.

::

    CancelflowError (Exception)
    ├── CancelledException               work was stopped on purpose
    │   └── PipelineTimeoutException     ... because a deadline passed (also TimeoutError)
    ├── PipelineFailedException          a node raised; the others were stopped
    ├── PipelineDefinitionError          a bad pipeline, refused before anything ran (also ValueError)
    ├── WorkerCrashedError               a worker process died by itself (also BrokenProcessPool)
    ├── UnreadableResultError            a task's result, error or partial value could not be unpickled
    │                                    (also BrokenProcessPool)
    ├── ClusterConnectionError           the connection to a Dask cluster was lost or closed
    │                                    (also ConnectionError)
    ├── UnsupportedPlatformError         this platform lacks what was asked for (also NotImplementedError)
    └── PoolClosedError                  work offered to a pool that was shut down (also RuntimeError)
        └── BrokenPoolError              the pool cannot run tasks any more (also BrokenProcessPool
                                         and BrokenThreadPool)

Relation to :class:`asyncio.CancelledError`: :class:`CancelledException` is *not* one, and
never derives from it. asyncio uses ``CancelledError`` to unwind a task that was
``Task.cancel()``-ed; if our exception were one, a ``CancelledException`` raised inside a
task would be mistaken by asyncio for the task's own cancellation (``TaskGroup`` and
``timeout()`` would swallow or re-interpret it). Where cancelflow cancels a coroutine
node it uses asyncio's own mechanism internally, then reports the outcome to the caller
as a ``CancelledException``.

All of them pickle, so they cross process boundaries with their data intact.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool
from concurrent.futures.thread import BrokenThreadPool
from typing import Any

from ._fate import Fate

__all__ = (
    "BrokenPoolError",
    "CancelflowError",
    "CancelledException",
    "ClusterConnectionError",
    "MemoryLimitError",
    "PipelineDefinitionError",
    "PipelineFailedException",
    "PipelineTimeoutException",
    "PoolClosedError",
    "UnreadableResultError",
    "UnsupportedPlatformError",
    "Terminated",
    "WorkerCrashedError",
)


class CancelflowError(Exception):
    """Base class of every error cancelflow raises on purpose."""


class CancelledException(CancelflowError):
    """Work was cancelled; carries why, where, and what was finished before.

    Raised by :meth:`CancellationToken.raise_if_cancelled`, by the pools when a task is
    stopped, and by :class:`PipelineExecutor` when a pipeline is cancelled (by the
    registry, the caller's token, a signal, or a newer request superseding it).

    Attributes:
        message: human-readable summary.
        reason: the reason given to the first ``cancel()`` (``None`` if none was given).
        partial_results: results of the work that completed before the cancellation,
            keyed by node id (plus anything stored with ``store_partial``). Final: it is
            raised only once nothing of the cancelled work is still running.
        wave_num: the wave that was running or about to start (0-based), or ``None``.
    """

    def __init__(
        self,
        message: str = "operation cancelled",
        partial_results: dict[str, Any] | None = None,
        wave_num: int | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.partial_results: dict[str, Any] = dict(partial_results or {})
        self.wave_num = wave_num
        self.reason = reason
        #: for a pipeline: how each node that started ended (see ``PipelineResult``)
        self.node_fates: dict[str, Fate] = {}
        #: for a pipeline: nodes run more than once, and how many times (see ``PipelineResult``)
        self.node_attempts: dict[str, int] = {}
        #: for a single pool task: how it was stopped (``cancelled``, ``terminated``,
        #: ``killed``, ``abandoned``...), else ``None``
        self.fate: Fate | None = None

    def __str__(self) -> str:
        where = f" (at wave {self.wave_num})" if self.wave_num is not None else ""
        return f"{self.message}{where} - {len(self.partial_results)} partial results available"

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), (self.message, self.partial_results, self.wave_num), self._extra()),
            {"fate": self.fate, "node_fates": self.node_fates, "node_attempts": self.node_attempts},
        )

    def _extra(self) -> dict[str, Any]:
        return {"reason": self.reason}


class PipelineTimeoutException(CancelledException, TimeoutError):
    """A pipeline, node or task ran past its deadline and was stopped.

    Also a :class:`TimeoutError`, so ``except TimeoutError`` catches it, and a
    :class:`CancelledException` (a timeout is one way of being cancelled), so
    ``partial_results`` and ``wave_num`` are there as for any cancellation.
    """

    def __init__(
        self,
        message: str = "pipeline timed out",
        partial_results: dict[str, Any] | None = None,
        wave_num: int | None = None,
        *,
        reason: str | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(message, partial_results, wave_num, reason=reason)
        self.timeout = timeout

    def _extra(self) -> dict[str, Any]:
        return {"reason": self.reason, "timeout": self.timeout}


class PipelineFailedException(CancelflowError):
    """A node raised, so the rest of its pipeline was stopped.

    The node's own exception is ``__cause__``. Distinct from :class:`CancelledException`:
    nobody asked for the stop; the pipeline could not go on.

    Attributes:
        node_id: the node whose error ended the pipeline (the first one to fail).
        partial_results: outputs of the nodes that completed, keyed by node id.
        wave_num: the wave the failing node belonged to.
    """

    def __init__(
        self,
        message: str,
        *,
        node_id: str | None = None,
        partial_results: dict[str, Any] | None = None,
        wave_num: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.node_id = node_id
        self.partial_results: dict[str, Any] = dict(partial_results or {})
        self.wave_num = wave_num
        #: how each node that started ended (see ``PipelineResult.node_fates``)
        self.node_fates: dict[str, Fate] = {}
        #: nodes run more than once, and how many times (``PipelineResult.node_attempts``)
        self.node_attempts: dict[str, int] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (
                type(self),
                (self.message,),
                {
                    "node_id": self.node_id,
                    "partial_results": self.partial_results,
                    "wave_num": self.wave_num,
                },
            ),
            {"node_fates": self.node_fates, "node_attempts": self.node_attempts},
        )


class PipelineDefinitionError(CancelflowError, ValueError):
    """A pipeline definition is invalid; raised before any node runs.

    Attributes:
        node_id: the offending node, when one node is to blame.
    """

    def __init__(self, message: str, *, node_id: str | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), (str(self),), {"node_id": self.node_id}))


class WorkerCrashedError(CancelflowError, BrokenProcessPool):
    """A worker process died by itself (segfault, ``os._exit``, OOM killer, an outside kill).

    Only the task that was running on that worker fails with it; the pool replaces the
    worker and keeps serving. Distinct from :class:`CancelledException`, where *we* stopped
    the worker. Also a :class:`concurrent.futures.process.BrokenProcessPool` (and so a
    ``RuntimeError``), so code written for ``ProcessPoolExecutor`` that catches a worker's
    death keeps working; unlike there, the pool is not broken afterwards.

    Attributes:
        exitcode: the exit status if it exited, else ``None``.
        signal: the number of the signal that killed it, else ``None``.
        pid: the worker's process id.
        fate: always ``"crashed"``.
    """

    fate: Fate = Fate.CRASHED

    def __init__(
        self,
        message: str,
        *,
        exitcode: int | None = None,
        signal: int | None = None,
        pid: int | None = None,
    ) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal
        self.pid = pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (
                type(self),
                (str(self),),
                {"exitcode": self.exitcode, "signal": self.signal, "pid": self.pid},
            ),
        )


class UnreadableResultError(CancelflowError, BrokenProcessPool):
    """What a task sent back pickled in the worker but could not be unpickled here (or
    the task's call, pickled here, that could not be unpickled in the worker).

    For example an exception class whose ``__init__`` takes other arguments than it
    passes to ``Exception.__init__``, or a value of a class the parent cannot import. Only
    the task concerned fails with it; the pool keeps serving. Also a
    :class:`concurrent.futures.process.BrokenProcessPool`, which is what
    ``ProcessPoolExecutor`` raises in this case (there, the whole pool breaks).

    Attributes:
        what: which part could not be read: ``"result"``, ``"exception"``,
            ``"partial result 'KEY'"``, or ``"call"`` (the function or arguments, in
            the worker).
        remote_text: the worker's text of the original: its ``repr`` and, for an
            exception, its formatted traceback.
    """

    def __init__(self, message: str, *, what: str = "result", remote_text: str = "") -> None:
        super().__init__(message)
        self.what = what
        self.remote_text = remote_text

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n\nIn the worker it was:\n{self.remote_text}" if self.remote_text else text

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), (self.args[0],), {"what": self.what, "remote_text": self.remote_text}),
        )


class ClusterConnectionError(CancelflowError, ConnectionError):
    """The connection to the cluster that runs the work was lost, or was closed.

    Raised by :class:`~cancelflow.DaskRunner` when its client is closed, or loses the
    scheduler, while a call runs (chained to Dask's own error), and at once for a call
    made while the client is closed or reconnecting. Not a cancellation: nobody asked the
    work to stop, and whether it ran to its end on the cluster is unknown. Also a
    :class:`ConnectionError`.

    Attributes:
        partial_results: the partial results that reached this process before the
            connection was lost (``{}`` for a call refused at once).
    """

    def __init__(self, message: str, partial_results: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.partial_results: dict[str, Any] = dict(partial_results or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (type(self), (self.args[0],), {"partial_results": self.partial_results}),
        )


class MemoryLimitError(CancelflowError, MemoryError):
    """A node's process tree was killed because it took its worker past a memory limit.

    Raised by :class:`~cancelflow.DaskRunner` for a process node whose processes, added to
    the Dask worker's own memory, passed the worker's ``memory_limit`` (times the fraction
    ``distributed.worker.memory.terminate``): the node's tree is killed, the worker and its
    data stay. Not a cancellation (nobody asked the node to stop) and not a crash. Also a
    :class:`MemoryError`.

    Attributes:
        partial_results: what the node stored before it was killed.
        reason: the reason its tree was killed (names the memory measured and the limit).
        used: bytes the node's processes held when they were killed.
        limit: the byte limit that was passed.
        fate: always ``"killed"``.
    """

    fate: Fate = Fate.KILLED

    def __init__(
        self,
        message: str,
        partial_results: dict[str, Any] | None = None,
        *,
        reason: str | None = None,
        used: int = 0,
        limit: int = 0,
    ) -> None:
        super().__init__(message)
        self.partial_results: dict[str, Any] = dict(partial_results or {})
        self.reason = reason
        self.used = used
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (
                type(self),
                (self.args[0], self.partial_results),
                {"reason": self.reason, "used": self.used, "limit": self.limit},
            ),
        )


class UnsupportedPlatformError(CancelflowError, NotImplementedError):
    """What was asked for needs something this platform does not have.

    Raised before any work starts (a :class:`~cancelflow.ProcessPool` is refused when it
    is made, a pipeline with process nodes before its first node runs), with a message
    that names the platform and what to use instead. ``platform`` is ``sys.platform``;
    ``implementation`` is the flavour of cancelflow's platform layer in use
    (``"linux"``, ``"posix"`` or ``"windows"``, see the README's platform table).
    """

    def __init__(self, message: str, *, platform: str = "", implementation: str = "") -> None:
        super().__init__(message)
        self.platform = platform
        self.implementation = implementation

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (
                type(self),
                self.args,
                {"platform": self.platform, "implementation": self.implementation},
            ),
        )


class PoolClosedError(CancelflowError, RuntimeError):
    """Work was offered to a pool or executor after it was shut down."""


class BrokenPoolError(PoolClosedError, BrokenProcessPool, BrokenThreadPool):
    """A pool can no longer run tasks, so every pending task failed and it refuses new ones.

    Raised when a worker's ``initializer`` fails (as the stdlib's executors do), when
    workers keep dying before they can start, or when the pool's own machinery failed.
    Also :class:`concurrent.futures.process.BrokenProcessPool` and
    :class:`concurrent.futures.thread.BrokenThreadPool`, so ``except BrokenExecutor``
    written for the stdlib keeps working.
    """


def _rebuild(cls: type[Exception], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Exception:
    return cls(*args, **kwargs)


class Terminated(BaseException):
    """Raised in a task when the pool sends SIGTERM (the ladder's second step).

    A ``BaseException`` so that ``except Exception`` in user code does not swallow it;
    ``finally`` blocks and context managers run.
    """
