"""What a Dask worker's memory limit sees of cancelflow's process nodes, measured.

1. The warm pool's own footprint on a worker: the worker's resident set before and after
   the runner starts its pool, and the pool's processes (zygote and children): how many,
   their private memory (what the memory watch counts) and their resident sets.
2. The watch's cost: one check while a process node runs, on the worker's event loop.
3. A process node that grows past the worker's limit (``memory_limit=400MB``, nanny on):
   how far its tree got before the kill, how long the call took, whether the worker kept
   its pid.

Run: ``python -m benchmarks.bench_dask_memory [samples]``
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from typing import Any

import dask
import distributed
import psutil

from cancelflow import DaskRunner, MemoryLimitError
from cancelflow._context import current_token, store_partial
from cancelflow._platform import proportional_memory

MB = 1_000_000
MIB = 1 << 20


def hold_memory(total_mb: int, step_mb: int, seconds: float) -> str:
    held = []
    for _ in range(total_mb // step_mb):
        held.append(b"\x01" * (step_mb * MB))
        store_partial("held_mb", len(held) * step_mb)
    current_token().wait_blocking(seconds)
    return "held"


def time_checks(dask_worker: Any, rounds: int = 200) -> float:
    """Seconds per memory check of the cancelflow plugin on this worker (run there)."""
    plugin = dask_worker.plugins["cancelflow"]
    started = time.perf_counter()
    for _ in range(rounds):
        plugin._check_memory()
    return (time.perf_counter() - started) / rounds


def time_exact(dask_worker: Any, rounds: int = 100) -> float:
    """Seconds per exact (proportional) count of the pool's processes (run there)."""
    from cancelflow._platform import descendants

    zygote = dask_worker.plugins["cancelflow"].pool.statistics().zygote_pid
    started = time.perf_counter()
    for _ in range(rounds):
        proportional_memory([zygote, *descendants(zygote)])
    return (time.perf_counter() - started) / rounds


def pool_processes(worker_pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(worker_pid).children(recursive=True)]


async def footprint(threads: int) -> None:
    config = {"distributed.worker.profile.enabled": False, "logging.distributed": "error"}
    with dask.config.set(config):
        cluster = await distributed.LocalCluster(
            processes=True,
            n_workers=1,
            threads_per_worker=threads,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit="4GB",
            asynchronous=True,
        )
    async with cluster, distributed.Client(cluster, asynchronous=True) as client:
        [pid] = (await client.run(os.getpid)).values()
        before = psutil.Process(pid).memory_info().rss
        async with DaskRunner(client) as runner:
            assert await runner.run_sync(int, "1") == 1
            after = psutil.Process(pid).memory_info().rss
            procs = pool_processes(pid)
            pss = proportional_memory(procs)
            rss = sum(psutil.Process(p).memory_info().rss for p in procs)
            print(
                f"  {threads} thread(s): pool = {len(procs)} processes, {pss / MIB:.1f} MiB "
                f"proportional (what the watch counts), {rss / MIB:.1f} MiB resident summed; "
                f"worker resident {before / MIB:.1f} -> {after / MIB:.1f} MiB"
            )
            call = asyncio.ensure_future(runner.run_sync(hold_memory, 50, 10, 3.0))
            await asyncio.sleep(0.5)  # let the node allocate; the checks are timed meanwhile
            [per_check] = (await client.run(time_checks)).values()
            assert await call == "held"
            print(
                f"    one memory check while a node runs, far from the cap: "
                f"{per_check * 1e6:.0f} us ({per_check / 0.1 * 100:.2f} % of the worker's "
                "loop at the 100 ms interval)"
            )
            [exact] = (await client.run(time_exact)).values()
            print(
                f"    the exact split near the cap (smaps_rollup of the pool): {exact * 1e6:.0f} us"
            )


async def over_the_limit(samples: int) -> None:
    config = {"distributed.worker.profile.enabled": False, "logging.distributed": "error"}
    with dask.config.set(config):
        cluster = await distributed.LocalCluster(
            processes=True,
            n_workers=1,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            memory_limit="400MB",
            asynchronous=True,
        )
    async with cluster, DaskRunner(cluster.scheduler_address) as runner:
        client = runner.client
        [pid] = (await client.run(os.getpid)).values()
        used, seconds, past = [], [], []
        for _ in range(samples):
            started = time.perf_counter()
            try:
                await runner.run_sync(hold_memory, 1500, 10, 30.0)
            except MemoryLimitError as error:
                seconds.append(time.perf_counter() - started)
                used.append(error.used)
                past.append(error.partial_results.get("held_mb", 0))
            else:
                print("  the node was not stopped")
        [pid_after] = (await client.run(os.getpid)).values()
        cap = 0.95 * 400 * MB
        print(
            f"  node tree at the kill: median {statistics.median(used) / MIB:.0f} MiB, max "
            f"{max(used) / MIB:.0f} MiB (cap for worker + pool: {cap / MIB:.0f} MiB); "
            f"the node had reported {statistics.median(past):.0f} MB allocated (median)"
        )
        print(
            f"  call -> MemoryLimitError: median {statistics.median(seconds) * 1e3:.0f} ms; "
            f"{len(used)}/{samples} stopped; worker pid kept: {pid_after == pid}"
        )


async def main(samples: int) -> None:
    print(f"distributed {distributed.__version__}, {os.cpu_count()} CPUs")
    print("1-2. the warm pool's footprint, and the watch's cost")
    for threads in (1, 2):
        await footprint(threads)
    print(f"3. a process node growing in 10 MB steps to 1.5 GB, memory_limit=400MB, {samples}x")
    await over_the_limit(samples)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
