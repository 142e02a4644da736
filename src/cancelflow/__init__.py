"""cancelflow: run a pipeline across asyncio, threads and processes, and stop it cleanly
from anywhere.

The public API is exactly what this module re-exports; everything in ``_``-prefixed
modules is private.
"""

from __future__ import annotations

from . import to_process as to_process, to_thread as to_thread
from ._backends._dask import DaskRunner as DaskRunner, LostAttempt as LostAttempt
from ._context import (
    check_cancelled as check_cancelled,
    critical_section as critical_section,
    current_token as current_token,
    store_partial as store_partial,
)
from ._events import (
    EVENT_NAMES as EVENT_NAMES,
    EventBus as EventBus,
    PipelineEvent as PipelineEvent,
)
from ._exceptions import (
    BrokenPoolError as BrokenPoolError,
    CancelflowError as CancelflowError,
    CancelledException as CancelledException,
    ClusterConnectionError as ClusterConnectionError,
    MemoryLimitError as MemoryLimitError,
    PipelineDefinitionError as PipelineDefinitionError,
    PipelineFailedException as PipelineFailedException,
    PipelineTimeoutException as PipelineTimeoutException,
    PoolClosedError as PoolClosedError,
    UnreadableResultError as UnreadableResultError,
    UnsupportedPlatformError as UnsupportedPlatformError,
    WorkerCrashedError as WorkerCrashedError,
)
from ._executor import PipelineExecutor as PipelineExecutor, PipelineResult as PipelineResult
from ._fate import Fate as Fate
from ._log import log_to_logging as log_to_logging
from ._node import Node as Node, NodeContext as NodeContext
from ._process import (
    ProcessPool as ProcessPool,
    ProcessPoolStatistics as ProcessPoolStatistics,
    TaskFuture as TaskFuture,
)
from ._registry import CancellationRegistry as CancellationRegistry
from ._remote import RemoteToken as RemoteToken
from ._supersede import Superseder as Superseder
from ._thread_pool import (
    ThreadPool as ThreadPool,
    ThreadPoolStatistics as ThreadPoolStatistics,
    ThreadTaskFuture as ThreadTaskFuture,
)
from ._token import CallbackHandle as CallbackHandle, CancellationToken as CancellationToken
from ._version import __version__ as __version__

__all__ = (
    "EVENT_NAMES",
    "BrokenPoolError",
    "CallbackHandle",
    "CancelflowError",
    "CancellationRegistry",
    "CancellationToken",
    "CancelledException",
    "ClusterConnectionError",
    "LostAttempt",
    "MemoryLimitError",
    "DaskRunner",
    "EventBus",
    "Fate",
    "Node",
    "NodeContext",
    "PipelineDefinitionError",
    "PipelineEvent",
    "PipelineExecutor",
    "PipelineFailedException",
    "PipelineResult",
    "PipelineTimeoutException",
    "PoolClosedError",
    "RemoteToken",
    "ProcessPool",
    "ProcessPoolStatistics",
    "Superseder",
    "TaskFuture",
    "ThreadPool",
    "ThreadPoolStatistics",
    "ThreadTaskFuture",
    "UnreadableResultError",
    "UnsupportedPlatformError",
    "WorkerCrashedError",
    "check_cancelled",
    "critical_section",
    "current_token",
    "log_to_logging",
    "store_partial",
    "to_process",
    "to_thread",
)


def _fixup_module_metadata() -> None:
    # Tracebacks, reprs and docs show ``cancelflow.X``, not ``cancelflow._module.X``.
    for name, value in list(globals().items()):
        if not name.startswith("_") and getattr(value, "__module__", "").startswith("cancelflow._"):
            try:
                value.__module__ = "cancelflow"
            except (AttributeError, TypeError):
                pass


_fixup_module_metadata()
del _fixup_module_metadata
