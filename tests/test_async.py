"""Specification of cancelflow's async entry points under trio (and anyio on both
backends): ``await token.wait()``, ``to_thread.run_sync``, the pools' ``run_sync``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

trio = pytest.importorskip("trio")
anyio = pytest.importorskip("anyio")

import cancelflow  # noqa: E402
from cancelflow import CancellationToken, ProcessPool, ThreadPool, current_token  # noqa: E402
from support import WAIT, assert_gone, needs_process_pools  # noqa: E402
from workloads import add, announce_and_spin  # noqa: E402


def _wait_for_token_then_report() -> str:
    token = current_token()
    token.wait_blocking(WAIT)
    return "cancelled" if token.is_cancelled else "not cancelled"


@pytest.fixture(autouse=True)
def fresh_default_pool() -> Iterator[None]:
    """The default pool of to_thread is made and shut down by each test."""
    cancelflow.to_thread.shutdown_default_pool()
    yield
    cancelflow.to_thread.shutdown_default_pool()


@pytest.fixture
def threads() -> Iterator[ThreadPool]:
    pool = ThreadPool(2, grace_period=0.05)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)


class TestUnderTrio:
    def test_token_wait_returns_when_another_thread_cancels(self) -> None:
        """Test that await token.wait() under trio wakes on a cancel from another thread."""
        token = CancellationToken()

        async def main() -> str | None:
            threading.Timer(0.01, token.cancel, ("from a thread",)).start()
            with trio.fail_after(WAIT):
                await token.wait()
            return token.cancel_reason

        assert trio.run(main) == "from a thread"

    def test_token_wait_is_cancelled_by_a_trio_cancel_scope(self) -> None:
        """Test that a trio cancel scope ends the wait (and the token's callback goes)."""
        token = CancellationToken()

        async def main() -> bool:
            with trio.move_on_after(0.01) as scope:
                await token.wait()
            return bool(scope.cancelled_caught)

        assert trio.run(main) is True
        assert not token.is_cancelled

    def test_to_thread_run_sync_returns_the_result(self) -> None:
        """Test that cancelflow.to_thread.run_sync works under trio."""

        async def main() -> int:
            return await cancelflow.to_thread.run_sync(add, 2, 3)

        assert trio.run(main) == 5

    def test_a_trio_cancel_stops_the_thread_task_then_propagates(self, threads: ThreadPool) -> None:
        """Test that cancelling the awaiting trio task cancels the thread task's token and
        the cancel propagates only once the task is over."""
        seen: list[str] = []

        def record() -> str:
            result = _wait_for_token_then_report()
            seen.append(result)
            return result

        async def main() -> bool:
            with trio.move_on_after(0.05) as scope:
                await threads.run_sync(record)
            return bool(scope.cancelled_caught)

        assert trio.run(main) is True
        assert seen == ["cancelled"]  # the task was over before the cancel propagated

    @needs_process_pools
    def test_a_process_task_is_killed_when_the_trio_task_is_cancelled(self) -> None:
        """Test that a trio cancel stops a process task that ignores its token, with its
        worker gone before the cancel propagates."""
        with ProcessPool(1, grace_period=0.0, term_grace_period=0.0) as pool:
            pool.wait_ready(WAIT)
            [worker] = pool.statistics().worker_pids

            async def main() -> bool:
                with trio.move_on_after(0.2) as scope:
                    await pool.run_sync(announce_and_spin)
                return bool(scope.cancelled_caught)

            assert trio.run(main) is True
            assert_gone(worker)
            assert pool.submit(add, 1, 1).result(WAIT) == 2


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
class TestUnderAnyio:
    def test_token_wait_and_to_thread(self, backend: str) -> None:
        """Test that token.wait() and to_thread.run_sync work under anyio on both backends."""
        token = CancellationToken()

        async def main() -> tuple[int, str | None]:
            value = await cancelflow.to_thread.run_sync(add, 20, 22)
            threading.Timer(0.01, token.cancel, ("anyio",)).start()
            with anyio.fail_after(WAIT):
                await token.wait()
            return value, token.cancel_reason

        assert anyio.run(main, backend=backend) == (42, "anyio")

    def test_a_cancelled_scope_waits_for_the_task_without_spinning(
        self, backend: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that run_sync cancelled by an anyio cancel scope sleeps while the task
        finishes, however many times the loop turns meanwhile (anyio re-delivers the
        cancel on every turn until the task leaves the scope)."""
        import asyncio

        waits = 0
        shield = asyncio.shield

        def counting_shield(awaitable: Any) -> Any:
            nonlocal waits
            waits += 1
            return shield(awaitable)

        monkeypatch.setattr(asyncio, "shield", counting_shield)
        started, release = threading.Event(), threading.Event()

        def blocked() -> None:
            started.set()
            release.wait(WAIT)

        pool = ThreadPool(1, grace_period=WAIT)
        try:

            async def main() -> None:
                async with anyio.create_task_group() as group:
                    scope = anyio.CancelScope()

                    async def runner() -> None:
                        with scope:
                            await pool.run_sync(blocked)

                    group.start_soon(runner)
                    await cancelflow.to_thread.run_sync(started.wait, WAIT)
                    scope.cancel()
                    for _ in range(200):  # turns of the loop while the task is stuck
                        await anyio.sleep(0)
                    release.set()

            anyio.run(main, backend=backend)
        finally:
            release.set()
            pool.shutdown(wait=True)
        assert waits <= 3
