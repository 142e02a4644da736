"""What cancelflow holds on a Dask worker: the demo's check that a run left nothing there.

``client.run(worker_census)`` runs :func:`worker_census` on every worker (the function is
sent by reference: the workers import this module). It reads the state of the worker's
:class:`~cancelflow._backends._dask_worker.CancelflowWorkerPlugin`: the tasks and runs it
still holds, its warm process pool, and any process under the worker that is neither that
pool's zygote nor one of its idle children. ``tests/test_dask.py`` uses it too.
"""

from __future__ import annotations

import os
from typing import Any

import psutil

from cancelflow._backends._dask_worker import PLUGIN_NAME, CancelflowWorkerPlugin
from cancelflow._platform import descendants

__all__ = ("worker_census",)


def worker_census(*, dask_worker: Any) -> dict[str, Any]:
    """What cancelflow holds on a worker (for tests and debugging): tasks, runs, processes.

    ``extra_processes`` lists descendants of the worker that are neither the pool's zygote
    nor its idle children, i.e. anything a task left behind.
    """
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, CancelflowWorkerPlugin):
        return {"tasks": [], "runs": [], "pool": None, "extra_processes": []}
    with plugin.lock:
        tasks = sorted(plugin.tasks)
        runs = sorted(plugin.runs)
        pool = plugin.pool
    expected: set[int] = set()
    stats = None
    if pool is not None:
        pool.wait_ready(5.0)  # a killed child's replacement may still be starting
        stats = pool.statistics()
        expected.update(stats.worker_pids)
        if stats.zygote_pid is not None:
            expected.add(stats.zygote_pid)
    extra = [
        _describe(pid)
        for pid in descendants(os.getpid())
        if pid not in expected and not _is_mp_helper(pid)
    ]
    return {
        "tasks": tasks,
        "runs": runs,
        "pool": None
        if stats is None
        else {"busy": stats.busy, "idle": stats.idle, "workers": stats.workers},
        "extra_processes": extra,
    }


def _is_mp_helper(pid: int) -> bool:
    """Not a leftover: multiprocessing's own helpers (resource tracker, forkserver), or a
    process that has exited and awaits its reaper (a zombie), or one gone meanwhile. One
    that cannot be read is counted (a leftover is never hidden): psutil, so that the same
    holds where there is no ``/proc``."""
    try:
        process = psutil.Process(pid)
        status = process.status()
        command = " ".join(process.cmdline())
    except psutil.NoSuchProcess:  # gone, or a zombie (ZombieProcess)
        return True
    except psutil.Error:
        return False
    return (
        status == psutil.STATUS_ZOMBIE or "resource_tracker" in command or "forkserver" in command
    )


def _describe(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        state = process.status()
        command = " ".join(process.cmdline()).strip()
    except psutil.Error:
        return f"{pid} (gone)"
    return f"{pid} [{state}] {command[:120]}"
