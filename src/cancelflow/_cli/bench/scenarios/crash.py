"""Scenario 6: the task kills its own worker (``os._exit``, a segfault)."""

from __future__ import annotations

import functools
import time

from .. import tasks
from ..harness import (
    BEACON_TIMEOUT,
    CALLER_BOUND,
    GONE_BOUND,
    NEXT_TIMEOUT,
    VERIFY,
    Bench,
    BlockedCaller,
)
from ..results import Cannot, Row
from ..systems import AsyncioProcs, AsyncProcs, SyncProcs


def crash_sync(bench: Bench, procs: SyncProcs, how: str, row: Row) -> None:
    """Scenario 6 on an open pool: the task kills its own worker."""
    caller_verified = False
    for _ in range(bench.samples):
        procs.ensure()
        seq = bench.seq()
        handle = procs.submit(
            *tasks.process_task("crash", procs.beacon_arg(), seq, how=how, pause=bench.pause())
        )
        # The caller: a thread blocked in the system's own wait before the task crashes
        # (it pauses first); not for a system whose caller is known never to return.
        caller = (
            None
            if procs.crash_caller_hangs
            else BlockedCaller(functools.partial(procs.wait, handle), CALLER_BOUND)
        )
        sig = bench.beacon.wait(seq, BEACON_TIMEOUT)[0]
        worker = bench.watch.watch(sig.pid)
        if procs.crash_caller_hangs:
            if not worker.wait(GONE_BOUND):
                row.error("the worker did not die")
                continue
            try:
                procs.next_task(NEXT_TIMEOUT)
                row.add("pool_runs_again", (time.perf_counter() - sig.t) * 1e3)
            except Cannot as exc:
                row.cannot["pool_runs_again"] = str(exc)
            if procs.wait(handle, 0.0 if caller_verified else VERIFY):
                row.error("the caller was released after all")
            else:
                row.cannot["caller_error"] = procs.crash_caller_hangs
            caller_verified = True
            continue
        assert caller is not None
        released = caller.join(CALLER_BOUND + 1.0)
        t1 = caller.released_at if caller.released_at is not None else time.perf_counter()
        if not released:
            row.error("caller not released")
            bench.finish_sample(procs.system, worker)
            continue
        row.extra.setdefault("error", repr(procs.error(handle))[:160])
        row.add("caller_error", (t1 - sig.t) * 1e3)
        try:
            procs.next_task(NEXT_TIMEOUT)
            row.add("pool_runs_again", (time.perf_counter() - sig.t) * 1e3)
        except Cannot as exc:
            row.cannot["pool_runs_again"] = str(exc)
        bench.finish_sample(procs.system, worker)


async def crash_async(bench: Bench, procs: AsyncProcs, how: str, row: Row) -> None:
    """Scenario 6 from an event loop."""
    for _ in range(bench.samples):
        await procs.ensure()
        seq = bench.seq()
        try:
            fn, args = tasks.process_task(
                "crash", bench.beacon.path, seq, how=how, pause=bench.pause()
            )
            await procs.call(fn, *args)
            row.error("the crashing task returned")
        except Exception as exc:  # noqa: BLE001 - the outcome being measured
            row.extra.setdefault("error", repr(exc)[:160])
        t1 = time.perf_counter()
        sig = (await bench.beacon.wait_async(seq, BEACON_TIMEOUT))[0]
        row.add("caller_error", (t1 - sig.t) * 1e3)
        if isinstance(procs, AsyncioProcs):
            procs.broken = True
            row.cannot["pool_runs_again"] = (
                "the executor is broken (BrokenProcessPool): a new executor is needed"
            )
            continue
        await procs.next_task()
        row.add("pool_runs_again", (time.perf_counter() - sig.t) * 1e3)
