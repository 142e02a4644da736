"""Fault injection (issue 9, part 2).

A worker segfaults, is SIGKILLed from outside, runs out of memory under an RLIMIT_AS it
set itself, hangs in a C call that ignores signals, or leaves a grandchild that ignores
SIGTERM or escapes into its own session; a cleanup handler raises, hangs past its
timeout, or cancels its pipeline again. Each time the affected task fails with a precise
error, the rest of the pipeline behaves as its mode says, the pool heals (same size,
every worker serves), and nothing is left behind (the autouse leak check, plus explicit
checks on the processes the faults started).

Every wait is on an event (a beacon from the node, a future) under a watchdog.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import resource
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest

import faultloads
import workloads
from cancelflow import (
    CancellationRegistry,
    Node,
    NodeContext,
    PipelineExecutor,
    PipelineResult,
    ProcessPool,
    WorkerCrashedError,
)
from support import WAIT, Announcements, assert_gone, run

MODES = ("graceful", "interrupt")
MP_SINGLETONS = ("resource_tracker", "forkserver")


def assert_healed(pool: ProcessPool, size: int) -> None:
    """The pool is back to ``size`` workers and they run tasks."""
    assert pool.wait_ready(WAIT), "watchdog: the pool did not heal"
    assert pool.statistics().workers == size
    futures = [pool.submit(faultloads.echo, index) for index in range(2 * size)]
    assert [future.result(WAIT) for future in futures] == list(range(2 * size))


@pytest.fixture
def pool() -> Iterator[ProcessPool]:
    with ProcessPool(2, grace_period=0.05, term_grace_period=0.3, name="faults") as p:
        assert p.wait_ready(WAIT)
        yield p


# -- one pipeline around a faulty process node ----------------------------------------------


@dataclass
class FaultRun:
    """What a pipeline around a faulty process node did."""

    result: PipelineResult
    beacon: str | None
    cleanups: list[str] = field(default_factory=list)


def fault_pipeline(
    pool: ProcessPool,
    fault: Callable[[NodeContext], Any],
    mode: str,
    *,
    on_running: Callable[[str], None] | None = None,
    cancel: bool = False,
) -> FaultRun:
    """Run wave 0 = [the fault (process), a held loop node], wave 1 = [after both].

    ``on_running`` gets the fault's beacon once it runs (e.g. to kill it from outside);
    ``cancel`` then cancels the run with the registry and releases the held node, so a
    graceful run lets it finish while an interrupted one stops it.
    """
    cleanups: list[str] = []
    seen: list[str | None] = [None]

    async def main() -> PipelineResult:
        async with faultloads.open_beacon() as beacon:
            release = asyncio.Event()

            async def held(ctx: NodeContext) -> str:
                await release.wait()
                return "held"

            async def after(ctx: NodeContext) -> str:
                return "after"

            executor = PipelineExecutor(
                process_pool=pool,
                mode=mode,  # type: ignore[arg-type]
                graceful_timeout=0.2,
            )
            nodes = [
                Node("fault", fault, run_in="process"),
                Node("held", held),
                Node("after", after, deps=["fault", "held"]),
            ]
            task = asyncio.create_task(
                executor.run_pipeline(
                    "p",
                    nodes,
                    {"beacon": beacon.path},
                    cleanup_handlers=[lambda: cleanups.append("cleanup")],
                )
            )
            if on_running is not None or cancel:
                running = seen[0] = await beacon.wait("fault.pid")
                if on_running is not None:
                    on_running(running)
                if cancel:
                    assert executor.registry.cancel_threadsafe("p", "stop")
                    release.set()
            return await task

    result = run(main())
    return FaultRun(result, seen[0], cleanups)


def assert_failed_by(outcome: FaultRun, error: type[BaseException], fate: str) -> BaseException:
    """A node failure: the run failed at wave 0 because of the fault, whose error is the
    cause; the held sibling was interrupted in either mode; wave 1 never started."""
    result = outcome.result
    assert result.outcome == "failed"
    assert result.failed_node == "fault"
    assert result.wave_cancelled_at == 0
    assert result.node_fates == {"fault": fate, "held": "cancelled"}
    cause = result.error.__cause__ if result.error is not None else None
    assert isinstance(cause, error)
    assert outcome.cleanups == ["cleanup"]
    return cause


def assert_cancelled_and_stopped(outcome: FaultRun, mode: str, fate: str) -> None:
    """A cancel: the fault node was stopped the hard way; graceful lets the held sibling
    finish (its output is kept), interrupt stops it; wave 1 never started."""
    result = outcome.result
    assert result.outcome == "cancelled"
    assert result.cancel_reason == "stop"
    assert result.wave_cancelled_at == 0
    held = "finished" if mode == "graceful" else "cancelled"
    assert result.node_fates == {"fault": fate, "held": held}
    assert ("held" in result.results) is (mode == "graceful")
    assert "after" not in result.results
    assert outcome.cleanups == ["cleanup"]


# -- the tests -------------------------------------------------------------------------------


class TestWorkerCrash:
    @pytest.mark.parametrize("mode", MODES)
    def test_segfault_fails_the_node_with_the_signal(self, pool: ProcessPool, mode: str) -> None:
        """Test that a segfaulting process node fails the pipeline with WorkerCrashedError
        carrying SIGSEGV and the worker's pid, interrupting its sibling in either mode,
        and that the pool heals."""
        outcome = fault_pipeline(pool, faultloads.node_segfault, mode, on_running=lambda _: None)
        cause = assert_failed_by(outcome, WorkerCrashedError, "crashed")
        assert isinstance(cause, WorkerCrashedError)
        assert cause.signal == signal.SIGSEGV
        assert str(cause.pid) == outcome.beacon
        assert "SIGSEGV" in str(cause)
        assert_healed(pool, 2)
        assert pool.statistics().crashed_total == 1

    @pytest.mark.parametrize("mode", MODES)
    def test_sigkill_from_outside_fails_the_node(self, pool: ProcessPool, mode: str) -> None:
        """Test that a worker SIGKILLed by someone else fails its node with
        WorkerCrashedError carrying SIGKILL (not a cancellation: nobody asked), and that
        the pool heals."""

        def kill(pid: str) -> None:
            os.kill(int(pid), signal.SIGKILL)

        outcome = fault_pipeline(pool, faultloads.node_spin, mode, on_running=kill)
        cause = assert_failed_by(outcome, WorkerCrashedError, "crashed")
        assert isinstance(cause, WorkerCrashedError)
        assert (cause.signal, cause.exitcode) == (signal.SIGKILL, None)
        assert outcome.beacon is not None
        assert_gone(int(outcome.beacon))
        assert_healed(pool, 2)

    def test_crash_fails_only_its_own_task(self, pool: ProcessPool) -> None:
        """Test that a worker crash fails only the task it ran: a task running on the
        other worker at the same time completes."""
        sink = Announcements()
        with faultloads.sync_beacon() as (path, events, _):
            survivor = pool.submit(faultloads.wait_for_token, path)
            assert events["running"].wait(WAIT)
            crash = pool.submit_task(workloads.segfault, partial_sink=sink)
            with pytest.raises(WorkerCrashedError) as info:
                crash.result(WAIT)
            assert info.value.pid == sink.wait("pid")
            assert not survivor.done()
            survivor.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                survivor.result(WAIT)
            assert survivor.fate == "cancelled"
        assert_healed(pool, 2)


class TestMemoryExhaustion:
    @pytest.mark.parametrize("mode", MODES)
    def test_memory_error_fails_the_node(self, pool: ProcessPool, mode: str) -> None:
        """Test that a node that lowers its RLIMIT_AS and then allocates past it fails
        the pipeline with its MemoryError, and that every worker afterwards has the full
        limit again and can allocate (the poisoned worker was replaced)."""
        outcome = fault_pipeline(pool, faultloads.node_exhaust_memory, mode)
        assert_failed_by(outcome, MemoryError, "failed")
        assert "fault.limit" in outcome.result.results
        assert_healed(pool, 2)
        limits = {pool.submit(faultloads.rlimit_as).result(WAIT) for _ in range(4)}
        assert limits == {resource.getrlimit(resource.RLIMIT_AS)}
        sizes = [pool.submit(faultloads.allocate, 256) for _ in range(4)]
        assert {future.result(WAIT) for future in sizes} == {256 * 1024 * 1024}


class TestUnstoppableCalls:
    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize(
        "fault",
        [faultloads.node_c_call_ignoring_sigterm, faultloads.node_pbkdf2_forever],
        ids=["sigterm-blocked-sleep", "pbkdf2"],
    )
    def test_c_call_ignoring_signals_is_killed(
        self, pool: ProcessPool, mode: str, fault: Callable[[NodeContext], Any]
    ) -> None:
        """Test that a node stuck in a C call that SIGTERM cannot interrupt is SIGKILLed
        (fate killed, worker confirmed gone) when the pipeline is cancelled, its stored
        pid survives in partial_results, and the pool heals."""
        outcome = fault_pipeline(pool, fault, mode, cancel=True)
        assert_cancelled_and_stopped(outcome, mode, "killed")
        assert outcome.beacon is not None
        assert outcome.result.results["fault.pid"] == int(outcome.beacon)
        assert_gone(int(outcome.beacon))
        assert_healed(pool, 2)


class TestEscapingProcessTrees:
    @pytest.mark.parametrize("mode", MODES)
    def test_grandchild_ignoring_sigterm_is_killed(self, pool: ProcessPool, mode: str) -> None:
        """Test that when a node that started a SIGTERM-ignoring child is cancelled, the
        node ends terminated (its finally blocks could run), its worker survives and
        serves again, and the child is killed and reaped."""
        outcome = fault_pipeline(
            pool, faultloads.node_grandchild_ignoring_sigterm, mode, cancel=True
        )
        assert_cancelled_and_stopped(outcome, mode, "terminated")
        assert outcome.beacon is not None
        worker, child = (int(pid) for pid in outcome.beacon.split(","))
        assert_gone(child)
        assert worker in pool.statistics().worker_pids
        assert_healed(pool, 2)

    @pytest.mark.parametrize("mode", MODES)
    def test_grandchild_in_its_own_session_is_killed(self, pool: ProcessPool, mode: str) -> None:
        """Test that a child that moved to its own session and process group (so no
        killpg reaches it) is still found and killed with its worker when the node,
        which blocks SIGTERM, is cancelled; the pool heals."""
        outcome = fault_pipeline(pool, faultloads.node_grandchild_new_session, mode, cancel=True)
        assert_cancelled_and_stopped(outcome, mode, "killed")
        assert outcome.beacon is not None
        worker, child = (int(pid) for pid in outcome.beacon.split(","))
        assert os.getpgid(0) != -1  # (we are still in our own group)
        assert_gone(child)
        assert_gone(worker)
        assert_healed(pool, 2)


class TestCleanupHandlerFaults:
    @staticmethod
    def cancelled_run(
        handlers: list[Callable[[], Any]], *, cleanup_timeout: float = WAIT
    ) -> tuple[PipelineResult, PipelineExecutor]:
        """Run a loop node until the registry cancels the run; return its result."""
        executor = PipelineExecutor(mode="interrupt", cleanup_timeout=cleanup_timeout)

        async def main() -> PipelineResult:
            started = asyncio.Event()

            async def block(ctx: NodeContext) -> None:
                started.set()
                await asyncio.Event().wait()

            task = asyncio.create_task(
                executor.run_pipeline("p", [Node("block", block)], cleanup_handlers=handlers)
            )
            await started.wait()
            assert await executor.registry.cancel("p", "first")
            return await task

        return run(main()), executor

    def test_raising_handler_does_not_stop_the_others(self) -> None:
        """Test that a cleanup handler that raises is reported in cleanup_errors, the
        others still run (in reverse order, once each), and the ending is unchanged."""
        ran: list[str] = []

        def boom() -> None:
            ran.append("boom")
            raise ValueError("handler broke")

        result, _ = self.cancelled_run(
            [lambda: ran.append("first"), boom, lambda: ran.append("last")]
        )
        assert ran == ["last", "boom", "first"]
        assert (result.outcome, result.cancel_reason) == ("cancelled", "first")
        assert [type(e) for e in result.cleanup_errors] == [ValueError]
        assert str(result.cleanup_errors[0]) == "handler broke"

    def test_async_handler_past_its_timeout_is_cancelled(self) -> None:
        """Test that an async handler that hangs past cleanup_timeout is cancelled (its
        finally runs), reported as TimeoutError, and the others still run."""
        ran: list[str] = []

        async def hang() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                ran.append("hang unwound")

        result, _ = self.cancelled_run(
            [lambda: ran.append("first"), hang, lambda: ran.append("last")], cleanup_timeout=0.05
        )
        assert ran == ["last", "hang unwound", "first"]
        assert [type(e) for e in result.cleanup_errors] == [TimeoutError]
        assert "did not finish within" in str(result.cleanup_errors[0])
        assert result.outcome == "cancelled"

    def test_sync_handler_past_its_timeout_is_abandoned(self) -> None:
        """Test that a sync handler blocked past cleanup_timeout is abandoned in its
        thread (TimeoutError reported, the run returns, the others run), and that the
        thread ends once the handler returns."""
        ran: list[str] = []
        entered, release = threading.Event(), threading.Event()

        def hang() -> None:
            entered.set()
            release.wait(WAIT)
            ran.append("hang returned")

        before = set(threading.enumerate())
        result, _ = self.cancelled_run(
            [lambda: ran.append("first"), hang, lambda: ran.append("last")], cleanup_timeout=0.05
        )
        assert entered.is_set()
        assert ran == ["last", "first"]  # the hung one had not returned
        assert [type(e) for e in result.cleanup_errors] == [TimeoutError]
        release.set()
        for thread in [t for t in threading.enumerate() if t not in before]:
            assert thread.name == "cancelflow-cleanup-p"
            thread.join(WAIT)
            assert not thread.is_alive()
        assert ran[-1] == "hang returned"

    @pytest.mark.parametrize(
        "how", ["await cancel", "await cancel_all", "cancel_threadsafe", "thread loop"]
    )
    def test_handler_cancelling_its_pipeline_again(self, how: str) -> None:
        """Test that a cleanup handler that cancels its own pipeline again gets False at
        once (regression, issue 9: an awaited cancel waited for its own cleanup until the
        handler timed out), no handler runs twice, and the first reason stays."""
        ran: list[str] = []
        answers: list[object] = []
        registry_box: list[CancellationRegistry] = []

        async def await_cancel() -> None:
            answers.append(await registry_box[0].cancel("p", "again"))

        async def await_cancel_all() -> None:
            answers.append(await registry_box[0].cancel_all("again"))

        def threadsafe() -> None:
            answers.append(registry_box[0].cancel_threadsafe("p", "again"))

        def thread_loop() -> None:
            answers.append(asyncio.run(registry_box[0].cancel("p", "again")))

        handler = {
            "await cancel": await_cancel,
            "await cancel_all": await_cancel_all,
            "cancel_threadsafe": threadsafe,
            "thread loop": thread_loop,
        }[how]
        executor = PipelineExecutor(mode="interrupt", cleanup_timeout=WAIT)
        registry_box.append(executor.registry)

        async def main() -> PipelineResult:
            started = asyncio.Event()

            async def block(ctx: NodeContext) -> None:
                started.set()
                await asyncio.Event().wait()

            task = asyncio.create_task(
                executor.run_pipeline(
                    "p",
                    [Node("block", block)],
                    cleanup_handlers=[lambda: ran.append("first"), handler],
                )
            )
            await started.wait()
            assert await executor.registry.cancel("p", "first")
            return await task

        result = run(main())
        assert answers == [[] if how == "await cancel_all" else False]
        assert ran == ["first"]
        assert result.cleanup_errors == ()
        assert (result.outcome, result.cancel_reason) == ("cancelled", "first")
        assert "p" not in executor.registry


class TestZygoteDeath:
    """The zygote is the pool's one helper process (cancelflow has no manager process):
    every worker is forked from it and freezes when it dies (PR_SET_PDEATHSIG=SIGSTOP), so
    the pool can kill each worker's whole tree, then start a new zygote."""

    def test_zygote_death_fails_the_running_task_and_keeps_its_partials(self) -> None:
        """Test that when the zygote is SIGKILLed, the running task fails with
        WorkerCrashedError naming the zygote, keeps every partial result it stored before,
        and its worker is gone with it (no orphan)."""
        pool = ProcessPool(1, name="orphaned")
        try:
            future = pool.submit_task(faultloads.store_then_kill_zygote, (200,))
            with pytest.raises(WorkerCrashedError, match="zygote process died"):
                future.result(WAIT)
            assert future.fate == "crashed"
            assert future.partial_results == {f"step-{i}": i for i in range(200)}
            assert future.pid is not None
            assert_gone(future.pid)
        finally:
            pool.shutdown(wait=True)

    def test_pool_heals_after_its_zygote_dies(self) -> None:
        """Test that a pool whose zygote was killed starts a new one and runs the next
        task (regression: it closed for good)."""
        pool = ProcessPool(1, name="orphaned")
        try:
            future = pool.submit_task(faultloads.store_then_kill_zygote, (1,))
            with pytest.raises(WorkerCrashedError):
                future.result(WAIT)
            assert pool.submit(faultloads.echo, 1).result(WAIT) == 1
        finally:
            pool.shutdown(wait=True)

    def test_queued_tasks_run_after_the_zygote_dies(self) -> None:
        """Test that tasks queued behind the one whose zygote died all run on the new
        zygote's workers."""
        pool = ProcessPool(1, name="orphaned")
        try:
            doomed = pool.submit_task(faultloads.store_then_kill_zygote, (1,))
            queued = [pool.submit(faultloads.echo, i) for i in range(5)]
            with pytest.raises(WorkerCrashedError):
                doomed.result(WAIT)
            assert [f.result(WAIT) for f in queued] == list(range(5))
        finally:
            pool.shutdown(wait=True)

    def test_grandchildren_die_with_the_zygote(self) -> None:
        """Test that a process the task started is killed when the zygote dies, not
        re-parented to PID 1 (regression: it outlived the pool)."""
        pool = ProcessPool(1, name="orphaned")
        try:
            future = pool.submit_task(faultloads.start_child_then_kill_zygote)
            with pytest.raises(WorkerCrashedError):
                future.result(WAIT)
            grandchild = future.partial_results["child"]
            assert_gone(grandchild)
        finally:
            pool.shutdown(wait=True)


class TestPoolShutdownDuringStartup:
    def test_pool_shut_down_while_its_zygote_starts_is_quiet(
        self, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """Test that a pool shut down before its zygote finished starting ends cleanly,
        with nothing on stderr (regression, issue 9: the zygote died on a BrokenPipeError
        traceback when it reported itself ready to a parent that had closed the channel)."""
        for _ in range(3):
            ProcessPool(1, name="short-lived").shutdown(wait=True)
        assert "Traceback" not in capfd.readouterr().err


class TestNoManagerProcess:
    def test_partial_results_survive_a_kill_without_a_manager(self, pool: ProcessPool) -> None:
        """Test that the only processes behind a running process node are the pool's
        zygote and its workers (no multiprocessing manager holds partial results, so
        there is none to die), and that what the node stored survives its worker being
        SIGKILLed."""
        census: list[list[str]] = []

        def take_census(_: str) -> None:
            # multiprocessing's own singletons may be alive from other tests: not ours.
            cmdlines = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]
            census.append([c for c in cmdlines if not any(s in c for s in MP_SINGLETONS)])

        outcome = fault_pipeline(
            pool,
            faultloads.node_c_call_ignoring_sigterm,
            "interrupt",
            on_running=take_census,
            cancel=True,
        )
        assert outcome.result.node_fates["fault"] == "killed"
        assert outcome.result.results["fault.pid"] == int(outcome.beacon or 0)
        (cmdlines,) = census
        assert len(cmdlines) == 3  # the zygote and two workers, forked from it
        assert all("cancelflow._process._zygote import zygote_main" in cmd for cmd in cmdlines)
