"""CPU per task of cancelflow.ProcessPool on trivial tasks, parent and workers apart.

Runs 3 warm-up batches, then 10 batches of 2,000 ``submit`` + ``result`` of a trivial
function on a 2-worker pool, and prints tasks/s with the CPU time (user + system) the
parent process and the workers spent per task, and the parent's context switches per
task (a thread woken, or one giving up the GIL). Meant for comparing two versions of
cancelflow run alternately on the same machine (put each version's ``src`` first on
``PYTHONPATH``): throughput alone is noisy, CPU per task tells which side got dearer.

Run: ``python benchmarks/bench_pool_cpu.py``
"""

from __future__ import annotations

import time

import psutil

from cancelflow import ProcessPool

BATCHES = 10
TASKS = 2000


def square(x: int) -> int:
    return x * x


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def switches(process: psutil.Process) -> int:
    counts = process.num_ctx_switches()
    return int(counts.voluntary + counts.involuntary)


def main() -> None:
    with ProcessPool(2) as pool:
        pool.wait_ready(30)
        for _ in range(3):
            [f.result() for f in [pool.submit(square, i) for i in range(TASKS)]]
        workers = [psutil.Process(pid) for pid in pool.statistics().worker_pids]
        me = psutil.Process()
        workers_before, me_before = sum(cpu(w) for w in workers), cpu(me)
        switches_before = switches(me)
        start = time.perf_counter()
        for _ in range(BATCHES):
            [f.result() for f in [pool.submit(square, i) for i in range(TASKS)]]
        elapsed = time.perf_counter() - start
        n = BATCHES * TASKS
        parent = (cpu(me) - me_before) / n * 1e6
        children = (sum(cpu(w) for w in workers) - workers_before) / n * 1e6
        switched = (switches(me) - switches_before) / n
        print(
            f"{n / elapsed:.0f} tasks/s  parent {parent:.1f} us/task  workers {children:.1f} "
            f"us/task  parent context switches {switched:.2f}/task"
        )


if __name__ == "__main__":
    main()
