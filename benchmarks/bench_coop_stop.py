"""Where a cooperative stop in a ProcessPool spends its time, step by step.

A task on a 1-worker pool polls ``check_cancelled()``; after a random pause its caller's
token is cancelled while another thread waits in ``future.result()``. Each sample stamps
(``time.perf_counter()``, one clock for every process on Linux), from the ``cancel()``:

* ``task saw it``: the task caught its ``CancelledException`` (stamped in a shared file);
* ``supervisor: stop``: the pool's supervisor thread took up the stop command;
* ``supervisor: result``: it took up the worker's result;
* ``caller raised``: the waiting thread's ``result()`` raised.

Medians and p90 in microseconds. The pause matters on a virtual machine: the longer the
machine idled, the slower every step runs (cold caches, idle CPUs), so run it with short
and long pauses. Compare two versions of cancelflow by putting each one's ``src`` first
on ``PYTHONPATH``.

Run: ``python -m benchmarks.bench_coop_stop [SAMPLES] [MAX_PAUSE_MS]`` (default 60 5)
"""

from __future__ import annotations

import mmap
import os
import random
import statistics
import struct
import sys
import tempfile
import threading
import time
from typing import Any

from cancelflow import CancellationToken, ProcessPool
from cancelflow._process import _supervisor

_STAMPS = struct.Struct("dd")  # task started, task saw its cancel


def poll_until_cancelled(path: str) -> None:
    """The task: stamp its start, poll ``check_cancelled()``, stamp the cancel it saw."""
    from cancelflow import check_cancelled

    # (16 bytes: the task goes by value and takes no Struct along)
    with open(path, "r+b") as file, mmap.mmap(file.fileno(), 16) as stamps:
        struct.pack_into("d", stamps, 0, time.perf_counter())
        try:
            while True:
                for _ in range(10_000):
                    check_cancelled()
        finally:
            struct.pack_into("d", stamps, 8, time.perf_counter())


def _stamped(steps: dict[str, float], name: str, method: Any) -> Any:
    def wrapper(*args: Any) -> Any:
        steps.setdefault(name, time.perf_counter())
        return method(*args)

    return wrapper


def main() -> None:
    samples = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    max_pause = (float(sys.argv[2]) if len(sys.argv) > 2 else 5.0) / 1e3
    steps: dict[str, float] = {}
    supervisor = _supervisor.Supervisor
    supervisor._on_command = _stamped(steps, "supervisor: stop", supervisor._on_command)  # type: ignore[method-assign]
    supervisor._on_result = _stamped(steps, "supervisor: result", supervisor._on_result)  # type: ignore[method-assign]
    rows: dict[str, list[float]] = {
        name: []
        for name in ("task saw it", "supervisor: stop", "supervisor: result", "caller raised")
    }
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as directory, ProcessPool(1) as pool:
        path = os.path.join(directory, "stamps")
        assert pool.wait_ready(60)
        with open(path, "w+b") as file:
            file.write(bytes(_STAMPS.size))
        with open(path, "r+b") as file, mmap.mmap(file.fileno(), _STAMPS.size) as stamps:
            for _ in range(samples):
                _STAMPS.pack_into(stamps, 0, 0.0, 0.0)
                token = CancellationToken()
                future = pool.submit_task(poll_until_cancelled, (path,), token=token)
                while _STAMPS.unpack_from(stamps)[0] == 0.0:
                    time.sleep(0.0005)  # a benchmark's poll, not a test's wait
                raised: list[float] = []

                def wait(future: Any = future, raised: list[float] = raised) -> None:
                    try:
                        future.result()
                    except BaseException:  # noqa: BLE001 - the stop being measured
                        raised.append(time.perf_counter())

                caller = threading.Thread(target=wait)
                caller.start()
                time.sleep(rng.uniform(0.0, max_pause))
                steps.clear()
                started = time.perf_counter()
                token.cancel("bench")
                caller.join()
                seen = _STAMPS.unpack_from(stamps)[1]
                rows["task saw it"].append(seen - started)
                for name in ("supervisor: stop", "supervisor: result"):
                    rows[name].append(steps.get(name, started) - started)
                rows["caller raised"].append(raised[0] - started)
    print(f"{samples} samples, pause 0-{max_pause * 1e3:g} ms; microseconds from cancel()")
    for name, values in rows.items():
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, (9 * len(ordered)) // 10)]
        print(f"  {name:<20} p50 {statistics.median(values) * 1e6:7.0f}   p90 {p90 * 1e6:7.0f}")


if __name__ == "__main__":
    main()
