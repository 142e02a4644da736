"""Tests for ``cancelflow._registry``: CancellationRegistry."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import threading
from typing import Any

import pytest

from cancelflow import CancellationToken, PipelineDefinitionError
from cancelflow._registry import CancellationRegistry
from support import WAIT, LogCapture, let_ready_callbacks_run, other_tasks, run


class TestCancellationRegistry:
    # -- registration ------------------------------------------------------------------------
    def test_register_returns_active_token(self) -> None:
        """Test that register returns a new, not cancelled token named after the pipeline."""
        registry = CancellationRegistry()
        token = registry.register("p")
        assert isinstance(token, CancellationToken)
        assert not token.is_cancelled
        assert token.name == "p"
        assert registry.get_token("p") is token
        assert "p" in registry
        assert registry.active_pipelines() == ("p",)

    def test_second_registration_of_active_id(self) -> None:
        """Test that registering an id that is already active is refused."""
        registry = CancellationRegistry()
        registry.register("p")
        with pytest.raises(PipelineDefinitionError, match="already registered"):
            registry.register("p")

    def test_register_again_after_unregister(self) -> None:
        """Test that an id can be registered again once unregistered, with a new token."""
        registry = CancellationRegistry()
        first = registry.register("p")
        assert registry.unregister("p") is True
        assert registry.register("p") is not first

    def test_unregister_is_idempotent(self) -> None:
        """Test that unregistering an unknown id returns False and raises nothing."""
        assert CancellationRegistry().unregister("nope") is False

    @pytest.mark.parametrize("pipeline_id", ["", 3, None])
    def test_bad_pipeline_id(self, pipeline_id: Any) -> None:
        """Test that an empty or non-string id is refused."""
        with pytest.raises(TypeError, match="pipeline_id"):
            CancellationRegistry().register(pipeline_id)

    @pytest.mark.parametrize("value", [0, -1, float("inf")])
    def test_bad_cleanup_timeout(self, value: float) -> None:
        """Test that a non-positive or infinite cleanup_timeout is refused."""
        with pytest.raises(ValueError, match="cleanup_timeout"):
            CancellationRegistry(cleanup_timeout=value)

    # -- partial results ---------------------------------------------------------------------
    def test_partial_results_round_trip(self) -> None:
        """Test that stored partial results are read back as a copy."""
        registry = CancellationRegistry()
        registry.register("p")
        registry.store_partial_result("p", "a", 1)
        results = registry.get_partial_results("p")
        results["b"] = 2
        assert registry.get_partial_results("p") == {"a": 1}

    def test_partial_results_from_threads(self) -> None:
        """Test that partial results stored from many threads are all kept."""
        registry = CancellationRegistry()
        registry.register("p")
        threads = [
            threading.Thread(target=registry.store_partial_result, args=("p", f"k{i}", i))
            for i in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert registry.get_partial_results("p") == {f"k{i}": i for i in range(8)}

    def test_partial_results_of_unknown_pipeline(self) -> None:
        """Test that partial results of an unknown pipeline raise KeyError."""
        registry = CancellationRegistry()
        with pytest.raises(KeyError, match="no pipeline 'p'"):
            registry.get_partial_results("p")
        with pytest.raises(KeyError, match="no pipeline 'p'"):
            registry.store_partial_result("p", "k", 1)

    def test_partial_result_key_must_be_str(self) -> None:
        """Test that a non-string partial-result key is refused."""
        registry = CancellationRegistry()
        registry.register("p")
        with pytest.raises(TypeError, match="key"):
            registry.store_partial_result("p", 1, 1)  # type: ignore[arg-type]

    # -- cancelling --------------------------------------------------------------------------
    def test_cancel_sets_token_with_reason(self) -> None:
        """Test that cancel sets the token with the reason and returns True (seed 000)."""

        async def main() -> tuple[bool, CancellationToken]:
            registry = CancellationRegistry()
            token = registry.register("my_pipeline")
            won = await registry.cancel("my_pipeline", "User requested cancellation")
            return won, token

        won, token = run(main())
        assert won is True
        assert token.is_cancelled
        assert token.cancel_reason == "User requested cancellation"

    def test_second_cancel_returns_false_and_keeps_first_reason(self) -> None:
        """Test that a second cancel returns False and the first reason stays."""

        async def main() -> tuple[bool, str | None]:
            registry = CancellationRegistry()
            token = registry.register("p")
            await registry.cancel("p", "first")
            return await registry.cancel("p", "second"), token.cancel_reason

        assert run(main()) == (False, "first")

    def test_cancel_unknown_pipeline_returns_false(self) -> None:
        """Test that cancelling an unknown (or finished) pipeline is not an error."""
        assert run(CancellationRegistry().cancel("nope", "why")) is False
        assert CancellationRegistry().cancel_threadsafe("nope") is False

    def test_cancel_rejects_bad_reason(self) -> None:
        """Test that a non-string reason is refused."""
        registry = CancellationRegistry()
        registry.register("p")
        with pytest.raises(TypeError, match="reason"):
            run(registry.cancel("p", 3))  # type: ignore[arg-type]

    # -- cleanup handlers --------------------------------------------------------------------
    def test_handlers_run_in_reverse_order(self) -> None:
        """Test that cleanup handlers run in reverse registration order, sync and async."""
        order: list[str] = []

        async def async_handler() -> None:
            order.append("async")

        async def main() -> None:
            registry = CancellationRegistry()
            registry.register("p")
            registry.register_cleanup_handler("p", lambda: order.append("first"))
            registry.register_cleanup_handler("p", async_handler)
            registry.register_cleanup_handler("p", lambda: order.append("last"))
            await registry.cancel("p")

        run(main())
        assert order == ["last", "async", "first"]

    def test_cancel_returns_after_handlers_ran(self) -> None:
        """Test that the seed's cleanup_resource has run when cancel returns."""
        cleaned: list[bool] = []

        async def cleanup_resource() -> None:
            await asyncio.sleep(0)
            cleaned.append(True)

        async def main() -> None:
            registry = CancellationRegistry()
            registry.register("my_pipeline")
            registry.register_cleanup_handler("my_pipeline", cleanup_resource)
            await registry.cancel("my_pipeline", "User requested cancellation")
            assert cleaned == [True]

        run(main())

    def test_sync_handler_runs_in_a_worker_thread(self) -> None:
        """Test that a sync handler runs off the loop thread (so it can be bounded)."""
        threads: list[int] = []

        async def main() -> None:
            registry = CancellationRegistry()
            registry.register("p")
            registry.register_cleanup_handler("p", lambda: threads.append(threading.get_ident()))
            await registry.cancel("p")

        run(main())
        assert len(threads) == 1
        assert threads[0] != threading.get_ident()

    def test_handlers_run_once_for_concurrent_cancels(self) -> None:
        """Test that two concurrent cancels run the handlers exactly once."""
        calls: list[int] = []

        async def handler() -> None:
            await asyncio.sleep(0)
            calls.append(1)

        async def main() -> list[bool]:
            registry = CancellationRegistry()
            registry.register("p")
            registry.register_cleanup_handler("p", handler)
            return list(await asyncio.gather(registry.cancel("p", "a"), registry.cancel("p", "b")))

        assert sorted(run(main())) == [False, True]
        assert calls == [1]

    def test_second_cancel_waits_for_the_running_cleanup(self) -> None:
        """Test that a cancel arriving during the cleanup returns only once it is done."""
        state: list[str] = []

        async def main() -> None:
            registry = CancellationRegistry()
            registry.register("p")
            started, gate = asyncio.Event(), asyncio.Event()

            async def handler() -> None:
                started.set()
                await gate.wait()
                state.append("cleaned")

            registry.register_cleanup_handler("p", handler)
            first = asyncio.create_task(registry.cancel("p"))
            await started.wait()
            second = asyncio.create_task(registry.cancel("p"))
            await let_ready_callbacks_run()
            assert not second.done()
            gate.set()
            assert await second is False
            assert state == ["cleaned"]
            assert await first is True

        run(main())

    def test_cancel_threadsafe_from_another_thread(self) -> None:
        """Test that cancel_threadsafe sets the token at once and runs handlers on the loop."""
        loop_thread: list[int] = []
        handler_threads: list[int] = []
        done = asyncio.Event()

        async def handler() -> None:
            handler_threads.append(threading.get_ident())
            done.set()

        async def main() -> list[bool]:
            loop_thread.append(threading.get_ident())
            registry = CancellationRegistry()
            token = registry.register("p")
            registry.register_cleanup_handler("p", handler)
            results: list[bool] = []

            def canceller() -> None:
                results.append(registry.cancel_threadsafe("p", "from thread"))
                results.append(token.is_cancelled)  # set before returning
                results.append(registry.cancel_threadsafe("p", "again"))

            thread = threading.Thread(target=canceller)
            thread.start()
            await done.wait()
            thread.join()
            assert token.cancel_reason == "from thread"
            return results

        assert run(main()) == [True, True, False]
        assert handler_threads == loop_thread

    def test_cancel_threadsafe_from_signal_handler(self) -> None:
        """Test that cancel_threadsafe works from a signal handler and cleanup follows once."""
        calls: list[int] = []

        async def main() -> None:
            registry = CancellationRegistry()
            token = registry.register("p")
            done = asyncio.Event()

            async def handler() -> None:
                calls.append(1)
                done.set()

            registry.register_cleanup_handler("p", handler)
            previous = signal.signal(
                signal.SIGUSR1, lambda *_: registry.cancel_threadsafe("p", "signal")
            )
            try:
                os.kill(os.getpid(), signal.SIGUSR1)
                await done.wait()
            finally:
                signal.signal(signal.SIGUSR1, previous)
            assert token.cancel_reason == "signal"
            await registry.cancel("p")  # a later cancel does not re-run the handlers

        run(main())
        assert calls == [1]

    def test_raising_handler_is_logged_and_others_run(self, logs: LogCapture) -> None:
        """Test that a raising handler (sync or async) is logged with the pipeline id and
        the other handlers still run."""
        ran: list[str] = []

        async def bad_async() -> None:
            raise RuntimeError("async boom")

        def bad_sync() -> None:
            raise RuntimeError("sync boom")

        async def main() -> None:
            registry = CancellationRegistry()
            registry.register("p")
            registry.register_cleanup_handler("p", lambda: ran.append("first"))
            registry.register_cleanup_handler("p", bad_async)
            registry.register_cleanup_handler("p", bad_sync)
            registry.register_cleanup_handler("p", lambda: ran.append("last"))
            assert await registry.cancel("p") is True

        run(main())
        assert ran == ["last", "first"]
        assert len(logs.cancelflow("ERROR")) == 2
        assert all(r["extra"]["pipeline_id"] == "p" for r in logs.cancelflow("ERROR"))

    def test_hanging_async_handler_is_bounded(self, logs: LogCapture) -> None:
        """Test that an async handler past cleanup_timeout is cancelled, logged, and the
        other handlers still run."""
        ran: list[str] = []

        async def hang() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                ran.append("hang cancelled")

        async def main() -> None:
            registry = CancellationRegistry(cleanup_timeout=0.01)
            registry.register("p")
            registry.register_cleanup_handler("p", lambda: ran.append("other"))
            registry.register_cleanup_handler("p", hang)
            await registry.cancel("p")

        run(main())
        assert ran == ["hang cancelled", "other"]
        assert any("timed out" in r["message"] for r in logs.cancelflow("ERROR"))

    def test_hanging_sync_handler_is_bounded(self, logs: LogCapture) -> None:
        """Test that a blocking sync handler past its timeout is abandoned and the others run."""
        ran: list[str] = []
        release = threading.Event()

        def block() -> None:
            release.wait(WAIT)

        async def main() -> None:
            registry = CancellationRegistry()
            registry.register("p", cleanup_timeout=0.01)
            registry.register_cleanup_handler("p", lambda: ran.append("other"))
            registry.register_cleanup_handler("p", block)
            await registry.cancel("p")

        try:
            run(main())
            assert ran == ["other"]
            assert any("timed out" in r["message"] for r in logs.cancelflow("ERROR"))
        finally:
            release.set()  # let the abandoned thread end

    def test_handler_for_unknown_pipeline(self) -> None:
        """Test that registering a handler for an unknown pipeline raises KeyError."""
        with pytest.raises(KeyError, match="no pipeline 'p'"):
            CancellationRegistry().register_cleanup_handler("p", print)

    def test_handler_after_cleanup_ran(self) -> None:
        """Test that registering a handler once cleanup has run is refused."""

        async def main() -> None:
            registry = CancellationRegistry()
            registry.register("p")
            await registry.cancel("p")
            with pytest.raises(RuntimeError, match="already run its cleanup"):
                registry.register_cleanup_handler("p", print)

        run(main())

    def test_non_callable_handler(self) -> None:
        """Test that a non-callable handler is refused."""
        registry = CancellationRegistry()
        registry.register("p")
        with pytest.raises(TypeError, match="callable"):
            registry.register_cleanup_handler("p", "nope")  # type: ignore[arg-type]

    def test_unregister_drops_handlers_without_running(self) -> None:
        """Test that a pipeline unregistered without a cancel never runs its handlers."""
        ran: list[int] = []

        async def main() -> None:
            registry = CancellationRegistry()
            registry.register("p")
            registry.register_cleanup_handler("p", lambda: ran.append(1))
            registry.unregister("p")
            assert await registry.cancel("p") is False

        run(main())
        assert ran == []

    def test_cancel_all(self) -> None:
        """Test that cancel_all cancels every pipeline, runs each cleanup once, and returns
        the ids it cancelled."""
        ran: list[str] = []

        async def main() -> list[str]:
            registry = CancellationRegistry()
            tokens = [registry.register(pid) for pid in ("a", "b", "c")]
            for pid in ("a", "b", "c"):
                registry.register_cleanup_handler(pid, functools.partial(ran.append, pid))
            await registry.cancel("b", "earlier")
            cancelled = await registry.cancel_all("shutdown")
            assert [t.cancel_reason for t in tokens] == ["shutdown", "earlier", "shutdown"]
            return cancelled

        assert run(main()) == ["a", "c"]
        assert sorted(ran) == ["a", "b", "c"]

    def test_no_task_left_after_cancel(self) -> None:
        """Test that no cleanup task is left once cancel has returned."""

        async def main() -> set[asyncio.Task[Any]]:
            registry = CancellationRegistry()
            registry.register("p")
            registry.register_cleanup_handler("p", lambda: None)
            await registry.cancel("p")
            return other_tasks()

        assert run(main()) == set()

    def test_registered_outside_a_loop(self) -> None:
        """Test that a pipeline registered outside any loop is cancelled, and cleaned up by
        an awaited cancel after a thread-safe one."""
        ran: list[int] = []
        registry = CancellationRegistry()
        token = registry.register("p")
        registry.register_cleanup_handler("p", lambda: ran.append(1))
        assert registry.cancel_threadsafe("p", "now") is True
        assert token.is_cancelled
        assert run(registry.cancel("p")) is False
        assert ran == [1]
