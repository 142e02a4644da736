"""cancelflow: run a pipeline across asyncio, threads and processes, and stop it cleanly
from anywhere.

The public API is exactly what this module re-exports; everything in ``_``-prefixed
modules is private.
"""

from __future__ import annotations

from ._exceptions import (
    CancelflowError as CancelflowError,
    CancelledException as CancelledException,
    PipelineDefinitionError as PipelineDefinitionError,
    PipelineFailedException as PipelineFailedException,
    PipelineTimeoutException as PipelineTimeoutException,
    PoolClosedError as PoolClosedError,
    WorkerCrashedError as WorkerCrashedError,
)
from ._token import CallbackHandle as CallbackHandle, CancellationToken as CancellationToken
from ._version import __version__ as __version__


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
