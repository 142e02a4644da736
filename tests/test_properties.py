"""Property tests: random pipelines cancelled at random moments (issue 9, part 1).

Hypothesis draws a DAG of coroutine, thread and process nodes (some quick, some slow,
some cooperative — they wait for their token —, some stubborn — they ignore it —, some
failing), a mode, and a cause: a registry cancel, the caller's token, the run's
timeout, a node failure, a signal whose handler calls ``registry.cancel_threadsafe``,
a superseding run, or nothing. A cancel fires at a moment named by an event of the run
(its start, a node starting, a node finishing, its end), from the event subscriber, so
where it lands never depends on timing. Every example then checks:

* exactly one ending, and it is the first cause: the run's one ``pipeline_finished``
  agrees with the result, and the ending is what the first cause seen in the run's
  event log says (a cancel marker on the registry token, or a node failure);
* the cleanup handlers ran exactly once (never on completion), in reverse order;
* every node that finished before the cancel is in ``partial_results`` with its output
  (and every output is the right one, built from the right inputs);
* no node of a later wave started after the cause; in graceful mode without a
  graceful timeout, every node running at the cancel finished;
* the exception's ``wave_num`` is the first wave that did not complete, and is the wave
  running at the cancel or the next one;
* nothing is left running: no loop node, no busy process worker, nothing registered,
  and every thread node returns once the test opens its gate.

CI runs a bounded number of examples; ``CANCELFLOW_HYPOTHESIS_PROFILE=soak`` runs many
more (the long profile for the soak).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import faultloads
from cancelflow import (
    CancellationToken,
    CancelledException,
    Node,
    NodeContext,
    PipelineEvent,
    PipelineExecutor,
    PipelineFailedException,
    PipelineResult,
    PipelineTimeoutException,
    ProcessPool,
    ThreadPool,
)
from support import WAIT

settings.register_profile(
    "cancelflow-ci",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "soak",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
PROFILE = os.environ.get("CANCELFLOW_HYPOTHESIS_PROFILE", "cancelflow-ci")
SETTINGS = settings.get_profile("soak" if PROFILE == "soak" else "cancelflow-ci")
TEST_TIMEOUT = 3600 if PROFILE == "soak" else 120

PID = "p"
KEY = "conversation"
REASON = "cancelled by the test"
MAX_PROCESS_NODES = 1

Source = Literal["registry", "thread", "token", "signal", "supersede", "timeout", "failure", "none"]
SOURCES: tuple[Source, ...] = (
    "registry",
    "thread",
    "token",
    "signal",
    "supersede",
    "timeout",
    "failure",
    "none",
)
CANCELS = ("registry", "thread", "token", "signal", "supersede")
#: sources that cancel from a task started by the trigger (lands at the next loop turn)
TASK_SOURCES = ("registry", "supersede")
Behaviour = Literal["quick", "slow", "block", "stubborn", "fail"]
HOLDS: tuple[Behaviour, ...] = ("block", "stubborn")  # never end unless stopped
ENDING_EVENTS = ("node_finished", "node_failed", "node_cancelled")


# -- plans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    id: str
    wave: int
    deps: tuple[str, ...]
    run_in: Literal["loop", "thread", "process"]
    behaviour: Behaviour


@dataclass(frozen=True)
class Plan:
    mode: Literal["graceful", "interrupt"]
    nodes: tuple[NodeSpec, ...]
    source: Source
    #: the event at which a cancel fires: (event name, node id or None)
    trigger: tuple[str, str | None] | None
    timeout: float | None

    @property
    def holds(self) -> bool:
        return any(node.behaviour in HOLDS for node in self.nodes)

    @property
    def graceful_timeout(self) -> float | None:
        # Without a node that never ends by itself, a graceful cancel may wait forever:
        # then "the running wave finishes" is checked exactly, with no timing involved.
        return 0.1 if self.holds else None

    def wave_of(self, node_id: str) -> int:
        return next(node.wave for node in self.nodes if node.id == node_id)


@st.composite
def plans(draw: st.DrawFn, mode: Literal["graceful", "interrupt"]) -> Plan:
    widths = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    shape: list[tuple[str, int, tuple[str, ...], str]] = []
    processes = 0
    for wave, width in enumerate(widths):
        earlier = [node_id for node_id, w, _, _ in shape if w < wave]
        previous = [node_id for node_id, w, _, _ in shape if w == wave - 1]
        for index in range(width):
            deps: tuple[str, ...] = ()
            if wave:
                first = draw(st.sampled_from(previous))
                extra = draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True))
                deps = tuple(sorted({first, *extra}))
            run_in = draw(st.sampled_from(["loop", "loop", "thread", "thread", "process"]))
            if run_in == "process":
                if processes >= MAX_PROCESS_NODES:
                    run_in = "thread"
                processes += 1
            shape.append((f"n{wave}{index}", wave, deps, run_in))
    ids = [node_id for node_id, _, _, _ in shape]
    waves = {node_id: wave for node_id, wave, _, _ in shape}
    source: Source = draw(st.sampled_from(SOURCES))
    trigger: tuple[str, str | None] | None = None
    timeout: float | None = None
    failing: str | None = None
    gate = len(widths)  # nodes in waves >= gate may hold (never end by themselves)
    if source in CANCELS:
        moments: list[tuple[str, str | None]] = [("pipeline_started", None)]
        moments += [("node_started", node_id) for node_id in ids]
        moments += [("node_finished", node_id) for node_id in ids]
        moments.append(("pipeline_finished", None))
        trigger = draw(st.sampled_from(moments))
        if trigger[0] == "pipeline_started":
            gate = 0
        elif trigger[1] is not None:
            gate = waves[trigger[1]]
    elif source == "timeout":
        timeout = draw(st.sampled_from([0.01, 0.05, 0.2]))
        gate = 0
    elif source == "failure":
        failing = draw(st.sampled_from(ids))
        gate = waves[failing]
    nodes: list[NodeSpec] = []
    for node_id, wave, deps, run_in in shape:
        choices: list[Behaviour] = ["quick", "quick", "quick", "slow", "slow", "fail"]
        if wave >= gate:
            choices += ["block", "block", "block", "stubborn", "stubborn"]
        if trigger == ("node_finished", node_id):
            choices = ["quick", "slow"]  # it must finish: that is the moment
        behaviour: Behaviour = "fail" if node_id == failing else draw(st.sampled_from(choices))
        nodes.append(NodeSpec(node_id, wave, deps, run_in, behaviour))  # type: ignore[arg-type]
    return Plan(mode, tuple(nodes), source, trigger, timeout)


# -- one example ------------------------------------------------------------------------------


@dataclass
class Observation:
    plan: Plan
    result: PipelineResult
    log: list[tuple[str, str | None, Any]]
    cleanups: list[str]
    loop_nodes_live_at_end: int
    process_busy_at_end: int
    registered_at_end: tuple[str, ...]
    other_tasks_at_end: int
    fired: bool
    registry_cancel_won: bool | None = None
    successor: PipelineResult | None = None
    thread_nodes_left: int = 0
    first_cause: int | None = None
    notes: list[str] = field(default_factory=list)


class Harness:
    """Builds the nodes of one plan, records the run's events, fires the cancel."""

    def __init__(self, plan: Plan, executor: PipelineExecutor) -> None:
        self.plan = plan
        self.executor = executor
        self.registry = executor.registry
        self.token = CancellationToken(name="caller")
        self.log: list[tuple[str, str | None, Any]] = []
        self.cleanups: list[str] = []
        self.fired = False
        self.tasks: list[asyncio.Task[Any]] = []
        self.threads: list[threading.Thread] = []
        self.gate = threading.Event()  # opened at the end: stubborn thread nodes return
        self.async_gate = asyncio.Event()
        self.loop_live = 0
        self.threads_live = 0
        self.threads_changed = threading.Condition()
        self.subscription = executor.events.subscribe("*", self.on_event)

    # -- nodes ----------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        built = []
        for spec in self.plan.nodes:
            fn: Callable[[NodeContext], Any]
            if spec.run_in == "loop":
                fn = self.loop_node(spec)
            elif spec.run_in == "thread":
                fn = self.thread_node(spec)
            else:
                fn = faultloads.prop_process_node
            built.append(Node(spec.id, fn, deps=spec.deps, run_in=spec.run_in))
        return built

    def context(self) -> dict[str, Any]:
        return {
            "behaviours": {spec.id: spec.behaviour for spec in self.plan.nodes},
            "deps": {spec.id: list(spec.deps) for spec in self.plan.nodes},
        }

    def loop_node(self, spec: NodeSpec) -> Callable[[NodeContext], Any]:
        async def node(ctx: NodeContext) -> str:
            self.loop_live += 1
            try:
                if spec.behaviour == "slow":
                    for _ in range(20):
                        await asyncio.sleep(0)
                elif spec.behaviour == "block":
                    await ctx.token.wait()
                    ctx.token.raise_if_cancelled()
                elif spec.behaviour == "stubborn":
                    await self.async_gate.wait()
                elif spec.behaviour == "fail":
                    raise ValueError(f"{spec.id} failed")
                return faultloads.checked_output(ctx, list(spec.deps))
            finally:
                self.loop_live -= 1

        return node

    def thread_node(self, spec: NodeSpec) -> Callable[[NodeContext], Any]:
        def node(ctx: NodeContext) -> str:
            with self.threads_changed:
                self.threads_live += 1
            try:
                if spec.behaviour == "slow":
                    total = 0
                    for index in range(20_000):
                        total += index
                elif spec.behaviour == "block":
                    ctx.token.wait_blocking(WAIT)
                    ctx.token.raise_if_cancelled()
                elif spec.behaviour == "stubborn":
                    self.gate.wait(WAIT)
                elif spec.behaviour == "fail":
                    raise ValueError(f"{spec.id} failed")
                return faultloads.checked_output(ctx, list(spec.deps))
            finally:
                with self.threads_changed:
                    self.threads_live -= 1
                    self.threads_changed.notify_all()

        return node

    # -- cleanup handlers -------------------------------------------------------------------
    def sync_handler(self) -> None:
        self.cleanups.append("sync")

    async def async_handler(self) -> None:
        self.cleanups.append("async")

    # -- events and the cancel ----------------------------------------------------------------
    def on_event(self, event: PipelineEvent) -> None:
        if event.pipeline_id != PID:
            return
        self.log.append((event.name, event.node_id, dict(event.data)))
        if event.name == "pipeline_started":
            token = self.registry.get_token(PID)
            token.on_cancel(lambda: self.log.append(("CANCEL", None, token.cancel_reason)))
            self.registry.register_cleanup_handler(PID, self.sync_handler)
            self.registry.register_cleanup_handler(PID, self.async_handler)
        trigger = self.plan.trigger
        if trigger is not None and not self.fired and (event.name, event.node_id) == trigger:
            self.fired = True
            self.fire()

    def fire(self) -> None:
        source = self.plan.source
        if source == "registry":
            self.tasks.append(asyncio.ensure_future(self.registry.cancel(PID, REASON)))
        elif source == "thread":
            # From another thread: lands at whatever point the loop has reached.
            thread = threading.Thread(
                target=self.registry.cancel_threadsafe, args=(PID, REASON), name="canceller"
            )
            thread.start()
            self.threads.append(thread)
        elif source == "token":
            self.token.cancel(REASON)
        elif source == "signal":
            signal.raise_signal(signal.SIGUSR1)  # its handler runs before this returns
        elif source == "supersede":

            async def successor(ctx: NodeContext) -> str:
                return "next"

            self.tasks.append(
                asyncio.ensure_future(
                    self.executor.run_superseding(
                        KEY, [Node("successor", successor)], pipeline_id="next", reason=REASON
                    )
                )
            )

    def on_signal(self, signum: int, frame: object) -> None:
        self.registry.cancel_threadsafe(PID, REASON)

    # -- running ------------------------------------------------------------------------------
    async def run(self) -> Observation:
        plan = self.plan
        if plan.source == "supersede":
            result = await self.executor.run_superseding(
                KEY,
                self.nodes(),
                self.context(),
                pipeline_id=PID,
                mode=plan.mode,
                graceful_timeout=plan.graceful_timeout,
            )
        else:
            result = await self.executor.run_pipeline(
                PID,
                self.nodes(),
                self.context(),
                timeout=plan.timeout,
                cancel_token=self.token,
                mode=plan.mode,
                graceful_timeout=plan.graceful_timeout,
            )
        # The state at the moment the caller got its result.
        loop_live = self.loop_live
        busy = pools.process.statistics().busy if pools.process is not None else 0
        registered = self.registry.active_pipelines()
        observation = Observation(
            plan,
            result,
            self.log,
            self.cleanups,
            loop_live,
            busy,
            tuple(pid for pid in registered if pid == PID),
            0,
            self.fired,
        )
        for thread in self.threads:
            thread.join(WAIT)
        for task in self.tasks:
            outcome = await task
            if isinstance(outcome, PipelineResult):
                observation.successor = outcome
            else:
                observation.registry_cancel_won = bool(outcome)
        observation.registered_at_end = self.registry.active_pipelines()
        observation.other_tasks_at_end = len(asyncio.all_tasks()) - 1
        # Thread nodes the pool released may still be running: open their gate and wait.
        self.gate.set()
        self.async_gate.set()
        with self.threads_changed:
            self.threads_changed.wait_for(lambda: self.threads_live == 0, WAIT)
            observation.thread_nodes_left = self.threads_live
        self.subscription.remove()
        return observation


class _Pools:
    thread: ThreadPool | None = None
    process: ProcessPool | None = None


pools = _Pools()


@pytest.fixture
def shared_pools() -> Iterator[_Pools]:
    """One thread pool and one process pool shared by every example of a test."""
    pools.thread = ThreadPool(4, grace_period=0.05, name="properties")
    pools.process = ProcessPool(2, grace_period=0.05, term_grace_period=1.0, name="properties")
    try:
        assert pools.process.wait_ready(WAIT)
        yield pools
    finally:
        pools.thread.shutdown(wait=True, cancel_futures=True)
        pools.process.shutdown(wait=True, cancel_futures=True, cancel_running=True)
        pools.thread = pools.process = None


def run_example(plan: Plan) -> Observation:
    executor = PipelineExecutor(thread_pool=pools.thread, process_pool=pools.process)
    harness = Harness(plan, executor)
    previous = signal.signal(signal.SIGUSR1, harness.on_signal)

    async def main() -> Observation:
        async with asyncio.timeout(WAIT):
            return await harness.run()

    try:
        return asyncio.run(main())
    finally:
        signal.signal(signal.SIGUSR1, previous)


# -- the invariants ---------------------------------------------------------------------------


def check(obs: Observation) -> None:
    plan, result, log = obs.plan, obs.result, obs.log
    wave_of = {node.id: node.wave for node in plan.nodes}
    behaviour = {node.id: node.behaviour for node in plan.nodes}

    # -- exactly one ending, and it is the first cause -------------------------------------
    finished = [entry for entry in log if entry[0] == "pipeline_finished"]
    assert len(finished) == 1, log
    assert finished[0][2]["outcome"] == result.outcome
    causes = [i for i, entry in enumerate(log) if entry[0] in ("CANCEL", "node_failed")]
    first = causes[0] if causes else None
    if first is None:
        expected = {"completed"}
    elif log[first][0] == "node_failed":
        expected = {"failed", "timed_out"} if plan.source == "timeout" else {"failed"}
        if plan.source == "thread" and any(e[0] == "CANCEL" and e[2] == REASON for e in log):
            # A cancel from another thread claims before its marker is logged, so a
            # failure logged in between may have come second.
            expected.add("cancelled")
    elif log[first][2] == REASON:
        expected = {"cancelled"}
    else:
        assert str(log[first][2]).startswith(f"pipeline {PID!r} timed out"), log
        expected = {"timed_out"}
    assert result.outcome in expected, (result.outcome, log)
    error = result.error
    if result.outcome == "completed":
        assert error is None
        assert result.results == {n.id: faultloads.expected_output(n.id) for n in plan.nodes}
        assert result.wave_cancelled_at is None
    elif result.outcome == "cancelled":
        assert type(error) is CancelledException
        assert result.cancel_reason == REASON == error.reason
    elif result.outcome == "timed_out":
        assert isinstance(error, PipelineTimeoutException)
        assert error.timeout == plan.timeout
    else:
        assert isinstance(error, PipelineFailedException)
        assert first is not None
        assert result.failed_node == error.node_id == log[first][1]
        assert behaviour[str(error.node_id)] == "fail"
        assert isinstance(error.__cause__, ValueError)
    if plan.source in CANCELS and obs.fired and plan.trigger == ("pipeline_finished", None):
        assert result.outcome in ("completed", "failed")  # a late cancel changes nothing
    if plan.source == "registry" and result.outcome == "cancelled":
        assert obs.registry_cancel_won is True
    if plan.source == "supersede" and obs.fired:
        assert obs.successor is not None
        assert (obs.successor.outcome, obs.successor.results) == (
            "completed",
            {"successor": "next"},
        )
    if isinstance(error, (CancelledException, PipelineFailedException)):
        assert result.node_fates == error.node_fates
        assert error.partial_results == result.results

    # -- cleanup handlers ran exactly once (never on completion), in reverse order --------
    expected_cleanups = [] if result.outcome == "completed" else ["async", "sync"]
    assert obs.cleanups == expected_cleanups
    assert result.cleanup_errors == ()

    # -- finished nodes are in partial_results with their output ----------------------------
    for node_id, fate in result.node_fates.items():
        if fate == "finished":
            assert result.results[node_id] == faultloads.expected_output(node_id)
    finished_nodes = {entry[1] for entry in log if entry[0] == "node_finished"}
    assert finished_nodes == {n for n, fate in result.node_fates.items() if fate == "finished"}
    before_cause = log if first is None else log[:first]
    for name, finished_id, _ in before_cause:
        if name == "node_finished":
            assert result.results.get(str(finished_id)) == faultloads.expected_output(
                str(finished_id)
            )
    assert not any(str(v).startswith("bad-inputs") for v in result.results.values())
    for node_id in result.node_fates:  # each node that started ended exactly once
        endings = [e for e in log if e[0] in ENDING_EVENTS and e[1] == node_id]
        assert len(endings) == 1, (node_id, log)
    started = [e for e in log if e[0] == "node_started"]
    assert {e[1] for e in started} <= set(result.node_fates)

    # -- no node of a later wave started after the cause ----------------------------------
    if first is not None:
        running = max(
            (wave_of[str(e[1])] for e in log[:first] if e[0] == "node_started"), default=-1
        )
        if plan.trigger == ("pipeline_started", None) and plan.source in TASK_SOURCES:
            running = max(running, 0)  # the cancel lands once wave 0 has been started
        lowest = max(running, 0)
        if plan.source in ("thread", "timeout"):
            # Not fired from the loop: the cause was claimed somewhat before its marker
            # (another thread logs it after claiming; the deadline's marker comes one loop
            # turn later), and it may land just after the next wave's nodes were started
            # (created) but before they said so.
            lowest = waves_of_trigger(plan)
            done = {e[1] for e in log[:first] if e[0] == "node_finished"}
            if all(n.id in done for n in plan.nodes if n.wave == running):
                running += 1
        late = [
            e[1] for e in log[first:] if e[0] == "node_started" and wave_of[str(e[1])] > running
        ]
        assert late == [], (running, log)
        if result.outcome == "cancelled":
            assert result.wave_cancelled_at is not None
            assert lowest <= result.wave_cancelled_at <= running + 1
            failures = any(fate == "failed" for fate in result.node_fates.values())
            if plan.mode == "graceful" and plan.graceful_timeout is None and not failures:
                # Nothing holds the wave (and no failure interrupts it): every node of it
                # that started ends by itself.
                for node_id, fate in result.node_fates.items():
                    if wave_of[node_id] == running:
                        assert fate == ("failed" if behaviour[node_id] == "fail" else "finished")

    # -- wave_num is the first wave that did not complete ----------------------------------
    if error is not None:
        incomplete = [
            node.wave for node in plan.nodes if result.node_fates.get(node.id) != "finished"
        ]
        first_incomplete = min(incomplete, default=max(wave_of.values()) + 1)
        if isinstance(error, PipelineFailedException):
            assert error.wave_num == wave_of[str(error.node_id)] == first_incomplete
        else:
            assert isinstance(error, CancelledException)
            assert error.wave_num == first_incomplete
        assert result.wave_cancelled_at == error.wave_num

    # -- nothing left running ---------------------------------------------------------------
    assert obs.loop_nodes_live_at_end == 0
    assert obs.process_busy_at_end == 0
    assert obs.registered_at_end == ()
    assert obs.other_tasks_at_end == 0
    assert obs.thread_nodes_left == 0


def waves_of_trigger(plan: Plan) -> int:
    """The wave a cancel fired at the plan's trigger cannot land before."""
    if plan.trigger is None or plan.trigger[1] is None:
        return 0
    return next(n.wave for n in plan.nodes if n.id == plan.trigger[1])


# -- the tests --------------------------------------------------------------------------------


class TestRandomPipelines:
    @pytest.mark.timeout(TEST_TIMEOUT)
    @pytest.mark.parametrize("mode", ["graceful", "interrupt"])
    def test_random_cancellation_keeps_the_invariants(
        self, mode: Literal["graceful", "interrupt"], shared_pools: _Pools
    ) -> None:
        """Test that a random pipeline of loop, thread and process nodes, cancelled at a
        random moment by a random source (or failing, timing out, completing), ends once,
        by its first cause, cleans up once, keeps every finished output, starts no later
        wave, reports the right wave, and leaves nothing running."""

        @SETTINGS
        @given(plan=plans(mode))
        def example(plan: Plan) -> None:
            check(run_example(plan))

        example()
