"""A program that tests/test_signals.py runs and signals (issue 9, part 3).

    python tests/signal_child.py PHASE METHOD [MODE [WATCHDOG]]

It runs pipelines the way an application would, with SIGINT and SIGTERM handlers that
cancel them: METHOD ``registry`` calls ``registry.cancel_threadsafe`` for every running
pipeline, ``token`` cancels the caller's token the runs were given; ``default`` installs
no handler (Python's own Ctrl-C: ``asyncio.run`` cancels the main task, then raises
KeyboardInterrupt, which the program catches at the top). It prints
``READY <phase>`` (stdout, flushed) when the test should send the signal, and at the
end ``ENDED <outcome> <reason>`` plus ``FACTS <json>``, then exits 0. A hang is caught
by faulthandler, which dumps every thread's stack and exits 1.

Phases:
    waves    the signal lands while a wave of loop, thread and process nodes runs
    cleanup  ... while a cleanup handler runs (the run was already cancelled)
    healing  ... while the process pool replaces a worker that crashed
    storm    SIGUSR1 lands non-stop while 200 pipelines run; the handler cancels the
             current run at every 7th signal (the token's signal race, at scale)
    pool-storm  SIGUSR1 lands non-stop while the main thread makes timeout tokens; the
             handler cancels a running ThreadPool task's token
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import signal
import socket
import sys
import threading
from typing import Any

import psutil
from loguru import logger

import faultloads
from cancelflow import (
    CancellationRegistry,
    CancellationToken,
    Node,
    NodeContext,
    PipelineEvent,
    PipelineExecutor,
    PipelineResult,
    ProcessPool,
    ThreadPool,
    current_token,
)

#: faulthandler exits the program (code 1) if it is stuck this long (argv[4] overrides)
WATCHDOG = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0

PHASE = sys.argv[1]
METHOD = sys.argv[2]
MODE = sys.argv[3] if len(sys.argv) > 3 else "interrupt"

registry = CancellationRegistry()
stop = CancellationToken(name="stop")  # the caller's token given to every run
signalled = CancellationToken(name="signalled")  # set by the handler (signal-safe)
facts: dict[str, Any] = {"signals": 0}


def say(line: str) -> None:
    """One line to the test, at once (stdout is a pipe)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def ready(phase: str) -> None:
    # Everything this program started so far: the test checks that none outlives it.
    facts["descendants"] = [p.pid for p in psutil.Process().children(recursive=True)]
    say(f"READY {phase}")


def on_signal(signum: int, frame: object) -> None:
    reason = f"signal {signal.Signals(signum).name}"
    facts["signals"] += 1
    if METHOD == "registry":
        for pipeline_id in registry.active_pipelines():
            registry.cancel_threadsafe(pipeline_id, reason)
    else:
        stop.cancel(reason)
    signalled.cancel(reason)


def late_cancel(event: PipelineEvent) -> None:
    """A run registered after the signal landed is cancelled as soon as it starts."""
    if METHOD == "registry" and signalled.is_cancelled:
        registry.cancel_threadsafe(event.pipeline_id, signalled.cancel_reason)


def report(result: PipelineResult) -> None:
    say(f"ENDED {result.outcome} {result.cancel_reason}")
    facts["fates"] = result.node_fates
    facts["results"] = sorted(result.results)
    facts["cleanup_errors"] = [repr(e) for e in result.cleanup_errors]


# -- waves ------------------------------------------------------------------------------------


async def prep(ctx: NodeContext) -> str:
    return "prep"


loop_running: list[asyncio.Event] = []  # not in the context: that goes to processes


async def loop_node(ctx: NodeContext) -> None:
    loop_running[0].set()
    await ctx.token.wait()
    ctx.token.raise_if_cancelled()


def thread_node(ctx: NodeContext) -> None:
    faultloads.send_beacon(ctx.context["beacon"], "thread.pid", os.getpid())
    ctx.token.wait_blocking()
    ctx.token.raise_if_cancelled()


async def never(ctx: NodeContext) -> str:
    raise AssertionError("a wave after the cancel ran")


async def waves(executor: PipelineExecutor) -> None:
    async with faultloads.open_beacon() as beacon:
        loop_running.append(asyncio.Event())
        nodes = [
            Node("prep", prep),
            Node("loop", loop_node, deps=["prep"]),
            Node("thread", thread_node, deps=["prep"]),
            Node("process", faultloads.node_wait_for_token, deps=["prep"], run_in="process"),
            Node("never", never, deps=["loop", "thread", "process"]),
        ]
        run = asyncio.create_task(
            executor.run_pipeline(
                "p",
                nodes,
                {"beacon": beacon.path},
                cancel_token=stop,
            )
        )
        await loop_running[0].wait()
        await beacon.wait("thread.pid")
        await beacon.wait("process.pid")
        ready("waves")
        report(await run)


# -- cleanup ----------------------------------------------------------------------------------


async def cleanup(executor: PipelineExecutor, *, signal_own_thread: bool = False) -> None:
    """``signal_own_thread``: the sync handler sends SIGINT to its own thread, which takes
    it (as any thread may take a signal sent to the process): the main thread, blocked in
    the loop, is not interrupted, and runs the handler only when the loop wakes."""
    first = CancellationToken(name="first")
    handlers_ran: list[str] = []

    async def cancel_itself(ctx: NodeContext) -> None:
        first.cancel("first")
        await asyncio.Event().wait()

    def sync_handler() -> None:
        handlers_ran.append("sync")
        ready("cleanup")
        if signal_own_thread:
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        facts["signal_seen_in_handler"] = signalled.wait_blocking(WATCHDOG)

    async def async_handler() -> None:
        handlers_ran.append("async")
        await signalled.wait()

    handlers = [async_handler, sync_handler]  # run in reverse: sync first, then async
    result = await executor.run_pipeline(
        "p", [Node("cancel_itself", cancel_itself)], cancel_token=first, cleanup_handlers=handlers
    )
    facts["handlers_ran"] = handlers_ran
    report(result)


# -- healing ----------------------------------------------------------------------------------


async def healing(executor: PipelineExecutor, pool: ProcessPool) -> None:
    def crashed(event: PipelineEvent) -> None:
        if event.node_id == "crash":
            facts["workers_when_ready"] = pool.statistics().idle
            ready("healing")

    executor.events.subscribe("node_failed", crashed)
    async with faultloads.open_beacon() as beacon:
        crash = await executor.run_pipeline(
            "crash",
            [Node("crash", faultloads.node_segfault, run_in="process")],
            {"beacon": beacon.path},
        )
        facts["crash"] = crash.node_fates
        result = await executor.run_pipeline(
            "after-crash",
            [Node("wait", faultloads.node_wait_for_token, run_in="process")],
            {"beacon": beacon.path},
            cancel_token=stop,
        )
    facts["replaced"] = pool.statistics().replaced_total
    report(result)


# -- storms -----------------------------------------------------------------------------------


class Storm:
    """SIGUSR1 sent non-stop to the main thread by a helper thread."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.count = 0
        self.depth = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._send, name="storm")

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.depth >= 2:
            return
        self.depth += 1
        try:
            self.count += 1
            self.handler(self.count)
        finally:
            self.depth -= 1

    def _send(self) -> None:
        main = threading.main_thread().ident
        assert main is not None
        while not self.stopped.is_set():
            signal.pthread_kill(main, signal.SIGUSR1)

    def __enter__(self) -> Storm:
        signal.signal(signal.SIGUSR1, self._on_signal)
        sys.setswitchinterval(1e-5)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


async def storm(executor: PipelineExecutor) -> None:
    runs = 300
    current: dict[str, Any] = {}
    cleanups: dict[str, int] = {}
    outcomes: dict[str, int] = {}

    def handler(count: int) -> None:
        if count % 7:
            return
        if count % 14 == 0:
            pipeline_id = current.get("id")
            if pipeline_id is not None:
                registry.cancel_threadsafe(pipeline_id, "storm")
        else:
            token = current.get("token")
            if token is not None:
                token.cancel("storm")

    async def first(ctx: NodeContext) -> int:
        await asyncio.sleep(0)
        return 1

    def second(ctx: NodeContext) -> int:
        for _ in range(200):
            ctx.token.raise_if_cancelled()
        return 2

    async def third(ctx: NodeContext) -> int:
        return int(ctx.inputs["first"]) + int(ctx.inputs["second"])

    nodes = [
        Node("first", first),
        Node("second", second),
        Node("third", third, deps=["first", "second"]),
    ]
    with Storm(handler) as sender:
        for index in range(runs):
            pipeline_id = f"run-{index}"
            token = CancellationToken(name=pipeline_id)
            current.update(id=pipeline_id, token=token)

            def count_cleanup(pipeline_id: str = pipeline_id) -> None:
                cleanups[pipeline_id] = cleanups.get(pipeline_id, 0) + 1

            result = await executor.run_pipeline(
                pipeline_id,
                nodes,
                cancel_token=token,
                mode="interrupt" if index % 2 else "graceful",
                cleanup_handlers=[count_cleanup],
            )
            current.clear()
            outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
            expected = 0 if result.outcome == "completed" else 1
            if cleanups.get(pipeline_id, 0) != expected:
                facts.setdefault("bad_cleanups", []).append((pipeline_id, result.outcome))
            if result.outcome == "completed" and result.results["third"] != 3:
                facts.setdefault("bad_results", []).append(pipeline_id)
        facts["storm_signals"] = sender.count
    facts["outcomes"] = outcomes
    facts["registered_after"] = list(registry.active_pipelines())
    say(f"ENDED storm {sum(outcomes.values())}")


def pool_storm() -> None:
    """The handler cancels a running thread-pool task's token while the main thread is
    making timeout tokens (which schedule timers)."""
    pool = ThreadPool(4, grace_period=WATCHDOG)
    current: dict[str, CancellationToken] = {}
    cancels = 0

    def handler(count: int) -> None:
        nonlocal cancels
        token = current.get("token")
        if token is not None and token.cancel("storm"):
            cancels += 1

    def task() -> None:
        current_token().wait_blocking(WATCHDOG)

    done = 0
    finished = threading.Event()

    def stall_watchdog() -> None:
        # Each round takes milliseconds: no progress for 3 s in a row is a deadlock.
        last, stalled = -1, 0
        while not finished.wait(1.0):
            stalled = stalled + 1 if done == last else 0
            last = done
            if stalled >= 3:
                say(f"STALLED after {done} rounds")
                faulthandler.dump_traceback(all_threads=True)
                os._exit(1)

    watchdog = threading.Thread(target=stall_watchdog, name="stall-watchdog", daemon=True)
    watchdog.start()
    with Storm(handler):
        for _ in range(300):
            token = CancellationToken()
            future = pool.submit_task(task, token=token)
            current["token"] = token
            while not token.is_cancelled:
                CancellationToken(timeout=WATCHDOG).close()
            current.clear()
            try:
                future.result(WATCHDOG)
            except Exception:  # noqa: BLE001 - cancelled, as intended
                done += 1
    finished.set()
    watchdog.join()
    pool.shutdown(wait=True, cancel_futures=True)
    facts["pool_storm_cancelled"] = done
    say(f"ENDED pool-storm {done}")


# -- main -------------------------------------------------------------------------------------


def wake_the_loop_on_signals(
    loop: asyncio.AbstractEventLoop,
) -> tuple[socket.socket, socket.socket]:
    """Have every signal wake ``loop``, which runs on the main thread (as the token's
    docs advise for ``signal.signal`` handlers): a handler runs only when the main thread
    runs Python, and a signal that lands just before the loop blocks would otherwise wait
    for the loop's next wake-up (seen once: a cleanup handler waiting for the signal
    timed out after 5 s). Returns the sockets to close."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    loop.add_reader(reader.fileno(), reader.recv, 4096)
    return reader, writer


def stop_waking_the_loop(
    loop: asyncio.AbstractEventLoop, sockets: tuple[socket.socket, socket.socket]
) -> None:
    signal.set_wakeup_fd(-1)
    loop.remove_reader(sockets[0].fileno())
    for sock in sockets:
        sock.close()


async def main() -> None:
    waker = wake_the_loop_on_signals(asyncio.get_running_loop())
    pool = ProcessPool(1 if PHASE == "healing" else 2, grace_period=0.05, term_grace_period=0.5)
    threads = ThreadPool(4, grace_period=0.5)
    executor = PipelineExecutor(
        registry,
        thread_pool=threads,
        process_pool=pool,
        mode=MODE,  # type: ignore[arg-type]
        graceful_timeout=0.3,
    )
    executor.events.subscribe("pipeline_started", late_cancel)
    try:
        if PHASE == "waves":
            await waves(executor)
        elif PHASE == "cleanup":
            await cleanup(executor)
        elif PHASE == "cleanup-signal-own-thread":
            await cleanup(executor, signal_own_thread=True)
        elif PHASE == "healing":
            await healing(executor, pool)
        elif PHASE == "storm":
            await storm(executor)
        else:
            raise SystemExit(f"unknown phase {PHASE!r}")
    finally:
        await executor.aclose()
        threads.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)
        stop_waking_the_loop(asyncio.get_running_loop(), waker)


if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="INFO", backtrace=False, diagnose=False)
    faulthandler.dump_traceback_later(WATCHDOG, exit=True)
    if METHOD != "default":  # "default": Python's own Ctrl-C handling under asyncio.run
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    if PHASE == "pool-storm":
        pool_storm()
    else:
        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            say("ENDED interrupted by-KeyboardInterrupt")
    faulthandler.cancel_dump_traceback_later()
    say("FACTS " + json.dumps(facts))
