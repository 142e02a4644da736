"""Tests for ``cancelflow._events``: EventBus, PipelineEvent, and what the executor emits."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from cancelflow import PipelineFailedException
from cancelflow._events import EVENT_NAMES, EventBus, PipelineEvent
from cancelflow._executor import PipelineExecutor
from cancelflow._node import Node, NodeContext
from support import LogCapture, run


def event(name: str = "pipeline_started", **data: Any) -> PipelineEvent:
    return PipelineEvent(name, "p", None, data)


class TestPipelineEvent:
    def test_payload_by_key(self) -> None:
        """Test that an event's payload reads as event["key"]."""
        assert event(wave_num=3)["wave_num"] == 3

    def test_is_immutable(self) -> None:
        """Test that an event cannot be changed by a subscriber."""
        with pytest.raises(AttributeError):
            event().name = "other"  # type: ignore[misc]


class TestEventBus:
    def test_sync_subscriber_gets_event(self) -> None:
        """Test that a sync subscriber is called with the event."""
        bus = EventBus()
        seen: list[PipelineEvent] = []
        bus.subscribe("pipeline_started", seen.append)
        sent = event()
        run(bus.emit(sent))
        assert seen == [sent]

    def test_async_subscriber_is_awaited(self) -> None:
        """Test that an async subscriber has finished when emit returns."""
        bus = EventBus()
        seen: list[str] = []

        async def subscriber(e: PipelineEvent) -> None:
            await asyncio.sleep(0)
            seen.append(e.name)

        bus.subscribe("pipeline_started", subscriber)
        run(bus.emit(event()))
        assert seen == ["pipeline_started"]

    def test_only_matching_events_delivered(self) -> None:
        """Test that a subscriber gets only the event it subscribed to."""
        bus = EventBus()
        seen: list[PipelineEvent] = []
        bus.subscribe("node_started", seen.append)
        run(bus.emit(event("pipeline_started")))
        assert seen == []

    def test_wildcard_gets_every_event(self) -> None:
        """Test that a "*" subscriber gets every event."""
        bus = EventBus()
        seen: list[str] = []
        bus.subscribe("*", lambda e: seen.append(e.name))

        async def main() -> None:
            for name in EVENT_NAMES:
                await bus.emit(event(name))

        run(main())
        assert seen == list(EVENT_NAMES)

    def test_subscribers_called_in_subscription_order(self) -> None:
        """Test that subscribers are called in the order they subscribed."""
        bus = EventBus()
        seen: list[int] = []
        bus.subscribe("pipeline_started", lambda e: seen.append(1))
        bus.subscribe("*", lambda e: seen.append(2))
        bus.subscribe("pipeline_started", lambda e: seen.append(3))
        run(bus.emit(event()))
        assert seen == [1, 2, 3]

    def test_raising_sync_subscriber_is_logged_and_others_run(self, logs: LogCapture) -> None:
        """Test that a raising sync subscriber is logged and later subscribers still run."""
        bus = EventBus()
        seen: list[PipelineEvent] = []

        def bad(e: PipelineEvent) -> None:
            raise RuntimeError("boom")

        bus.subscribe("pipeline_started", bad)
        bus.subscribe("pipeline_started", seen.append)
        run(bus.emit(event()))
        assert len(seen) == 1
        assert any("raised" in m for m in logs.messages("ERROR"))

    def test_raising_async_subscriber_is_logged(self, logs: LogCapture) -> None:
        """Test that a raising async subscriber is logged, not raised."""
        bus = EventBus()

        async def bad(e: PipelineEvent) -> None:
            raise RuntimeError("boom")

        bus.subscribe("pipeline_started", bad)
        run(bus.emit(event()))
        assert any("raised" in m for m in logs.messages("ERROR"))

    def test_hanging_async_subscriber_is_bounded(self, logs: LogCapture) -> None:
        """Test that an async subscriber past subscriber_timeout is cancelled and logged."""
        bus = EventBus(subscriber_timeout=0.01)
        seen: list[PipelineEvent] = []
        cancelled: list[bool] = []

        async def hang(e: PipelineEvent) -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.append(True)

        bus.subscribe("pipeline_started", hang)
        bus.subscribe("pipeline_started", seen.append)
        run(bus.emit(event()))
        assert cancelled == [True]
        assert len(seen) == 1
        assert any("timed out" in m for m in logs.messages("ERROR"))

    def test_unknown_event_name(self) -> None:
        """Test that subscribing to a misspelt event is refused."""
        with pytest.raises(ValueError, match="unknown event"):
            EventBus().subscribe("pipeline_start", print)

    def test_non_callable_subscriber(self) -> None:
        """Test that a non-callable subscriber is refused."""
        with pytest.raises(TypeError, match="callable"):
            EventBus().subscribe("pipeline_started", 3)  # type: ignore[arg-type]

    def test_bad_subscriber_timeout(self) -> None:
        """Test that a non-positive subscriber_timeout is refused."""
        with pytest.raises(ValueError, match="subscriber_timeout"):
            EventBus(subscriber_timeout=0)

    def test_unsubscribe(self) -> None:
        """Test that unsubscribe stops delivery and reports whether it removed anything."""
        bus = EventBus()
        seen: list[PipelineEvent] = []
        bus.subscribe("pipeline_started", seen.append)
        assert bus.unsubscribe("pipeline_started", seen.append) is True
        assert bus.unsubscribe("pipeline_started", seen.append) is False
        run(bus.emit(event()))
        assert seen == []

    def test_subscription_remove(self) -> None:
        """Test that Subscription.remove stops delivery and is idempotent."""
        bus = EventBus()
        seen: list[PipelineEvent] = []
        subscription = bus.subscribe("*", seen.append)
        assert subscription.remove() is True
        assert subscription.remove() is False
        assert not bus.has_subscribers()

    def test_unsubscribe_during_delivery(self) -> None:
        """Test that a subscriber removing another mid-delivery does not skip or break it."""
        bus = EventBus()
        seen: list[str] = []
        second = None

        def first(e: PipelineEvent) -> None:
            assert second is not None
            second.remove()
            seen.append("first")

        bus.subscribe("pipeline_started", first)
        second = bus.subscribe("pipeline_started", lambda e: seen.append("second"))
        run(bus.emit(event()))
        run(bus.emit(event()))
        assert seen == ["first", "second", "first"]

    def test_has_subscribers(self) -> None:
        """Test that has_subscribers sees direct and wildcard subscriptions."""
        bus = EventBus()
        assert not bus.has_subscribers("node_started")
        bus.subscribe("*", print)
        assert bus.has_subscribers("node_started")
        assert bus.has_subscribers()


# -- what the executor emits -----------------------------------------------------------------


async def ok(ctx: NodeContext) -> str:
    return ctx.node_id


def recorder(executor: PipelineExecutor) -> list[PipelineEvent]:
    seen: list[PipelineEvent] = []
    executor.events.subscribe("*", seen.append)
    return seen


class TestExecutorEvents:
    def test_order_for_completed_run(self) -> None:
        """Test the event sequence of a completed two-wave run."""

        async def main() -> list[PipelineEvent]:
            executor = PipelineExecutor()
            seen = recorder(executor)
            await executor.execute_pipeline("p", [Node("a", ok), Node("b", ok, deps=["a"])])
            return seen

        seen = run(main())
        assert [(e.name, e.node_id) for e in seen] == [
            ("pipeline_started", None),
            ("node_started", "a"),
            ("node_finished", "a"),
            ("node_started", "b"),
            ("node_finished", "b"),
            ("pipeline_finished", None),
        ]
        assert all(e.pipeline_id == "p" for e in seen)
        assert dict(seen[0].data) == {"total_waves": 2, "node_count": 2, "mode": "graceful"}
        assert seen[3]["wave_num"] == 1
        assert seen[3]["run_in"] == "loop"
        assert dict(seen[-1].data) == {
            "outcome": "completed",
            "wave_num": 2,
            "total_waves": 2,
            "results_count": 2,
            "reason": None,
        }

    def test_cancelled_run_emits_execution_cancelled(self) -> None:
        """Test that a cancelled run emits execution_cancelled (seed payload) before
        pipeline_finished, and that run_pipeline then emits cancellation_handled."""

        async def main() -> list[PipelineEvent]:
            executor = PipelineExecutor()
            seen = recorder(executor)

            async def cancel_me(ctx: NodeContext) -> str:
                executor.registry.cancel_threadsafe(ctx.pipeline_id, "new message")
                return "done"

            nodes = [Node("a", cancel_me), Node("b", ok, deps=["a"]), Node("c", ok, deps=["b"])]
            result = await executor.run_pipeline("p", nodes)
            assert result.cancelled
            return seen

        seen = run(main())
        names = [e.name for e in seen]
        assert names == [
            "pipeline_started",
            "node_started",
            "node_finished",
            "execution_cancelled",
            "pipeline_finished",
            "cancellation_handled",
        ]
        cancelled = seen[3]
        assert dict(cancelled.data) == {
            "wave_num": 1,
            "total_waves": 3,
            "partial_results_count": 1,
            "cancel_reason": "new message",
        }
        assert seen[4]["outcome"] == "cancelled"
        assert seen[4]["reason"] == "new message"
        handled = seen[5]
        assert handled["wave_num"] == 1
        assert handled["partial_results_count"] == 1
        assert handled["cancel_reason"] == "new message"
        assert "new message" in handled["message"]

    def test_failed_node_event_carries_error(self) -> None:
        """Test that node_failed carries the node's exception and the run ends "failed"."""
        boom = ValueError("boom")

        async def fail(ctx: NodeContext) -> None:
            raise boom

        async def main() -> list[PipelineEvent]:
            executor = PipelineExecutor()
            seen = recorder(executor)
            with pytest.raises(PipelineFailedException):
                await executor.execute_pipeline("p", [Node("bad", fail)])
            return seen

        seen = run(main())
        failed = [e for e in seen if e.name == "node_failed"]
        assert len(failed) == 1
        assert failed[0].node_id == "bad"
        assert failed[0]["error"] is boom
        assert "execution_cancelled" not in [e.name for e in seen]
        assert seen[-1]["outcome"] == "failed"

    def test_interrupted_node_emits_node_cancelled(self) -> None:
        """Test that a node interrupted by a cancel emits node_cancelled with the reason."""

        async def main() -> list[PipelineEvent]:
            executor = PipelineExecutor(mode="interrupt")
            seen = recorder(executor)
            started = asyncio.Event()

            async def wait_forever(ctx: NodeContext) -> None:
                started.set()
                await asyncio.Event().wait()

            task = asyncio.create_task(executor.run_pipeline("p", [Node("w", wait_forever)]))
            await started.wait()
            await executor.registry.cancel("p", "stop")
            await task
            return seen

        seen = run(main())
        cancelled = [e for e in seen if e.name == "node_cancelled"]
        assert [(e.node_id, e["reason"], e["wave_num"]) for e in cancelled] == [("w", "stop", 0)]

    def test_raising_subscribers_do_not_break_the_run(self, logs: LogCapture) -> None:
        """Test that sync and async subscribers raising on every event leave the run intact."""

        def bad_sync(e: PipelineEvent) -> None:
            raise RuntimeError("sync boom")

        async def bad_async(e: PipelineEvent) -> None:
            raise RuntimeError("async boom")

        async def main() -> dict[str, Any]:
            executor = PipelineExecutor()
            executor.events.subscribe("*", bad_sync)
            executor.events.subscribe("*", bad_async)
            return await executor.execute_pipeline("p", [Node("a", ok), Node("b", ok, deps=["a"])])

        assert run(main()) == {"a": "a", "b": "b"}
        assert len(logs.messages("ERROR")) == 2 * 6

    def test_async_subscriber_runs_on_the_loop_thread(self) -> None:
        """Test that async subscribers are awaited on the run's loop, in its thread."""
        threads: set[int] = set()

        async def subscriber(e: PipelineEvent) -> None:
            threads.add(threading.get_ident())

        async def main() -> None:
            executor = PipelineExecutor()
            executor.events.subscribe("*", subscriber)
            await executor.execute_pipeline("p", [Node("a", ok)])

        run(main())
        assert threads == {threading.get_ident()}


class TestEventNamesArePublic:
    def test_exported_from_the_package(self) -> None:
        """Test that the names EventBus.subscribe accepts are public as cancelflow.EVENT_NAMES."""
        import cancelflow

        assert cancelflow.EVENT_NAMES == EVENT_NAMES

    def test_the_readme_documents_each_event_and_its_payload(self) -> None:
        """Test that the README's event table has one row per event, in order."""
        import re
        from pathlib import Path

        readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
        table = readme[readme.index("| event | when | `data` |") :]
        table = table[: table.index("\n\n")]
        rows = re.findall(r"^\| `([a-z_]+)`(?: \*)? \| [^|]+ \| [^|]+ \|$", table, re.MULTILINE)
        assert tuple(rows) == EVENT_NAMES
