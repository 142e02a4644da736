"""Specification of ``cancelflow.to_process``: run_sync on the process-wide default pool."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

import faultloads
import workloads
from cancelflow import (
    CancellationToken,
    CancelledException,
    PipelineTimeoutException,
    PoolClosedError,
    to_process,
)
from support import Announcements, assert_gone, assert_not_running, names, run, run_script


@pytest.fixture(autouse=True)
def fresh_default_pool() -> Iterator[None]:
    to_process.shutdown_default_pool()
    yield
    to_process.shutdown_default_pool()


class TestRunSync:
    def test_returns_what_the_function_returns_in_another_process(self) -> None:
        """Test that run_sync returns fn(*args) computed in a worker of the default pool."""
        assert run(to_process.run_sync(workloads.add, 2, 3)) == 5
        pid = run(to_process.run_sync(workloads.whoami))
        assert pid != os.getpid()
        assert pid in to_process.current_default_process_pool().statistics().worker_pids

    def test_an_exception_reaches_the_caller(self) -> None:
        """Test that an exception raised by fn is raised by run_sync."""
        with pytest.raises(ValueError, match="bad row"):
            run(to_process.run_sync(workloads.raise_value_error, "bad row"))

    def test_cancelling_the_token_stops_the_running_task(self) -> None:
        """Test that cancelling the token while fn runs raises CancelledException with the
        reason, and the pool serves the next call."""

        async def main() -> tuple[CancelledException, int]:
            async with faultloads.open_beacon() as beacon:
                token = CancellationToken()
                call = asyncio.ensure_future(
                    to_process.run_sync(faultloads.wait_for_token, beacon.path, token=token)
                )
                pid = int(await beacon.wait("running"))
                token.cancel("stop it")
                with pytest.raises(CancelledException) as info:
                    await call
                return info.value, pid

        error, pid = run(main())
        assert error.reason == "stop it"
        assert pid != os.getpid()
        assert run(to_process.run_sync(workloads.add, 1, 1)) == 2

    def test_partial_sink_hears_what_the_task_stores(self) -> None:
        """Test that run_sync passes partial_sink on, as ProcessPool.run_sync does
        (regression: the argument was missing)."""
        seen = Announcements()

        async def main() -> None:
            token = CancellationToken()
            call = asyncio.ensure_future(
                to_process.run_sync(
                    workloads.store_then_spin,
                    2,
                    token=token,
                    partial_sink=seen,
                    grace_period=0,
                    term_grace_period=0,
                )
            )
            await asyncio.get_running_loop().run_in_executor(None, seen.wait, "pid")
            token.cancel("enough")
            with pytest.raises(CancelledException):
                await call

        run(main())
        assert seen.values["step-1"] == 1

    def test_a_cancelled_token_runs_nothing(self) -> None:
        """Test that a token cancelled before the call raises CancelledException on entry
        and runs no task."""
        token = CancellationToken()
        token.cancel("too late")
        with pytest.raises(CancelledException, match="too late"):
            run(to_process.run_sync(workloads.whoami, token=token))
        assert to_process.current_default_process_pool().statistics().completed_total == 0

    def test_timeout_raises_pipeline_timeout(self) -> None:
        """Test that fn running past timeout makes run_sync raise PipelineTimeoutException
        carrying that timeout."""
        with pytest.raises(PipelineTimeoutException) as info:
            run(to_process.run_sync(workloads.announce_and_wait_cooperatively, timeout=0.05))
        assert info.value.timeout == 0.05

    def test_cancelling_the_awaiting_task_stops_fn_first(self) -> None:
        """Test that cancelling the asyncio task awaiting run_sync stops the worker's task
        before asyncio.CancelledError reaches the caller."""

        async def main() -> int:
            async with faultloads.open_beacon() as beacon:
                call = asyncio.ensure_future(
                    to_process.run_sync(faultloads.wait_for_token, beacon.path)
                )
                await beacon.wait("running")
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                return to_process.current_default_process_pool().statistics().busy

        assert run(main()) == 0


class TestDefaultPool:
    def test_is_made_on_first_use_and_shared(self) -> None:
        """Test that every call uses one default pool, the one current_default_process_pool
        returns."""
        pool = to_process.current_default_process_pool()
        assert to_process.current_default_process_pool() is pool
        pid = run(to_process.run_sync(workloads.whoami))
        assert pid in pool.statistics().worker_pids

    def test_shutdown_closes_it_and_the_next_use_makes_a_new_one(self) -> None:
        """Test that after shutdown_default_pool the old pool refuses work and the next
        call runs on a new pool."""
        first = to_process.current_default_process_pool()
        to_process.shutdown_default_pool()
        with pytest.raises(PoolClosedError):
            first.submit(workloads.whoami)
        second = to_process.current_default_process_pool()
        assert second is not first
        assert run(to_process.run_sync(workloads.add, 2, 2)) == 4

    def test_shutdown_stops_running_tasks(self) -> None:
        """Test that shutdown_default_pool stops a task that is running (one that ignores
        its token too) and leaves none of the pool's processes."""
        pool = to_process.current_default_process_pool()
        announce = Announcements()
        future = pool.submit_task(workloads.announce_and_spin, partial_sink=announce)
        pid = announce.wait("pid")
        to_process.shutdown_default_pool()
        assert future.done()
        assert future.fate in ("cancelled", "terminated", "killed")
        assert_gone(pid)

    def test_a_program_that_never_shuts_it_down_exits_cleanly(self) -> None:
        """Test that a program that used run_sync and ends without shutdown_default_pool
        exits 0, silently, and leaves none of the pool's processes."""
        result = run_script(
            """
            import asyncio
            import workloads
            from cancelflow import to_process

            if __name__ == "__main__":
                print(asyncio.run(to_process.run_sync(workloads.whoami)), flush=True)
                print(to_process.current_default_process_pool().statistics().zygote_pid, flush=True)
            """
        )
        assert (result.returncode, result.stderr) == (0, "")
        for pid in map(int, result.stdout.split()):
            assert_not_running(pid)


class TestBadInput:
    def test_to_process(self) -> None:
        """Test that to_process.run_sync refuses a bad token or timeout, naming it, and
        then runs a good call."""
        try:
            with pytest.raises(TypeError, match=names("token")):
                run(to_process.run_sync(faultloads.echo, 1, token="t"))  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=names("timeout")):
                run(to_process.run_sync(faultloads.echo, 1, timeout=-1))
            assert run(to_process.run_sync(faultloads.echo, 1)) == 1
        finally:
            to_process.shutdown_default_pool()
