"""Scenarios 1, 2, 3 (process) and 6 on one 1-worker pool per system and round.

In each round, system after system (in an order rotated per round), a system opens its
pool, runs its share of the round's samples of every cell of the group on it, and closes
it (see ``run_pool_group``).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable

from ..harness import Bench, anyio_run, progress
from ..results import Row, brief
from ..systems import ASYNC_PROCS, SYNC_PROCS, AsyncProcs, SyncProcs
from .coop import coop_process_async, coop_process_sync
from .crash import crash_async, crash_sync
from .stop import RUN_SYNC_ROWS, kill_async, kill_run_sync, kill_sync

GROUP = (
    ("1", "loop"),
    ("1", "c_call"),
    ("2", "grandchild"),
    ("3", "process"),
    ("6", "exit"),
    ("6", "segfault"),
)
_SYNC_FILL: dict[str, Callable[[Bench, SyncProcs, str, Row], None]] = {
    "1": kill_sync,
    "2": kill_sync,
    "3": coop_process_sync,
    "6": crash_sync,
}
_ASYNC_FILL: dict[str, Callable[[Bench, AsyncProcs, str, Row], Awaitable[None]]] = {
    "1": kill_async,
    "2": kill_async,
    "3": coop_process_async,
    "6": crash_async,
}


def group_rows(
    system: str, cells: list[tuple[str, str]], run_sync_rows: bool = True
) -> list[tuple[Row, int]]:
    """The rows of the pool group for ``system``, each with the index of its adapter
    (negative: cancelflow's ``run_sync`` rows, planned only if ``run_sync_rows``: they
    need anyio)."""
    out: list[tuple[Row, int]] = []
    classes: list[type[SyncProcs | AsyncProcs]] = (
        list(SYNC_PROCS[system]) if system in SYNC_PROCS else [ASYNC_PROCS[system]]
    )
    for key, variant in cells:
        for index, cls in enumerate(classes):
            if index and key in ("3", "6"):
                continue  # the second way of using an executor only differs in how it stops
            label = (
                cls.coop_label
                if key == "3"
                else cls.label.split(",")[0]
                if key == "6"
                else cls.label
            )
            row = Row(key, variant, system, label, primary=index == 0, tag=cls.tag)
            out.append((row, index))
        if run_sync_rows and system == "cancelflow" and (key, variant) == ("1", "loop"):
            for index, (tag, how) in enumerate(RUN_SYNC_ROWS, start=1):
                label = "ProcessPool.run_sync on asyncio, " + (
                    "anyio CancelScope.cancel()" if how == "anyio" else "Task.cancel()"
                )
                out.append((Row(key, variant, system, label, primary=False, tag=tag), -index))
    return out


def _report(row: Row, round_: int, started: float) -> None:
    progress(
        f"  [{row.scenario + '/' + row.variant + f' r{round_ + 1}':<21}] {row.system:<20} "
        f"{time.perf_counter() - started:6.1f}s  {brief(row)}"
    )


def run_pool_group(
    bench: Bench,
    system: str,
    planned: list[tuple[Row, int]],
    round_: int,
    position: int,
    share: int,
) -> None:
    """Run ``share`` samples of every cell of the group for one system (its block of round
    ``round_``, at ``position`` in that round's order) on one 1-worker pool, opened for the
    block and closed after it.

    Each round re-opens the pool (rather than keeping every system's pool open across the
    rounds): a system's idle pool (pebble's manager threads poll every 0.1 s) then never
    runs while another system is measured on this 2-core machine, and the leak census
    still sees each system's block alone, before and after, as it did with one block.
    """
    with bench.leaks.track(system, f"scenarios 1, 2, 3/process, 6 (round {round_ + 1})"):
        if system in SYNC_PROCS:
            _run_sync_block(bench, system, planned, round_, position, share)
        else:
            _run_async_block(bench, system, planned, round_, position, share)


def _run_sync_block(
    bench: Bench,
    system: str,
    planned: list[tuple[Row, int]],
    round_: int,
    position: int,
    share: int,
) -> None:
    adapters = [cls(bench) for cls in SYNC_PROCS[system]]
    opened: set[int] = set()
    try:
        for row, index in planned:
            if row.status != "ok":
                continue  # a "cannot" found in an earlier round stays so
            how = RUN_SYNC_ROWS[-index - 1][1] if index < 0 else ""
            index = max(index, 0)  # run_sync rows use the ProcessPool of the first adapter
            procs = adapters[index]
            if index not in opened:
                procs.open(1)
                opened.add(index)
            started = time.perf_counter()
            ok = True
            try:
                with bench.measured(row, round_, position, share):
                    if how:
                        pool = getattr(procs, "pool", None)
                        anyio_run(
                            functools.partial(kill_run_sync, bench, pool, row, how), "asyncio"
                        )
                    else:
                        _SYNC_FILL[row.scenario](bench, procs, row.variant, row)
            except Exception as exc:  # noqa: BLE001 - a failing cell is reported, the run goes on
                row.error(f"{type(exc).__name__}: {exc}")
                ok = False
            _report(row, round_, started)
            if not ok:
                opened.discard(index)  # it may be wedged: the next cell gets a fresh pool
                try:
                    procs.close()
                except Exception as exc:  # noqa: BLE001 - reported on the row
                    row.error(f"closing the pool: {exc}")
    finally:
        for index in opened:
            with contextlib.suppress(Exception):
                adapters[index].close()


def _run_async_block(
    bench: Bench,
    system: str,
    planned: list[tuple[Row, int]],
    round_: int,
    position: int,
    share: int,
) -> None:
    aprocs = ASYNC_PROCS[system](bench)

    async def main() -> None:
        await aprocs.open(1)
        try:
            for row, _ in planned:
                if row.status != "ok":
                    continue
                started = time.perf_counter()
                try:
                    with bench.measured(row, round_, position, share):
                        await _ASYNC_FILL[row.scenario](bench, aprocs, row.variant, row)
                except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                    row.error(f"{type(exc).__name__}: {exc}")
                    await aprocs.close()  # it may be wedged: continue on a fresh pool
                    await aprocs.open(1)
                _report(row, round_, started)
        finally:
            await aprocs.close()

    anyio_run(main, aprocs.backend)
