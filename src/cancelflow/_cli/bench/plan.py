"""The plan: which rows each cell produces (and what fills them), which systems can be imported."""

from __future__ import annotations

import functools
from collections.abc import Callable

from .harness import Bench
from .results import Row
from .scenarios import SYSTEM_TITLES, SYSTEMS, Scenario, Variant
from .scenarios.coop import coop_thread_async, coop_thread_sync
from .scenarios.coroutine import coroutine_cell
from .scenarios.overhead import check_cost_cell, throughput_async, throughput_sync
from .scenarios.pipeline import pipeline_cell
from .systems import ASYNC_PROCS, SYNC_PROCS, SYNC_THREADS, CancelflowThreads, SyncThreads
from .tasks import main_square


def availability() -> dict[str, str | None]:
    """``None`` if the system can be imported, else why not."""
    needs = {
        "pebble": ("pebble",),
        "loky": ("loky",),
        "anyio": ("anyio",),
        "trio-parallel": ("trio", "trio_parallel", "anyio"),
        "asyncio": ("anyio",),  # the harness of every event-loop peer
    }
    out: dict[str, str | None] = {}
    for system in SYSTEMS:
        out[system] = None
        for module in needs.get(system, ()):
            try:
                __import__(module)
            except Exception as exc:  # noqa: BLE001 - any import failure is a skip reason
                out[system] = f"cannot import {module}: {exc!r}"
                break
    return out


_NO_COROUTINES = "runs no coroutines (a process/thread pool for sync callables)"
_NO_PIPELINE = (
    "no pipeline executor: waves, a graceful mode and kept partial results are not offered"
)
_NO_TOKEN = "no cancellation token a task can check"


def cell_rows(
    bench: Bench, scenario: Scenario, variant: Variant, system: str
) -> list[tuple[Row, Callable[[], None] | None]]:
    """The rows of one cell, each with the callable that fills it (``None``: already final)."""
    key, v = scenario.key, variant.key

    def row(label: str, primary: bool = True) -> Row:
        return Row(key, v, system, label, primary=primary)

    def cannot(reason: str, label: str = "") -> list[tuple[Row, Callable[[], None] | None]]:
        r = row(label or SYSTEM_TITLES[system])
        r.cannot_all(reason)
        return [(r, None)]

    if key == "3":
        if system == "cancelflow":
            threads: SyncThreads = CancelflowThreads(bench)
        elif system in SYNC_THREADS:
            threads = SYNC_THREADS[system]()
        elif system == "anyio":
            r = row(
                "anyio.to_thread.run_sync, cancel scope; the task polls from_thread.check_cancelled()"
            )
            return [(r, functools.partial(coop_thread_async, bench, system, r))]
        elif system == "asyncio":
            r = row("loop.run_in_executor(ThreadPoolExecutor); the task polls a threading.Event")
            return [(r, functools.partial(coop_thread_async, bench, system, r))]
        else:
            return cannot(f"{system} runs tasks in processes only")
        r = row(threads.label)
        return [(r, functools.partial(coop_thread_sync, bench, threads, r))]
    if key == "4":
        if system == "cancelflow":
            r = row("PipelineExecutor, mode='interrupt', token.cancel() -> CancelledException")
        elif system == "asyncio":
            r = row("Task.cancel() -> CancelledError")
        elif system == "anyio":
            r = row("CancelScope.cancel() (asyncio backend)")
        else:
            return cannot(_NO_COROUTINES)
        return [(r, functools.partial(coroutine_cell, bench, system, r))]
    if key == "5":
        if system != "cancelflow":
            return cannot(_NO_PIPELINE)
        r = row(f"PipelineExecutor, mode={v!r}, token.cancel()")
        return [(r, functools.partial(pipeline_cell, bench, v, r))]
    # scenario 7
    if v in ("processes", "processes_main"):
        if system == "raw":
            return cannot("no pool: one new process per task")
        fn = main_square() if v == "processes_main" else abs
        if system in SYNC_PROCS:
            procs = SYNC_PROCS[system][0](bench)
            r = row(procs.label.split(",")[0])
            return [(r, functools.partial(throughput_sync, bench, procs, r, 2, fn))]
        if v == "processes_main":
            return cannot(
                "measured on the pools driven from a thread only (anyio's and "
                "trio-parallel's workers are fresh interpreters, which cannot find a "
                "function of the program's __main__ by name)"
            )
        r = row(ASYNC_PROCS[system].label.split(",")[0].split(" run_sync")[0])
        return [(r, functools.partial(throughput_async, bench, system, v, r))]
    if v in ("threads", "threads8"):
        n = 8 if v == "threads8" else 2
        if system == "cancelflow":
            t = CancelflowThreads(bench)
            r = row("ThreadPool.submit")
            return [(r, functools.partial(throughput_sync, bench, t, r, n))]
        if system in SYNC_THREADS and system != "raw":
            t2 = SYNC_THREADS[system]()
            r = row(t2.label.split(";")[0])
            return [(r, functools.partial(throughput_sync, bench, t2, r, n))]
        if system == "anyio":
            r = row("anyio.to_thread.run_sync")
            return [(r, functools.partial(throughput_async, bench, system, "threads", r, n))]
        if system == "asyncio":
            r = row("loop.run_in_executor(ThreadPoolExecutor)")
            return [(r, functools.partial(throughput_async, bench, system, "threads", r, n))]
        if system == "raw":
            return cannot("no pool: one new thread per task")
        return cannot(f"{system} runs tasks in processes only")
    # token_check
    if system == "cancelflow":
        r1 = row("CancellationToken.is_cancelled")
        r2 = row("check_cancelled() inside a task", primary=False)
        r2.tag = "check_cancelled()"
        return [
            (r1, functools.partial(check_cost_cell, bench, system, r1)),
            (r2, functools.partial(check_cost_cell, bench, system, r2, "check_cancelled")),
        ]
    if system == "concurrent.futures":
        r = row("threading.Event.is_set() (what a ThreadPoolExecutor task can poll)")
    elif system == "multiprocessing.Pool":
        r = row("multiprocessing.Event.is_set() (what a Pool task can poll)")
    elif system == "anyio":
        r = row("anyio.from_thread.check_cancelled() in a to_thread worker")
    else:
        return cannot(_NO_TOKEN)
    return [(r, functools.partial(check_cost_cell, bench, system, r))]
