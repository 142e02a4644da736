"""What the Dask test modules share: checking that nothing of a test is left on a cluster.

The functions run on the scheduler travel by value (cloudpickle), so a scheduler that
cannot import this test module still runs them.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import cloudpickle
import dask
import distributed

from cancelflow import DaskRunner
from cancelflow._cli.demo.census import worker_census
from support import WAIT

#: Dask settings of the tests' clusters
DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,  # no profiler thread per worker
    "distributed.scheduler.allowed-failures": 0,  # a worker's death fails its task at once
    "distributed.admin.system-monitor.gil.enabled": False,
}

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def warm_process_cluster(n_workers: int, threads_per_worker: int) -> Any:
    """A ``processes=True`` ``LocalCluster`` on 127.0.0.1 only (dashboards too: with
    ``dashboard_address=None`` HTTP is served on 0.0.0.0:8787 all the same), warmed up
    (every worker joined, the runner's plugin and its process pool started) so that no
    test pays for, or sees, its start. The caller closes it."""
    with dask.config.set(DASK_CONFIG):
        cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
            processes=True,
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )

    async def warm() -> None:
        async with DaskRunner(cluster.scheduler_address) as runner:
            await runner.client.wait_for_workers(n_workers, timeout=WAIT)
            assert await runner.run_sync(int, "2") == 2

    try:
        asyncio.run(asyncio.wait_for(warm(), WAIT * 2))
    except BaseException:
        cluster.close()
        raise
    return cluster


async def assert_workers_clean(client: Any) -> None:
    """Nothing of cancelflow is left on any worker or on the scheduler."""
    # A task the scheduler cancelled on its own (another client's cancel) leaves the
    # worker's books once its Dask thread has returned, which may be after the caller
    # heard: wait for that, with a deadline.
    deadline = time.monotonic() + WAIT
    while True:
        census = await client.run(worker_census)
        if all(not state["tasks"] and not state["runs"] for state in census.values()):
            break
        if time.monotonic() > deadline:
            break  # the asserts below say what is left
        await asyncio.sleep(0.01)  # re-check soon; not a wait for something to happen
    for address, state in census.items():
        assert state["tasks"] == [], f"{address} still runs {state['tasks']}"
        assert state["runs"] == [], f"{address} still watches runs {state['runs']}"
        assert state["extra_processes"] == [], f"{address} left {state['extra_processes']}"
        if state["pool"] is not None:
            assert state["pool"]["busy"] == 0, f"{address}: {state['pool']}"
    # A call's key is released (and its run's Event cleared) by messages the scheduler
    # handles after the call returned: wait for that, with a deadline.
    clean: dict[str, Any] = {"keys": [], "events": [], "reasons": {}}
    deadline = time.monotonic() + WAIT
    while (leftovers := await client.run_on_scheduler(cancelflow_state_on_scheduler)) != clean:
        assert time.monotonic() < deadline, f"left on the scheduler: {leftovers}"
        await asyncio.sleep(0.01)  # re-check soon; not a wait for something to happen


def cancelflow_state_on_scheduler(dask_scheduler: Any) -> dict[str, Any]:
    keys = [k for k in dask_scheduler.tasks if str(k).startswith("cancelflow-")]
    events = [
        n for n in dask_scheduler.extensions["events"]._events if str(n).startswith("cancelflow")
    ]
    reasons = dask_scheduler.task_metadata.get("cancelflow-run-reason", {})
    return {"keys": keys, "events": events, "reasons": reasons}
