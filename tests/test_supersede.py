"""Tests for ``cancelflow._supersede``: Superseder, and PipelineExecutor.run_superseding."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cancelflow import CancellationToken, CancelledException
from cancelflow._executor import PipelineExecutor, PipelineResult
from cancelflow._node import Node, NodeContext
from cancelflow._supersede import DEFAULT_SUPERSEDE_REASON, Superseder
from support import let_ready_callbacks_run, run


class Tracker:
    """Jobs that record overlap: each runs until its token is cancelled or it is released."""

    def __init__(self) -> None:
        self.running = 0
        self.max_running = 0
        self.log: list[str] = []
        self.started: dict[str, asyncio.Event] = {}
        self.release: dict[str, asyncio.Event] = {}

    def job(self, name: str) -> Any:
        self.started[name] = asyncio.Event()
        self.release[name] = asyncio.Event()

        async def body(token: CancellationToken) -> str:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.log.append(f"start {name}")
            self.started[name].set()
            try:
                release = asyncio.ensure_future(self.release[name].wait())
                cancelled = asyncio.ensure_future(token.wait())
                await asyncio.wait({release, cancelled}, return_when=asyncio.FIRST_COMPLETED)
                release.cancel()
                cancelled.cancel()
                await asyncio.gather(release, cancelled, return_exceptions=True)
                if token.is_cancelled:
                    self.log.append(f"{name} cancelled: {token.cancel_reason}")
                    return f"{name} partial"
                return f"{name} done"
            finally:
                self.running -= 1
                self.log.append(f"end {name}")

        return body


class TestSuperseder:
    def test_single_job_returns_its_result(self) -> None:
        """Test that a job with nothing to supersede just runs."""

        async def job(token: CancellationToken) -> str:
            return "ok"

        assert run(Superseder().run("k", job)) == "ok"

    def test_new_job_cancels_the_running_one_and_waits_for_it(self) -> None:
        """Test that a new job cancels the running one with the reason and starts only
        after it ended."""
        tracker = Tracker()

        async def main() -> tuple[str, str]:
            superseder = Superseder()
            first = asyncio.create_task(superseder.run("k", tracker.job("a")))
            await tracker.started["a"].wait()
            second = asyncio.create_task(superseder.run("k", tracker.job("b"), reason="newer"))
            await tracker.started["b"].wait()
            tracker.release["b"].set()
            return await first, await second

        assert run(main()) == ("a partial", "b done")
        assert tracker.log == ["start a", "a cancelled: newer", "end a", "start b", "end b"]

    def test_concurrent_callers_never_overlap(self) -> None:
        """Test that many callers for one key never run two jobs at once, and that jobs
        superseded before starting never start."""
        tracker = Tracker()

        async def main() -> list[Any]:
            superseder = Superseder()
            first = asyncio.create_task(superseder.run("k", tracker.job("j0")))
            await tracker.started["j0"].wait()
            rest = [
                asyncio.create_task(superseder.run("k", tracker.job(f"j{i}"))) for i in range(1, 6)
            ]
            await tracker.started["j5"].wait()
            tracker.release["j5"].set()
            return await asyncio.gather(first, *rest, return_exceptions=True)

        outcomes = run(main())
        assert tracker.max_running == 1
        assert outcomes[0] == "j0 partial"
        assert outcomes[-1] == "j5 done"
        for skipped in outcomes[1:-1]:
            assert isinstance(skipped, CancelledException)
            assert skipped.reason == DEFAULT_SUPERSEDE_REASON
        assert [line for line in tracker.log if line.startswith("start")] == [
            "start j0",
            "start j5",
        ]

    def test_keys_are_independent(self) -> None:
        """Test that jobs of different keys run at the same time."""
        tracker = Tracker()

        async def main() -> list[str]:
            superseder = Superseder()
            tasks = [
                asyncio.create_task(superseder.run(key, tracker.job(key))) for key in ("x", "y")
            ]
            await tracker.started["x"].wait()
            await tracker.started["y"].wait()
            assert sorted(superseder.running_keys()) == ["x", "y"]
            for key in ("x", "y"):
                tracker.release[key].set()
            return list(await asyncio.gather(*tasks))

        assert run(main()) == ["x done", "y done"]
        assert tracker.max_running == 2

    def test_cancelled_waiter_keeps_the_successor_waiting(self) -> None:
        """Test that a caller cancelled while waiting does not let the next job start
        before the older job has ended."""
        tracker = Tracker()

        async def main() -> None:
            superseder = Superseder()

            tokens: list[CancellationToken] = []

            async def stubborn(token: CancellationToken) -> str:
                tokens.append(token)
                tracker.running += 1
                tracker.started["old"].set()
                await tracker.release["old"].wait()  # ignores its token
                tracker.running -= 1
                tracker.log.append("end old")
                return "old"

            tracker.started["old"] = asyncio.Event()
            tracker.release["old"] = asyncio.Event()
            old = asyncio.create_task(superseder.run("k", stubborn))
            await tracker.started["old"].wait()
            waiting = asyncio.create_task(superseder.run("k", tracker.job("mid")))
            await tokens[0].wait()  # "mid" has superseded "old" and waits for it
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            newest = asyncio.create_task(superseder.run("k", tracker.job("new")))
            await let_ready_callbacks_run()
            assert not tracker.started["new"].is_set()
            tracker.release["old"].set()
            await tracker.started["new"].wait()
            tracker.release["new"].set()
            assert await old == "old"
            assert await newest == "new done"

        run(main())
        assert tracker.max_running == 1
        assert tracker.log.index("end old") < tracker.log.index("start new")

    def test_cancel_key(self) -> None:
        """Test that cancel(key) tells the running job and leaves nothing behind."""
        tracker = Tracker()

        async def main() -> str:
            superseder = Superseder()
            task = asyncio.create_task(superseder.run("k", tracker.job("a")))
            await tracker.started["a"].wait()
            assert superseder.cancel("k", "user left") is True
            result: str = await task
            assert superseder.running_keys() == ()
            assert superseder.cancel("k") is False
            return result

        assert run(main()) == "a partial"
        assert "a cancelled: user left" in tracker.log

    def test_key_must_be_str(self) -> None:
        """Test that a non-string key is refused."""

        async def job(token: CancellationToken) -> None:
            return None

        with pytest.raises(TypeError, match="key"):
            run(Superseder().run(3, job))  # type: ignore[arg-type]


class TestRunSuperseding:
    def test_a_graceful_run_finishes_its_wave_when_superseded(self) -> None:
        """Test the message-queue pattern with mode="graceful": a new run cancels the
        running one, which ends gracefully (its wave finishes), and then runs itself."""
        log: list[str] = []

        async def main() -> tuple[PipelineResult, PipelineResult]:
            executor = PipelineExecutor()
            started, release = asyncio.Event(), asyncio.Event()

            async def reply(ctx: NodeContext) -> str:
                message = ctx.context["message"]
                log.append(f"start {message}")
                if message == "first":
                    started.set()
                    await release.wait()
                log.append(f"end {message}")
                return f"reply to {message}"

            async def send(ctx: NodeContext) -> str:
                return f"sent {ctx.inputs['reply']}"

            def nodes() -> list[Node]:
                return [Node("reply", reply), Node("send", send, deps=["reply"])]

            first = asyncio.create_task(
                executor.run_superseding("chat-1", nodes(), {"message": "first"}, mode="graceful")
            )
            await started.wait()
            second = asyncio.create_task(
                executor.run_superseding(
                    "chat-1", nodes(), {"message": "second"}, reason="New message received"
                )
            )
            await executor.registry.get_token("chat-1").wait()
            release.set()
            return await first, await second

        old, new = run(main())
        assert old.cancelled
        assert old.cancel_reason == "New message received"
        assert old.results == {"reply": "reply to first"}
        assert old.wave_cancelled_at == 1
        assert new.completed
        assert new.results == {"reply": "reply to second", "send": "sent reply to second"}
        assert log == ["start first", "end first", "start second", "end second"]

    def test_by_default_the_superseded_run_is_interrupted_and_the_new_one_starts(
        self,
    ) -> None:
        """Test that with the defaults (an executor in graceful mode) a superseded run is
        interrupted: its running node is cancelled at once, and the newer request starts
        without waiting for that node (which would otherwise never end here)."""

        async def main() -> tuple[PipelineResult, PipelineResult]:
            # graceful is the executor's default; unbounded here, so that only an
            # interrupt can end the first run
            executor = PipelineExecutor(graceful_timeout=None)
            started = asyncio.Event()

            async def slow(ctx: NodeContext) -> str:
                if ctx.context["message"] == "first":
                    started.set()
                    await asyncio.Event().wait()  # only an interrupt ends it
                return f"reply to {ctx.context['message']}"

            first = asyncio.create_task(
                executor.run_superseding("chat-2", [Node("reply", slow)], {"message": "first"})
            )
            await started.wait()
            new = await executor.run_superseding(
                "chat-2", [Node("reply", slow)], {"message": "second"}
            )
            return await first, new

        old, new = run(main())
        assert old.cancelled
        assert old.node_fates == {"reply": "cancelled"}
        assert new.results == {"reply": "reply to second"}

    def test_superseded_before_start_runs_nothing(self) -> None:
        """Test that a run superseded while waiting returns a cancelled, empty result."""
        ran: list[str] = []

        async def main() -> list[PipelineResult]:
            executor = PipelineExecutor(mode="interrupt")
            started = asyncio.Event()

            async def work(ctx: NodeContext) -> str:
                ran.append(ctx.context["n"])
                if ctx.context["n"] == "0":
                    started.set()
                    await asyncio.Event().wait()
                n: str = ctx.context["n"]
                return n

            tasks = [
                asyncio.create_task(
                    executor.run_superseding("k", [Node("w", work)], {"n": "0"}, pipeline_id="r0")
                )
            ]
            await started.wait()
            for n in ("1", "2"):
                tasks.append(
                    asyncio.create_task(
                        executor.run_superseding(
                            "k", [Node("w", work)], {"n": n}, pipeline_id=f"r{n}"
                        )
                    )
                )
            return list(await asyncio.gather(*tasks))

        results = run(main())
        assert ran == ["0", "2"]
        assert [r.outcome for r in results] == ["cancelled", "cancelled", "completed"]
        skipped = results[1]
        assert (skipped.pipeline_id, skipped.results, skipped.wave_cancelled_at) == ("r1", {}, 0)
        assert skipped.cancel_reason == DEFAULT_SUPERSEDE_REASON
