"""The worker plugin the runner registers: a loader that any Dask worker can unpickle.

Dask unpickles every registered worker plugin on each worker that joins, and a worker
that fails to unpickle one fails to start at all. A worker without cancelflow (or with
another version) must still join and serve the cluster's other work; it only has to be
refused the runner's tasks. So the runner registers this loader, which travels *by value*
(cloudpickle: the class itself is in the pickle, and it needs only ``distributed``), and
which on each worker:

* imports cancelflow's worker plugin, checks that the version is the runner's, and puts
  the real plugin in its place (``worker.plugins``), which then offers the Dask resource
  that every task of the runner asks for;
* where that fails, logs why (through the worker's own ``logging``: cancelflow's logger
  is not there) and does nothing else: the worker joins, offers no such resource, and so
  is never sent one of the runner's tasks.

This module imports nothing of cancelflow: it must unpickle where cancelflow is missing.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed import WorkerPlugin

__all__ = ("PluginLoader",)


class PluginLoader(WorkerPlugin):  # type: ignore[misc,unused-ignore]
    """Installs cancelflow's worker plugin where this version of cancelflow imports."""

    idempotent = True
    name = "cancelflow"

    def __init__(self, version: str, warm: bool) -> None:
        self.version = version
        self.warm = warm

    async def setup(self, worker: Any) -> None:
        try:
            from cancelflow._backends._dask_worker import CancelflowWorkerPlugin
            from cancelflow._version import __version__
        except Exception as exc:  # noqa: BLE001 - any failure means: not here
            self._refuse(worker, f"cancelflow cannot be imported ({type(exc).__name__}: {exc})")
            return
        if __version__ != self.version:
            self._refuse(worker, f"it has cancelflow {__version__}, the runner {self.version}")
            return
        plugin = CancelflowWorkerPlugin(warm=self.warm)
        worker.plugins[self.name] = plugin  # the real plugin gets the hooks from now on
        await plugin.setup(worker)

    def _refuse(self, worker: Any, why: str) -> None:
        logging.getLogger("distributed.worker").warning(
            "cancelflow: worker %s takes no DaskRunner task: %s", worker.address, why
        )
