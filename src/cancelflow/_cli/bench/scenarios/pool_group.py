"""Scenarios 1, 2, 3 (process) and 6, system by system, on one long-lived 1-worker pool each."""

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
from .stop import kill_async, kill_sync

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


def _group_rows(bench: Bench, system: str, cells: list[tuple[str, str]]) -> list[tuple[Row, int]]:
    """The rows of the pool group for ``system``, each with the index of its adapter."""
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
    return out


def run_pool_group(bench: Bench, system: str, cells: list[tuple[str, str]]) -> list[Row]:
    """Run every cell of the group for one system on one long-lived 1-worker pool."""
    planned = _group_rows(bench, system, cells)

    def run_one(row: Row, fill: Callable[[], None]) -> bool:
        started = time.perf_counter()
        ok = True
        try:
            fill()
        except Exception as exc:  # noqa: BLE001 - a failing cell is reported, the run goes on
            row.error(f"{type(exc).__name__}: {exc}")
            ok = False
        progress(
            f"  [{row.scenario + '/' + row.variant:<18}] {system:<20} {time.perf_counter() - started:6.1f}s  {brief(row)}"
        )
        return ok

    with bench.leaks.track(system, "scenarios 1, 2, 3/process, 6"):
        if system in SYNC_PROCS:
            adapters = [cls(bench) for cls in SYNC_PROCS[system]]
            opened: set[int] = set()
            try:
                for row, index in planned:
                    procs = adapters[index]
                    if index not in opened:
                        procs.open(1)
                        opened.add(index)
                    if not run_one(
                        row,
                        functools.partial(_SYNC_FILL[row.scenario], bench, procs, row.variant, row),
                    ):
                        opened.discard(index)  # it may be wedged: the next cell gets a fresh pool
                        try:
                            procs.close()
                        except Exception as exc:  # noqa: BLE001 - reported on the row
                            row.error(f"closing the pool: {exc}")
            finally:
                for index in opened:
                    with contextlib.suppress(Exception):
                        adapters[index].close()
        else:
            aprocs = ASYNC_PROCS[system](bench)

            async def main() -> None:
                await aprocs.open(1)
                try:
                    for row, _ in planned:
                        started = time.perf_counter()
                        try:
                            await _ASYNC_FILL[row.scenario](bench, aprocs, row.variant, row)
                        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                            row.error(f"{type(exc).__name__}: {exc}")
                            await aprocs.close()  # it may be wedged: continue on a fresh pool
                            await aprocs.open(1)
                        progress(
                            f"  [{row.scenario + '/' + row.variant:<18}] {system:<20} "
                            f"{time.perf_counter() - started:6.1f}s  {brief(row)}"
                        )
                finally:
                    await aprocs.close()

            anyio_run(main, aprocs.backend)
    return [row for row, _ in planned]
