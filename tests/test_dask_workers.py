"""Specification of what a Dask worker's life does to the nodes of a DaskRunner.

A worker that joins without cancelflow is refused the runner's tasks; a worker's memory
limit covers the process trees of its nodes; a worker that leaves mid-node costs an
attempt that the caller is told about, with what it stored. Every test runs on a
``dask scheduler`` and ``dask worker`` processes of its own, on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

distributed = pytest.importorskip("distributed", reason="cancelflow[dask] is not installed")
cloudpickle = pytest.importorskip("cloudpickle", reason="cancelflow[dask] is not installed")

from cancelflow import (  # noqa: E402
    CancellationToken,
    CancelledException,
    DaskRunner,
    Fate,
    MemoryLimitError,
    Node,
    NodeContext,
    PipelineExecutor,
    PipelineFailedException,
    WorkerCrashedError,
)
from cancelflow._backends._dask_worker import RESOURCE  # noqa: E402
from cancelflow._context import current_token, store_partial  # noqa: E402
from dasksupport import Reports, SeparateCluster, assert_workers_clean  # noqa: E402
from support import WAIT, run  # noqa: E402

# Node functions travel by value: the workers never import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CLUSTER_WAIT = 2 * WAIT
MB = 1_000_000


# -- node functions (run on the workers) ------------------------------------------------------
def worker_name() -> str:
    return str(distributed.get_worker().name)


def hold_memory(total_mb: int, step_mb: int, seconds: float) -> str:
    """Allocate ``total_mb`` (touched, so resident) in steps, reporting each; then hold it
    ``seconds`` (or until cancelled)."""
    held = []
    for _ in range(total_mb // step_mb):
        held.append(b"\x01" * (step_mb * MB))
        store_partial("held_mb", len(held) * step_mb)
    current_token().wait_blocking(seconds)
    return "held"


def stay_until_killed_then_finish(marker: str) -> str:
    """First attempt: report the worker's pid and wait to be killed with it. Any later
    attempt (the marker exists): report and return."""
    if os.path.exists(marker):
        store_partial("pid", os.getpid())
        return f"done on {worker_name()}"
    # The marker exists before the pid is reported: the test kills the worker on the
    # report, and a kill between the report and the marker would make the second
    # attempt wait as the first did.
    Path(marker).touch()
    store_partial("pid", os.getpid())
    current_token().wait_blocking(WAIT)
    return "first attempt survived"


def stay_until_killed_then_fail(ctx: NodeContext) -> str:
    marker = ctx.context["marker"]
    if os.path.exists(marker):
        ctx.store_partial("pid", os.getpid())
        raise ValueError("the second attempt fails")
    # The marker exists before the pid is reported: the test kills the worker on the
    # report, and a kill between the report and the marker would make the second
    # attempt wait as the first did.
    Path(marker).touch()
    ctx.store_partial("pid", os.getpid())
    ctx.token.wait_blocking(WAIT)
    return "first attempt survived"


def wait_for_cancel() -> str:
    store_partial("started", True)
    token = current_token()
    token.wait_blocking(WAIT)
    token.raise_if_cancelled()
    return "not cancelled"


def restrictions_on_scheduler(dask_scheduler: Any) -> dict[str, Any]:
    """The resource restrictions of the runners' tasks the scheduler holds (run there)."""
    return {
        str(key): ts.resource_restrictions
        for key, ts in dask_scheduler.tasks.items()
        if str(key).startswith("cancelflow-")
    }


# -- helpers (test process) -------------------------------------------------------------------
async def address_of(client: Any, name: str) -> str:
    workers = (await client.scheduler.identity())["workers"]
    return next(str(address) for address, info in workers.items() if info["name"] == name)


async def kill_when_reported(reports: Reports) -> int:
    pid = int(await reports.wait("pid"))
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture
def cluster() -> Iterator[SeparateCluster]:
    with SeparateCluster(first_worker=False) as cluster:
        yield cluster


async def restrictions_while_running(runner: DaskRunner) -> list[Any]:
    """Start a thread node, read its task's restrictions on the scheduler while it runs,
    then cancel it."""
    reports = Reports()
    token = CancellationToken()
    call = asyncio.ensure_future(
        runner.run_sync(wait_for_cancel, token=token, partial_sink=reports, run_in="thread")
    )
    await reports.wait("started")
    found = await runner.client.run_on_scheduler(restrictions_on_scheduler)
    token.cancel("read")
    with pytest.raises(CancelledException):
        await call
    return list(found.values())


# == 3. a worker that joins without cancelflow ==================================================
class TestLateWorkerWithoutCancelflow:
    def test_tasks_are_placed_freely_while_every_worker_runs_cancelflow(
        self, cluster: SeparateCluster
    ) -> None:
        """Test that while every worker runs this version's plugin, the runner's tasks
        carry no restriction (Dask places them as any task)."""

        async def body() -> None:
            cluster.start_worker(name="good")
            await cluster.start(workers=1)
            async with DaskRunner(cluster.address) as runner:
                assert await restrictions_while_running(runner) == [None]

        run(body(), CLUSTER_WAIT)

    def test_gets_none_of_the_runners_tasks_and_keeps_serving_others(
        self, cluster: SeparateCluster
    ) -> None:
        """Test that a worker that joins after the runner started, and cannot import
        cancelflow, receives none of the runner's tasks (all run, on the worker that has
        cancelflow) and is not poisoned: it stays and runs plain Dask tasks."""

        async def body() -> None:
            cluster.start_worker(name="good")
            await cluster.start(workers=1)
            async with distributed.Client(cluster.address, asynchronous=True) as client:
                async with DaskRunner(client, run_in="thread") as runner:
                    cluster.start_worker(without_cancelflow=True, name="bare")
                    await client.wait_for_workers(2, timeout=WAIT)
                    bare = await address_of(client, "bare")
                    restricted = await restrictions_while_running(runner)
                    assert restricted == [{RESOURCE: 1}]
                    names = await asyncio.gather(*(runner.run_sync(worker_name) for _ in range(8)))
                    assert names == ["good"] * 8
                    plain = client.submit(sum, [1, 2], workers=[bare], pure=False)
                    assert await plain == 3
                    assert bare in (await client.scheduler.identity())["workers"]

        run(body(), CLUSTER_WAIT)


# == 4. memory limits over the node's process tree ==============================================
class TestMemoryLimit:
    def test_a_node_tree_past_the_workers_limit_is_killed_and_the_worker_stays(
        self, cluster: SeparateCluster
    ) -> None:
        """Test that a process node whose child grows past the worker's memory limit (with
        a nanny, which watches the worker process alone) is killed with its tree: the call
        raises MemoryLimitError (fate killed, a reason naming memory and the limit, what
        the node stored), the worker keeps its pid, and its next node runs."""

        async def body() -> None:
            cluster.start_worker(name="small", nanny=True, memory_limit="400MB")
            await cluster.start(workers=1)
            async with distributed.Client(cluster.address, asynchronous=True) as client:
                async with DaskRunner(client) as runner:
                    before = await client.run(os.getpid)
                    with pytest.raises(MemoryLimitError) as info:
                        await runner.run_sync(hold_memory, 700, 20, WAIT)
                    error = info.value
                    assert error.fate == Fate.KILLED
                    assert "memory" in str(error)
                    assert "memory_limit" in (error.reason or "")
                    assert 0 < error.limit <= 400 * MB
                    assert error.used > 0
                    assert error.partial_results["held_mb"] >= 20
                    assert await client.run(os.getpid) == before  # not restarted
                    assert await runner.run_sync(int, "7") == 7  # the pool healed
                    await assert_workers_clean(client)

        run(body(), CLUSTER_WAIT)

    def test_a_node_within_the_limit_completes(self, cluster: SeparateCluster) -> None:
        """Test that a process node that stays well under the worker's limit is left
        alone by the watch."""

        async def body() -> None:
            cluster.start_worker(name="roomy", memory_limit="2GB")
            await cluster.start(workers=1)
            async with DaskRunner(cluster.address) as runner:
                # held for several of the watch's 100 ms rounds
                assert await runner.run_sync(hold_memory, 60, 20, 0.5) == "held"

        run(body(), CLUSTER_WAIT)


# == 5. a worker that leaves mid-node ===========================================================
class TestLostAttempts:
    def test_the_caller_is_told_of_an_attempt_lost_with_its_worker(
        self, cluster: SeparateCluster, tmp_path: Path
    ) -> None:
        """Test that when the worker running a node dies and Dask runs the node again on
        another worker, the call returns the second attempt's value and the runner
        records the lost attempt: its number, its worker and what it stored."""

        async def body() -> None:
            cluster.start_worker(name="a")
            cluster.start_worker(name="b")
            await cluster.start(workers=2)
            async with DaskRunner(cluster.address, run_in="thread") as runner:
                reports = Reports()
                call = asyncio.ensure_future(
                    runner.run_sync(
                        stay_until_killed_then_finish,
                        str(tmp_path / "marker"),
                        partial_sink=reports,
                    )
                )
                pids = await runner.client.run(os.getpid)
                names = {
                    a: i["name"]
                    for a, i in (await runner.client.scheduler.identity())["workers"].items()
                }
                killed = await kill_when_reported(reports)
                [dead] = [address for address, pid in pids.items() if pid == killed]
                [survivor] = [name for address, name in names.items() if address != dead]
                assert await call == f"done on {survivor}"
                [lost] = runner.lost_attempts
                assert lost.attempt == 1
                assert lost.worker == dead
                assert lost.partial_results == {"pid": killed}
                assert lost.key.startswith("cancelflow-stay_until_killed_then_finish-")

        run(body(), CLUSTER_WAIT)

    def test_a_pipeline_keeps_each_attempts_partial_results_and_counts_attempts(
        self, cluster: SeparateCluster, tmp_path: Path
    ) -> None:
        """Test that in a pipeline a node re-run after its worker died keeps the lost
        attempt's partial results under "node@1.key", the last attempt's under
        "node.key", and that node_attempts says the node ran twice."""

        async def body() -> None:
            cluster.start_worker(name="a")
            cluster.start_worker(name="b")
            await cluster.start(workers=2)
            async with DaskRunner(cluster.address, run_in="thread") as runner:
                reports = Reports()
                spy = _Forward(runner, reports)
                executor = PipelineExecutor(thread_pool=spy, process_pool=spy)
                nodes = [Node("n", stay_until_killed_then_fail, run_in="thread")]
                run_task = asyncio.ensure_future(
                    executor.execute_pipeline(
                        "rerun", nodes, context={"marker": str(tmp_path / "m")}
                    )
                )
                killed = await kill_when_reported(reports)
                with pytest.raises(PipelineFailedException) as info:
                    await run_task
                error = info.value
                assert error.node_attempts == {"n": 2}
                assert error.partial_results["n@1.pid"] == killed
                assert error.partial_results["n.pid"] not in (killed, None)
                assert error.node_fates == {"n": Fate.FAILED}

        run(body(), CLUSTER_WAIT)

    def test_at_most_once_with_allowed_failures_zero(self, tmp_path: Path) -> None:
        """Test that with distributed.scheduler.allowed-failures = 0 on the scheduler (the
        README's way to at-most-once), a worker dying mid-node fails the call with
        WorkerCrashedError and the node never runs again."""
        no_retry = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}

        async def body(cluster: SeparateCluster) -> None:
            cluster.start_worker(name="a")
            cluster.start_worker(name="b")
            await cluster.start(workers=2)
            async with DaskRunner(cluster.address, run_in="thread") as runner:
                reports = Reports()
                marker = tmp_path / "marker"
                call = asyncio.ensure_future(
                    runner.run_sync(
                        stay_until_killed_then_finish, str(marker), partial_sink=reports
                    )
                )
                killed = await kill_when_reported(reports)
                with pytest.raises(WorkerCrashedError):
                    await call
                [lost] = runner.lost_attempts
                assert lost.partial_results == {"pid": killed}

        with SeparateCluster(scheduler_environment=no_retry, first_worker=False) as cluster:
            run(body(cluster), CLUSTER_WAIT)


class _Forward:
    """A pool for the executor that runs on ``runner`` and copies partial results to
    ``reports`` too (so the test can await them)."""

    def __init__(self, runner: DaskRunner, reports: Reports) -> None:
        self.runner = runner
        self.reports = reports

    async def run_sync(self, fn: Any, *args: Any, partial_sink: Any = None, **kw: Any) -> Any:
        sink = _Tee(partial_sink, self.reports)
        return await self.runner.run_sync(fn, *args, partial_sink=sink, **kw)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


class _Tee:
    def __init__(self, sink: Any, reports: Reports) -> None:
        self.sink = sink
        self.reports = reports

    def __call__(self, key: str, value: Any) -> None:
        self.sink(key, value)
        self.reports(key, value)

    def attempt_lost(self, attempt: int, where: str, partials: dict[str, Any]) -> None:
        self.sink.attempt_lost(attempt, where, partials)
