"""Process-pool throughput on trivial tasks: cancelflow.ProcessPool vs ProcessPoolExecutor.

Each batch submits ``tasks`` calls of a trivial function and waits for every result; the
two pools run their batches interleaved in one run (after a warm-up), so machine noise
hits both alike. Reports tasks/s (median, p10, p90 over the batches) and the ratio of
medians. To compare two versions of cancelflow, run it once per version with that
version's ``src`` first on ``PYTHONPATH`` (e.g. ``git archive <rev> | tar -x -C /tmp/old``).

Run: ``python benchmarks/bench_pool_throughput.py [batches] [tasks] [workers]``
"""

from __future__ import annotations

import concurrent.futures
import statistics
import sys
import time
from collections.abc import Callable

import cancelflow


def square(x: int) -> int:
    return x * x


def batch(pool: concurrent.futures.Executor, tasks: int) -> float:
    """Tasks per second for one batch on ``pool``."""
    start = time.perf_counter()
    futures = [pool.submit(square, i) for i in range(tasks)]
    for future in futures:
        future.result()
    return tasks / (time.perf_counter() - start)


def summary(name: str, rates: list[float]) -> float:
    ordered = sorted(rates)
    p10 = ordered[len(ordered) // 10]
    p90 = ordered[min(len(ordered) - 1, (9 * len(ordered)) // 10)]
    median = statistics.median(rates)
    print(f"{name:<28} median {median:8.0f}/s   p10 {p10:8.0f}/s   p90 {p90:8.0f}/s")
    return median


def main() -> None:
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    makers: dict[str, Callable[[], concurrent.futures.Executor]] = {
        "cancelflow.ProcessPool": lambda: cancelflow.ProcessPool(workers),
        "ProcessPoolExecutor": lambda: concurrent.futures.ProcessPoolExecutor(workers),
    }
    pools = {name: make() for name, make in makers.items()}
    rates: dict[str, list[float]] = {name: [] for name in pools}
    try:
        for pool in pools.values():
            batch(pool, tasks)  # warm-up: every worker started
        for _ in range(batches):
            for name, pool in pools.items():
                rates[name].append(batch(pool, tasks))
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True)
    print(f"cancelflow {cancelflow.__version__} from {cancelflow.__file__}")
    print(f"{batches} batches of {tasks} trivial tasks, {workers} workers, interleaved")
    medians = {name: summary(name, values) for name, values in rates.items()}
    ratio = medians["cancelflow.ProcessPool"] / medians["ProcessPoolExecutor"]
    print(f"ratio cancelflow / ProcessPoolExecutor: {ratio:.2f}x")


if __name__ == "__main__":
    main()
