"""Scenario 7: the overhead, as throughput of trivial tasks and the cost of one check."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import multiprocessing
import multiprocessing.pool
import threading
import time
import timeit
from collections.abc import Callable
from typing import Any

from ..harness import Bench, anyio_run
from ..results import Row
from ..systems import ASYNC_PROCS, SyncProcs, SyncThreads


def throughput_sync(
    bench: Bench,
    pool: SyncProcs | SyncThreads,
    row: Row,
    workers: int = 2,
    fn: Callable[[int], int] = abs,
) -> None:
    pool.open(workers)
    try:
        pool.throughput(50, fn)  # warm every worker
        for _ in range(bench.samples):
            t0 = time.perf_counter()
            pool.throughput(bench.settings.tasks, fn)
            row.add("throughput", bench.settings.tasks / (time.perf_counter() - t0))
    finally:
        pool.close()


def throughput_async(bench: Bench, system: str, variant: str, row: Row, workers: int = 2) -> None:
    import anyio

    async def cell() -> None:
        n = bench.settings.tasks
        if variant == "processes":
            procs = ASYNC_PROCS[system](bench)
            await procs.open(workers)
            try:
                await procs.throughput(50)
                for _ in range(bench.samples):
                    t0 = time.perf_counter()
                    await procs.throughput(n)
                    row.add("throughput", n / (time.perf_counter() - t0))
            finally:
                await procs.close()
            return
        if system == "asyncio":
            tpe = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
            loop = asyncio.get_running_loop()
            try:
                for rep in range(bench.samples + 1):
                    t0 = time.perf_counter()
                    await asyncio.gather(*(loop.run_in_executor(tpe, abs, i) for i in range(n)))
                    if rep:
                        row.add("throughput", n / (time.perf_counter() - t0))
            finally:
                tpe.shutdown(wait=True)
            return
        limiter = anyio.CapacityLimiter(workers)
        for rep in range(bench.samples + 1):
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(
                        functools.partial(anyio.to_thread.run_sync, abs, i, limiter=limiter)
                    )
            if rep:
                row.add("throughput", n / (time.perf_counter() - t0))

    anyio_run(cell, "trio" if system == "trio-parallel" else "asyncio")


def _net_ns(stmt: str, namespace: dict[str, Any], calls: int) -> float:
    timed = timeit.Timer(stmt, globals=namespace).timeit(calls)
    empty = timeit.Timer("pass").timeit(calls)
    return max(0.0, (timed - empty) / calls * 1e9)


def check_cost_cell(bench: Bench, system: str, row: Row, which: str = "") -> None:
    calls = bench.settings.check_calls
    if system == "cancelflow":
        from cancelflow._context import check_cancelled, task_scope
        from cancelflow._token import CancellationToken

        token = CancellationToken(name="bench-check")
        with task_scope(token):
            for _ in range(bench.samples):
                if which == "check_cancelled":
                    row.add("check_cost", _net_ns("check()", {"check": check_cancelled}, calls))
                else:
                    row.add("check_cost", _net_ns("token.is_cancelled", {"token": token}, calls))
        token.close()
        return
    if system == "concurrent.futures":
        event = threading.Event()
        for _ in range(bench.samples):
            row.add("check_cost", _net_ns("is_set()", {"is_set": event.is_set}, calls))
        return
    if system == "multiprocessing.Pool":
        mp_event = multiprocessing.get_context("fork").Event()
        for _ in range(bench.samples):
            row.add("check_cost", _net_ns("is_set()", {"is_set": mp_event.is_set}, calls))
        del mp_event
        return
    # anyio: from_thread.check_cancelled() inside a to_thread worker.

    def in_worker() -> list[float]:
        from anyio.from_thread import check_cancelled

        return [_net_ns("check()", {"check": check_cancelled}, calls) for _ in range(bench.samples)]

    async def cell() -> None:
        import anyio

        for value in await anyio.to_thread.run_sync(in_worker):
            row.add("check_cost", value)

    anyio_run(cell, "asyncio")
