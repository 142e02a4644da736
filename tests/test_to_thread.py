"""Tests for ``cancelflow.to_thread``: run_sync on the process-wide default pool."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator

import pytest

import faultloads
from cancelflow import CancellationToken, CancelledException, PipelineTimeoutException, to_thread
from cancelflow._context import current_token
from cancelflow._thread_pool import ThreadPool
from support import WAIT, names, run


@pytest.fixture(autouse=True)
def fresh_default_pool() -> Iterator[None]:
    to_thread.shutdown_default_pool()
    yield
    to_thread.shutdown_default_pool()


class TestModule:
    def test_all_lists_public_names(self) -> None:
        """Test that __all__ names exactly the module's public callables."""
        public = {
            name
            for name, value in vars(to_thread).items()
            if not name.startswith("_")
            and callable(value)
            and getattr(value, "__module__", None) == to_thread.__name__
        }
        assert isinstance(to_thread.__all__, tuple)
        assert set(to_thread.__all__) == public


class TestRunSync:
    def test_returns_result_from_worker_thread(self) -> None:
        """Test that run_sync returns fn's result, computed in a cancelflow worker thread."""

        async def main() -> tuple[int, str]:
            return await to_thread.run_sync(
                lambda a, b: (a + b, threading.current_thread().name), 2, 3
            )

        value, thread_name = asyncio.run(main())
        assert value == 5
        assert thread_name.startswith("cancelflow-thread-")

    def test_token_cancelled_from_other_thread_releases_caller(self) -> None:
        """Test that cancelling the token from another thread makes run_sync raise CancelledException."""
        token = CancellationToken()
        stopped = threading.Event()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            started = asyncio.Event()

            def work() -> None:
                loop.call_soon_threadsafe(started.set)
                current_token().wait_blocking(WAIT)
                stopped.set()

            call = asyncio.create_task(to_thread.run_sync(work, token=token))
            await asyncio.wait_for(started.wait(), WAIT)
            canceller = threading.Thread(target=token.cancel, args=("stop now",))
            canceller.start()
            try:
                await asyncio.wait_for(call, WAIT)
            finally:
                canceller.join()

        with pytest.raises(CancelledException) as info:
            asyncio.run(main())
        assert info.value.reason == "stop now"
        assert stopped.wait(WAIT)

    def test_asyncio_cancellation_cancels_thread_token(self) -> None:
        """Test that cancelling the awaiting task propagates CancelledError and cancels the thread's token."""
        seen: list[CancellationToken] = []
        stopped = threading.Event()

        async def main() -> None:
            loop = asyncio.get_running_loop()
            started = asyncio.Event()

            def work() -> None:
                seen.append(current_token())
                loop.call_soon_threadsafe(started.set)
                seen[0].wait_blocking(WAIT)
                stopped.set()

            call = asyncio.create_task(to_thread.run_sync(work))
            await asyncio.wait_for(started.wait(), WAIT)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

        asyncio.run(main())
        assert stopped.wait(WAIT)
        assert seen[0].is_cancelled

    def test_cancelled_token_raises_before_taking_a_thread(self) -> None:
        """Test that an already-cancelled token raises CancelledException on entry, starting no thread."""
        token = CancellationToken()
        token.cancel("already")
        called = threading.Event()

        async def main() -> None:
            await to_thread.run_sync(called.set, token=token)

        with pytest.raises(CancelledException) as info:
            asyncio.run(main())
        assert info.value.reason == "already"
        assert not called.is_set()
        assert to_thread.current_default_thread_pool().statistics().workers == 0

    def test_timeout(self) -> None:
        """Test that fn running past timeout makes run_sync raise PipelineTimeoutException."""
        stopped = threading.Event()

        def work() -> None:
            current_token().wait_blocking(WAIT)
            stopped.set()

        async def main() -> None:
            await to_thread.run_sync(work, timeout=0.02)

        with pytest.raises(PipelineTimeoutException):
            asyncio.run(main())
        assert stopped.wait(WAIT)

    def test_bad_arguments(self) -> None:
        """Test that invalid arguments raise TypeError/ValueError naming the argument."""

        async def main() -> None:
            with pytest.raises(TypeError, match="fn"):
                await to_thread.run_sync(42)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="grace_period"):
                await to_thread.run_sync(print, grace_period=-1)

        asyncio.run(main())

    def test_copies_caller_context(self) -> None:
        """Test that fn sees the caller's contextvars, as with asyncio.to_thread."""
        var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

        async def main() -> str:
            var.set("caller")
            return await to_thread.run_sync(var.get)

        assert asyncio.run(main()) == "caller"


class TestCurrentDefaultThreadPool:
    def test_is_shared(self) -> None:
        """Test that every call returns the same ThreadPool until it is shut down."""
        pool = to_thread.current_default_thread_pool()
        assert isinstance(pool, ThreadPool)
        assert to_thread.current_default_thread_pool() is pool


class TestShutdownDefaultPool:
    def test_next_use_creates_new_pool(self) -> None:
        """Test that after shutdown_default_pool the next use gets a new, working pool."""

        async def main() -> int:
            return await to_thread.run_sync(lambda: 1)

        first = to_thread.current_default_thread_pool()
        assert asyncio.run(main()) == 1
        to_thread.shutdown_default_pool()
        assert to_thread.current_default_thread_pool() is not first
        assert asyncio.run(main()) == 1

    def test_is_idempotent(self) -> None:
        """Test that shutting down with no default pool, or twice, does nothing."""
        to_thread.shutdown_default_pool()
        to_thread.shutdown_default_pool()


class TestBadInput:
    def test_to_thread(self) -> None:
        """Test that to_thread.run_sync refuses a bad fn or token, naming it, and then
        runs a good call."""
        try:
            with pytest.raises(TypeError, match=names("fn")):
                run(to_thread.run_sync(3))  # type: ignore[arg-type]
            with pytest.raises(TypeError, match=names("token")):
                run(to_thread.run_sync(faultloads.echo, 1, token="t"))  # type: ignore[arg-type]
            assert run(to_thread.run_sync(faultloads.echo, 1)) == 1
        finally:
            to_thread.shutdown_default_pool()
