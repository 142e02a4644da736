"""Soak: many pipelines with random cancellation on 2 process workers (issue 9, part 4).

Runs ``--pipelines`` random pipelines (loop, thread and process nodes; quick, slow,
cooperative-blocking, stubborn and failing ones; 1-3 waves), ``--concurrency`` at a time,
in both modes. Most are cancelled at a random moment by a random source: the registry
(awaited cancel), the caller's token, ``cancel_threadsafe`` from another thread, the
run's timeout, or a superseding run; the others complete or fail.

Reports throughput (pipelines/s), cancel latency (cancel call -> the caller has the
result: every node stopped, cleanup run, pipeline unregistered) p50/p99 per mode, and at
the end the counts that must be 0: leaked child processes, threads, file descriptors,
/dev/shm entries, multiprocessing manager processes, partial results lost (stored before
the cancel but missing from the result), cleanup handlers run twice or never, wrong
endings. Parent RSS is measured after a warm-up and at the end.

Run: ``python -m benchmarks.soak [--pipelines 1000] [--concurrency 4] [--seed 9]``.
Exit status 1 if any of the must-be-zero counts is not zero (``--watchdog`` seconds: a
stuck soak dumps every thread's stack and exits 1). 100 warm-up pipelines run first and
are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import gc
import itertools
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psutil
from loguru import logger

from cancelflow import (
    CancellationToken,
    Node,
    NodeContext,
    PipelineExecutor,
    PipelineResult,
    ProcessPool,
    ThreadPool,
)

WAIT = 60.0  # watchdog per pipeline; a pipeline stuck this long counts as a hang
_seq = itertools.count(1)  # orders stores and cancels (next() is atomic under the GIL)

# -- nodes (module level: process workers import them by name) --------------------------------


def _report(path: str, key: str) -> None:
    """Tell the soak's beacon (in the parent) that ``key`` was stored."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(key.encode() + b"\n")


def process_node(ctx: NodeContext) -> str:
    behaviour = ctx.context["behaviours"][ctx.node_id]
    ctx.store_partial("started", ctx.node_id)  # sent to the parent before it returns
    _report(ctx.context["beacon"], f"{ctx.pipeline_id}/{ctx.node_id}")
    if behaviour == "slow":
        total = 0
        for index in range(300_000):
            total += index
    elif behaviour == "block":
        ctx.token.wait_blocking()
        ctx.token.raise_if_cancelled()
    elif behaviour == "stubborn":
        while True:
            pass
    elif behaviour == "fail":
        raise ValueError(f"{ctx.node_id} failed")
    return f"out-{ctx.node_id}"


@dataclass
class Book:
    """What the soak saw; the counts at the end come from here."""

    stores: dict[str, int] = field(default_factory=dict)  # "pid/node" -> seq when stored
    cleanups: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lost_partials: list[str] = field(default_factory=list)
    bad_cleanups: list[str] = field(default_factory=list)
    bad_endings: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    dumped: bool = False
    expected_cleanups: dict[str, int] = field(default_factory=dict)


book = Book()
pending_handlers: dict[str, Any] = {}  # pipeline id -> cleanup handler to add at its start


def add_pending_handler(registry: Any, pipeline_id: str) -> None:
    handler = pending_handlers.pop(pipeline_id, None)
    if handler is not None:
        registry.register_cleanup_handler(pipeline_id, handler)


def thread_node(ctx: NodeContext) -> str:
    ctx.store_partial("started", ctx.node_id)
    book.stores[f"{ctx.pipeline_id}/{ctx.node_id}"] = next(_seq)
    behaviour = ctx.context["behaviours"][ctx.node_id]
    if behaviour == "slow":
        total = 0
        for index in range(50_000):
            total += index
            if index % 5000 == 0:
                ctx.token.raise_if_cancelled()
    elif behaviour == "block":
        ctx.token.wait_blocking(WAIT)
        ctx.token.raise_if_cancelled()
    elif behaviour == "fail":
        raise ValueError(f"{ctx.node_id} failed")
    return f"out-{ctx.node_id}"


async def loop_node(ctx: NodeContext) -> str:
    ctx.store_partial("started", ctx.node_id)
    book.stores[f"{ctx.pipeline_id}/{ctx.node_id}"] = next(_seq)
    behaviour = ctx.context["behaviours"][ctx.node_id]
    if behaviour == "slow":
        for _ in range(50):
            await asyncio.sleep(0)
    elif behaviour == "block":
        await ctx.token.wait()
        ctx.token.raise_if_cancelled()
    elif behaviour == "fail":
        raise ValueError(f"{ctx.node_id} failed")
    return f"out-{ctx.node_id}"


async def successor(ctx: NodeContext) -> str:
    return "next"


# -- one pipeline -----------------------------------------------------------------------------


SOURCES = ("none", "registry", "token", "thread", "timeout", "supersede")
SOURCE_WEIGHTS = (2, 2, 2, 2, 1, 1)


def build(rng: random.Random, cancelled: bool) -> tuple[list[Node], dict[str, str]]:
    """A random DAG; nodes that never end by themselves only if a cancel will come."""
    nodes: list[Node] = []
    behaviours: dict[str, str] = {}
    previous: list[str] = []
    processes = 0
    for wave in range(rng.randint(1, 3)):
        current = []
        for index in range(rng.randint(1, 3)):
            node_id = f"n{wave}{index}"
            run_in = rng.choice(("loop", "loop", "thread", "thread", "process"))
            if run_in == "process" and processes >= 2:
                run_in = "thread"
            processes += run_in == "process"
            choices = ["quick", "quick", "quick", "slow", "fail"]
            if cancelled:
                choices += ["block", "block"] + (["stubborn"] if run_in == "process" else [])
            behaviours[node_id] = rng.choice(choices)
            deps = [rng.choice(previous)] if previous else []
            fn: Any = {"loop": loop_node, "thread": thread_node, "process": process_node}[run_in]
            nodes.append(Node(node_id, fn, deps=deps, run_in=run_in))  # type: ignore[arg-type]
            current.append(node_id)
        previous = current
    return nodes, behaviours


async def one_pipeline(
    index: int, executor: PipelineExecutor, beacon: str, seed: int, arrivals: dict[str, int]
) -> None:
    rng = random.Random(seed * 1_000_003 + index)
    pid = f"run-{index}"
    source = rng.choices(SOURCES, SOURCE_WEIGHTS)[0]
    mode = rng.choice(("graceful", "interrupt"))
    nodes, behaviours = build(rng, cancelled=source != "none")
    context = {"behaviours": behaviours, "beacon": beacon}
    token = CancellationToken(name=pid)

    def handler() -> None:
        book.cleanups[pid] += 1

    timeout = rng.uniform(0.005, 0.05) if source == "timeout" else None
    if source == "supersede":
        # run_superseding takes no handlers: the run's are added when it starts.
        pending_handlers[pid] = handler
        task = asyncio.ensure_future(
            executor.run_superseding(
                pid,
                nodes,
                context,
                mode=mode,  # type: ignore[arg-type]
                graceful_timeout=0.2,
            )
        )
    else:
        task = asyncio.ensure_future(
            executor.run_pipeline(
                pid,
                nodes,
                context,
                timeout=timeout,
                cancel_token=token,
                mode=mode,  # type: ignore[arg-type]
                graceful_timeout=0.2,
                cleanup_handlers=[handler],
            )
        )
    cancel_seq = None
    cancelled_at = None
    successor_task = None
    try:
        async with asyncio.timeout(WAIT):
            if source not in ("none", "timeout"):
                await asyncio.sleep(rng.uniform(0, 0.02))
                cancel_seq = next(_seq)
                cancelled_at = time.perf_counter()
                if source == "registry":
                    await executor.registry.cancel(pid, "soak")
                elif source == "token":
                    token.cancel("soak")
                elif source == "thread":
                    canceller = threading.Thread(
                        target=executor.registry.cancel_threadsafe, args=(pid, "soak")
                    )
                    canceller.start()
                    canceller.join()
                else:
                    successor_task = asyncio.ensure_future(
                        executor.run_superseding(pid, [Node("s", successor)], reason="soak")
                    )
            result = await task
            if successor_task is not None:
                after = await successor_task
                if after.outcome != "completed":
                    book.bad_endings.append(f"{pid} successor {after.outcome}")
    except TimeoutError:
        book.hangs.append(f"{pid} {mode} {source} {behaviours} {[(n.id, n.run_in) for n in nodes]}")
        if not book.dumped:
            book.dumped = True
            for stuck in asyncio.all_tasks():
                stuck.print_stack(limit=8, file=sys.stderr)
        return
    ended_at = time.perf_counter()
    book.outcomes[f"{mode} {source} {result.outcome}"] += 1
    if cancelled_at is not None and result.outcome == "cancelled":
        book.latencies[mode].append(ended_at - cancelled_at)
    check(pid, result, nodes, behaviours, source, cancel_seq, arrivals)
    for node in nodes:  # checked: forget this run's bookkeeping
        book.stores.pop(f"{pid}/{node.id}", None)
        arrivals.pop(f"{pid}/{node.id}", None)


def check(
    pid: str,
    result: PipelineResult,
    nodes: list[Node],
    behaviours: dict[str, str],
    source: str,
    cancel_seq: int | None,
    arrivals: dict[str, int],
) -> None:
    outcome = result.outcome
    allowed = {
        "none": {"completed", "failed"},
        "timeout": {"completed", "failed", "timed_out"},
    }.get(source, {"completed", "failed", "cancelled"})
    if outcome not in allowed:
        book.bad_endings.append(f"{pid}: {source} ended {outcome}")
    if outcome == "cancelled" and result.cancel_reason != "soak":
        book.bad_endings.append(f"{pid}: reason {result.cancel_reason!r}")
    # Cleanup handlers: once unless the run completed (then never).
    expected = 0 if outcome == "completed" else 1
    book.expected_cleanups[pid] = expected
    if book.cleanups[pid] != expected:
        book.bad_cleanups.append(f"{pid}: {book.cleanups[pid]} runs, outcome {outcome}")
    # Outputs of finished nodes, and every store made before the cancel.
    for node in nodes:
        if (
            result.node_fates.get(node.id) == "finished"
            and result.results.get(node.id) != f"out-{node.id}"
        ):
            book.lost_partials.append(f"{pid}/{node.id} output")
        key = f"{pid}/{node.id}"
        stored = arrivals.get(key) if node.run_in == "process" else book.stores.get(key)
        before_cancel = stored is not None and (cancel_seq is None or stored < cancel_seq)
        # A completed run reports its outputs; the stored partials matter when it did not.
        if (
            outcome != "completed"
            and before_cancel
            and result.results.get(f"{node.id}.started") != node.id
        ):
            book.lost_partials.append(
                f"{key} partial ({source} {outcome} {result.node_fates.get(node.id)})"
            )


# -- the run ----------------------------------------------------------------------------------


def census() -> dict[str, Any]:
    me = psutil.Process()
    children = me.children(recursive=True)
    cmdlines = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            cmdlines.append(" ".join(child.cmdline()))
    return {
        "children": {c.pid for c in children},
        "managers": sum("multiprocessing" in c and "manager" in c.lower() for c in cmdlines),
        "threads": {t.ident for t in threading.enumerate()},
        "fds": set(os.listdir("/proc/self/fd")),
        "shm": set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set(),
        "rss": me.memory_info().rss,
    }


async def serve_beacon(path: str, arrivals: dict[str, int]) -> asyncio.AbstractServer:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.close()
        for line in data.decode().splitlines():
            arrivals[line] = next(_seq)

    return await asyncio.start_unix_server(on_connect, path)


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="cfsoak")
    beacon = os.path.join(directory, "beacon")
    arrivals: dict[str, int] = {}
    server = await serve_beacon(beacon, arrivals)
    threads = ThreadPool(8, grace_period=0.05, name="soak")
    processes = ProcessPool(2, grace_period=0.05, term_grace_period=0.5, name="soak")
    executor = PipelineExecutor(thread_pool=threads, process_pool=processes)
    executor.events.subscribe(
        "pipeline_started", lambda event: add_pending_handler(executor.registry, event.pipeline_id)
    )

    async def run_many(indexes: range) -> None:
        # ``concurrency`` runners take the next index in turn: no task per pipeline
        # waits up front, so memory measures the library, not the soak.
        pending = iter(indexes)

        async def runner() -> None:
            for index in pending:
                await one_pipeline(index, executor, beacon, args.seed, arrivals)

        await asyncio.gather(*(runner() for _ in range(args.concurrency)))

    try:
        # Warm-up (not counted): pools started, code paths and caches warm.
        await run_many(range(-100, 0))
        for key in list(book.__dict__):
            value = getattr(book, key)
            if hasattr(value, "clear"):
                value.clear()
        gc.collect()
        rss_before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        await run_many(range(args.pipelines))
        elapsed = time.perf_counter() - started
        gc.collect()
        rss_after = psutil.Process().memory_info().rss
        pool_stats = processes.statistics()
        thread_stats = threads.statistics()
    finally:
        await executor.aclose()
        threads.shutdown(wait=True, cancel_futures=True)
        processes.shutdown(wait=True, cancel_futures=True, cancel_running=True)
        server.close()
        await server.wait_closed()
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "elapsed": elapsed,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "pool": pool_stats,
        "threads": thread_stats,
        "registered_after": list(executor.registry.active_pipelines()),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--watchdog",
        type=float,
        default=900.0,
        help="dump every thread's stack and exit 1 if the soak takes longer (seconds)",
    )
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.watchdog, exit=True)
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    logger.disable("cancelflow")

    before = census()
    run = asyncio.run(soak(args))
    # Give abandoned threads and reaped processes a bounded moment to go (no sleep-poll
    # on the happy path: it returns at once when everything is already gone).
    deadline = time.monotonic() + 10
    while True:
        gc.collect()
        after = census()
        leaks = {
            "processes": len(after["children"] - before["children"]),
            "threads": len(after["threads"] - before["threads"]),
            "fds": len(after["fds"] - before["fds"]),
            "shm": len(after["shm"] - before["shm"]),
        }
        if not any(leaks.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    leaks["managers"] = after["managers"]
    # A handler that ran late (after its run returned) shows up only now.
    for pid, expected in book.expected_cleanups.items():
        if book.cleanups[pid] != expected and not any(pid in b for b in book.bad_cleanups):
            book.bad_cleanups.append(f"{pid}: {book.cleanups[pid]} runs in the end")
    zero = {
        **{f"leaked {k}": v for k, v in leaks.items()},
        "lost partial results": len(book.lost_partials),
        "cleanup run twice or never": len(book.bad_cleanups),
        "wrong endings": len(book.bad_endings),
        "hung pipelines": len(book.hangs),
        "still registered": len(run["registered_after"]),
    }
    latency = {
        mode: {
            "n": len(values),
            "p50_ms": 1000 * statistics.median(values) if values else float("nan"),
            "p99_ms": 1000 * percentile(values, 0.99),
        }
        for mode, values in sorted(book.latencies.items())
    }
    figures = {
        "command": "python -m benchmarks.soak " + " ".join(sys.argv[1:]),
        "pipelines": args.pipelines,
        "concurrency": args.concurrency,
        "process_workers": 2,
        "seconds": round(run["elapsed"], 2),
        "pipelines_per_s": round(args.pipelines / run["elapsed"], 1),
        "cancel_latency": latency,
        "outcomes": dict(Counter(k.rsplit(" ", 1)[1] for k in book.outcomes.elements())),
        "must_be_zero": zero,
        "rss_mb_before": round(run["rss_before"] / 2**20, 1),
        "rss_mb_after": round(run["rss_after"] / 2**20, 1),
        "process_pool": {
            "replaced": run["pool"].replaced_total,
            "killed": run["pool"].killed_total,
            "crashed": run["pool"].crashed_total,
            "completed": run["pool"].completed_total,
        },
        "thread_pool_abandoned": run["threads"].abandoned_total,
    }
    print(f"soak: {args.pipelines} pipelines, concurrency {args.concurrency}, 2 process workers")
    print(f"  {figures['pipelines_per_s']} pipelines/s ({figures['seconds']} s)")
    for mode, row in latency.items():
        print(
            f"  cancel latency {mode:9s} p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms"
            f"  (n={row['n']})"
        )
    print(
        "    (graceful waits for the running wave; a node that holds it is interrupted after"
        " graceful_timeout=0.2 s; interrupt includes the ladder's 0.05 s grace for process"
        " nodes that ignore their token)"
    )
    print(f"  outcomes: {figures['outcomes']}")
    print(f"  parent RSS: {figures['rss_mb_before']} MB -> {figures['rss_mb_after']} MB")
    print(f"  process pool: {figures['process_pool']}")
    for name, value in zero.items():
        print(f"  {name}: {value}")
    for name, problems in (
        ("lost", book.lost_partials),
        ("cleanup", book.bad_cleanups),
        ("ending", book.bad_endings),
        ("hang", book.hangs),
    ):
        for problem in problems[:20]:
            print(f"    {name}: {problem}")
    faulthandler.cancel_dump_traceback_later()
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 1 if any(zero.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
