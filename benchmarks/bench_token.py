"""What a ``CancellationToken`` costs to check, and how fast a cancel wakes a waiter.

Check cost, per call, net of an empty loop of the same length:

* in this process: ``token.is_cancelled`` against ``threading.Event().is_set()``;
* in a worker process (spawn): ``token.is_cancelled`` against
  ``multiprocessing.Event().is_set()`` (both objects handed to the worker at start).

Each figure is the median and the 99th percentile over many timed runs of a hot loop.
Targets: in-process at most 2x ``Event.is_set``; in a worker at least 10x cheaper than
``multiprocessing.Event.is_set``.

Wake latency, from just before ``cancel()`` to the waiter running again (p50/p99):

* a thread cancels, an asyncio waiter (``await token.wait()``) on the main loop resumes
  (for reference, a thread resolving a future with ``loop.call_soon_threadsafe``);
* the parent cancels, a worker blocked in ``token.wait_blocking()`` returns;
* for reference, the parent sets a ``multiprocessing.Event`` the worker waits on.

Run from the repository root::

    python -m benchmarks.bench_token [--runs N] [--loop N] [--wakes N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from cancelflow import CancellationToken

perf_ns = time.perf_counter_ns  # CLOCK_MONOTONIC: comparable across processes on Linux


# -- check cost ---------------------------------------------------------------------------


def _empty(n: int) -> int:
    start = perf_ns()
    for _ in range(n):
        pass
    return perf_ns() - start


def _token_check(token: CancellationToken, n: int) -> int:
    start = perf_ns()
    for _ in range(n):
        token.is_cancelled  # noqa: B018 - the attribute read is what we time
    return perf_ns() - start


def _event_check(event: Any, n: int) -> int:
    start = perf_ns()
    for _ in range(n):
        event.is_set()
    return perf_ns() - start


def measure_checks(
    subjects: dict[str, Callable[[int], int]], runs: int, loop: int
) -> dict[str, list[float]]:
    """Per-call ns for each subject, one figure per run, net of an adjacent empty loop.

    Subjects are interleaved within each run so that drift (frequency scaling, a noisy
    neighbour) hits them alike.
    """
    for check in subjects.values():  # warm up
        check(loop)
    _empty(loop)
    results: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(runs):
        for name, check in subjects.items():
            before = _empty(loop)
            timed = check(loop)
            after = _empty(loop)
            results[name].append(max(timed - min(before, after), 0) / loop)
    return results


def _worker_checks(
    token: CancellationToken,
    mp_event: Any,
    conn: multiprocessing.connection.Connection,
    runs: int,
    loop: int,
) -> None:
    thread_event = threading.Event()
    conn.send(
        measure_checks(
            {
                "token.is_cancelled": lambda n: _token_check(token, n),
                "multiprocessing.Event.is_set": lambda n: _event_check(mp_event, n),
                "threading.Event.is_set": lambda n: _event_check(thread_event, n),
            },
            runs,
            loop,
        )
    )
    conn.close()


# -- wake latency -------------------------------------------------------------------------


SETTLE = 0.0005  # s the firing thread waits first, so that the loop is asleep in epoll


def asyncio_wake_latency(samples: int) -> list[float]:
    """ns from ``cancel()`` in a helper thread to ``await token.wait()`` returning."""
    jobs: queue.SimpleQueue[CancellationToken | None] = queue.SimpleQueue()
    sent: list[int] = []

    def canceller() -> None:
        while (token := jobs.get()) is not None:
            time.sleep(SETTLE)
            sent.append(perf_ns())
            token.cancel()

    helper = threading.Thread(target=canceller)
    helper.start()

    async def main() -> list[float]:
        latencies: list[float] = []
        while len(latencies) < samples:
            token = CancellationToken()
            jobs.put(token)
            await token.wait()
            if len(sent) == len(latencies) + 1:
                latencies.append(perf_ns() - sent[-1])
        return latencies

    try:
        return asyncio.run(main())
    finally:
        jobs.put(None)
        helper.join()


def asyncio_raw_wake_latency(samples: int) -> list[float]:
    """Reference: ns from ``call_soon_threadsafe(future.set_result)`` in a helper thread to
    ``await future`` returning: what any cross-thread wake-up of a loop costs."""
    jobs: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None]
    jobs = queue.SimpleQueue()
    sent: list[int] = []

    def waker() -> None:
        while (job := jobs.get()) is not None:
            loop, future = job
            time.sleep(SETTLE)
            sent.append(perf_ns())
            loop.call_soon_threadsafe(future.set_result, None)

    helper = threading.Thread(target=waker)
    helper.start()

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        for _ in range(samples):
            future: asyncio.Future[None] = loop.create_future()
            jobs.put((loop, future))
            await future
            latencies.append(perf_ns() - sent[-1])
        return latencies

    try:
        return asyncio.run(main())
    finally:
        jobs.put(None)
        helper.join()


def _worker_waits(
    waits: list[CancellationToken],
    readies: list[CancellationToken],
    events: list[Any],
    conn: multiprocessing.connection.Connection,
) -> None:
    woke_token = []
    for ready, wait in zip(readies[: len(waits)], waits, strict=True):
        ready.cancel()
        wait.wait_blocking(30)
        woke_token.append(perf_ns())
    woke_event = []
    for ready, event in zip(readies[len(waits) :], events, strict=True):
        ready.cancel()
        event.wait(30)
        woke_event.append(perf_ns())
    conn.send((woke_token, woke_event))
    conn.close()


def process_wake_latency(samples: int) -> tuple[list[float], list[float]]:
    """ns from the parent's ``cancel()`` / ``Event.set()`` to the blocked worker returning."""
    ctx = multiprocessing.get_context("spawn")
    waits = [CancellationToken() for _ in range(samples)]
    readies = [CancellationToken() for _ in range(2 * samples)]
    events = [ctx.Event() for _ in range(samples)]
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker_waits, args=(waits, readies, events, writer))
    proc.start()
    writer.close()
    sent_token, sent_event = [], []
    for i, wait in enumerate(waits):
        readies[i].wait_blocking(30)
        time.sleep(SETTLE)  # let the worker reach its futex wait (a benchmark may sleep)
        sent_token.append(perf_ns())
        wait.cancel()
    for i, event in enumerate(events):
        readies[samples + i].wait_blocking(30)
        time.sleep(SETTLE)
        sent_event.append(perf_ns())
        event.set()
    woke_token, woke_event = reader.recv()
    reader.close()
    proc.join()
    return (
        [b - a for a, b in zip(sent_token, woke_token, strict=True)],
        [b - a for a, b in zip(sent_event, woke_event, strict=True)],
    )


# -- report -------------------------------------------------------------------------------


def pctl(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name: str, values: list[float], unit: float, suffix: str) -> str:
    return (
        f"  {name:<34} {statistics.median(values) / unit:>9.1f} {suffix}"
        f"  {pctl(values, 0.99) / unit:>9.1f} {suffix}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per check (default 200)")
    parser.add_argument(
        "--loop", type=int, default=20_000, help="calls per timed run (default 20000)"
    )
    parser.add_argument("--wakes", type=int, default=200, help="wake samples (default 200)")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers here")
    args = parser.parse_args(argv)

    token = CancellationToken()
    event = threading.Event()
    local = measure_checks(
        {
            "token.is_cancelled": lambda n: _token_check(token, n),
            "threading.Event.is_set": lambda n: _event_check(event, n),
        },
        args.runs,
        args.loop,
    )

    ctx = multiprocessing.get_context("spawn")
    worker_token = CancellationToken()
    mp_event = ctx.Event()
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_worker_checks, args=(worker_token, mp_event, writer, args.runs, args.loop)
    )
    proc.start()
    writer.close()
    worker: dict[str, list[float]] = reader.recv()
    reader.close()
    proc.join()

    asyncio_wake = asyncio_wake_latency(args.wakes)
    asyncio_raw_wake = asyncio_raw_wake_latency(args.wakes)
    token_wake, event_wake = process_wake_latency(args.wakes)

    local_ratio = statistics.median(local["token.is_cancelled"]) / statistics.median(
        local["threading.Event.is_set"]
    )
    worker_ratio = statistics.median(worker["multiprocessing.Event.is_set"]) / statistics.median(
        worker["token.is_cancelled"]
    )

    print(f"cancelflow token benchmark: Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"check cost per call, net of an empty loop ({args.runs} runs x {args.loop} calls)")
    print(f"  {'':<34} {'median':>12}  {'p99':>12}")
    print(" same process")
    for name, values in local.items():
        print(row(name, values, 1, "ns"))
    print(" worker process (spawn)")
    for name, values in worker.items():
        print(row(name, values, 1, "ns"))
    print("ratios (medians)")
    print(
        f"  same process: token / Event.is_set      = {local_ratio:5.2f}x"
        f"  (target <= 2x: {'ok' if local_ratio <= 2 else 'MISSED'})"
    )
    print(
        f"  worker: mp.Event.is_set / token         = {worker_ratio:5.1f}x"
        f"  (target >= 10x: {'ok' if worker_ratio >= 10 else 'MISSED'})"
    )
    print(f"wake latency ({args.wakes} samples)            {'p50':>12}  {'p99':>12}")
    print(row("thread cancel -> asyncio waiter", asyncio_wake, 1e3, "us"))
    print(row("call_soon_threadsafe -> await (ref)", asyncio_raw_wake, 1e3, "us"))
    print(row("parent cancel -> wait_blocking", token_wake, 1e3, "us"))
    print(row("parent set -> mp.Event.wait (ref)", event_wake, 1e3, "us"))

    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "python": sys.version,
                    "cpus": os.cpu_count(),
                    "runs": args.runs,
                    "loop": args.loop,
                    "check_ns_per_call": {"same_process": local, "worker_process": worker},
                    "ratios": {
                        "same_process_token_over_event": local_ratio,
                        "worker_mp_event_over_token": worker_ratio,
                    },
                    "wake_ns": {
                        "thread_cancel_to_asyncio_waiter": asyncio_wake,
                        "thread_call_soon_threadsafe_to_await": asyncio_raw_wake,
                        "parent_cancel_to_child_wait_blocking": token_wake,
                        "parent_set_to_child_mp_event_wait": event_wake,
                    },
                },
                out,
                indent=1,
            )
        print(f"raw numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
