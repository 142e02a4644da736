"""Scenario 3: a cooperative task checking its token (or stop flag), in a process and in a thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time

from .. import tasks
from ..harness import BEACON_TIMEOUT, CALLER_BOUND, Bench, BlockedCaller, anyio_run
from ..results import Row
from ..systems import AsyncProcs, SyncProcs, SyncThreads


# -- in a process ------------------------------------------------------------------------------
def coop_process_sync(bench: Bench, procs: SyncProcs, variant: str, row: Row) -> None:
    """Scenario 3 in a process, on an open pool: cancelflow's token, the peers' flag.

    As in ``stop.kill_sync``, the caller is a thread blocked in the system's own wait,
    started before the cancel; this thread only stamps the cancel."""
    from cancelflow._token import CancellationToken

    for _ in range(bench.samples):
        procs.ensure()
        seq = bench.seq()
        token: CancellationToken | None = None
        if procs.via_sink:
            token = CancellationToken(name=f"bench-{seq}")
            handle = procs.submit(*tasks.process_task("coop_token", None, seq), token=token)
        else:
            bench.flag.clear()
            handle = procs.submit(
                *tasks.process_task(
                    "coop_flag",
                    procs.beacon_arg(),
                    seq,
                    flag_path=bench.flag.path,
                    quiet=procs.quiet,
                )
            )
        bench.beacon.wait(seq, BEACON_TIMEOUT)
        pause = bench.pause()
        caller = BlockedCaller(functools.partial(procs.wait, handle), pause + CALLER_BOUND)
        time.sleep(pause)
        t0 = time.perf_counter()
        if token is not None:
            token.cancel("bench")
        else:
            bench.flag.set()
        released = caller.join(CALLER_BOUND + 1.0)
        if not released or caller.released_at is None:
            row.error("caller not released")
            continue
        t1 = caller.released_at
        error = procs.error(handle)
        if error is None:
            row.error("the task returned instead of raising")
        row.extra.setdefault("raised", type(error).__name__)
        row.add("caller_raises", (t1 - t0) * 1e3)


async def coop_process_async(bench: Bench, procs: AsyncProcs, variant: str, row: Row) -> None:
    """Scenario 3 in a process, from an event loop: the task polls the flag."""
    import anyio

    for _ in range(bench.samples):
        await procs.ensure()
        seq = bench.seq()
        bench.flag.clear()
        result: list[BaseException] = []
        ended: list[float] = []

        async def runner(
            seq: int = seq, result: list[BaseException] = result, ended: list[float] = ended
        ) -> None:
            try:
                fn, args = tasks.process_task(
                    "coop_flag", bench.beacon.path, seq, flag_path=bench.flag.path
                )
                await procs.call(fn, *args)
            except Exception as exc:  # noqa: BLE001 - the outcome being measured
                result.append(exc)
            finally:
                ended.append(time.perf_counter())

        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            await bench.beacon.wait_async(seq, BEACON_TIMEOUT)
            await anyio.sleep(bench.pause())
            t0 = time.perf_counter()
            bench.flag.set()
        if not result:
            row.error("the task returned instead of raising")
        else:
            row.extra.setdefault("raised", type(result[0]).__name__)
        row.add("caller_raises", (ended[0] - t0) * 1e3)


# -- in a thread -------------------------------------------------------------------------------
def coop_thread_sync(bench: Bench, threads: SyncThreads, row: Row) -> None:
    from cancelflow._token import CancellationToken

    threads.open(1)
    try:
        for _ in range(bench.samples):
            seq = bench.seq()
            record: dict[str, float] = {}
            event = threading.Event()
            token: CancellationToken | None = None
            if threads.uses_token:
                token = CancellationToken(name=f"bench-{seq}")
                handle = threads.submit(tasks.coop_token, (None, seq, record), token=token)
            else:
                handle = threads.submit(tasks.coop_event, (bench.beacon.path, seq, event, record))
            bench.beacon.wait(seq, BEACON_TIMEOUT)
            pause = bench.pause()
            caller = BlockedCaller(functools.partial(threads.wait, handle), pause + CALLER_BOUND)
            time.sleep(pause)
            t0 = time.perf_counter()
            if token is not None:
                token.cancel("bench")
            else:
                event.set()
            released = caller.join(CALLER_BOUND + 1.0)
            if not released or caller.released_at is None:
                row.error("caller not released")
                event.set()
                continue
            t1 = caller.released_at
            error = threads.error(handle)
            if error is None:
                row.error("the task returned instead of raising")
            row.extra.setdefault("raised", type(error).__name__)
            row.add("caller_raises", (t1 - t0) * 1e3)
            deadline = time.monotonic() + CALLER_BOUND
            while "stopped" not in record and time.monotonic() < deadline:
                time.sleep(0.001)  # the thread may still be unwinding (cancelflow releases at once)
            if "stopped" in record:
                row.add("task_stopped", (record["stopped"] - t0) * 1e3)
            else:
                row.error("the task did not stop")
    finally:
        threads.close()


def coop_thread_async(bench: Bench, system: str, row: Row) -> None:
    import anyio

    async def cell() -> None:
        tpe = concurrent.futures.ThreadPoolExecutor(max_workers=1) if system == "asyncio" else None
        limiter = anyio.CapacityLimiter(1)
        try:
            for _ in range(bench.samples):
                seq = bench.seq()
                record: dict[str, float] = {}
                event = threading.Event()
                scope = anyio.CancelScope()
                raised: list[BaseException] = []
                ended: list[float] = []

                async def runner(
                    seq: int = seq,
                    record: dict[str, float] = record,
                    event: threading.Event = event,
                    scope: anyio.CancelScope = scope,
                    raised: list[BaseException] = raised,
                    ended: list[float] = ended,
                ) -> None:
                    try:
                        with scope:
                            if tpe is not None:
                                await asyncio.get_running_loop().run_in_executor(
                                    tpe, tasks.coop_event, bench.beacon.path, seq, event, record
                                )
                            else:
                                await anyio.to_thread.run_sync(
                                    tasks.coop_anyio_thread,
                                    bench.beacon.path,
                                    seq,
                                    record,
                                    limiter=limiter,
                                )
                    except Exception as exc:  # noqa: BLE001 - the outcome being measured
                        raised.append(exc)
                    finally:
                        ended.append(time.perf_counter())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(runner)
                    await bench.beacon.wait_async(seq, BEACON_TIMEOUT)
                    await anyio.sleep(bench.pause())
                    t0 = time.perf_counter()
                    if tpe is not None:
                        event.set()
                    else:
                        scope.cancel()
                row.extra.setdefault("raised", type(raised[0]).__name__ if raised else "Cancelled")
                row.add("caller_raises", (ended[0] - t0) * 1e3)
                deadline = time.monotonic() + CALLER_BOUND
                while "stopped" not in record and time.monotonic() < deadline:  # noqa: ASYNC110 - set by a worker thread
                    await anyio.sleep(0.001)
                if "stopped" in record:
                    row.add("task_stopped", (record["stopped"] - t0) * 1e3)
                else:
                    row.error("the task did not stop")
        finally:
            if tpe is not None:
                tpe.shutdown(wait=True)

    anyio_run(cell, "asyncio")
