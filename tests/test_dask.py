"""Specification of the Dask backend (DaskRunner): remote nodes that stop when told.

Logic tests run on an in-process ``LocalCluster(processes=False)`` started and closed by
each test. Hard-cancel tests share one ``processes=True`` cluster (2 workers, 1 thread
each, 127.0.0.1 only, dashboards included) for the whole module; each of them checks
explicitly that nothing of it is left on the workers. Tests that lose the cluster start
a ``dask scheduler`` and a ``dask worker`` as processes of their own. Everything listens on
127.0.0.1 only (``TestLoopbackOnly``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

distributed = pytest.importorskip("distributed", reason="cancelflow[dask] is not installed")
cloudpickle = pytest.importorskip("cloudpickle", reason="cancelflow[dask] is not installed")

import dask  # noqa: E402

import backendloads  # noqa: E402
from cancelflow import (  # noqa: E402
    CancellationToken,
    CancelledException,
    ClusterConnectionError,
    Node,
    NodeContext,
    PipelineExecutor,
    PipelineFailedException,
    PipelineTimeoutException,
    WorkerCrashedError,
)
from cancelflow._backends._dask import DaskRunner  # noqa: E402
from cancelflow._backends._dask_worker import (  # noqa: E402
    missing_scheduler_internals,
    missing_worker_internals,
)
from cancelflow._context import current_token, store_partial  # noqa: E402
from dasksupport import (  # noqa: E402
    DASK_CONFIG,
    Reports,
    SeparateCluster,
    assert_workers_clean,
    cancelflow_state_on_scheduler,
    warm_process_cluster,
)
from support import (  # noqa: E402
    WAIT,
    assert_gone,
    listening_beyond_loopback,
    ours_and_descendants,
    run,
)

# Node functions travel by value, as functions from __main__ or a notebook would: the
# workers and their children never import this test module (nor pytest).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: a cluster's start and close around a test body, which bounds its own waits by WAIT
CLUSTER_WAIT = 2 * WAIT


# -- node functions (run on the workers) ------------------------------------------------------
def add(a: int, b: int) -> int:
    return a + b


def describe(ctx: NodeContext) -> dict[str, Any]:
    return {
        "node_id": ctx.node_id,
        "pipeline_id": ctx.pipeline_id,
        "inputs": dict(ctx.inputs),
        "context": dict(ctx.context),
        "token_is_current": ctx.token is current_token(),
        "cancelled": ctx.token.is_cancelled,
    }


def wait_cooperatively(label: str) -> str:
    """Announces itself, then polls its (local) token until cancelled."""
    token = current_token()
    store_partial("started", label)
    while not token.is_cancelled:
        token.wait_blocking(0.05)
    token.raise_if_cancelled()
    return "unreachable"


def spin_with_grandchild() -> None:
    """Never checks its token; starts a grandchild that would outlive it."""
    grandchild = subprocess.Popen(["sleep", "1000"])
    store_partial("rows", 41)
    store_partial("pids", [os.getpid(), grandchild.pid])
    while True:
        pass


def spin() -> None:
    store_partial("pid", os.getpid())
    while True:
        pass


def fail(message: str) -> None:
    raise ValueError(message)


def crash(code: int) -> None:
    os._exit(code)


async def coroutine_node(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2


async def coroutine_waits_forever() -> None:
    store_partial("started", True)
    await asyncio.Event().wait()


# -- helpers ---------------------------------------------------------------------------------
# -- clusters --------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def dask_background_threads() -> None:
    """Start Dask's process-wide helper threads (the offload executor) before any test's
    leak snapshot: they live as long as the interpreter, whichever test starts them."""
    from distributed.utils import offload

    async def touch() -> None:
        await offload(int)

    asyncio.run(touch())


async def _local_cluster() -> Any:
    with dask.config.set(DASK_CONFIG):
        return await distributed.LocalCluster(
            processes=False,
            n_workers=1,
            threads_per_worker=2,
            asynchronous=True,
            # Measured with distributed 2026.8: with dashboard_address=None the scheduler's
            # HTTP server still listens on 0.0.0.0:8787 and the worker's on 0.0.0.0 too;
            # bind both to a free port on 127.0.0.1 (TestLoopbackOnly checks it).
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
        )


async def in_process(body: Callable[[DaskRunner, Any], Awaitable[None]], **options: Any) -> None:
    """Run ``body(runner, client)`` against a fresh in-process cluster (thread nodes)."""
    options.setdefault("warm_pool", False)
    options.setdefault("run_in", "thread")
    cluster = await _local_cluster()
    try:
        async with DaskRunner(cluster.scheduler_address, **options) as runner:
            await body(runner, runner.client)
            await assert_workers_clean(runner.client)
    finally:
        await cluster.close()


@pytest.fixture(scope="module")
def process_cluster() -> Iterator[Any]:
    """One ``processes=True`` cluster for the hard-cancel tests, with warm pools."""
    cluster = warm_process_cluster(n_workers=2, threads_per_worker=1)
    try:
        yield cluster
    finally:
        cluster.close()


async def on_processes(cluster: Any, body: Callable[[DaskRunner, Any], Awaitable[None]]) -> None:
    async with DaskRunner(
        cluster.scheduler_address, grace_period=0.0, term_grace_period=0.0
    ) as runner:
        await runner.client.wait_for_workers(2, timeout=WAIT)
        await body(runner, runner.client)
        await assert_workers_clean(runner.client)


# == logic (in-process cluster) ===============================================================
class TestDaskRunnerLogic:
    def test_returns_result_of_thread_node(self) -> None:
        """Test that a thread node's return value comes back from the worker."""

        async def body(runner: DaskRunner, client: Any) -> None:
            assert await runner.run_sync(add, 2, 3) == 5

        run(in_process(body), CLUSTER_WAIT)

    def test_node_context_is_rebuilt_on_the_worker(self) -> None:
        """Test that a NodeContext arrives with its inputs and the task's local token."""

        async def body(runner: DaskRunner, client: Any) -> None:
            token = CancellationToken()
            ctx = NodeContext(token, {"up": 1}, {"user": "x"}, "pipe-1", "node-a")
            seen = await runner.run_sync(describe, ctx, token=token)
            assert seen == {
                "node_id": "node-a",
                "pipeline_id": "pipe-1",
                "inputs": {"up": 1},
                "context": {"user": "x"},
                "token_is_current": True,
                "cancelled": False,
            }

        run(in_process(body), CLUSTER_WAIT)

    def test_cooperative_cancel_of_thread_node(self) -> None:
        """Test that cancelling a thread node's token reaches its local token and the call
        raises CancelledException with the reason and the partial results."""

        async def body(runner: DaskRunner, client: Any) -> None:
            token = CancellationToken()
            reports = Reports()
            call = asyncio.ensure_future(
                runner.run_sync(wait_cooperatively, "a", token=token, partial_sink=reports)
            )
            await reports.wait("started")
            token.cancel("user asked")
            with pytest.raises(CancelledException) as info:
                await call
            assert info.value.reason == "user asked"
            assert info.value.partial_results == {"started": "a"}

        run(in_process(body), CLUSTER_WAIT)

    def test_run_event_cancels_every_node_of_the_run(self) -> None:
        """Test that cancelling the run token (parent of the node tokens) stops all of the
        run's nodes through the run's Event, which is cleared afterwards."""

        async def body(runner: DaskRunner, client: Any) -> None:
            run_token = CancellationToken()
            reports = [Reports(), Reports()]
            calls = [
                asyncio.ensure_future(
                    runner.run_sync(
                        wait_cooperatively, str(i), token=run_token.child(), partial_sink=reports[i]
                    )
                )
                for i in range(2)
            ]
            for report in reports:
                await report.wait("started")
            events = (await client.run_on_scheduler(cancelflow_state_on_scheduler))["events"]
            assert len(events) == 1  # one Event for the run, watched from the worker
            run_token.cancel("whole run")
            for call in calls:
                with pytest.raises(CancelledException) as info:
                    await call
                assert info.value.reason == "whole run"

        run(in_process(body), CLUSTER_WAIT)

    def test_node_token_alone_stops_only_its_node(self) -> None:
        """Test that cancelling one node's token stops that node and not its sibling."""

        async def body(runner: DaskRunner, client: Any) -> None:
            run_token = CancellationToken()
            stopped, survivor = run_token.child(), run_token.child()
            reports = Reports()
            first = asyncio.ensure_future(
                runner.run_sync(wait_cooperatively, "a", token=stopped, partial_sink=reports)
            )
            await reports.wait("started")
            stopped.cancel("only this one")
            with pytest.raises(CancelledException, match="only this one"):
                await first
            assert await runner.run_sync(add, 1, 2, token=survivor) == 3
            assert not run_token.is_cancelled

        run(in_process(body), CLUSTER_WAIT)

    def test_timeout_of_thread_node(self) -> None:
        """Test that a cooperative thread node past its timeout raises
        PipelineTimeoutException."""

        async def body(runner: DaskRunner, client: Any) -> None:
            with pytest.raises(PipelineTimeoutException) as info:
                await runner.run_sync(wait_cooperatively, "t", timeout=0.2)
            assert info.value.timeout == 0.2

        run(in_process(body), CLUSTER_WAIT)

    def test_node_failure_raises_its_own_exception(self) -> None:
        """Test that a node's exception reaches the caller as that exception."""

        async def body(runner: DaskRunner, client: Any) -> None:
            with pytest.raises(ValueError, match="boom"):
                await runner.run_sync(fail, "boom")

        run(in_process(body), CLUSTER_WAIT)

    def test_coroutine_node_runs_on_the_worker(self) -> None:
        """Test that a coroutine function runs to its result on the worker."""

        async def body(runner: DaskRunner, client: Any) -> None:
            assert await runner.run_sync(coroutine_node, 21) == 42

        run(in_process(body), CLUSTER_WAIT)

    def test_coroutine_node_is_cancelled_at_its_await(self) -> None:
        """Test that cancelling a coroutine node's token cancels it at its next await."""

        async def body(runner: DaskRunner, client: Any) -> None:
            token = CancellationToken()
            reports = Reports()
            call = asyncio.ensure_future(
                runner.run_sync(coroutine_waits_forever, token=token, partial_sink=reports)
            )
            await reports.wait("started")
            token.cancel("enough")
            with pytest.raises(CancelledException, match="enough"):
                await call

        run(in_process(body), CLUSTER_WAIT)

    def test_pre_cancelled_token_submits_nothing(self) -> None:
        """Test that an already-cancelled token raises at once and sends no task."""

        async def body(runner: DaskRunner, client: Any) -> None:
            token = CancellationToken()
            token.cancel("before")
            with pytest.raises(CancelledException, match="before"):
                await runner.run_sync(add, 1, 2, token=token)
            info = await client.run_on_scheduler(cancelflow_state_on_scheduler)
            assert info["keys"] == []

        run(in_process(body), CLUSTER_WAIT)

    def test_unpicklable_argument_is_refused_before_submitting(self) -> None:
        """Test that an argument cloudpickle cannot carry raises TypeError locally."""

        async def body(runner: DaskRunner, client: Any) -> None:
            with pytest.raises(TypeError):
                await runner.run_sync(add, threading.Lock(), 1)

        run(in_process(body), CLUSTER_WAIT)

    def test_pipeline_runs_on_dask(self) -> None:
        """Test that PipelineExecutor runs thread nodes on Dask with the runner as pool."""
        from cancelflow._executor import PipelineExecutor

        async def body(runner: DaskRunner, client: Any) -> None:
            executor = PipelineExecutor(thread_pool=runner, process_pool=runner)
            nodes = [
                Node("a", describe, run_in="thread"),
                Node("b", describe, deps=["a"], run_in="thread"),
            ]
            result = await executor.execute_pipeline("dask-pipe", nodes, {"k": 1})
            assert result["b"]["inputs"]["a"]["node_id"] == "a"
            assert result["b"]["context"] == {"k": 1}

        run(in_process(body), CLUSTER_WAIT)

    def test_pipeline_cancel_stops_its_dask_nodes(self) -> None:
        """Test that cancelling a pipeline (interrupt mode) stops its running Dask node
        through the run's Event and reports what the node stored."""
        from cancelflow._executor import PipelineExecutor

        async def body(runner: DaskRunner, client: Any) -> None:
            reports = Reports()
            spy = _SpyRunner(runner, reports)
            executor = PipelineExecutor(thread_pool=spy, process_pool=spy, mode="interrupt")
            token = CancellationToken()
            nodes = [Node("slow", _pipeline_node, run_in="thread")]
            run_task = asyncio.ensure_future(
                executor.execute_pipeline("dask-cancel", nodes, cancel_token=token)
            )
            await reports.wait("started")
            token.cancel("stop the pipeline")
            with pytest.raises(CancelledException) as info:
                await run_task
            assert info.value.reason == "stop the pipeline"
            assert info.value.partial_results == {"slow.started": "slow"}

        run(in_process(body), CLUSTER_WAIT)


def _pipeline_node(ctx: NodeContext) -> str:
    ctx.store_partial("started", ctx.node_id)
    while not ctx.token.is_cancelled:
        ctx.token.wait_blocking(0.05)
    ctx.token.raise_if_cancelled()
    return "unreachable"


class _SpyRunner:
    """A runner that also tells the test what the nodes store."""

    def __init__(self, runner: DaskRunner, reports: Reports) -> None:
        self.runner = runner
        self.reports = reports

    async def run_sync(self, fn: Any, *args: Any, partial_sink: Any = None, **options: Any) -> Any:
        def sink(key: str, value: Any) -> None:
            if partial_sink is not None:
                partial_sink(key, value)
            self.reports(key, value)

        return await self.runner.run_sync(fn, *args, partial_sink=sink, **options)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.runner.shutdown(wait, cancel_futures=cancel_futures)


# == hard cancel (shared processes=True cluster) ==============================================
class TestDaskRunnerHardCancel:
    # Processes: a killed child is replaced by its worker's pool with a new pid, by design,
    # and the replacement is a descendant of this test process. Threads/fds: the shared
    # cluster's scheduler runs in this process and pools connections opened during a test.
    # So the leak check cannot be per test here; assert_workers_clean checks instead that no
    # task, run, busy child or stray process is left on any worker and no key on the
    # scheduler.
    @pytest.mark.allow_leaks
    def test_cancel_kills_process_tree_and_worker_keeps_its_data(
        self, process_cluster: Any
    ) -> None:
        """Test that cancelling a non-cooperative process node kills its child and its
        grandchild, while each worker keeps its other results and its process."""

        async def body(runner: DaskRunner, client: Any) -> None:
            workers = sorted((await client.scheduler.identity())["workers"])
            held = [
                client.submit(add, i, 100, workers=[w], pure=False) for i, w in enumerate(workers)
            ]
            assert await client.gather(held) == [100, 101]
            worker_pids = await client.run(os.getpid)
            token = CancellationToken()
            reports = Reports()
            call = asyncio.ensure_future(
                runner.run_sync(spin_with_grandchild, token=token, partial_sink=reports)
            )
            child, grandchild = await reports.wait("pids")
            token.cancel("stop now")
            with pytest.raises(CancelledException) as info:
                await call
            assert info.value.reason == "stop now"
            assert_gone(child, already_exited=True)
            assert_gone(grandchild, already_exited=True)
            assert await client.run(os.getpid) == worker_pids
            who_has = await client.who_has(held)
            assert {key: tuple(where) for key, where in who_has.items()} == {
                f.key: (w,) for f, w in zip(held, workers, strict=True)
            }
            assert await client.gather(held) == [100, 101]

        run(on_processes(process_cluster, body), CLUSTER_WAIT)

    @pytest.mark.allow_leaks
    def test_dask_future_cancel_kills_the_tree(self, process_cluster: Any) -> None:
        """Test that Dask's own cancel of the task's future (from another client) kills
        the node's process tree through the worker plugin."""

        async def body(runner: DaskRunner, client: Any) -> None:
            reports = Reports()
            call = asyncio.ensure_future(runner.run_sync(spin, partial_sink=reports))
            pid = await reports.wait("pid")
            keys = (await client.run_on_scheduler(cancelflow_state_on_scheduler))["keys"]
            assert len(keys) == 1
            async with distributed.Client(
                process_cluster.scheduler_address, asynchronous=True
            ) as other:
                await other.cancel([distributed.Future(keys[0], other)], force=True)
                with pytest.raises(CancelledException, match="outside cancelflow"):
                    await call
                await asyncio.to_thread(assert_gone, pid)

        run(on_processes(process_cluster, body), CLUSTER_WAIT)

    @pytest.mark.allow_leaks
    def test_cancelling_the_awaiting_task_kills_the_tree(self, process_cluster: Any) -> None:
        """Test that cancelling the asyncio task awaiting run_sync releases the Dask task
        and returns only once the child is gone."""

        async def body(runner: DaskRunner, client: Any) -> None:
            reports = Reports()
            call = asyncio.ensure_future(runner.run_sync(spin, partial_sink=reports))
            pid = await reports.wait("pid")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert_gone(pid, already_exited=True)

        run(on_processes(process_cluster, body), CLUSTER_WAIT)

    @pytest.mark.allow_leaks
    def test_timeout_kills_process_node(self, process_cluster: Any) -> None:
        """Test that a process node past its timeout is killed and the call raises
        PipelineTimeoutException with the partial results."""

        async def body(runner: DaskRunner, client: Any) -> None:
            reports = Reports()
            with pytest.raises(PipelineTimeoutException) as info:
                await runner.run_sync(spin, timeout=0.3, partial_sink=reports)
            assert info.value.timeout == 0.3
            assert info.value.partial_results["pid"] == reports.values["pid"]
            assert_gone(reports.values["pid"], already_exited=True)

        run(on_processes(process_cluster, body), CLUSTER_WAIT)

    @pytest.mark.allow_leaks
    def test_process_node_failure(self, process_cluster: Any) -> None:
        """Test that a process node's exception reaches the caller and its child stays
        in the pool."""

        async def body(runner: DaskRunner, client: Any) -> None:
            with pytest.raises(ValueError, match="bad row"):
                await runner.run_sync(fail, "bad row")

        run(on_processes(process_cluster, body), CLUSTER_WAIT)

    @pytest.mark.allow_leaks
    def test_child_crash_raises_worker_crashed(self, process_cluster: Any) -> None:
        """Test that a process node whose child dies by itself raises WorkerCrashedError
        with the exit code, and the pool replaces the child."""

        async def body(runner: DaskRunner, client: Any) -> None:
            with pytest.raises(WorkerCrashedError) as info:
                await runner.run_sync(crash, 3)
            assert info.value.exitcode == 3
            assert await runner.run_sync(add, 1, 2) == 3

        run(on_processes(process_cluster, body), CLUSTER_WAIT)

    @pytest.mark.allow_leaks
    def test_partial_results_survive_a_kill(self, process_cluster: Any) -> None:
        """Test that partial results stored before a kill reach the sink and the error."""

        async def body(runner: DaskRunner, client: Any) -> None:
            token = CancellationToken()
            reports = Reports()
            call = asyncio.ensure_future(
                runner.run_sync(spin_with_grandchild, token=token, partial_sink=reports)
            )
            pids = await reports.wait("pids")
            token.cancel("keep what you have")
            with pytest.raises(CancelledException) as info:
                await call
            assert info.value.partial_results == {"rows": 41, "pids": pids}
            assert reports.values == {"rows": 41, "pids": pids}

        run(on_processes(process_cluster, body), CLUSTER_WAIT)

    @pytest.mark.allow_leaks
    def test_worker_killed_mid_run_raises_worker_crashed(self, process_cluster: Any) -> None:
        """Test that a Dask worker killed from outside while it runs a process node fails
        the call with WorkerCrashedError and takes the node's process tree with it."""
        # A worker of its own, without a nanny, so that nothing restarts it and the shared
        # cluster's workers are untouched.
        environment = dict(os.environ, DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED="False")
        victim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                process_cluster.scheduler_address,
                "--no-nanny",
                "--nthreads=1",
                "--host=127.0.0.1",
                "--dashboard-address=127.0.0.1:0",  # --no-dashboard: HTTP on 0.0.0.0 all the same
                "--name=victim",
            ],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            async def body() -> None:
                async with distributed.Client(
                    process_cluster.scheduler_address, asynchronous=True
                ) as client:
                    await client.wait_for_workers(3, timeout=WAIT)
                    workers = (await client.scheduler.identity())["workers"]
                    address = next(a for a, w in workers.items() if w["name"] == "victim")
                    runner = DaskRunner(client, submit_options={"workers": [address]})
                    reports = Reports()
                    call = asyncio.ensure_future(
                        runner.run_sync(spin_with_grandchild, partial_sink=reports)
                    )
                    child, grandchild = await reports.wait("pids")
                    os.kill(victim.pid, signal.SIGKILL)
                    with pytest.raises(WorkerCrashedError, match="died"):
                        await call
                    await runner.aclose()
                    await asyncio.to_thread(assert_gone, child)
                    await asyncio.to_thread(assert_gone, grandchild)
                    await assert_workers_clean(client)

            run(body(), CLUSTER_WAIT)
        finally:
            victim.kill()
            victim.wait()


# == a cluster of separate processes: losing it ===============================================
@pytest.fixture
def separate_cluster() -> Iterator[SeparateCluster]:
    with SeparateCluster() as cluster:
        yield cluster


class TestLosingTheCluster:
    """Losing the client or the scheduler is reported as what it is, never as a cancel."""

    def test_closing_the_client_during_a_call_raises_cluster_connection_error(
        self, separate_cluster: SeparateCluster
    ) -> None:
        """Test that closing the runner's client while a process node runs fails the call
        with ClusterConnectionError chained to Dask's error, and that a call made
        afterwards fails at once the same way, without sending anything."""

        async def body() -> None:
            await separate_cluster.start()
            client = await distributed.Client(separate_cluster.address, asynchronous=True)
            runner = DaskRunner(client)
            reports = Reports()
            call = asyncio.ensure_future(
                runner.run_sync(spin_with_grandchild, partial_sink=reports)
            )
            await reports.wait("pids")
            await client.close()
            with pytest.raises(ClusterConnectionError) as info:
                await call
            assert not isinstance(info.value, CancelledException)
            assert info.value.__cause__ is not None
            assert "pids" in info.value.partial_results
            started = time.monotonic()
            with pytest.raises(ClusterConnectionError, match="closed"):
                await runner.run_sync(add, 1, 2)
            assert time.monotonic() - started < WAIT / 3  # at once, not after Dask's timeout
            await runner.aclose()

        run(body(), CLUSTER_WAIT)

    def test_losing_the_scheduler_during_a_call_raises_cluster_connection_error(
        self, separate_cluster: SeparateCluster
    ) -> None:
        """Test that a scheduler killed while a node runs fails the call with
        ClusterConnectionError (chained to Dask's FutureCancelledError), and that a call
        made while the client tries to reconnect fails at once."""

        async def body() -> None:
            await separate_cluster.start()
            async with distributed.Client(separate_cluster.address, asynchronous=True) as client:
                runner = DaskRunner(client, run_in="thread")
                reports = Reports()
                call = asyncio.ensure_future(
                    runner.run_sync(wait_cooperatively, "lost", partial_sink=reports)
                )
                await reports.wait("started")
                separate_cluster.scheduler.kill()
                with pytest.raises(ClusterConnectionError, match="scheduler was lost") as info:
                    await call
                assert isinstance(info.value.__cause__, distributed.client.FutureCancelledError)
                started = time.monotonic()
                with pytest.raises(ClusterConnectionError):
                    await runner.run_sync(add, 1, 2)
                assert time.monotonic() - started < WAIT / 3
                await runner.aclose(timeout=0)

        run(body(), CLUSTER_WAIT)

    def test_a_pipeline_reports_the_lost_cluster_as_its_failure_cause(
        self, separate_cluster: SeparateCluster
    ) -> None:
        """Test that inside a pipeline the lost connection is the failure's cause (a
        PipelineFailedException from ClusterConnectionError), not a cancellation."""

        async def body() -> None:
            await separate_cluster.start()
            client = await distributed.Client(separate_cluster.address, asynchronous=True)
            runner = DaskRunner(client)
            reports = Reports()
            spy = _SpyRunner(runner, reports)
            executor = PipelineExecutor(thread_pool=spy, process_pool=spy)
            nodes = [Node("spin", _spin_node, run_in="process")]
            run_task = asyncio.ensure_future(executor.execute_pipeline("lost", nodes))
            await reports.wait("pids")
            await client.close()
            with pytest.raises(PipelineFailedException) as info:
                await run_task
            assert isinstance(info.value.__cause__, ClusterConnectionError)
            await runner.aclose()

        run(body(), CLUSTER_WAIT)


class TestWhereCancelflowMustBeInstalled:
    def test_a_worker_without_cancelflow_is_named_and_a_later_start_retries(
        self, separate_cluster: SeparateCluster
    ) -> None:
        """Test that a runner's start fails with an error naming the worker that cannot
        import cancelflow, and that the failure is not kept: once that worker is gone, the
        same runner starts and runs."""

        async def body() -> None:
            await separate_cluster.start()
            bad = separate_cluster.start_worker(without_cancelflow=True, name="no-cancelflow")
            async with distributed.Client(separate_cluster.address, asynchronous=True) as client:
                await client.wait_for_workers(2, timeout=WAIT)
                workers = (await client.scheduler.identity())["workers"]
                bad_address = next(
                    address for address, info in workers.items() if info["name"] == "no-cancelflow"
                )
                runner = DaskRunner(client, run_in="thread")
                with pytest.raises(RuntimeError, match="cannot import cancelflow") as info:
                    await runner.run_sync(add, 1, 2)
                assert f"worker {bad_address}" in str(info.value)
                assert "the scheduler cannot" not in str(info.value)  # it has cancelflow
                bad.kill()
                bad.wait(WAIT)
                deadline = time.monotonic() + WAIT
                while bad_address in (await client.scheduler.identity())["workers"]:
                    assert time.monotonic() < deadline, "the scheduler kept the dead worker"
                    await asyncio.sleep(0.05)  # re-check soon; the scheduler notices
                assert await runner.run_sync(add, 1, 2) == 3
                await runner.aclose()

        run(body(), CLUSTER_WAIT)


def _spin_node(ctx: NodeContext) -> None:
    spin_with_grandchild()


class TestBoundedClose:
    def test_aclose_abandons_a_call_still_running_after_its_timeout(self, tmp_path: Path) -> None:
        """Test that aclose(timeout) returns once the timeout passed although a thread
        node that ignores its token still runs, counts it in abandoned_calls, and that
        the abandoned call raises ClusterConnectionError once the runner's client closed."""
        gate = tmp_path / "gate"

        async def body() -> None:
            cluster = await _local_cluster()
            try:
                runner = DaskRunner(cluster.scheduler_address, warm_pool=False, run_in="thread")
                reports = Reports()
                call = asyncio.ensure_future(
                    runner.run_sync(
                        backendloads.finish_behind_gate, str(gate), partial_sink=reports
                    )
                )
                try:
                    await reports.wait("started")
                    await runner.aclose(timeout=0.2)
                    assert runner.abandoned_calls == 1
                    with pytest.raises(ClusterConnectionError) as info:
                        await call
                    assert "started" in info.value.partial_results
                finally:
                    gate.touch()
            finally:
                await cluster.close()

        run(body(), CLUSTER_WAIT)

    @pytest.mark.parametrize("timeout", [-1, float("nan"), "1"])
    def test_aclose_refuses_a_bad_timeout(self, timeout: Any) -> None:
        """Test that aclose refuses a timeout that is not seconds >= 0 or None, naming it."""

        async def body() -> None:
            runner = DaskRunner("tcp://127.0.0.1:1")
            with pytest.raises((TypeError, ValueError), match="timeout"):
                await runner.aclose(timeout=timeout)

        run(body())


# == loopback only ============================================================================
class TestLoopbackOnly:
    def test_the_check_sees_a_socket_listening_beyond_loopback(self) -> None:
        """Test that listening_beyond_loopback reports a socket on 0.0.0.0 and not one on
        127.0.0.1 (so the checks below can fail)."""
        with socket.socket() as wide, socket.socket() as narrow:
            wide.bind(("0.0.0.0", 0))
            wide.listen()
            narrow.bind(("127.0.0.1", 0))
            narrow.listen()
            found = listening_beyond_loopback([os.getpid()])
            port = wide.getsockname()[1]
        assert found == [f"{os.getpid()} 0.0.0.0:{port}"]

    def test_the_module_cluster_listens_on_loopback_only(self, process_cluster: Any) -> None:
        """Test that the scheduler, the workers, their nannies and dashboards of the
        module's processes=True cluster listen on 127.0.0.1 only."""
        assert listening_beyond_loopback(ours_and_descendants()) == []

    def test_the_in_process_cluster_listens_on_loopback_only(self) -> None:
        """Test that the in-process cluster of the logic tests listens on 127.0.0.1 only."""

        async def body() -> list[str]:
            cluster = await _local_cluster()
            try:
                return listening_beyond_loopback([os.getpid()])
            finally:
                await cluster.close()

        assert run(body(), CLUSTER_WAIT) == []

    def test_a_cluster_of_separate_processes_listens_on_loopback_only(
        self, separate_cluster: SeparateCluster
    ) -> None:
        """Test that a scheduler and a worker started from the command line as the tests
        start them listen on 127.0.0.1 only (the CLI's default dashboard is 0.0.0.0)."""
        run(separate_cluster.start(), CLUSTER_WAIT)
        assert listening_beyond_loopback(separate_cluster.processes()) == []


# == the Dask internals the runner relies on ==================================================
class TestDaskInternals:
    """The runner uses a few private parts of distributed; if a release moves them, these
    fail and say which (the tested range is pinned in pyproject.toml's ``dask`` extra)."""

    def test_the_scheduler_has_what_the_runner_calls(self) -> None:
        """Test that the scheduler has stimulus_cancel with the arguments the runner passes,
        the pub/sub broker's topics, the events extension and the rest it uses."""

        async def body() -> tuple[list[str], dict[str, list[str]]]:
            cluster = await _local_cluster()
            try:
                async with distributed.Client(cluster.scheduler_address, asynchronous=True) as c:
                    on_scheduler = await c.run_on_scheduler(missing_scheduler_internals)
                    on_workers = await c.run(missing_worker_internals)
                    return on_scheduler, on_workers
            finally:
                await cluster.close()

        on_scheduler, on_workers = run(body(), CLUSTER_WAIT)
        version = distributed.__version__
        assert on_scheduler == [], (
            f"distributed {version} moved scheduler internals that DaskRunner uses "
            f"(src/cancelflow/_backends/_dask_worker.py): {on_scheduler}"
        )
        assert all(missing == [] for missing in on_workers.values()), (
            f"distributed {version} moved worker internals the plugin uses: {on_workers}"
        )

    def test_the_check_names_what_is_missing(self) -> None:
        """Test that the check reports a scheduler without those parts, naming each (so the
        test above can fail, and the runner's start says what is wrong)."""

        class Bare:
            extensions: ClassVar[dict[str, Any]] = {}

        missing = missing_scheduler_internals(dask_scheduler=Bare())
        assert any("stimulus_cancel" in m for m in missing)
        assert any("_broker._topics" in m for m in missing)
        assert any("events" in m for m in missing)
        assert "Worker.state.nthreads" in missing_worker_internals(dask_worker=Bare())

    def test_the_extra_pins_the_tested_range(self) -> None:
        """Test that the dask extra gives distributed an upper bound, and that the version
        installed here is inside the range."""
        from importlib.metadata import requires

        from packaging.requirements import Requirement

        pins = [
            Requirement(text.split(";")[0])
            for text in requires("cancelflow") or []
            if text.startswith("distributed") and "dask" in text
        ]
        assert pins, "the dask extra does not name distributed"
        specifier = pins[0].specifier
        assert any(spec.operator == "<" for spec in specifier), f"no upper bound: {specifier}"
        assert specifier.contains(distributed.__version__), (
            f"distributed {distributed.__version__} is outside the tested range {specifier}"
        )
