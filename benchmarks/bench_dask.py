"""Stopping a running node on Dask: cancelflow's DaskRunner vs Dask's own tools.

On a ``LocalCluster`` of 2 worker processes (1 thread each, 127.0.0.1), measures:

1. *cancel -> tree gone*: a process node that never checks its token and has started a
   grandchild is cancelled; timed from ``token.cancel()`` to the moment the child and
   the grandchild have both exited (pidfds watched by a thread of this process), and to
   ``run_sync`` raising. Also through Dask's own cancel of the task's future (the worker
   plugin's transition hook; ``run_sync``'s awaiting task cancelled).
2. *next task on the same worker*: right after each cancel returns, a plain Dask task
   and a cancelflow process node (on a fresh child of the pool) are sent to the worker
   that ran the killed node; timed from the cancel to their start on the worker.
3. *per-node overhead*: sequential round trips of a trivial function, plain
   ``client.submit`` vs ``DaskRunner.run_sync`` (process, process with a token, thread).
4. Dask's ``future.cancel()`` on a spinning task (the task keeps running: reported from
   the worker's CPU time) and ``client.restart_workers`` (the only built-in stop).

Run: ``python -m benchmarks.bench_dask [samples]`` (default 40 cancels, 200 round trips).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import dask
import distributed
import psutil
from loguru import logger

from cancelflow import CancellationToken, CancelledException
from cancelflow._backends._dask import DaskRunner
from cancelflow._context import store_partial

WAIT = 30.0


# -- node functions (sent by value: this module is __main__) --------------------------------
def add(a: int, b: int) -> int:
    return a + b


def started_at() -> float:
    return time.time()


def spin_tree() -> None:
    grandchild = subprocess.Popen(["sleep", "1000"])
    store_partial("pids", [os.getpid(), grandchild.pid])
    while True:
        pass


def spin_forever_plain(name: str) -> None:
    distributed.Event(name).set()
    while True:
        pass


# -- helpers ----------------------------------------------------------------------------------
def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def line(name: str, samples: list[float], target: str = "") -> None:
    print(
        f"  {name:<52} p50 {pct(samples, 0.5):8.2f} ms   p99 {pct(samples, 0.99):8.2f} ms"
        + (f"   (target {target})" if target else "")
    )


_WATCHER = r"""
import os, selectors, sys, time
for line in sys.stdin:
    fds = [os.pidfd_open(int(pid)) for pid in line.split()]
    print("ok", flush=True)
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        pending = len(fds)
        while pending:
            for key, _ in selector.select(30):
                selector.unregister(key.fileobj)
                pending -= 1
    print(time.perf_counter(), flush=True)
    for fd in fds:
        os.close(fd)
"""


class GoneWatcher:
    """A helper process that reports when every pid of a set has exited (pidfds).

    A process of its own, so that the time is taken the moment the kernel reports the
    exits, not when a thread of this busy process (client and scheduler) gets the GIL.
    ``time.perf_counter()`` is CLOCK_MONOTONIC, the same clock in every process.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def arm(self, pids: list[int]) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(" ".join(map(str, pids)) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    async def gone_at(self) -> float:
        assert self.proc.stdout is not None
        line = await asyncio.to_thread(self.proc.stdout.readline)
        return float(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


class Pids:
    """partial_sink that resolves a future with the node's pids."""

    def __init__(self) -> None:
        self.future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()

    def __call__(self, key: str, value: Any) -> None:
        if key == "pids" and not self.future.done():
            self.future.set_result(value)


async def worker_of(client: Any, child_pid: int) -> str:
    """The address of the Dask worker whose pool runs ``child_pid`` (child <- zygote <- worker)."""
    worker_pid = psutil.Process(child_pid).parent().parent().pid
    pids = await client.run(os.getpid)
    return next(address for address, pid in pids.items() if pid == worker_pid)


# -- 1 & 2: cancel -> gone, next task ------------------------------------------------------------
async def bench_cancel(runner: DaskRunner, samples: int, how: str) -> dict[str, list[float]]:
    client = runner.client
    workers = sorted((await client.scheduler.identity())["workers"])
    gone: list[float] = []
    raised: list[float] = []
    next_plain: list[float] = []
    next_node: list[float] = []
    watcher = GoneWatcher()
    for index in range(samples):
        address = workers[index % len(workers)]
        pinned = runner_on(runner, address)
        pids = Pids()
        token = CancellationToken()
        call = asyncio.ensure_future(
            pinned.run_sync(
                spin_tree, token=token, partial_sink=pids, grace_period=0.0, term_grace_period=0.0
            )
        )
        tree = await asyncio.wait_for(pids.future, WAIT)
        # Waits in that worker's queue (1 thread) behind the node about to be cancelled.
        queued = client.submit(started_at, workers=[address], pure=False)
        watcher.arm(tree)
        await client.scheduler.identity()  # the queued task has reached the scheduler
        t0 = time.perf_counter()
        wall0 = time.time()
        if how == "token":
            token.cancel("bench")
            try:
                await call
            except CancelledException:
                pass
        else:
            call.cancel()
            try:
                await call
            except asyncio.CancelledError:
                pass
        raised.append(time.perf_counter() - t0)
        wall1 = time.time()
        gone.append(await watcher.gone_at() - t0)
        next_plain.append(await queued - wall0)
        node_start = await pinned.run_sync(started_at)
        next_node.append(node_start - wall1)
    watcher.close()
    return {"gone": gone, "raised": raised, "next_plain": next_plain, "next_node": next_node}


_pinned: dict[str, DaskRunner] = {}


def runner_on(runner: DaskRunner, address: str) -> DaskRunner:
    if address not in _pinned:
        _pinned[address] = DaskRunner(runner.client, submit_options={"workers": [address]})
    return _pinned[address]


# -- 3: overhead ---------------------------------------------------------------------------------
async def bench_overhead(runner: DaskRunner, rounds: int) -> dict[str, list[float]]:
    client = runner.client
    threads = runner.with_run_in("thread")
    results: dict[str, list[float]] = {
        "plain": [],
        "process": [],
        "process+token": [],
        "thread": [],
    }
    for _ in range(rounds):
        t0 = time.perf_counter()
        assert await client.submit(add, 1, 2, pure=False) == 3
        results["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert await runner.run_sync(add, 1, 2) == 3
        results["process"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert await runner.run_sync(add, 1, 2, token=CancellationToken()) == 3
        results["process+token"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert await threads.run_sync(add, 1, 2) == 3
        results["thread"].append(time.perf_counter() - t0)
    return results


# -- 4: Dask's own ---------------------------------------------------------------------------------
async def bench_dask_own(client: Any) -> tuple[float, float, float]:
    """Returns (CPU share of the worker in the second after future.cancel(), seconds of
    restart_workers, seconds until a task runs on the restarted worker)."""
    workers = sorted((await client.scheduler.identity())["workers"])
    address = workers[0]
    pid = (await client.run(os.getpid, workers=[address]))[address]
    running = distributed.Event(f"bench-spin-{os.getpid()}", client=client)
    future = client.submit(spin_forever_plain, running.name, workers=[address], pure=False)
    await running.wait(timeout=WAIT)
    await future.cancel(force=True)
    proc = psutil.Process(pid)
    cpu0 = sum(proc.cpu_times()[:2])
    t0 = time.perf_counter()
    await asyncio.sleep(1.0)  # the window in which we watch the cancelled task burn CPU
    share = (sum(proc.cpu_times()[:2]) - cpu0) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    await client.restart_workers([address], timeout=120)
    restart = time.perf_counter() - t0
    await client.wait_for_workers(2, timeout=WAIT)
    workers = sorted((await client.scheduler.identity())["workers"])
    t1 = time.perf_counter()
    await client.submit(add, 1, 1, pure=False)
    return share, restart, time.perf_counter() - t1 + restart


async def main(samples: int, rounds: int) -> None:
    # The scheduler of a LocalCluster lives in this process: on this event loop (not a
    # thread of its own), so that it and the client do not trade the GIL at every hop.
    config = {"distributed.worker.profile.enabled": False, "logging.distributed": "error"}
    with dask.config.set(config):
        cluster = await distributed.LocalCluster(
            processes=True,
            n_workers=2,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            asynchronous=True,
        )
    async with cluster:
        await bench_all(samples, rounds, cluster.scheduler_address)


async def bench_all(samples: int, rounds: int, address: str) -> None:
    async with DaskRunner(address) as runner:
        client = runner.client
        await client.wait_for_workers(2, timeout=WAIT)
        for _ in range(10):  # warm: imports in every child, connections
            await runner.run_sync(add, 1, 1)
            await runner.with_run_in("thread").run_sync(add, 1, 1)
        print(
            f"DaskRunner on LocalCluster(processes=True, n_workers=2, threads_per_worker=1), "
            f"distributed {distributed.__version__}, {os.cpu_count()} CPUs"
        )
        print(f"\n1. cancel -> node's process tree (child + grandchild) gone, {samples} samples")
        by_token = await bench_cancel(runner, samples, "token")
        line("token.cancel() -> tree gone", by_token["gone"], "p50 <= 10 ms, p99 <= 50 ms")
        line("token.cancel() -> run_sync raised", by_token["raised"])
        by_task = await bench_cancel(runner, samples, "task")
        line("awaiting task cancelled (Dask release) -> tree gone", by_task["gone"])
        line("awaiting task cancelled -> CancelledError raised", by_task["raised"])
        print("\n2. after the cancel, the same worker runs its next task")
        line("queued Dask task starts (from token.cancel())", by_token["next_plain"], "<= 20 ms")
        line("queued Dask task starts (from the Dask release)", by_task["next_plain"])
        line("process node sent after the cancel starts (new child)", by_token["next_node"])
        print(f"\n3. per-node round trip, {rounds} sequential calls of add(1, 2)")
        over = await bench_overhead(runner, rounds)
        base = pct(over["plain"], 0.5)
        for name, values in over.items():
            ratio = pct(values, 0.5) / base
            line(
                f"{name} ({ratio:.2f}x plain at p50)",
                values,
                "<= 1.5x" if name == "process" else "",
            )
        print("\n4. Dask's own tools on a spinning task (1 thread per worker)")
        for pinned in _pinned.values():
            await pinned.aclose()
        share, restart, recovered = await bench_dask_own(client)
        print(
            f"  future.cancel(force=True): the task keeps running; worker CPU in the next "
            f"second: {share * 100:.0f} % (the thread is never stopped)"
        )
        print(f"  client.restart_workers([that worker]): {restart:.2f} s (its results are lost)")
        print(f"  ... until a task runs on the cluster again: {recovered:.2f} s")
    print("\nRun: python -m benchmarks.bench_dask [samples] [rounds]")


def run() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    logger.disable("cancelflow")
    asyncio.run(main(samples, rounds))


if __name__ == "__main__":
    run()
