"""What sending a call to a process worker costs, by reference and by value.

1. Pickling one call ``(fn, (1, 2), {})`` in the parent: a module-level function (plain
   pickle, by reference), a lambda and a closure (cloudpickle, by value), and a
   function of this ``__main__`` (by value: the worker may not find it).
2. Throughput of a 2-worker ProcessPool on 2,000 trivial tasks, by reference, by value
   (a lambda) and of ``main_square``, interleaved in rounds. A function sent by value
   again, unchanged, reuses its pickle (``_process/_sent_functions``): the first row of
   1. is that reuse for the lambda, the closure and the ``__main__`` function.

Run: ``python -m benchmarks.bench_dispatch [rounds]`` (as a module, ``main_square`` is not
in ``__main__``; run ``python benchmarks/bench_dispatch.py`` to time that path too).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from cancelflow import ProcessPool
from cancelflow._process._pickling import dump_call

try:
    from .bench_pool_throughput import square
except ImportError:  # run as a script: this directory is on the path
    from bench_pool_throughput import square  # type: ignore[no-redef,import-not-found]


def _closure() -> Callable[[int, int], int]:
    offset = 0

    def square_shifted(x: int) -> int:
        return x * x + offset

    return square_shifted


def main_square(x: int) -> int:  # pickled as __main__.main_square when run as a script
    return x * x


def per_call(fn: Callable[..., Any], repeat: int = 5_000) -> float:
    call = (fn, (7,), {})
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            dump_call(call, None)
        samples.append((time.perf_counter() - started) / repeat)
    return statistics.median(samples)


def throughput(pool: ProcessPool, fn: Callable[..., Any], tasks: int) -> float:
    started = time.perf_counter()
    futures = [pool.submit(fn, i) for i in range(tasks)]
    for future in futures:
        future.result()
    return tasks / (time.perf_counter() - started)


def run(rounds: int) -> None:
    lam = lambda x: x * x  # noqa: E731 - what a user passes
    print("1. pickling one call in the parent (median of 5 x 5,000)")
    ref = per_call(square)
    for name, fn in (
        ("module function (by reference)", square),
        ("lambda (by value)", lam),
        ("closure (by value)", _closure()),
        ("function of __main__ (by value)", main_square),
    ):
        cost = per_call(fn)
        print(f"  {name:34s} {cost * 1e6:7.2f} us  ({cost / ref:5.1f}x by reference)")
    print(f"2. ProcessPool(2), 2,000 trivial tasks, {rounds} interleaved rounds")
    results: dict[str, list[float]] = {"by reference": [], "by value": [], "__main__": []}
    with ProcessPool(2) as pool:
        throughput(pool, square, 200)  # warm
        for _ in range(rounds):
            results["by reference"].append(throughput(pool, square, 2000))
            results["by value"].append(throughput(pool, lam, 2000))
            results["__main__"].append(throughput(pool, main_square, 2000))
    base = statistics.median(results["by reference"])
    for name, values in results.items():
        median = statistics.median(values)
        print(
            f"  {name:14s} median {median:7.0f} tasks/s  min {min(values):7.0f}  "
            f"({median / base:.2f}x by reference)"
        )


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
