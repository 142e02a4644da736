"""How long a kill takes when the worker's tree is large and still growing.

The task starts a chain of processes that each fork a successor and exit at once (the
double-fork pattern on repeat). The links it leaves behind are re-parented to the worker
(a subreaper) and stay there as zombies until the task ends, while the live end of the
chain keeps forking. Once ``N`` links exist, the future is cancelled (grace 0: SIGKILL of
the whole tree at once) and the time until ``result()`` raises is measured, with how many
processes the kill froze (``kill_tree``'s members, zombies included).

For each ``N`` given, ``SAMPLES`` runs; medians and maxima are printed. Compare two
versions of cancelflow by putting each one's ``src`` first on ``PYTHONPATH``.

Run: ``python -m benchmarks.bench_kill_tree [N ...]`` (default 50 1000 4000)
"""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import cancelflow
from cancelflow import ProcessPool
from cancelflow._platform import kill_tree
from cancelflow._process import _supervisor

SAMPLES = 3


def fork_chain(path: str) -> None:
    """A chain of processes, each forking its successor and exiting; every link appends
    its pid to ``path``. Ends by itself after 60 seconds."""
    cancelflow.store_partial("pid", os.getpid())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    deadline = time.monotonic() + 60
    if os.fork() == 0:
        try:
            while time.monotonic() < deadline:
                os.write(fd, f"{os.getpid()}\n".encode())
                if os.fork() != 0:
                    break
        finally:
            os._exit(0)
    while True:
        time.sleep(1)


def links(path: str) -> int:
    try:
        with open(path, "rb") as handle:
            return len(handle.read().split())
    except FileNotFoundError:
        return 0


def one_kill(size: int, members: list[int]) -> float:
    """Seconds from ``future.cancel()`` to ``result()`` raising, with ``size`` links."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        ProcessPool(1, grace_period=0, term_grace_period=0) as pool,
    ):
        path = os.path.join(tmp, "links")
        started = threading.Event()

        def sink(key: str, value: Any) -> None:
            started.set()

        future = pool.submit_task(fork_chain, (path,), partial_sink=sink)
        if not started.wait(30):
            raise RuntimeError("the task did not start")
        while links(path) < size:
            time.sleep(0.001)  # polls a file the chain writes: nothing to wait on
        t0 = time.perf_counter()
        future.cancel()
        try:
            future.result(120)
        except concurrent.futures.CancelledError:
            pass
        return time.perf_counter() - t0


def main(argv: list[str]) -> None:
    sizes = [int(arg) for arg in argv] or [50, 1000, 4000]
    members: list[int] = []

    def counting_kill_tree(*args: Any, **kwargs: Any) -> dict[int, int | None]:
        tree = kill_tree(*args, **kwargs)
        members.append(len(tree))
        return tree

    _supervisor.__dict__["kill_tree"] = counting_kill_tree  # as the supervisor calls it
    print(f"python {sys.version.split()[0]}, {SAMPLES} samples per size")
    for size in sizes:
        members.clear()
        seconds = [one_kill(size, members) for _ in range(SAMPLES)]
        print(
            f"links >= {size:5}: cancel -> result() raises p50 {statistics.median(seconds):7.3f} s"
            f", max {max(seconds):7.3f} s; processes frozen p50 {statistics.median(members):6.0f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
