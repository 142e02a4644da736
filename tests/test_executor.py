"""Tests for ``cancelflow._executor``: PipelineExecutor and PipelineResult."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from cancelflow import (
    CancellationToken,
    CancelledException,
    PipelineDefinitionError,
    PipelineFailedException,
    PipelineTimeoutException,
    PoolClosedError,
)
from cancelflow._executor import PipelineExecutor, PipelineResult
from cancelflow._node import Node, NodeContext
from cancelflow._registry import CancellationRegistry
from cancelflow._thread_pool import ThreadPool
from support import (
    WAIT,
    LogCapture,
    let_ready_callbacks_run,
    needs_process_pools,
    other_tasks,
    run,
    value_of,
    wait,
)


def shut_down_within(pool: Any, seconds: float) -> None:
    """Shut ``pool`` down from a daemon thread; fail (not hang) if it takes too long."""
    thread = threading.Thread(target=pool.shutdown, args=(True,), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "watchdog: the pool did not shut down"


async def forever(ctx: NodeContext) -> None:
    await asyncio.Event().wait()


# -- process-node workloads (module level: the workers import them by name) -----------------


def proc_double(ctx: NodeContext) -> int:
    return int(ctx.inputs["a"]) * 2


def proc_store_signal_spin(ctx: NodeContext) -> None:
    """Stores its pid, tells the test it runs, then spins ignoring its token."""
    ctx.store_partial("pid", os.getpid())
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(ctx.context["sock"])
        sock.sendall(b"running")
    while True:
        pass


@asynccontextmanager
async def running_signal() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A Unix socket a process node connects to when it runs; the event is set then."""
    directory = tempfile.mkdtemp(prefix="cf")
    path = os.path.join(directory, "s")
    connected = asyncio.Event()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        connected.set()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_unix_server(on_connect, path)
    try:
        yield path, connected
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(directory, ignore_errors=True)


async def _twenty_one(ctx: NodeContext) -> int:
    return 21


class TestCompletedRuns:
    """A run that completes: outputs by node id, what each node receives, where it runs."""

    def test_returns_outputs_by_node_id(self) -> None:
        """Test that a completed run returns {node_id: output} (seed 000 call shape)."""

        async def main() -> dict[str, Any]:
            executor = PipelineExecutor()
            nodes = [Node("a", value_of), Node("b", value_of, deps=["a"])]
            return await executor.execute_pipeline("pipeline_id", nodes, {})

        assert run(main()) == {"a": "a", "b": "b"}

    def test_node_context(self) -> None:
        """Test that a node gets its deps' outputs, the context, its ids and a token."""
        seen: dict[str, Any] = {}

        async def first(ctx: NodeContext) -> int:
            return 20

        async def second(ctx: NodeContext) -> int:
            seen.update(
                inputs=dict(ctx.inputs),
                context=ctx.context,
                ids=(ctx.pipeline_id, ctx.node_id),
                token=ctx.token,
            )
            return int(ctx.inputs["first"]) + int(ctx.context["add"])

        async def main() -> dict[str, Any]:
            executor = PipelineExecutor()
            nodes = [Node("first", first), Node("second", second, deps=["first"])]
            return await executor.execute_pipeline("p", nodes, {"add": 1})

        assert run(main()) == {"first": 20, "second": 21}
        assert seen["inputs"] == {"first": 20}
        assert seen["context"] == {"add": 1}
        assert seen["ids"] == ("p", "second")
        assert isinstance(seen["token"], CancellationToken)
        assert not seen["token"].is_cancelled

    def test_empty_pipeline(self) -> None:
        """Test that a pipeline without nodes completes with no outputs."""
        assert run(PipelineExecutor().execute_pipeline("p", [])) == {}

    def test_thread_node_runs_in_the_thread_pool(self, thread_pool: ThreadPool) -> None:
        """Test that a plain function runs in a pool thread and gets its inputs."""
        loop_thread = threading.get_ident()

        def in_thread(ctx: NodeContext) -> tuple[bool, str]:
            return threading.get_ident() != loop_thread, ctx.inputs["a"]

        async def main() -> dict[str, Any]:
            executor = PipelineExecutor(thread_pool=thread_pool)
            nodes = [Node("a", value_of), Node("t", in_thread, deps=["a"])]
            return await executor.execute_pipeline("p", nodes)

        assert run(main())["t"] == (True, "a")

    @needs_process_pools
    def test_process_node_completes(self) -> None:
        """Test that a process node gets its inputs and returns its output."""
        pytest.importorskip("cancelflow._process", reason="process pool not yet available")

        async def main() -> dict[str, Any]:
            async with PipelineExecutor() as executor:
                nodes = [
                    Node("a", _twenty_one),
                    Node("double", proc_double, deps=["a"], run_in="process"),
                ]
                return await executor.execute_pipeline("p", nodes)

        assert run(main()) == {"a": 21, "double": 42}

    def test_outputs_are_partial_results_during_the_run(self) -> None:
        """Test that each completed node's output is in the registry while the run goes on."""
        seen: dict[str, Any] = {}

        async def main() -> None:
            executor = PipelineExecutor()

            async def peek(ctx: NodeContext) -> None:
                seen.update(executor.registry.get_partial_results(ctx.pipeline_id))

            await executor.execute_pipeline("p", [Node("a", value_of), Node("b", peek, deps=["a"])])

        run(main())
        assert seen == {"a": "a"}


class TestWaves:
    """Nodes run in waves: a wave's nodes at once, the next wave only after it."""

    def test_loop_nodes_of_a_wave_run_concurrently(self) -> None:
        """Test that the coroutine nodes of one wave all run at once (a 3-party barrier)."""
        barrier = asyncio.Barrier(3)

        async def meet(ctx: NodeContext) -> str:
            await barrier.wait()
            return ctx.node_id

        async def main() -> dict[str, Any]:
            nodes = [Node(name, meet) for name in ("x", "y", "z")]
            return await PipelineExecutor().execute_pipeline("p", nodes)

        assert run(main()) == {"x": "x", "y": "y", "z": "z"}

    def test_thread_nodes_of_a_wave_run_concurrently(self, thread_pool: ThreadPool) -> None:
        """Test that the thread nodes of one wave all run at once (a 3-party barrier)."""
        barrier = threading.Barrier(3, timeout=WAIT)

        def meet(ctx: NodeContext) -> int:
            return barrier.wait()

        async def main() -> dict[str, Any]:
            nodes = [Node(name, meet) for name in ("x", "y", "z")]
            return await PipelineExecutor(thread_pool=thread_pool).execute_pipeline("p", nodes)

        assert sorted(run(main()).values()) == [0, 1, 2]

    def test_wave_starts_after_the_previous_one_finished(self) -> None:
        """Test that no node of a wave starts before every node of the previous one ended."""
        log: list[str] = []

        def logged(fn: Callable[[NodeContext], Awaitable[Any]]) -> Callable[..., Any]:
            async def node(ctx: NodeContext) -> Any:
                log.append(f"start {ctx.node_id}")
                result = await fn(ctx)
                log.append(f"end {ctx.node_id}")
                return result

            return node

        async def yields(ctx: NodeContext) -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        async def main() -> None:
            nodes = [
                Node("a1", logged(yields)),
                Node("a2", logged(value_of)),
                Node("b", logged(value_of), deps=["a2"]),
                Node("c", logged(value_of), deps=["b", "a1"]),
            ]
            await PipelineExecutor().execute_pipeline("p", nodes)

        run(main())
        assert log.index("start b") > max(log.index("end a1"), log.index("end a2"))
        assert log.index("start c") > log.index("end b")


class TestRefusedRuns:
    """A bad pipeline, node, argument or id is refused before anything runs."""

    @pytest.mark.parametrize(
        ("deps", "match"),
        [
            ({"a": (), "a2": (), "dup": ()}, "duplicate node id 'a'"),
            ({"a": ("ghost",)}, "unknown node 'ghost'"),
            ({"a": ("b",), "b": ("a",)}, "dependency cycle: "),
        ],
        ids=["duplicate", "unknown-dep", "cycle"],
    )
    def test_bad_definition_runs_nothing(self, deps: dict[str, Any], match: str) -> None:
        """Test that a bad pipeline is refused before any node runs or anything registers."""
        ran: list[str] = []

        async def track(ctx: NodeContext) -> None:
            ran.append(ctx.node_id)

        nodes = [Node("ok", track)]
        for name, node_deps in deps.items():
            node_id = "a" if name in ("a2", "dup") else name
            nodes.append(Node(node_id, track, deps=node_deps))

        async def main() -> CancellationRegistry:
            executor = PipelineExecutor()
            with pytest.raises(PipelineDefinitionError, match=match):
                await executor.execute_pipeline("p", nodes)
            return executor.registry

        registry = run(main())
        assert ran == []
        assert "p" not in registry

    def test_running_pipeline_id_is_refused(self) -> None:
        """Test that a second run with the id of a running one is refused, leaving it intact."""

        async def main() -> dict[str, Any]:
            executor = PipelineExecutor()
            started, release = asyncio.Event(), asyncio.Event()

            async def hold(ctx: NodeContext) -> str:
                started.set()
                await release.wait()
                return "first"

            first = asyncio.create_task(executor.execute_pipeline("p", [Node("h", hold)]))
            await started.wait()
            with pytest.raises(PipelineDefinitionError, match="already registered"):
                await executor.execute_pipeline("p", [Node("h", hold)])
            release.set()
            return await first

        assert run(main()) == {"h": "first"}

    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"mode": "fast"}, ValueError),
            ({"timeout": 0}, ValueError),
            ({"timeout": "1"}, TypeError),
            ({"graceful_timeout": -1}, ValueError),
            ({"cancel_token": "token"}, TypeError),
            ({"context": ["not", "a", "mapping"]}, TypeError),
        ],
    )
    def test_bad_arguments(self, kwargs: dict[str, Any], error: type[Exception]) -> None:
        """Test that bad call arguments are refused before anything runs."""
        with pytest.raises(error):
            run(PipelineExecutor().execute_pipeline("p", [Node("a", value_of)], **kwargs))

    def test_bad_constructor_arguments(self) -> None:
        """Test that a bad default mode, timeout or registry is refused."""
        with pytest.raises(ValueError, match="mode"):
            PipelineExecutor(mode="soft")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="graceful_timeout"):
            PipelineExecutor(graceful_timeout=0)
        with pytest.raises(TypeError, match="registry"):
            PipelineExecutor(registry={})  # type: ignore[arg-type]


class TestCallerToken:
    """The caller's cancel_token cancels the run, and is checked on entry."""

    def test_caller_token_cancels_the_run(self) -> None:
        """Test that cancelling the caller's cancel_token cancels the run with its reason."""

        async def main() -> CancelledException:
            token = CancellationToken()

            async def cancel_then_finish(ctx: NodeContext) -> str:
                token.cancel("New message received")
                return "kept"

            nodes = [Node("a", cancel_then_finish), Node("b", value_of, deps=["a"])]
            with pytest.raises(CancelledException) as info:
                await PipelineExecutor().execute_pipeline("p", nodes, cancel_token=token)
            return info.value

        error = run(main())
        assert error.reason == "New message received"
        assert error.partial_results == {"a": "kept"}
        assert error.wave_num == 1

    def test_pre_cancelled_token_runs_nothing(self) -> None:
        """Test that a token cancelled before the call runs no node (checked on entry)."""
        ran: list[str] = []

        async def track(ctx: NodeContext) -> None:
            ran.append(ctx.node_id)

        async def main() -> CancelledException:
            token = CancellationToken()
            token.cancel("too late")
            with pytest.raises(CancelledException) as info:
                await PipelineExecutor().execute_pipeline(
                    "p", [Node("a", track)], cancel_token=token
                )
            return info.value

        error = run(main())
        assert ran == []
        assert (error.reason, error.wave_num, error.partial_results) == ("too late", 0, {})


class TestGracefulMode:
    """A graceful cancel lets the running wave finish, and escalates when it takes too long."""

    def test_graceful_cancel_lets_the_running_wave_finish(self) -> None:
        """Test that a graceful cancel keeps the running wave (its token stays uncancelled),
        starts no new wave, and raises with the wave's results and the next wave's index."""
        observed: list[bool] = []
        later: list[str] = []

        async def main() -> tuple[CancelledException, bool]:
            executor = PipelineExecutor()
            started, release = asyncio.Event(), asyncio.Event()

            async def first(ctx: NodeContext) -> str:
                started.set()
                await release.wait()
                observed.append(ctx.token.is_cancelled)
                return "first done"

            async def second(ctx: NodeContext) -> None:
                later.append("second")

            nodes = [Node("first", first), Node("second", second, deps=["first"])]
            task = asyncio.create_task(executor.execute_pipeline("p", nodes))
            await started.wait()
            cancel = asyncio.create_task(executor.registry.cancel("p", "stop"))
            await executor.registry.get_token("p").wait()
            release.set()
            with pytest.raises(CancelledException) as info:
                await task
            return info.value, await cancel

        error, won = run(main())
        assert won is True
        assert observed == [False]
        assert later == []
        assert error.reason == "stop"
        assert error.partial_results == {"first": "first done"}
        assert error.wave_num == 1
        assert type(error) is CancelledException

    def test_graceful_cancel_escalates_after_graceful_timeout(self) -> None:
        """Test that a wave still running graceful_timeout after a cancel is interrupted."""
        stopped: list[str | None] = []

        async def main() -> CancelledException:
            executor = PipelineExecutor(graceful_timeout=0.05)

            async def stuck(ctx: NodeContext) -> None:
                executor.registry.cancel_threadsafe(ctx.pipeline_id, "hurry")
                try:
                    await asyncio.Event().wait()
                finally:
                    stopped.append(ctx.token.cancel_reason)

            with pytest.raises(CancelledException) as info:
                await executor.execute_pipeline("p", [Node("stuck", stuck)])
            return info.value

        error = run(main())
        assert stopped == ["hurry"]
        assert (error.reason, error.wave_num) == ("hurry", 0)

    def test_graceful_cancel_during_the_last_wave_still_ends_cancelled(self) -> None:
        """Test that a cancel that fires while the last wave runs decides the ending, though
        every node then completes (the first cause wins)."""

        calls: list[int] = []

        async def main() -> CancelledException:
            executor = PipelineExecutor()

            async def last(ctx: NodeContext) -> str:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, lambda: calls.append(1))
                executor.registry.cancel_threadsafe(ctx.pipeline_id, "late")
                return "last"

            nodes = [Node("a", value_of), Node("last", last, deps=["a"])]
            with pytest.raises(CancelledException) as info:
                await executor.execute_pipeline("p", nodes)
            return info.value

        error = run(main())
        assert error.partial_results == {"a": "a", "last": "last"}
        assert error.wave_num == 2
        assert calls == [1]

    def test_interrupt_escalates_a_graceful_cancel_at_once(self) -> None:
        """Test that executor.interrupt stops a node a graceful cancel is waiting for."""
        from cancelflow import CancelledException, Node, PipelineExecutor

        async def main() -> None:
            started = asyncio.Event()

            async def stuck(ctx: Any) -> None:
                started.set()
                await asyncio.Event().wait()

            async with PipelineExecutor(graceful_timeout=None) as executor:
                run = asyncio.create_task(
                    executor.execute_pipeline("esc", [Node("stuck", stuck)], mode="graceful")
                )
                await asyncio.wait_for(started.wait(), 10)
                assert executor.registry.cancel_threadsafe("esc", "first ctrl-c")
                assert executor.interrupt("esc", "second ctrl-c")
                with pytest.raises(CancelledException) as info:
                    await asyncio.wait_for(run, 10)
            assert info.value.reason == "first ctrl-c"
            assert info.value.node_fates == {"stuck": "cancelled"}
            assert not executor.interrupt("esc")

        asyncio.run(main())


class TestInterruptMode:
    """An interrupt stops the running nodes (coroutines, threads, processes) before raising."""

    def test_interrupt_cancels_coroutine_nodes_before_raising(self) -> None:
        """Test that an interrupt cancels running coroutine nodes and raises only once their
        finally blocks have run."""
        finalized: list[str] = []

        async def main() -> tuple[CancelledException, list[str]]:
            executor = PipelineExecutor(mode="interrupt")
            started = asyncio.Event()

            async def wait_forever(ctx: NodeContext) -> None:
                started.set()
                try:
                    await asyncio.Event().wait()
                finally:
                    await asyncio.sleep(0)
                    finalized.append(ctx.node_id)

            nodes = [
                Node("a", value_of),
                Node("w1", wait_forever, deps=["a"]),
                Node("w2", wait_forever, deps=["a"]),
            ]
            task = asyncio.create_task(executor.execute_pipeline("p", nodes))
            await started.wait()
            await executor.registry.cancel("p", "User requested cancellation")
            with pytest.raises(CancelledException) as info:
                await task
            return info.value, list(finalized)

        error, at_raise = run(main())
        assert sorted(at_raise) == ["w1", "w2"]
        assert error.reason == "User requested cancellation"
        assert error.partial_results == {"a": "a"}
        assert error.wave_num == 1

    def test_interrupt_tells_thread_nodes_through_their_token(
        self, thread_pool: ThreadPool
    ) -> None:
        """Test that an interrupt cancels a thread node's ctx.token with the reason."""
        started, finished = threading.Event(), threading.Event()
        seen: list[str | None] = []

        def cooperative(ctx: NodeContext) -> None:
            started.set()
            ctx.token.wait_blocking(WAIT)
            seen.append(ctx.token.cancel_reason)
            finished.set()
            ctx.token.raise_if_cancelled()

        async def main() -> CancelledException:
            executor = PipelineExecutor(thread_pool=thread_pool, mode="interrupt")
            task = asyncio.create_task(executor.execute_pipeline("p", [Node("t", cooperative)]))
            await asyncio.to_thread(wait, started)
            executor.registry.cancel_threadsafe("p", "stop threads")
            with pytest.raises(CancelledException) as info:
                await task
            return info.value

        error = run(main())
        wait(finished)
        assert seen == ["stop threads"]
        assert (error.reason, error.wave_num) == ("stop threads", 0)

    def test_mode_per_call_overrides_the_default(self) -> None:
        """Test that mode="interrupt" on the call interrupts although the executor is graceful."""

        async def main() -> CancelledException:
            executor = PipelineExecutor(mode="graceful", graceful_timeout=None)

            async def cancel_and_wait(ctx: NodeContext) -> None:
                executor.registry.cancel_threadsafe(ctx.pipeline_id, "now")
                await asyncio.Event().wait()

            with pytest.raises(CancelledException) as info:
                await executor.execute_pipeline("p", [Node("w", cancel_and_wait)], mode="interrupt")
            return info.value

        assert run(main()).wave_num == 0

    @needs_process_pools
    def test_interrupt_stops_a_process_node_and_keeps_its_partial(self) -> None:
        """Test that an interrupt stops a process node that ignores its token, and that what
        it stored before is in partial_results."""
        process_pool = pytest.importorskip(
            "cancelflow._process", reason="process pool not yet available"
        )

        pool = process_pool.ProcessPool(1, grace_period=0.05, term_grace_period=0.1)

        async def main() -> CancelledException:
            async with running_signal() as (path, running):
                executor = PipelineExecutor(process_pool=pool, mode="interrupt")
                node = Node("spin", proc_store_signal_spin, run_in="process")
                task = asyncio.create_task(executor.execute_pipeline("p", [node], {"sock": path}))
                await running.wait()
                await executor.registry.cancel("p", "kill it")
                with pytest.raises(CancelledException) as info:
                    await task
                return info.value

        try:
            error = run(main())
        finally:
            shut_down_within(pool, WAIT)
        assert error.reason == "kill it"
        assert isinstance(error.partial_results.get("spin.pid"), int)
        assert error.partial_results["spin.pid"] != os.getpid()


class TestTimeouts:
    """The pipeline's deadline and a node's own timeout stop what runs."""

    @pytest.mark.parametrize("mode", ["graceful", "interrupt"])
    def test_timeout_raises_with_partial_results(self, mode: str) -> None:
        """Test that the deadline interrupts running nodes in either mode and raises
        PipelineTimeoutException with the partial results (seed 000's except clause)."""
        printed: list[str] = []

        async def main() -> PipelineTimeoutException:
            executor = PipelineExecutor(mode=mode)  # type: ignore[arg-type]
            nodes = [Node("fast", value_of), Node("slow", forever, deps=["fast"])]
            try:
                await executor.execute_pipeline("pipeline_id", nodes, {}, timeout=0.05)
            except PipelineTimeoutException as e:
                printed.append(f"Pipeline timed out. Partial results: {e.partial_results}")
                return e
            raise AssertionError("no timeout")

        error = run(main())
        assert printed == ["Pipeline timed out. Partial results: {'fast': 'fast'}"]
        assert isinstance(error, TimeoutError)
        assert isinstance(error, CancelledException)
        assert error.wave_num == 1
        assert error.timeout == 0.05
        assert error.reason == "pipeline 'pipeline_id' timed out after 0.05s"

    def test_timeout_tells_a_cooperative_thread_node(self, thread_pool: ThreadPool) -> None:
        """Test that at the deadline a thread node's token is cancelled with the timeout reason."""
        finished = threading.Event()
        seen: list[str | None] = []

        def cooperative(ctx: NodeContext) -> str:
            ctx.token.wait_blocking(WAIT)
            seen.append(ctx.token.cancel_reason)
            finished.set()
            return "stopped early"

        async def main() -> None:
            executor = PipelineExecutor(thread_pool=thread_pool)
            with pytest.raises(PipelineTimeoutException):
                await executor.execute_pipeline("p", [Node("t", cooperative)], timeout=0.05)

        run(main())
        wait(finished)
        assert seen == ["pipeline 'p' timed out after 0.05s"]

    def test_node_timeout_fails_the_pipeline(self) -> None:
        """Test that a node past its own timeout fails the run with a PipelineTimeoutException
        as the cause, while a sibling is interrupted."""

        async def main() -> PipelineFailedException:
            nodes = [Node("slow", forever, timeout=0.02), Node("sibling", forever)]
            with pytest.raises(PipelineFailedException) as info:
                await PipelineExecutor().execute_pipeline("p", nodes)
            return info.value

        error = run(main())
        assert error.node_id == "slow"
        assert isinstance(error.__cause__, PipelineTimeoutException)
        assert error.__cause__.timeout == 0.02
        assert error.__cause__.reason == "node 'slow' timed out after 0.02s"
        assert error.wave_num == 0

    def test_thread_node_timeout(self, thread_pool: ThreadPool) -> None:
        """Test that a thread node past its own timeout is told through its token."""
        finished = threading.Event()
        seen: list[str | None] = []

        def cooperative(ctx: NodeContext) -> None:
            ctx.token.wait_blocking(WAIT)
            seen.append(ctx.token.cancel_reason)
            finished.set()

        async def main() -> PipelineFailedException:
            executor = PipelineExecutor(thread_pool=thread_pool)
            with pytest.raises(PipelineFailedException) as info:
                await executor.execute_pipeline("p", [Node("t", cooperative, timeout=0.02)])
            return info.value

        error = run(main())
        wait(finished)
        assert seen == ["node 't' timed out after 0.02s"]
        assert isinstance(error.__cause__, PipelineTimeoutException)


class TestFailurePropagation:
    """A failing node fails the run, stops its siblings, and keeps what was stored."""

    @pytest.mark.parametrize("mode", ["graceful", "interrupt"])
    def test_node_failure_cancels_the_others(self, mode: str) -> None:
        """Test that a failing node interrupts its running siblings (either mode) and raises
        PipelineFailedException naming it, with its error as __cause__."""
        boom = ValueError("boom")
        stopped: list[str] = []

        async def main() -> PipelineFailedException:
            started = asyncio.Event()

            async def sibling(ctx: NodeContext) -> None:
                started.set()
                try:
                    await asyncio.Event().wait()
                finally:
                    stopped.append(ctx.node_id)

            async def fail(ctx: NodeContext) -> None:
                await started.wait()
                raise boom

            nodes = [
                Node("a", value_of),
                Node("sib", sibling, deps=["a"]),
                Node("bad", fail, deps=["a"]),
                Node("never", value_of, deps=["bad"]),
            ]
            executor = PipelineExecutor(mode=mode)  # type: ignore[arg-type]
            with pytest.raises(PipelineFailedException) as info:
                await executor.execute_pipeline("p", nodes)
            return info.value

        error = run(main())
        assert stopped == ["sib"]
        assert error.node_id == "bad"
        assert error.__cause__ is boom
        assert error.partial_results == {"a": "a"}
        assert error.wave_num == 1
        assert "ValueError: boom" in str(error)

    def test_thread_node_failure(self, thread_pool: ThreadPool) -> None:
        """Test that an error raised in a thread node is the failure's __cause__."""

        def fail(ctx: NodeContext) -> None:
            raise KeyError("missing")

        async def main() -> PipelineFailedException:
            executor = PipelineExecutor(thread_pool=thread_pool)
            with pytest.raises(PipelineFailedException) as info:
                await executor.execute_pipeline("p", [Node("t", fail)])
            return info.value

        error = run(main())
        assert isinstance(error.__cause__, KeyError)
        assert error.node_id == "t"

    def test_node_raising_cancelled_on_its_own_is_a_failure(self) -> None:
        """Test that a CancelledException a node raises without being cancelled is a failure."""

        async def own(ctx: NodeContext) -> None:
            raise CancelledException("my own sub-operation was cancelled")

        async def main() -> PipelineFailedException:
            with pytest.raises(PipelineFailedException) as info:
                await PipelineExecutor().execute_pipeline("p", [Node("n", own)])
            return info.value

        assert isinstance(run(main()).__cause__, CancelledException)

    def test_node_cancelled_from_elsewhere_is_a_failure(self) -> None:
        """Test that an asyncio.CancelledError escaping a node that the executor did not
        cancel fails the run instead of leaving the node silently without output."""

        async def main() -> PipelineFailedException:
            async def awaits_a_cancelled_future(ctx: NodeContext) -> None:
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                future.cancel()
                await future

            nodes = [Node("n", awaits_a_cancelled_future), Node("after", value_of, deps=["n"])]
            with pytest.raises(PipelineFailedException) as info:
                await PipelineExecutor().execute_pipeline("p", nodes)
            return info.value

        error = run(main())
        assert error.node_id == "n"
        assert isinstance(error.__cause__, asyncio.CancelledError)

    def test_store_partial_survives_a_failure(self) -> None:
        """Test that values stored with ctx.store_partial appear as "node.key"."""

        async def half(ctx: NodeContext) -> None:
            ctx.store_partial("rows", 10)
            raise RuntimeError("disk full")

        async def main() -> PipelineFailedException:
            with pytest.raises(PipelineFailedException) as info:
                await PipelineExecutor().execute_pipeline(
                    "p", [Node("a", value_of), Node("h", half)]
                )
            return info.value

        assert run(main()).partial_results == {"a": "a", "h.rows": 10}


class TestFirstCauseWins:
    """When a cancel, the deadline and a failure race, the first one decides the ending."""

    def test_cancel_then_timeout_ends_cancelled(self) -> None:
        """Test that a graceful cancel followed by the deadline ends as the cancel, with the
        cancel's reason, the deadline having interrupted the wave."""

        async def main() -> CancelledException:
            executor = PipelineExecutor()

            async def cancel_and_wait(ctx: NodeContext) -> None:
                executor.registry.cancel_threadsafe(ctx.pipeline_id, "first")
                await asyncio.Event().wait()

            with pytest.raises(CancelledException) as info:
                await executor.execute_pipeline("p", [Node("w", cancel_and_wait)], timeout=0.3)
            return info.value

        error = run(main())
        assert type(error) is CancelledException
        assert error.reason == "first"

    def test_timeout_then_cancel_ends_timed_out(self) -> None:
        """Test that a cancel arriving after the deadline does not change the ending."""
        answers: list[bool] = []

        async def main() -> PipelineTimeoutException:
            executor = PipelineExecutor()

            async def wait_then_cancel(ctx: NodeContext) -> None:
                try:
                    await asyncio.Event().wait()
                finally:
                    answers.append(executor.registry.cancel_threadsafe(ctx.pipeline_id, "late"))

            with pytest.raises(PipelineTimeoutException) as info:
                await executor.execute_pipeline("p", [Node("w", wait_then_cancel)], timeout=0.02)
            return info.value

        error = run(main())
        assert answers == [False]
        assert error.reason == "pipeline 'p' timed out after 0.02s"

    def test_failure_then_cancel_ends_failed(self) -> None:
        """Test that a cancel made while a failure is stopping the run does not change it."""

        async def main() -> PipelineFailedException:
            executor = PipelineExecutor()
            started = asyncio.Event()

            async def sibling(ctx: NodeContext) -> None:
                started.set()
                try:
                    await asyncio.Event().wait()
                finally:
                    executor.registry.cancel_threadsafe(ctx.pipeline_id, "late")

            async def fail(ctx: NodeContext) -> None:
                await started.wait()
                raise RuntimeError("boom")

            with pytest.raises(PipelineFailedException) as info:
                await executor.execute_pipeline("p", [Node("s", sibling), Node("f", fail)])
            return info.value

        assert run(main()).node_id == "f"


class TestAwaitingTaskCancelled:
    """Cancelling the task that awaits a run stops the run before the error propagates."""

    def test_cancelled_awaiting_task_stops_the_run_first(self) -> None:
        """Test that cancelling the task awaiting a run interrupts it, cleans up and
        unregisters before asyncio.CancelledError propagates."""
        log: list[str] = []

        async def main() -> None:
            executor = PipelineExecutor(graceful_timeout=None)
            started = asyncio.Event()

            async def cleanup() -> None:
                log.append("cleanup")

            async def wait_forever(ctx: NodeContext) -> None:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, cleanup)
                started.set()
                try:
                    await asyncio.Event().wait()
                finally:
                    log.append("node stopped")

            task = asyncio.create_task(executor.execute_pipeline("p", [Node("w", wait_forever)]))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            log.append("raised")
            assert "p" not in executor.registry
            assert other_tasks() == set()

        run(main())
        assert log == ["node stopped", "cleanup", "raised"]

    def test_asyncio_timeout_around_a_run(self) -> None:
        """Test that asyncio.timeout around execute_pipeline works (TimeoutError) and the
        run is over when it is raised."""
        stopped: list[str] = []

        async def main() -> None:
            executor = PipelineExecutor()

            async def wait_forever(ctx: NodeContext) -> None:
                try:
                    await asyncio.Event().wait()
                finally:
                    stopped.append("stopped")

            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.02):
                    await executor.execute_pipeline("p", [Node("w", wait_forever)])
            assert stopped == ["stopped"]
            assert "p" not in executor.registry

        run(main())


class TestCleanupHandlers:
    """Cleanup handlers run once per stopped run, after its nodes, bounded and reported."""

    def test_cleanup_runs_after_the_graceful_wave(self) -> None:
        """Test that handlers run once the running wave has finished, not while it runs."""
        log: list[str] = []

        async def main() -> None:
            executor = PipelineExecutor()
            started, release = asyncio.Event(), asyncio.Event()

            async def cleanup_resource() -> None:
                log.append("cleanup")

            async def work(ctx: NodeContext) -> str:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, cleanup_resource)
                started.set()
                await release.wait()
                log.append("node finished")
                return "ok"

            task = asyncio.create_task(executor.execute_pipeline("p", [Node("w", work)]))
            await started.wait()
            cancel = asyncio.create_task(executor.registry.cancel("p", "stop"))
            await executor.registry.get_token("p").wait()
            await let_ready_callbacks_run()  # a premature cleanup would run now
            log.append("released")
            release.set()
            assert await cancel is True
            log.append("cancel returned")
            with pytest.raises(CancelledException):
                await task

        run(main())
        assert log == ["released", "node finished", "cleanup", "cancel returned"]

    def test_cleanup_runs_once_for_two_cancels(self) -> None:
        """Test that two racing cancels run the handlers once; the first reason wins."""
        calls: list[str] = []

        async def main() -> tuple[list[bool], CancelledException]:
            executor = PipelineExecutor(mode="interrupt")
            started = asyncio.Event()

            async def handler() -> None:
                await asyncio.sleep(0)
                calls.append("cleanup")

            async def work(ctx: NodeContext) -> None:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, handler)
                started.set()
                await asyncio.Event().wait()

            task = asyncio.create_task(executor.execute_pipeline("p", [Node("w", work)]))
            await started.wait()
            answers = await asyncio.gather(
                executor.registry.cancel("p", "one"), executor.registry.cancel("p", "two")
            )
            with pytest.raises(CancelledException) as info:
                await task
            return list(answers), info.value

        answers, error = run(main())
        assert answers == [True, False]
        assert calls == ["cleanup"]
        assert error.reason == "one"

    def test_cleanup_runs_once_for_cancels_from_a_thread_and_the_loop(self) -> None:
        """Test that a thread-safe cancel from another thread racing an awaited cancel runs
        the handlers once."""
        calls: list[int] = []

        async def main() -> None:
            executor = PipelineExecutor(mode="interrupt")
            started = asyncio.Event()

            async def work(ctx: NodeContext) -> None:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, lambda: calls.append(1))
                started.set()
                await asyncio.Event().wait()

            task = asyncio.create_task(executor.execute_pipeline("p", [Node("w", work)]))
            await started.wait()
            thread = threading.Thread(target=executor.registry.cancel_threadsafe, args=("p", "t"))
            thread.start()
            await executor.registry.cancel("p", "loop")
            await asyncio.to_thread(thread.join)
            with pytest.raises(CancelledException):
                await task

        run(main())
        assert calls == [1]

    @pytest.mark.parametrize("first", ["cancel", "timeout"])
    def test_cleanup_runs_once_when_cancel_races_the_deadline(self, first: str) -> None:
        """Test that a cancel and the deadline, in either order, run the handlers once."""
        calls: list[int] = []

        async def main() -> CancelledException:
            executor = PipelineExecutor()

            async def work(ctx: NodeContext) -> None:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, lambda: calls.append(1))
                if first == "cancel":
                    executor.registry.cancel_threadsafe(ctx.pipeline_id, "cancel")
                try:
                    await asyncio.Event().wait()
                finally:
                    executor.registry.cancel_threadsafe(ctx.pipeline_id, "late cancel")

            timeout = 0.3 if first == "cancel" else 0.02
            with pytest.raises(CancelledException) as info:
                await executor.execute_pipeline("p", [Node("w", work)], timeout=timeout)
            return info.value

        error = run(main())
        assert calls == [1]
        assert isinstance(error, PipelineTimeoutException) == (first == "timeout")

    def test_cleanup_runs_on_failure(self) -> None:
        """Test that a failed run runs its handlers."""
        calls: list[int] = []

        async def fail(ctx: NodeContext) -> None:
            registry.register_cleanup_handler(ctx.pipeline_id, lambda: calls.append(1))
            raise RuntimeError("boom")

        registry = CancellationRegistry()

        async def main() -> None:
            with pytest.raises(PipelineFailedException):
                await PipelineExecutor(registry).execute_pipeline("p", [Node("f", fail)])

        run(main())
        assert calls == [1]

    def test_handlers_dropped_on_success_and_late_cancel_is_a_no_op(self) -> None:
        """Test that a completed run drops its handlers unrun, and a cancel after it returns
        False."""
        calls: list[int] = []

        async def main() -> bool:
            executor = PipelineExecutor()

            async def work(ctx: NodeContext) -> str:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, lambda: calls.append(1))
                return "ok"

            assert await executor.execute_pipeline("p", [Node("w", work)]) == {"w": "ok"}
            return await executor.registry.cancel("p", "too late")

        assert run(main()) is False
        assert calls == []

    def test_cleanup_errors_are_reported_in_the_result(self) -> None:
        """Test that a raising handler does not change the ending and is in cleanup_errors."""
        boom = RuntimeError("cleanup boom")

        async def bad() -> None:
            raise boom

        async def main() -> PipelineResult:
            executor = PipelineExecutor()

            async def work(ctx: NodeContext) -> None:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, bad)
                executor.registry.cancel_threadsafe(ctx.pipeline_id, "stop")

            return await executor.run_pipeline("p", [Node("w", work)])

        result = run(main())
        assert result.cancelled
        assert result.cleanup_errors == (boom,)

    def test_cleanup_timeout_bounds_handlers(self) -> None:
        """Test that the executor's cleanup_timeout bounds each handler of its runs."""

        async def hang() -> None:
            await asyncio.Event().wait()

        async def main() -> PipelineResult:
            executor = PipelineExecutor(cleanup_timeout=0.01)

            async def work(ctx: NodeContext) -> None:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, hang)
                raise RuntimeError("boom")

            return await executor.run_pipeline("p", [Node("w", work)])

        result = run(main())
        assert result.outcome == "failed"
        assert len(result.cleanup_errors) == 1
        assert isinstance(result.cleanup_errors[0], TimeoutError)

    def test_registry_token_tells_the_outside_about_timeouts_and_failures(self) -> None:
        """Test that a timeout or failure cancels the pipeline's registry token with its reason."""
        reasons: list[str | None] = []

        async def main() -> None:
            registry = CancellationRegistry()
            executor = PipelineExecutor(registry)

            async def watch_then_fail(ctx: NodeContext) -> None:
                token = registry.get_token(ctx.pipeline_id)
                token.on_cancel(lambda: reasons.append(token.cancel_reason))
                raise RuntimeError("boom")

            with pytest.raises(PipelineFailedException):
                await executor.execute_pipeline("p", [Node("f", watch_then_fail)])

        run(main())
        assert reasons == ["node 'f' failed: RuntimeError('boom')"]

    def test_cleanup_handlers_argument_runs_once_on_cancel(self) -> None:
        """Test that handlers given to execute_pipeline run exactly once when it is cancelled."""
        from cancelflow import CancellationToken, CancelledException, Node, PipelineExecutor

        calls: list[str] = []

        async def main() -> None:
            token = CancellationToken()

            async def cancel_me(ctx: Any) -> None:
                token.cancel("stop")
                await asyncio.Event().wait()

            async with PipelineExecutor(mode="interrupt") as executor:
                with pytest.raises(CancelledException):
                    await asyncio.wait_for(
                        executor.execute_pipeline(
                            "cleanup-arg",
                            [Node("n", cancel_me)],
                            cancel_token=token,
                            cleanup_handlers=[lambda: calls.append("sync")],
                        ),
                        10,
                    )

        asyncio.run(main())
        assert calls == ["sync"]

    def test_cleanup_handlers_argument_rejects_non_callables(self) -> None:
        """Test that a non-callable cleanup handler is refused before anything runs."""
        from cancelflow import Node, PipelineExecutor

        async def noop(ctx: Any) -> int:
            return 1

        async def main() -> None:
            async with PipelineExecutor() as executor:
                with pytest.raises(TypeError, match=r"cleanup_handlers\[0\]"):
                    await executor.execute_pipeline(
                        "bad-cleanup",
                        [Node("n", noop)],
                        cleanup_handlers=[42],  # type: ignore[list-item]
                    )
                assert "bad-cleanup" not in executor.registry

        asyncio.run(main())


class TestNothingLeftBehind:
    """After any ending the run is unregistered and no task of it is left."""

    @pytest.mark.parametrize("ending", ["completed", "cancelled", "timed_out", "failed"])
    def test_nothing_left_after_any_ending(self, ending: str) -> None:
        """Test that after every ending the run is unregistered, no task is left, and its
        cleanup handler has finished (or was dropped, on success)."""
        handler_state: list[str] = []

        async def main() -> None:
            executor = PipelineExecutor(mode="interrupt")

            async def handler() -> None:
                handler_state.append("started")
                await asyncio.sleep(0)
                handler_state.append("finished")

            async def work(ctx: NodeContext) -> str:
                executor.registry.register_cleanup_handler(ctx.pipeline_id, handler)
                if ending == "cancelled":
                    executor.registry.cancel_threadsafe(ctx.pipeline_id, "stop")
                if ending == "failed":
                    raise RuntimeError("boom")
                if ending != "completed":
                    await asyncio.Event().wait()
                return "ok"

            nodes = [Node("w", work), Node("sibling", value_of)]
            timeout = 0.02 if ending == "timed_out" else None
            result = await executor.run_pipeline("p", nodes, timeout=timeout)
            assert result.outcome == ending
            assert "p" not in executor.registry
            assert executor.registry.active_pipelines() == ()
            assert other_tasks() == set()

        run(main())
        assert handler_state == ([] if ending == "completed" else ["started", "finished"])


class TestClose:
    """aclose shuts down the pools the executor made, cancels running runs, and refuses new ones."""

    def test_aclose_shuts_down_pools_it_created(self) -> None:
        """Test that a pool the executor created lazily is shut down by aclose."""

        def in_thread(ctx: NodeContext) -> str:
            return "t"

        async def main() -> None:
            async with PipelineExecutor() as executor:
                assert await executor.execute_pipeline("p", [Node("t", in_thread)]) == {"t": "t"}
                pool = executor._thread_pool
            assert isinstance(pool, ThreadPool)
            with pytest.raises(PoolClosedError):
                pool.submit(print)

        run(main())

    def test_aclose_leaves_pools_passed_in_open(self, thread_pool: ThreadPool) -> None:
        """Test that a pool given to the executor is still usable after aclose."""

        async def main() -> None:
            async with PipelineExecutor(thread_pool=thread_pool):
                pass
            assert await thread_pool.run_sync(int, "7") == 7

        run(main())

    def test_closed_executor_refuses_runs(self) -> None:
        """Test that a closed executor raises PoolClosedError and registers nothing."""

        async def main() -> None:
            executor = PipelineExecutor()
            await executor.aclose()
            assert executor.closed
            with pytest.raises(PoolClosedError):
                await executor.execute_pipeline("p", [Node("a", value_of)])
            assert "p" not in executor.registry

        run(main())

    def test_aclose_cancels_running_pipelines(self) -> None:
        """Test that aclose cancels running runs (in their mode) and waits for their end."""

        async def main() -> CancelledException:
            executor = PipelineExecutor(mode="interrupt")
            started = asyncio.Event()

            async def wait_forever(ctx: NodeContext) -> None:
                started.set()
                await asyncio.Event().wait()

            task = asyncio.create_task(executor.execute_pipeline("p", [Node("w", wait_forever)]))
            await started.wait()
            await executor.aclose()
            assert task.done()
            with pytest.raises(CancelledException) as info:
                await task
            return info.value

        assert run(main()).reason == "executor closed"


class TestLogLines:
    """The executor's log lines say which pipeline and node they are about."""

    def test_log_lines_bind_pipeline_and_node_ids(self, logs: LogCapture) -> None:
        """Test that the executor's log lines carry pipeline_id, and node lines node_id."""

        async def fail(ctx: NodeContext) -> None:
            raise RuntimeError("boom")

        async def main() -> None:
            with pytest.raises(PipelineFailedException):
                await PipelineExecutor().execute_pipeline("logged", [Node("bad", fail)])

        run(main())
        records = logs.cancelflow("DEBUG")
        assert records
        assert all(r["extra"].get("pipeline_id") == "logged" for r in records)
        failed = [r for r in records if "node failed" in r["message"]]
        assert [r["extra"]["node_id"] for r in failed] == ["bad"]


class TestPipelineResult:
    def test_completed(self) -> None:
        """Test the fields of a completed run's result."""
        result = run(PipelineExecutor().run_pipeline("p", [Node("a", value_of)]))
        assert result.completed
        assert result.outcome == "completed"
        assert (result.results, result.cancelled, result.wave_cancelled_at) == (
            {"a": "a"},
            False,
            None,
        )
        assert result.unwrap() == {"a": "a"}

    def test_cancelled_reads_like_the_seed_response(self) -> None:
        """Test that a cancelled result has seed 004's fields, also by key."""

        async def main() -> PipelineResult:
            token = CancellationToken()

            async def cancel(ctx: NodeContext) -> str:
                token.cancel("New message received")
                return "tool 1"

            nodes = [Node("a", cancel), Node("b", value_of, deps=["a"])]
            return await PipelineExecutor().run_pipeline("p", nodes, cancel_token=token)

        result = run(main())
        assert result.get("cancelled") is True
        assert result["cancel_reason"] == "New message received"
        assert result["wave_cancelled_at"] == 1
        assert len(result["results"]) == 1
        assert result.outcome == "cancelled"
        assert isinstance(result.error, CancelledException)
        assert result.get("no such field", "default") == "default"
        with pytest.raises(KeyError):
            result["no such field"]
        with pytest.raises(CancelledException):
            result.unwrap()

    def test_timed_out(self) -> None:
        """Test that a timed-out result is cancelled and timed_out, with the timeout reason."""
        result = run(PipelineExecutor().run_pipeline("p", [Node("w", forever)], timeout=0.02))
        assert (result.cancelled, result.timed_out, result.outcome) == (True, True, "timed_out")
        assert result.cancel_reason == "pipeline 'p' timed out after 0.02s"
        assert isinstance(result.error, PipelineTimeoutException)

    def test_failed(self) -> None:
        """Test that a failed result names the node and carries the error."""

        async def fail(ctx: NodeContext) -> None:
            raise RuntimeError("boom")

        result = run(
            PipelineExecutor().run_pipeline("p", [Node("a", value_of), Node("f", fail, deps=["a"])])
        )
        assert (result.cancelled, result.failed_node, result.outcome) == (False, "f", "failed")
        assert result.results == {"a": "a"}
        assert isinstance(result.error, PipelineFailedException)
        assert isinstance(result.error.__cause__, RuntimeError)
        assert result.wave_cancelled_at == 1


def _context_size(ctx: NodeContext) -> int:
    return len(ctx.context)


class TestContextForProcessNodes:
    def test_an_unpicklable_context_value_is_refused_before_any_node_runs(self) -> None:
        """Test that with a process node in the pipeline, a context value that cannot be
        sent to a worker (a lock) is refused with PipelineDefinitionError naming its key,
        before any node (here a thread node of the first wave) runs."""
        ran = threading.Event()

        def first(ctx: NodeContext) -> None:
            ran.set()

        nodes = [Node("first", first), Node("heavy", _context_size, run_in="process")]

        async def body() -> None:
            async with PipelineExecutor() as executor:
                context = {"ok": 1, "guard": threading.Lock()}
                with pytest.raises(PipelineDefinitionError, match=r"context\['guard'\]") as info:
                    await executor.execute_pipeline("p", nodes, context=context)
                assert info.value.node_id == "heavy"
                assert "p" not in executor.registry.active_pipelines()

        run(body())
        assert not ran.is_set()

    def test_a_bound_asyncio_event_is_refused_by_its_key(self) -> None:
        """Test that an asyncio.Event something waits on (bound to its loop, so it cannot
        be pickled) is named the same way."""

        async def body() -> None:
            stop = asyncio.Event()
            waiter = asyncio.ensure_future(stop.wait())
            await asyncio.sleep(0)  # the waiter binds the event to this loop
            try:
                async with PipelineExecutor() as executor:
                    nodes = [Node("heavy", _context_size, run_in="process")]
                    with pytest.raises(PipelineDefinitionError, match=r"context\['stop'\]"):
                        await executor.execute_pipeline("p", nodes, context={"stop": stop})
            finally:
                waiter.cancel()

        run(body())

    def test_without_process_nodes_any_context_is_accepted(self) -> None:
        """Test that loop and thread nodes read the context as it is (nothing is pickled)."""
        lock = threading.Lock()

        def uses_lock(ctx: NodeContext) -> bool:
            return ctx.context["guard"] is lock

        async def body() -> None:
            async with PipelineExecutor() as executor:
                result = await executor.execute_pipeline(
                    "p", [Node("t", uses_lock)], context={"guard": lock}
                )
                assert result == {"t": True}

        run(body())
