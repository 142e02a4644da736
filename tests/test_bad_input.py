"""Bad input across the public API (issue 9, part 5).

Every constructor and call given a wrong type, an out-of-range number, an unknown id, or
called after shutdown gets a precise exception that names the offending argument, raised
before any work starts (no task queued, no node run, no process started, no pipeline
registered or cancelled), and leaves the object usable: each test then makes a good call
on the same object.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

import faultloads
from cancelflow import (
    CancellationRegistry,
    CancellationToken,
    EventBus,
    Node,
    NodeContext,
    PipelineDefinitionError,
    PipelineExecutor,
    PoolClosedError,
    ProcessPool,
    Superseder,
    ThreadPool,
)
from support import WAIT, names, run, value_of

NAN, INF = math.nan, math.inf


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


class NodeRecorder:
    """A node function that records each call (to prove nothing ran)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, ctx: NodeContext) -> str:
        self.calls.append(ctx.node_id)
        return ctx.node_id


@pytest.fixture(scope="module")
def process_pool() -> Iterator[ProcessPool]:
    with ProcessPool(1, grace_period=0.05, term_grace_period=0.2, name="bad-input") as pool:
        assert pool.wait_ready(WAIT)
        yield pool


# -- CancellationToken ------------------------------------------------------------------------


class TestCancellationTokenBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "error", "argument"),
        [
            ({"timeout": "1"}, TypeError, "timeout"),
            ({"timeout": True}, TypeError, "timeout"),
            ({"timeout": -1}, ValueError, "timeout"),
            ({"timeout": NAN}, ValueError, "timeout"),
            ({"timeout": INF}, ValueError, "timeout"),
            ({"name": 3}, TypeError, "name"),
        ],
    )
    def test_constructor(
        self, kwargs: dict[str, Any], error: type[Exception], argument: str
    ) -> None:
        """Test that a bad timeout or name is refused, naming it, and tokens still work."""
        with pytest.raises(error, match=names(argument)):
            CancellationToken(**kwargs)
        token = CancellationToken(name="fine")
        assert token.cancel("ok")
        assert token.cancel_reason == "ok"

    @pytest.mark.parametrize(
        ("call", "error", "argument"),
        [
            (lambda t: t.cancel(3), TypeError, "reason"),
            (lambda t: t.on_cancel(3), TypeError, "callback"),
            (lambda t: t.wait_blocking("soon"), TypeError, "timeout"),
            (lambda t: t.wait_blocking(-1), ValueError, "timeout"),
            (lambda t: t.wait_blocking(NAN), ValueError, "timeout"),
            (lambda t: t.child(timeout=-1), ValueError, "timeout"),
            (lambda t: CancellationToken.linked(t, 3), TypeError, "tokens[1]"),  # type: ignore[arg-type]
        ],
    )
    def test_methods(
        self, call: Callable[[CancellationToken], object], error: type[Exception], argument: str
    ) -> None:
        """Test that a bad argument to a token method is refused, naming it, and leaves the
        token active and working."""
        token = CancellationToken()
        with pytest.raises(error, match=names(argument)):
            call(token)
        assert not token.is_cancelled
        ran: list[str] = []
        token.on_cancel(lambda: ran.append("callback"))
        assert token.cancel("ok")
        assert ran == ["callback"]
        assert token.cancel_reason == "ok"


# -- ProcessPool ------------------------------------------------------------------------------


class TestProcessPoolBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "error", "argument"),
        [
            ({"max_workers": "2"}, TypeError, "max_workers"),
            ({"max_workers": True}, TypeError, "max_workers"),
            ({"max_workers": 0}, ValueError, "max_workers"),
            ({"max_workers": -3}, ValueError, "max_workers"),
            ({"grace_period": "x"}, TypeError, "grace_period"),
            ({"grace_period": -1}, ValueError, "grace_period"),
            ({"grace_period": NAN}, ValueError, "grace_period"),
            ({"grace_period": INF}, ValueError, "grace_period"),
            ({"term_grace_period": None}, TypeError, "term_grace_period"),
            ({"term_grace_period": -0.5}, ValueError, "term_grace_period"),
            ({"name": 3}, TypeError, "name"),
        ],
    )
    def test_constructor(
        self,
        process_pool: ProcessPool,
        kwargs: dict[str, Any],
        error: type[Exception],
        argument: str,
    ) -> None:
        """Test that a bad constructor argument is refused, naming it, before any process
        starts; the other pool keeps working."""
        before = children()
        with pytest.raises(error, match=names(argument)):
            ProcessPool(**kwargs)
        assert children() == before
        assert process_pool.submit(faultloads.echo, 1).result(WAIT) == 1

    @pytest.mark.parametrize(
        ("call", "error", "argument"),
        [
            (lambda p: p.submit_task(3), TypeError, "fn"),
            (lambda p: p.submit_task(faultloads.echo, 3), TypeError, "args"),
            (lambda p: p.submit_task(faultloads.echo, (1,), 3), TypeError, "kwargs"),
            (lambda p: p.submit_task(faultloads.echo, (1,), token="t"), TypeError, "token"),
            (lambda p: p.submit_task(faultloads.echo, (1,), timeout=0), ValueError, "timeout"),
            (lambda p: p.submit_task(faultloads.echo, (1,), timeout=-1), ValueError, "timeout"),
            (lambda p: p.submit_task(faultloads.echo, (1,), timeout="1"), TypeError, "timeout"),
            (lambda p: p.submit_task(faultloads.echo, (1,), timeout=NAN), ValueError, "timeout"),
            (
                lambda p: p.submit_task(faultloads.echo, (1,), grace_period=-1),
                ValueError,
                "grace_period",
            ),
            (
                lambda p: p.submit_task(faultloads.echo, (1,), term_grace_period="x"),
                TypeError,
                "term_grace_period",
            ),
            (
                lambda p: p.submit_task(faultloads.echo, (1,), partial_sink=3),
                TypeError,
                "partial_sink",
            ),
            # a callable that cannot travel even by value (a lambda can: cloudpickle)
            (lambda p: p.submit_task(functools.partial(print, threading.Lock())), TypeError, "fn"),
            (lambda p: p.submit_task(faultloads.echo, (threading.Lock(),)), TypeError, "args[0]"),
            (
                lambda p: p.submit_task(faultloads.echo, (), {"value": threading.Lock()}),
                TypeError,
                "kwargs['value']",
            ),
            (
                lambda p: p.submit_task(faultloads.echo, (CancellationToken(),)),
                TypeError,
                "args[0]",
            ),
        ],
    )
    def test_submit_task(
        self,
        process_pool: ProcessPool,
        call: Callable[[ProcessPool], object],
        error: type[Exception],
        argument: str,
    ) -> None:
        """Test that a bad submission is refused, naming the argument, before anything is
        queued or run; the pool then runs the next task."""
        before = process_pool.statistics()
        with pytest.raises(error, match=names(argument)):
            call(process_pool)
        after = process_pool.statistics()
        assert (after.queued, after.completed_total) == (0, before.completed_total)
        assert process_pool.submit(faultloads.echo, "next").result(WAIT) == "next"

    @pytest.mark.parametrize(
        ("kwargs", "error", "argument"),
        [
            ({"token": "t"}, TypeError, "token"),
            ({"timeout": -1}, ValueError, "timeout"),
            ({"grace_period": "x"}, TypeError, "grace_period"),
            ({"partial_sink": 3}, TypeError, "partial_sink"),
        ],
    )
    def test_run_sync(
        self,
        process_pool: ProcessPool,
        kwargs: dict[str, Any],
        error: type[Exception],
        argument: str,
    ) -> None:
        """Test that run_sync refuses a bad option, naming it, before taking a worker."""
        before = process_pool.statistics().completed_total
        with pytest.raises(error, match=names(argument)):
            run(process_pool.run_sync(faultloads.echo, 1, **kwargs))
        assert process_pool.statistics().completed_total == before
        assert run(process_pool.run_sync(faultloads.echo, 2)) == 2

    def test_calls_after_shutdown(self) -> None:
        """Test that every way of offering work to a shut-down pool raises PoolClosedError
        naming the pool, that shutdown stays idempotent, and that a new pool works."""
        pool = ProcessPool(1, name="closed-pool")
        pool.shutdown(wait=True)
        calls: list[Callable[[], object]] = [
            lambda: pool.submit(faultloads.echo, 1),
            lambda: pool.submit_task(faultloads.echo, (1,)),
            lambda: run(pool.run_sync(faultloads.echo, 1)),
            lambda: list(pool.map(faultloads.echo, [1, 2])),
        ]
        for call in calls:
            with pytest.raises(PoolClosedError, match="closed-pool"):
                call()
        pool.shutdown(wait=True)
        with ProcessPool(1) as fresh:
            assert fresh.submit(faultloads.echo, 3).result(WAIT) == 3


# -- ThreadPool -------------------------------------------------------------------------------


class TestThreadPoolBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "error", "argument"),
        [
            ({"max_workers": "2"}, TypeError, "max_workers"),
            ({"max_workers": False}, TypeError, "max_workers"),
            ({"max_workers": 0}, ValueError, "max_workers"),
            ({"grace_period": "x"}, TypeError, "grace_period"),
            ({"grace_period": -1}, ValueError, "grace_period"),
            ({"grace_period": NAN}, ValueError, "grace_period"),
            ({"name": 3}, TypeError, "name"),
        ],
    )
    def test_constructor(
        self, kwargs: dict[str, Any], error: type[Exception], argument: str
    ) -> None:
        """Test that a bad constructor argument is refused, naming it."""
        with pytest.raises(error, match=names(argument)):
            ThreadPool(**kwargs)

    @pytest.mark.parametrize(
        ("call", "error", "argument"),
        [
            (lambda p: p.submit_task(3), TypeError, "fn"),
            (lambda p: p.submit_task(faultloads.echo, 3), TypeError, "args"),
            (lambda p: p.submit_task(faultloads.echo, (1,), 3), TypeError, "kwargs"),
            (lambda p: p.submit_task(faultloads.echo, (1,), token="t"), TypeError, "token"),
            (lambda p: p.submit_task(faultloads.echo, (1,), timeout=-1), ValueError, "timeout"),
            (lambda p: p.submit_task(faultloads.echo, (1,), timeout="1"), TypeError, "timeout"),
            (
                lambda p: p.submit_task(faultloads.echo, (1,), grace_period=INF),
                ValueError,
                "grace_period",
            ),
            (
                lambda p: p.submit_task(faultloads.echo, (1,), partial_sink=3),
                TypeError,
                "partial_sink",
            ),
            (
                lambda p: p.submit_task(faultloads.echo, (1,), interrupt_on_cancel="yes"),
                TypeError,
                "interrupt_on_cancel",
            ),
        ],
    )
    def test_submit_task(
        self,
        thread_pool: ThreadPool,
        call: Callable[[ThreadPool], object],
        error: type[Exception],
        argument: str,
    ) -> None:
        """Test that a bad submission is refused, naming the argument, before a thread is
        started or a task queued; the pool then runs the next task."""
        with pytest.raises(error, match=names(argument)):
            call(thread_pool)
        stats = thread_pool.statistics()
        assert (stats.workers, stats.queued, stats.completed) == (0, 0, 0)
        assert thread_pool.submit(faultloads.echo, "next").result(WAIT) == "next"

    def test_run_sync_bad_token(self, thread_pool: ThreadPool) -> None:
        """Test that run_sync refuses a token that is not a CancellationToken, naming it."""
        with pytest.raises(TypeError, match=names("token")):
            run(thread_pool.run_sync(faultloads.echo, 1, token="t"))  # type: ignore[arg-type]
        assert run(thread_pool.run_sync(faultloads.echo, 2)) == 2

    def test_calls_after_shutdown(self) -> None:
        """Test that a shut-down pool refuses work with PoolClosedError naming it."""
        pool = ThreadPool(1, name="closed-threads")
        pool.shutdown(wait=True)
        with pytest.raises(PoolClosedError, match="closed-threads"):
            pool.submit(faultloads.echo, 1)
        with pytest.raises(PoolClosedError, match="closed-threads"):
            run(pool.run_sync(faultloads.echo, 1))
        pool.shutdown(wait=True)
        assert pool.statistics().workers == 0


# -- pipeline definitions ------------------------------------------------------------


class TestPipelineDefinitionBadInput:
    @pytest.mark.parametrize(
        ("nodes", "match"),
        [
            (3, names("nodes")),
            ("ab", names("nodes")),
            ([Node("a", value_of), 3], names("nodes[1]")),
            ([Node("a", value_of), Node("a", value_of)], "duplicate node id 'a'"),
            ([Node("a", value_of, deps=["ghost"])], "unknown node 'ghost'"),
            ([Node("a", value_of, deps=["a"])], "depends on itself"),
            (
                [Node("a", value_of, deps=["b"]), Node("b", value_of, deps=["a"])],
                "cycle: a -> b -> a",
            ),
        ],
    )
    def test_pipeline_definition(self, nodes: Any, match: str) -> None:
        """Test that a bad pipeline is refused, naming what is wrong, before any node runs
        or the id is registered; the executor then runs a good pipeline."""
        executor = PipelineExecutor()
        recorder = NodeRecorder()

        async def main() -> dict[str, Any]:
            with pytest.raises(PipelineDefinitionError, match=match):
                await executor.execute_pipeline("p", nodes)
            assert "p" not in executor.registry
            return await executor.execute_pipeline("p", [Node("ok", recorder)])

        assert run(main()) == {"ok": "ok"}
        assert recorder.calls == ["ok"]


# -- PipelineExecutor -------------------------------------------------------------------------


class TestPipelineExecutorBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "error", "argument"),
        [
            ({"registry": {}}, TypeError, "registry"),
            ({"mode": "soft"}, ValueError, "mode"),
            ({"graceful_timeout": 0}, ValueError, "graceful_timeout"),
            ({"graceful_timeout": "1"}, TypeError, "graceful_timeout"),
            ({"cleanup_timeout": -1}, ValueError, "cleanup_timeout"),
            ({"cleanup_timeout": NAN}, ValueError, "cleanup_timeout"),
            ({"events": "bus"}, TypeError, "events"),
            ({"thread_pool": "pool"}, TypeError, "thread_pool"),
            ({"process_pool": 3}, TypeError, "process_pool"),
        ],
    )
    def test_constructor(
        self, kwargs: dict[str, Any], error: type[Exception], argument: str
    ) -> None:
        """Test that a bad constructor argument is refused, naming it."""
        with pytest.raises(error, match=names(argument)):
            PipelineExecutor(**kwargs)

    @pytest.mark.parametrize(
        ("kwargs", "error", "argument"),
        [
            ({"pipeline_id": 3}, TypeError, "pipeline_id"),
            ({"pipeline_id": ""}, TypeError, "pipeline_id"),
            ({"context": ["a"]}, TypeError, "context"),
            ({"timeout": -1}, ValueError, "timeout"),
            ({"timeout": "1"}, TypeError, "timeout"),
            ({"timeout": INF}, ValueError, "timeout"),
            ({"cancel_token": "t"}, TypeError, "cancel_token"),
            ({"mode": "soft"}, ValueError, "mode"),
            ({"graceful_timeout": 0}, ValueError, "graceful_timeout"),
            ({"cleanup_handlers": 3}, TypeError, "cleanup_handlers"),
            ({"cleanup_handlers": [print, 3]}, TypeError, "cleanup_handlers[1]"),
        ],
    )
    @pytest.mark.parametrize("method", ["execute_pipeline", "run_pipeline"])
    def test_run_arguments(
        self, method: str, kwargs: dict[str, Any], error: type[Exception], argument: str
    ) -> None:
        """Test that a bad run argument is refused, naming it, before any node runs, any
        event is published or the id is registered; the executor then runs a pipeline."""
        executor = PipelineExecutor()
        published: list[str] = []
        executor.events.subscribe("*", lambda event: published.append(event.name))
        recorder = NodeRecorder()
        call = {"pipeline_id": "p", "nodes": [Node("a", recorder)], **kwargs}

        async def main() -> dict[str, Any]:
            with pytest.raises(error, match=names(argument)):
                await getattr(executor, method)(**call)
            assert executor.registry.active_pipelines() == ()
            assert (recorder.calls, published) == ([], [])
            return await executor.execute_pipeline("p", [Node("a", recorder)])

        assert run(main()) == {"a": "a"}

    def test_running_pipeline_id(self) -> None:
        """Test that a second run under a running id is refused, naming the id, and that
        the running pipeline is left alone to complete."""
        executor = PipelineExecutor()
        started, release = asyncio.Event(), asyncio.Event()

        async def held(ctx: NodeContext) -> str:
            started.set()
            await release.wait()
            return "held"

        async def main() -> dict[str, Any]:
            first = asyncio.create_task(executor.execute_pipeline("p", [Node("a", held)]))
            await started.wait()
            with pytest.raises(PipelineDefinitionError, match="'p'"):
                await executor.execute_pipeline("p", [Node("b", value_of)])
            assert not executor.registry.get_token("p").is_cancelled
            release.set()
            return await first

        assert run(main()) == {"a": "held"}

    @pytest.mark.parametrize(
        ("kwargs", "error", "argument"),
        [
            ({"key": 3}, TypeError, "key"),
            ({"nodes": [Node("a", value_of, deps=["ghost"])]}, PipelineDefinitionError, "ghost"),
            ({"nodes": 3}, PipelineDefinitionError, "nodes"),
            ({"reason": 3}, TypeError, "reason"),
            ({"context": 3}, TypeError, "context"),
            ({"timeout": -1}, ValueError, "timeout"),
            ({"mode": "soft"}, ValueError, "mode"),
            ({"graceful_timeout": "1"}, TypeError, "graceful_timeout"),
            ({"pipeline_id": 3}, TypeError, "pipeline_id"),
        ],
    )
    def test_run_superseding_checks_before_superseding(
        self, kwargs: dict[str, Any], error: type[Exception], argument: str
    ) -> None:
        """Test that a bad superseding call is refused, naming the argument, before it
        cancels the key's running pipeline, which completes; the key then still works."""
        executor = PipelineExecutor()
        started, release = asyncio.Event(), asyncio.Event()

        async def held(ctx: NodeContext) -> str:
            started.set()
            await release.wait()
            return "held"

        async def main() -> tuple[Any, Any]:
            first = asyncio.create_task(executor.run_superseding("k", [Node("a", held)]))
            await started.wait()
            call = {"key": "k", "nodes": [Node("b", value_of)], **kwargs}
            with pytest.raises(error, match=names(argument)):
                await executor.run_superseding(**call)
            assert not executor.registry.get_token("k").is_cancelled
            release.set()
            done = await first
            again = await executor.run_superseding("k", [Node("c", value_of)])
            return done, again

        done, again = run(main())
        assert (done.outcome, done.results) == ("completed", {"a": "held"})
        assert (again.outcome, again.results) == ("completed", {"c": "c"})

    def test_closed_executor(self) -> None:
        """Test that a closed executor refuses runs with PoolClosedError, registering
        nothing, and that its registry still serves a new executor."""
        registry = CancellationRegistry()
        executor = PipelineExecutor(registry)

        async def main() -> dict[str, Any]:
            await executor.aclose()
            with pytest.raises(PoolClosedError, match="closed"):
                await executor.execute_pipeline("p", [Node("a", value_of)])
            assert registry.active_pipelines() == ()
            return await PipelineExecutor(registry).execute_pipeline("p", [Node("a", value_of)])

        assert run(main()) == {"a": "a"}


# -- CancellationRegistry ---------------------------------------------------------------------


class TestCancellationRegistryBadInput:
    @pytest.mark.parametrize(
        ("value", "error"), [(0, ValueError), (-1, ValueError), (NAN, ValueError), ("1", TypeError)]
    )
    def test_constructor(self, value: Any, error: type[Exception]) -> None:
        """Test that a bad cleanup_timeout is refused, naming it."""
        with pytest.raises(error, match=names("cleanup_timeout")):
            CancellationRegistry(cleanup_timeout=value)

    @pytest.mark.parametrize(
        ("call", "error", "argument"),
        [
            (lambda r: r.register(3), TypeError, "pipeline_id"),
            (lambda r: r.register(""), TypeError, "pipeline_id"),
            (lambda r: r.register("new", cleanup_timeout=0), ValueError, "cleanup_timeout"),
            (lambda r: r.register("p"), PipelineDefinitionError, "'p'"),
            (lambda r: r.unregister(3), TypeError, "pipeline_id"),
            (lambda r: r.unregister(["p"]), TypeError, "pipeline_id"),
            (lambda r: r.register_cleanup_handler("ghost", print), KeyError, "'ghost'"),
            (lambda r: r.register_cleanup_handler("p", 3), TypeError, "handler"),
            (lambda r: r.register_cleanup_handler(3, print), TypeError, "pipeline_id"),
            (lambda r: r.get_token("ghost"), KeyError, "'ghost'"),
            (lambda r: r.get_token(3), TypeError, "pipeline_id"),
            (lambda r: r.store_partial_result("p", 3, 1), TypeError, "key"),
            (lambda r: r.store_partial_result("ghost", "k", 1), KeyError, "'ghost'"),
            (lambda r: r.get_partial_results("ghost"), KeyError, "'ghost'"),
            (lambda r: r.cancel_threadsafe("p", 3), TypeError, "reason"),
            (lambda r: r.cancel_threadsafe("ghost", 3), TypeError, "reason"),
            (lambda r: r.cancel_threadsafe(3), TypeError, "pipeline_id"),
            (lambda r: r.cancel_threadsafe(["p"]), TypeError, "pipeline_id"),
            (lambda r: run(r.cancel("p", 3)), TypeError, "reason"),
            (lambda r: run(r.cancel(3)), TypeError, "pipeline_id"),
            (lambda r: run(r.cancel_all(3)), TypeError, "reason"),
        ],
    )
    def test_methods(
        self,
        call: Callable[[CancellationRegistry], object],
        error: type[Exception],
        argument: str,
    ) -> None:
        """Test that a bad registry call is refused, naming the argument or the unknown
        id, changes nothing, and that the registry then cancels and cleans up as usual."""
        registry = CancellationRegistry()
        token = registry.register("p")
        with pytest.raises(error, match=names(argument) if argument.isidentifier() else argument):
            call(registry)
        assert registry.active_pipelines() == ("p",)
        assert not token.is_cancelled
        ran: list[str] = []
        registry.register_cleanup_handler("p", lambda: ran.append("cleanup"))
        assert run(registry.cancel("p", "ok"))
        assert (token.cancel_reason, ran) == ("ok", ["cleanup"])

    def test_unknown_pipeline_is_not_an_error_to_cancel(self) -> None:
        """Test that cancelling an unknown (or finished) pipeline returns False rather than
        raising: cancel and completion race freely."""
        registry = CancellationRegistry()
        registry.register("p")
        registry.unregister("p")
        assert run(registry.cancel("p")) is False
        assert registry.cancel_threadsafe("ghost") is False
        assert registry.unregister("p") is False

    def test_handler_for_a_finished_pipeline(self) -> None:
        """Test that registering a cleanup handler for a pipeline that finished raises
        KeyError naming it (the handler would never run); a new run can register one."""
        executor = PipelineExecutor()

        async def main() -> list[str]:
            await executor.execute_pipeline("p", [Node("a", value_of)])
            with pytest.raises(KeyError, match=r"'p'.*finished"):
                executor.registry.register_cleanup_handler("p", print)
            ran: list[str] = []
            token = CancellationToken()

            async def first(ctx: NodeContext) -> None:
                executor.registry.register_cleanup_handler("p", lambda: ran.append("ran"))
                token.cancel("stop")

            result = await executor.run_pipeline("p", [Node("a", first)], cancel_token=token)
            assert result.outcome == "cancelled"
            return ran

        assert run(main()) == ["ran"]

    def test_handler_while_cleanup_runs(self) -> None:
        """Test that a handler registered once the cleanup started is refused with
        RuntimeError naming the pipeline, and the cleanup completes."""
        registry = CancellationRegistry()
        registry.register("p")
        refused: list[BaseException] = []

        def handler() -> None:
            try:
                registry.register_cleanup_handler("p", print)
            except RuntimeError as exc:
                refused.append(exc)

        registry.register_cleanup_handler("p", handler)
        assert run(registry.cancel("p"))
        assert len(refused) == 1
        assert "'p'" in str(refused[0])


# -- EventBus, Superseder ---------------------------------------------------------------------


class TestEventBusBadInput:
    @pytest.mark.parametrize(
        ("value", "error"), [("1", TypeError), (0, ValueError), (-1, ValueError), (NAN, ValueError)]
    )
    def test_constructor(self, value: Any, error: type[Exception]) -> None:
        """Test that a bad subscriber_timeout is refused, naming it."""
        with pytest.raises(error, match=names("subscriber_timeout")):
            EventBus(subscriber_timeout=value)

    @pytest.mark.parametrize(
        ("call", "error", "argument"),
        [
            (lambda b: b.subscribe("node_exploded", print), ValueError, "node_exploded"),
            (lambda b: b.subscribe("*", 3), TypeError, "callback"),
        ],
    )
    def test_subscribe(
        self, call: Callable[[EventBus], object], error: type[Exception], argument: str
    ) -> None:
        """Test that a bad subscription is refused, naming the argument, and the bus still
        delivers to good subscribers."""
        bus = EventBus()
        with pytest.raises(error, match=names(argument)):
            call(bus)
        assert not bus.has_subscribers()
        seen: list[str] = []
        bus.subscribe("*", lambda event: seen.append(event.name))

        async def main() -> None:
            executor = PipelineExecutor(events=bus)
            await executor.execute_pipeline("p", [])

        run(main())
        assert seen == ["pipeline_started", "pipeline_finished"]


class TestSupersederBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "error", "argument"),
        [
            ({"key": 3}, TypeError, "key"),
            ({"job": 3}, TypeError, "job"),
            ({"reason": 3}, TypeError, "reason"),
        ],
    )
    def test_run(self, kwargs: dict[str, Any], error: type[Exception], argument: str) -> None:
        """Test that a bad run is refused, naming the argument, before it supersedes the
        key's running job, which completes; the key then still runs new jobs."""
        superseder = Superseder()
        started, release = asyncio.Event(), asyncio.Event()

        async def held(token: CancellationToken) -> str:
            started.set()
            await release.wait()
            return "cancelled" if token.is_cancelled else "held"

        async def quick(token: CancellationToken) -> str:
            return "quick"

        async def main() -> tuple[str, str]:
            first = asyncio.create_task(superseder.run("k", held))
            await started.wait()
            call = {"key": "k", "job": quick, **kwargs}
            with pytest.raises(error, match=names(argument)):
                await superseder.run(**call)
            release.set()
            return await first, await superseder.run("k", quick)

        assert run(main()) == ("held", "quick")
