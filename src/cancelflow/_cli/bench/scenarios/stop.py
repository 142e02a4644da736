"""Scenarios 1 and 2: stop a non-cooperative task (a loop, a C call, one with a grandchild)."""

from __future__ import annotations

import time

from .. import tasks
from ..harness import BEACON_TIMEOUT, CALLER_BOUND, GONE_BOUND, NEXT_TIMEOUT, VERIFY, Bench
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


def _finish_grand_row(bench: Bench, row: Row, variant: str) -> None:
    if variant != "grandchild" or row.status != "ok":
        return
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
    """Scenarios 1 and 2 on an open pool: stop a running non-cooperative task."""
    caller_verified = False
    for _ in range(bench.samples):
        procs.ensure()
        seq = bench.seq()
        handle = procs.submit(*tasks.process_task("spin", procs.beacon_arg(), seq, kind=variant))
        sig = bench.beacon.wait(seq, BEACON_TIMEOUT)[0]
        worker = bench.watch.watch(sig.pid)
        grand = bench.watch.watch(sig.gpid) if sig.gpid else None
        time.sleep(bench.pause())
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
            return
        bound = CALLER_BOUND
        if procs.caller_hangs:  # verified once with a bound, then only checked
            bound, caller_verified = (0.0 if caller_verified else VERIFY), True
            worker.wait(GONE_BOUND)
        released = procs.wait(handle, bound)
        t1 = time.perf_counter()
        _record_stop(bench, row, procs.system, t0, t1, released, procs.caller_hangs, worker, grand)
        if variant != "grandchild":
            try:
                procs.next_task(NEXT_TIMEOUT)
                row.add("next_task", (time.perf_counter() - t0) * 1e3)
            except Cannot as exc:
                row.cannot["next_task"] = str(exc)
        bench.finish_sample(procs.system, worker, grand)
    _finish_grand_row(bench, row, variant)


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
    _finish_grand_row(bench, row, variant)
