"""Scenarios 1 and 2: stop a non-cooperative task (a loop, a C call, one with a grandchild)."""

from __future__ import annotations

import functools
import time
from typing import Any

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
from ..systems import AsyncProcs, SyncProcs
from ..watch import Watched


def _record_stop(
    bench: Bench,
    row: Row,
    system: str,
    t0: float,
    t1: float,
    released: bool,
    caller_hangs: str | None,
    worker: Watched,
    grand: Watched | None,
    kills_worker: bool = True,
) -> None:
    if released:
        row.add("caller_unblocked", (t1 - t0) * 1e3)
    elif caller_hangs:
        row.cannot["caller_unblocked"] = caller_hangs
    else:
        row.error(f"caller not released within {CALLER_BOUND:g}s")
    if not kills_worker:
        if worker.wait(VERIFY):
            row.error("the worker died although the system does not stop it")
        else:
            row.cannot["worker_gone"] = (
                "the worker runs on: cancelling the awaiting task does not stop it "
                f"(verified: still running {VERIFY * 1e3:.0f} ms later)"
            )
            bench.finish_sample(system, worker)
    elif worker.wait(GONE_BOUND - (time.perf_counter() - t0)):
        assert worker.gone_at is not None
        row.add("worker_gone", (worker.gone_at - t0) * 1e3)
    else:
        row.error(f"worker still alive {GONE_BOUND:g}s after the cancel")
    if grand is not None:
        base = max(t1, worker.gone_at or t1)
        if grand.wait(base + bench.grand_bound - time.perf_counter()):
            assert grand.gone_at is not None
            row.add("grandchild_gone", (grand.gone_at - t0) * 1e3)
        else:
            row.extra["grandchild_left_alive"] = row.extra.get("grandchild_left_alive", 0) + 1


def finish_grand_row(bench: Bench, row: Row, variant: str) -> None:
    """After every round: say in how many samples the grandchild was left alive."""
    if variant != "grandchild" or row.status != "ok":
        return
    if isinstance(row.extra.get("grandchild_left_alive"), str):
        return  # already said
    left = row.extra.get("grandchild_left_alive", 0)
    total = left + len(row.samples.get("grandchild_gone", []))
    row.extra["grandchild_left_alive"] = f"{left}/{total}"
    if left and not row.samples.get("grandchild_gone"):
        row.cannot["grandchild_gone"] = (
            f"never: left alive in {left}/{total} samples "
            f"(still running {bench.grand_bound * 1e3:.0f} ms after the worker died; killed by the benchmark)"
        )
    elif left:
        row.notes.append(f"grandchild left alive in {left}/{total} samples")


def kill_sync(bench: Bench, procs: SyncProcs, variant: str, row: Row) -> None:
    """Scenarios 1 and 2 on an open pool: stop a running non-cooperative task.

    The caller is a thread blocked in the system's own wait (``procs.wait``: the future's
    ``result()``, ``AsyncResult.get()``, ``Process.join()``), started before the cancel;
    "caller unblocked" is when that wait returned. This thread only stamps the cancel.
    """
    caller_verified = False
    for _ in range(bench.samples):
        procs.ensure()
        seq = bench.seq()
        handle = procs.submit(*tasks.process_task("spin", procs.beacon_arg(), seq, kind=variant))
        sig = bench.beacon.wait(seq, BEACON_TIMEOUT)[0]
        worker = bench.watch.watch(sig.pid)
        grand = bench.watch.watch(sig.gpid) if sig.gpid else None
        pause = bench.pause()
        if procs.caller_hangs:  # verified once with a bound, then only checked
            bound = 0.0 if caller_verified else VERIFY
        else:
            bound = CALLER_BOUND
        caller = BlockedCaller(functools.partial(procs.wait, handle), pause + bound)
        time.sleep(pause)
        t0 = time.perf_counter()
        try:
            procs.stop(handle, sig)
        except Cannot as exc:
            alive = not worker.wait(VERIFY)
            row.cannot_all(
                f"{exc}"
                + (f" (verified: still running {VERIFY * 1e3:.0f} ms later)" if alive else "")
            )
            bench.finish_sample(procs.system, worker, grand)
            caller.join(GONE_BOUND)  # the kill ends the call: the caller thread returns
            return
        if procs.caller_hangs:
            caller_verified = True
            worker.wait(GONE_BOUND)
        released = caller.join(bound + 1.0)
        t1 = caller.released_at if released and caller.released_at is not None else t0
        _record_stop(bench, row, procs.system, t0, t1, released, procs.caller_hangs, worker, grand)
        if variant != "grandchild":
            try:
                procs.next_task(NEXT_TIMEOUT)
                row.add("next_task", (time.perf_counter() - t0) * 1e3)
            except Cannot as exc:
                row.cannot["next_task"] = str(exc)
        bench.finish_sample(procs.system, worker, grand)
        caller.join(GONE_BOUND)


async def kill_async(bench: Bench, procs: AsyncProcs, variant: str, row: Row) -> None:
    """Scenarios 1 and 2 on an open pool, from an event loop: cancel the awaiting scope."""
    import anyio

    for _ in range(bench.samples):
        await procs.ensure()
        seq = bench.seq()
        scope = anyio.CancelScope()
        done = anyio.Event()
        ended: list[float] = []

        async def runner(
            scope: anyio.CancelScope = scope,
            done: anyio.Event = done,
            ended: list[float] = ended,
            seq: int = seq,
        ) -> None:
            try:
                with scope:
                    fn, args = tasks.process_task("spin", bench.beacon.path, seq, kind=variant)
                    await procs.call(fn, *args)
            except Exception as exc:  # noqa: BLE001 - recorded as an error of the row
                row.error(f"call raised {exc!r}")
            finally:
                ended.append(time.perf_counter())
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            sig = (await bench.beacon.wait_async(seq, BEACON_TIMEOUT))[0]
            worker = bench.watch.watch(sig.pid)
            grand = bench.watch.watch(sig.gpid) if sig.gpid else None
            await anyio.sleep(bench.pause())
            t0 = time.perf_counter()
            scope.cancel()
            with anyio.move_on_after(CALLER_BOUND):
                await done.wait()
            released = done.is_set()
            t1 = ended[0] if released else time.perf_counter()
            if not released:
                tg.cancel_scope.cancel()
        _record_stop(
            bench, row, procs.system, t0, t1, released, None, worker, grand, procs.kills_worker
        )
        if not procs.kills_worker:
            procs.broken = True  # type: ignore[attr-defined]
        if variant != "grandchild":
            try:
                await procs.next_task()
                row.add("next_task", (time.perf_counter() - t0) * 1e3)
            except Cannot as exc:
                row.cannot["next_task"] = str(exc)
        bench.finish_sample(procs.system, worker, grand)


#: cancelflow's ``ProcessPool.run_sync`` awaited on asyncio (scenario 1, loop), cancelled
#: two ways: (row tag, how).
RUN_SYNC_ROWS = (
    ("run_sync, anyio cancel scope", "anyio"),
    ("run_sync, asyncio Task.cancel()", "asyncio"),
)


async def kill_run_sync(bench: Bench, pool: Any, row: Row, how: str) -> None:
    """``await pool.run_sync(...)`` of a non-cooperative loop, cancelled by an anyio cancel
    scope (``how="anyio"``) or by ``Task.cancel()`` of the awaiting task (``"asyncio"``);
    the awaiting task stamps when its own await returns."""
    import asyncio

    import anyio

    row.cannot["next_task"] = "measured on the ProcessPool.submit row (the same pool)"
    for _ in range(bench.samples):
        seq = bench.seq()
        fn, args = tasks.process_task("spin", None, seq, kind="loop")
        scope = anyio.CancelScope()
        ended: list[float] = []

        async def call(
            fn: Any = fn, args: Any = args, scope: anyio.CancelScope = scope, ended: Any = ended
        ) -> None:
            try:
                if how == "anyio":
                    with scope:
                        await pool.run_sync(fn, *args, partial_sink=bench.beacon.sink)
                else:
                    await pool.run_sync(fn, *args, partial_sink=bench.beacon.sink)
            except Exception as exc:  # noqa: BLE001 - recorded as an error of the row
                row.error(f"call raised {exc!r}")
            finally:
                ended.append(time.perf_counter())

        task = asyncio.ensure_future(call())
        sig = (await bench.beacon.wait_async(seq, BEACON_TIMEOUT))[0]
        worker = bench.watch.watch(sig.pid)
        await anyio.sleep(bench.pause())
        t0 = time.perf_counter()
        if how == "anyio":
            scope.cancel()
        else:
            task.cancel()
        await asyncio.wait({task}, timeout=CALLER_BOUND)
        released = bool(ended)
        t1 = ended[0] if released else time.perf_counter()
        if not released:
            task.cancel()
            await asyncio.wait({task}, timeout=GONE_BOUND)
        _record_stop(bench, row, "cancelflow", t0, t1, released, None, worker, None)
        bench.finish_sample("cancelflow", worker)
