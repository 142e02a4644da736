"""Cancellation latency of a cooperative task in a thread: cancelflow vs asyncio's executors.

The task polls its token (``check_cancelled()``) in a tight loop. For each sample the
task signals that it runs, then it is cancelled the way each API allows, and we time:

* *caller released*: from the cancel call to the awaiting/blocked caller getting its
  exception;
* *thread stopped*: from the cancel call to the task's ``finally`` running in the worker.

``asyncio.to_thread`` / ``loop.run_in_executor`` have no way to tell the thread to stop:
cancelling the awaiting task releases the caller, and the thread runs on (reported as
"cannot"; the benchmark stops it afterwards through a private flag).

Run: ``/work/venv/bin/python benchmarks/bench_thread_pool.py [samples]``
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable

from loguru import logger

from cancelflow import CancellationToken, CancelledException
from cancelflow._context import check_cancelled
from cancelflow._thread_pool import ThreadPool

WAIT = 10.0


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def report(name: str, released: list[float], stopped: list[float] | None) -> None:
    stop = (
        f"p50 {pct(stopped, 0.5):7.3f} ms  p99 {pct(stopped, 0.99):7.3f} ms"
        if stopped
        else "cannot (the thread runs until it returns by itself)"
    )
    print(
        f"{name:<46} caller released: p50 {pct(released, 0.5):7.3f} ms  "
        f"p99 {pct(released, 0.99):7.3f} ms | thread stopped: {stop}"
    )


def cooperative(started: threading.Event, stopped_at: list[float]) -> Callable[[], None]:
    def task() -> None:
        try:
            started.set()
            while True:
                check_cancelled()
        finally:
            stopped_at.append(time.perf_counter())

    return task


def bench_future_cancel(pool: ThreadPool, n: int) -> tuple[list[float], list[float]]:
    """A thread blocked in future.result(); the main thread calls future.cancel()."""
    released: list[float] = []
    stopped: list[float] = []
    for _ in range(n):
        started, done = threading.Event(), threading.Event()
        stopped_at: list[float] = []
        raised_at: list[float] = []
        future = pool.submit(cooperative(started, stopped_at))

        def caller(
            future: object = future,
            raised_at: list[float] = raised_at,
            done: threading.Event = done,
        ) -> None:
            try:
                future.result(WAIT)  # type: ignore[attr-defined]
            except BaseException:  # noqa: BLE001 - concurrent.futures.CancelledError
                raised_at.append(time.perf_counter())
            done.set()

        waiter = threading.Thread(target=caller)
        waiter.start()
        assert started.wait(WAIT)
        t0 = time.perf_counter()
        future.cancel()
        assert done.wait(WAIT)
        waiter.join()
        pool.submit(lambda: None).result(WAIT)  # the worker is free again
        released.append(raised_at[0] - t0)
        stopped.append(stopped_at[0] - t0)
    return released, stopped


async def bench_run_sync_token(pool: ThreadPool, n: int) -> tuple[list[float], list[float]]:
    """await pool.run_sync(..., token=t); another thread calls t.cancel()."""
    released: list[float] = []
    stopped: list[float] = []
    for _ in range(n):
        token = CancellationToken()
        started = threading.Event()
        stopped_at: list[float] = []
        sent_at: list[float] = []

        def canceller(
            token: CancellationToken = token,
            started: threading.Event = started,
            sent_at: list[float] = sent_at,
        ) -> None:
            assert started.wait(WAIT)
            sent_at.append(time.perf_counter())
            token.cancel("bench")

        thread = threading.Thread(target=canceller)
        thread.start()
        try:
            await pool.run_sync(cooperative(started, stopped_at), token=token)
        except CancelledException:
            released.append(time.perf_counter())
        thread.join()
        await pool.run_sync(lambda: None)  # the worker is free again
        released[-1] -= sent_at[0]
        stopped.append(stopped_at[0] - sent_at[0])
    return released, stopped


async def bench_run_sync_task_cancel(pool: ThreadPool, n: int) -> tuple[list[float], list[float]]:
    """The asyncio task awaiting pool.run_sync is cancelled (task.cancel())."""
    released: list[float] = []
    stopped: list[float] = []
    loop = asyncio.get_running_loop()
    for _ in range(n):
        started = threading.Event()
        ready = asyncio.Event()
        stopped_at: list[float] = []

        def task(
            started: threading.Event = started,
            stopped_at: list[float] = stopped_at,
            ready: asyncio.Event = ready,
        ) -> None:
            loop.call_soon_threadsafe(ready.set)
            cooperative(started, stopped_at)()

        call = asyncio.ensure_future(pool.run_sync(task))
        await ready.wait()
        t0 = time.perf_counter()
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            released.append(time.perf_counter() - t0)
        await pool.run_sync(lambda: None)
        stopped.append(stopped_at[0] - t0)
    return released, stopped


async def bench_asyncio_to_thread(n: int, use_executor: bool) -> list[float]:
    """asyncio.to_thread / run_in_executor: the caller is released, the thread is not stopped."""
    released: list[float] = []
    loop = asyncio.get_running_loop()
    for _ in range(n):
        stop = threading.Event()  # private flag: the API itself offers nothing
        ready = asyncio.Event()
        finished = threading.Event()

        def task(
            stop: threading.Event = stop,
            finished: threading.Event = finished,
            ready: asyncio.Event = ready,
        ) -> None:
            loop.call_soon_threadsafe(ready.set)
            try:
                while not stop.is_set():
                    pass
            finally:
                finished.set()

        if use_executor:
            call = asyncio.ensure_future(loop.run_in_executor(None, task))
        else:
            call = asyncio.ensure_future(asyncio.to_thread(task))
        await ready.wait()
        t0 = time.perf_counter()
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            released.append(time.perf_counter() - t0)
        still_running = not finished.is_set()
        stop.set()
        assert finished.wait(WAIT)
        assert still_running, "cancelling the asyncio task should not stop the thread"
    return released


def bench_interrupt(pool: ThreadPool, n: int) -> tuple[list[float], list[float]]:
    """A pure-Python loop that never checks its token; interrupt_on_cancel, grace 0."""
    released: list[float] = []
    stopped: list[float] = []
    for _ in range(n):
        started = threading.Event()
        stopped_at: list[float] = []

        def spin(started: threading.Event = started, stopped_at: list[float] = stopped_at) -> None:
            try:
                started.set()
                x = 0
                while True:
                    x += 1
            finally:
                stopped_at.append(time.perf_counter())

        future = pool.submit_task(spin, grace_period=0, interrupt_on_cancel=True)
        assert started.wait(WAIT)
        t0 = time.perf_counter()
        future.cancel()
        released.append(time.perf_counter() - t0)  # cancel() resolves the future itself
        pool.submit(lambda: None).result(WAIT)
        stopped.append(stopped_at[0] - t0)
    return released, stopped


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    logger.disable("cancelflow")
    print(
        f"{n} samples each, Python {sys.version.split()[0]}, {threading.active_count()} thread(s)"
    )
    with ThreadPool(1, grace_period=1.0) as pool:
        report("cancelflow future.cancel() (sync caller)", *bench_future_cancel(pool, n))
        report(
            "cancelflow run_sync, token cancelled elsewhere",
            *asyncio.run(bench_run_sync_token(pool, n)),
        )
        report(
            "cancelflow run_sync, awaiting task cancelled",
            *asyncio.run(bench_run_sync_task_cancel(pool, n)),
        )
        report(
            "cancelflow interrupt_on_cancel (no token check)",
            *bench_interrupt(pool, min(n, 100)),
        )
    report(
        "asyncio.to_thread, awaiting task cancelled",
        asyncio.run(bench_asyncio_to_thread(n, False)),
        None,
    )
    report(
        "loop.run_in_executor, awaiting task cancelled",
        asyncio.run(bench_asyncio_to_thread(n, True)),
        None,
    )


if __name__ == "__main__":
    main()
