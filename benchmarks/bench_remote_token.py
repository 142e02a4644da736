"""A token in a process cancelflow did not start: RemoteToken against a manager's Event.

In a worker of a stdlib ``ProcessPoolExecutor`` (already running when the handle is sent):

1. the cost of one check: ``handle.is_cancelled`` (a local read, updated by a reader
   thread) against ``multiprocessing.Manager().Event().is_set()`` (a round trip to the
   manager process), and the owner's own ``CancellationToken.is_cancelled``;
2. the latency from ``token.cancel()`` in the owner to the worker's polling loop seeing it,
   for both, over several samples (``time.monotonic`` is system-wide on Linux).

Run: ``python -m benchmarks.bench_remote_token [samples]``
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import statistics
import sys
import threading
import time
import timeit
from typing import Any

from cancelflow import CancellationToken


def time_statement(statement: str, rounds: int, **names: Any) -> float:
    """Seconds per execution of ``statement`` (best of 5 timeit runs: no call overhead)."""
    return min(timeit.repeat(statement, globals=names, number=rounds, repeat=5)) / rounds


def check_costs(handle: Any, event: Any) -> tuple[float, float]:
    """In the worker: seconds per check of the handle, and of the manager's Event."""
    remote = time_statement("handle.is_cancelled", 1_000_000, handle=handle)
    manager = time_statement("event.is_set()", 2_000, event=event)
    return remote, manager


def poll_until(check: Any, started: Any) -> float:
    """In the worker: say it polls, then poll ``check`` in a tight loop; when it is seen."""
    started.set()
    while not check():
        pass
    return time.monotonic()


def poll_handle(handle: Any, started: Any) -> float:
    return poll_until(lambda: handle.is_cancelled, started)


def poll_event(event: Any, started: Any) -> float:
    return poll_until(event.is_set, started)


def run(samples: int) -> None:
    context = multiprocessing.get_context("fork")
    with (
        context.Manager() as manager,
        concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool,
    ):
        pool.submit(int).result()  # the worker runs before any handle exists
        token = CancellationToken()
        handle = token.remote()
        event = manager.Event()
        remote, managed = pool.submit(check_costs, handle, event).result()
        local = time_statement("token.is_cancelled", 1_000_000, token=token)
        plain = time_statement("flag.is_set()", 1_000_000, flag=threading.Event())
        handle.close()
        print("1. one check, in a ProcessPoolExecutor worker (best of 5 timeit runs)")
        print(f"  RemoteToken.is_cancelled          {remote * 1e9:9.1f} ns")
        print(
            f"  Manager().Event().is_set()        {managed * 1e9:9.0f} ns  "
            f"({managed / remote:,.0f}x RemoteToken)"
        )
        print(f"  CancellationToken.is_cancelled    {local * 1e9:9.1f} ns  (in the owner)")
        print(f"  threading.Event.is_set()          {plain * 1e9:9.1f} ns  (in the owner)")
        latencies: dict[str, list[float]] = {"RemoteToken": [], "Manager Event": []}
        for _ in range(samples):
            for name in latencies:
                token = CancellationToken()
                handle = token.remote()
                event = manager.Event()
                started = manager.Event()
                if name == "RemoteToken":
                    future = pool.submit(poll_handle, handle, started)
                else:
                    future = pool.submit(poll_event, event, started)
                started.wait()
                time.sleep(0.01)  # let the worker settle into its polling loop
                cancelled_at = time.monotonic()
                token.cancel("bench")
                event.set()
                latencies[name].append(future.result() - cancelled_at)
                handle.close()
        print(f"2. owner cancels -> the worker's polling loop sees it ({samples} samples)")
        for name, values in latencies.items():
            values.sort()
            p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
            print(
                f"  {name:14s} p50 {statistics.median(values) * 1e3:7.3f} ms   "
                f"p99 {p99 * 1e3:7.3f} ms"
            )


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
