"""The platform layer's costs, per implementation and per Python: what the README's
platform table quotes.

For each implementation (``CANCELFLOW_PLATFORM`` = linux, posix, windows; each run in a
fresh interpreter) and each interpreter given:

1. the cost of one check, ``token.is_cancelled`` (a token only this process sees, and a
   view of a token another process may see), against ``threading.Event.is_set()``
   (net of timeit's loop);
2. a wake-up within a process: ``token.cancel()`` in one thread until ``wait_blocking()``
   returns in another, against ``Event.set()`` until ``Event.wait()`` returns;
3. a wake-up across processes: ``cancel()`` in the parent until ``wait_blocking()`` returns
   in a forked child holding the token, against a byte written to a pipe until the child's
   blocked ``os.read`` returns; and ``cancel()`` in the child until the parent's
   ``on_cancel`` callback runs (the hub). Not on "windows", where tokens do not cross
   processes. The pipe is measured twice: its writer blocks right after writing (the
   kernel then runs the reader on the writer's CPU, which is awake), and its writer
   keeps running for as long as that sample's ``cancel()`` call took (the reader must
   be woken on another CPU, as a waiter is while ``cancel()`` goes on: on a virtual
   machine an idle CPU takes tens of µs to wake);
4. where the implementation runs a process pool: a cancel until the caller hears, for a
   task that polls its token and for one that never does (grace 0: the tree is killed),
   and the pool's throughput on trivial tasks.

Samples of each pair are interleaved (token, baseline, token, ...), so a noisy moment
lands on both; medians and p99 are reported, and the ratio of the medians.
``time.monotonic_ns`` is system-wide on Linux, so a child's stamp compares with the
parent's.

Run: ``python -m benchmarks.bench_platforms [samples] [--python PATH ...]``
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
import timeit
from typing import Any

FLAVOURS = ("linux", "posix", "windows")


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    }


def _checks() -> dict[str, float]:
    """ns per check, net of timeit's loop and the name lookup (``token`` alone): a token
    only this process sees (a slot read), a view of a token another process may see (a
    read of its shared memory), and ``Event.is_set()``."""
    from cancelflow import CancellationToken
    from cancelflow._token import token_on_slot

    token, event = CancellationToken(), threading.Event()
    shared = token_on_slot(token._chunk, token._offset)
    statements = {
        "is_cancelled": "token.is_cancelled",
        "shared_is_cancelled": "shared.is_cancelled",
        "event_is_set": "event.is_set()",
        "loop": "token",
    }
    names = {"token": token, "shared": shared, "event": event}
    best = dict.fromkeys(statements, float("inf"))
    for _ in range(5):  # interleaved rounds, best of each
        for name, stmt in statements.items():
            seconds = min(timeit.repeat(stmt, globals=names, number=200_000, repeat=3))
            best[name] = min(best[name], seconds / 200_000 * 1e9)
    loop = best.pop("loop")
    return {name: value - loop for name, value in best.items()}


def _one_wake(wait: Any, fire: Any) -> float:
    """Microseconds from ``fire()`` in this thread to ``wait()`` returning in another."""
    woke: list[int] = []
    ready = threading.Event()

    def waiter() -> None:
        ready.set()
        wait()
        woke.append(time.monotonic_ns())

    thread = threading.Thread(target=waiter)
    thread.start()
    ready.wait()
    time.sleep(0.002)  # let it block
    start = time.monotonic_ns()
    fire()
    thread.join()
    return (woke[0] - start) / 1000


def _wake_in_process(samples: int) -> dict[str, list[float]]:
    from cancelflow import CancellationToken

    out: dict[str, list[float]] = {"token": [], "event": []}
    for _ in range(samples):
        token, event = CancellationToken(), threading.Event()
        out["token"].append(_one_wake(functools.partial(token.wait_blocking, 30), token.cancel))
        out["event"].append(_one_wake(functools.partial(event.wait, 30), event.set))
    return out


def _child(tokens: list[Any], back: list[Any], pipe_r: int, report: Any) -> None:
    for token, reply in zip(tokens, back, strict=True):
        report.send("ready")
        token.wait_blocking(30)
        woke = time.monotonic_ns()
        report.send(("token", woke))
        for kind in ("pipe", "pipe_working"):
            report.send("ready")
            os.read(pipe_r, 1)
            report.send((kind, time.monotonic_ns()))
        report.recv()  # the parent says: cancel yours now
        report.send(("start", time.monotonic_ns()))
        reply.cancel()


def _wake_across(samples: int) -> dict[str, list[float]]:
    from cancelflow import CancellationToken

    tokens = [CancellationToken() for _ in range(samples)]
    back = [CancellationToken() for _ in range(samples)]
    pipe_r, pipe_w = os.pipe()
    parent_end, child_end = multiprocessing.Pipe()
    # fork: the child inherits the pipe (and the tokens, shared from the fork on)
    context = multiprocessing.get_context("fork")
    process = context.Process(target=_child, args=(tokens, back, pipe_r, child_end))
    process.start()
    out: dict[str, list[float]] = {"token": [], "pipe": [], "pipe_working": [], "callback": []}
    try:
        for token, reply in zip(tokens, back, strict=True):
            heard: list[int] = []
            called = threading.Event()

            def callback(heard: list[int] = heard, called: threading.Event = called) -> None:
                heard.append(time.monotonic_ns())
                called.set()

            reply.on_cancel(callback)
            assert parent_end.recv() == "ready"
            time.sleep(0.002)
            start = time.monotonic_ns()
            token.cancel()
            spent = time.monotonic_ns() - start
            _, woke = parent_end.recv()
            out["token"].append((woke - start) / 1000)
            for kind in ("pipe", "pipe_working"):
                assert parent_end.recv() == "ready"
                time.sleep(0.002)
                start = time.monotonic_ns()
                os.write(pipe_w, b"x")
                if kind == "pipe_working":
                    while time.monotonic_ns() - start < spent:
                        pass
                _, woke = parent_end.recv()
                out[kind].append((woke - start) / 1000)
            parent_end.send("go")
            _, start = parent_end.recv()
            assert called.wait(30)
            out["callback"].append((heard[0] - start) / 1000)
    finally:
        process.join(60)
        os.close(pipe_r)
        os.close(pipe_w)
    return out


def noop() -> None:
    """A trivial task."""


def announce_and_poll() -> None:
    """Say it runs, then poll its token until it is cancelled."""
    import cancelflow

    cancelflow.store_partial("running", True)
    while True:
        cancelflow.check_cancelled()


def announce_and_spin() -> None:
    """Say it runs, then spin without ever checking its token."""
    import cancelflow

    cancelflow.store_partial("running", True)
    while True:
        pass


def _pool(samples: int) -> dict[str, Any]:
    """A 2-worker ProcessPool: cancel of a task that polls ``check_cancelled()`` until its
    caller (blocked in ``result()``) raises; cancel with grace 0 of a task that spins and
    never checks until its caller is released (the tree killed); tasks per second for
    2,000 trivial tasks."""
    import concurrent.futures

    from cancelflow import ProcessPool

    out: dict[str, Any] = {}
    with ProcessPool(2, grace_period=0, term_grace_period=0) as pool:
        pool.submit(noop).result(60)
        for kind, fn, grace in (
            ("cooperative", announce_and_poll, 5.0),
            ("kill", announce_and_spin, 0.0),
        ):
            times = []
            for _ in range(max(10, samples // 10)):
                started: concurrent.futures.Future[float] = concurrent.futures.Future()
                future = pool.submit_task(
                    fn,
                    grace_period=grace,
                    partial_sink=lambda _key, _value, s=started: s.set_result(0.0),
                )
                started.result(60)
                released = threading.Event()
                stamp: list[float] = []

                def caller(f: Any = future, out: list[float] = stamp, done: Any = released) -> None:
                    with contextlib.suppress(BaseException):
                        f.result(60)
                    out.append(time.perf_counter())
                    done.set()

                thread = threading.Thread(target=caller)
                thread.start()
                begin = time.perf_counter()
                future.cancel()
                released.wait(60)
                thread.join(60)
                times.append((stamp[0] - begin) * 1e6)
            out[kind] = _summary(times)
        begin = time.perf_counter()
        futures = [pool.submit(noop) for _ in range(2000)]
        for f in futures:
            f.result(60)
        out["tasks_per_s"] = 2000 / (time.perf_counter() - begin)
    return out


def measure(samples: int) -> dict[str, Any]:
    """In one interpreter, with the implementation it was started with."""
    from cancelflow import _platform

    result: dict[str, Any] = {
        "flavour": _platform.FLAVOUR,
        "python": sys.version.split()[0],
        "check_ns": _checks(),
    }
    inside = _wake_in_process(samples)
    result["in_process_us"] = {kind: _summary(values) for kind, values in inside.items()}
    if _platform.TOKENS_CROSS_PROCESSES:
        across = _wake_across(samples)
        result["across_us"] = {kind: _summary(values) for kind, values in across.items()}
    if _platform.PROCESS_POOLS:
        result["pool_us"] = _pool(samples)
    return result


def run(samples: int, pythons: list[str]) -> list[dict[str, Any]]:
    rows = []
    for python in pythons:
        for flavour in FLAVOURS:
            env = {**os.environ, "CANCELFLOW_PLATFORM": flavour}
            done = subprocess.run(
                [python, "-m", "benchmarks.bench_platforms", "--one", str(samples)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                print(f"{python} {flavour}: failed\n{done.stderr[-2000:]}")
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def show(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'python':8} {'impl':8} {'is_cancelled':>12} {'shared':>8} {'Event.is_set':>12} "
        f"{'ratio':>6}  "
        f"{'wake in process p50 (us) token/Event':>38}  "
        f"{'across p50 (us) token/pipe, pipe whose writer works on, callback':>38}"
    )
    for row in rows:
        checks = row["check_ns"]
        inside = row["in_process_us"]
        line = (
            f"{row['python']:8} {row['flavour']:8} {checks['is_cancelled']:10.1f}ns "
            f"{checks['shared_is_cancelled']:6.1f}ns {checks['event_is_set']:10.1f}ns {checks['is_cancelled'] / checks['event_is_set']:5.2f}x  "
            f"{inside['token']['median']:10.1f} / {inside['event']['median']:6.1f} "
            f"(p99 {inside['token']['p99']:6.0f} / {inside['event']['p99']:5.0f}) "
            f"{inside['token']['median'] / inside['event']['median']:4.2f}x"
        )
        across = row.get("across_us")
        if across:
            line += (
                f"  {across['token']['median']:7.1f} / {across['pipe']['median']:6.1f} "
                f"(p99 {across['token']['p99']:6.0f} / {across['pipe']['p99']:5.0f}) "
                f"{across['token']['median'] / across['pipe']['median']:4.2f}x, "
                f"working {across['pipe_working']['median']:6.1f} "
                f"({across['token']['median'] / across['pipe_working']['median']:4.2f}x), "
                f"callback {across['callback']['median']:6.1f} (p99 {across['callback']['p99']:5.0f})"
            )
        else:
            line += "  (tokens do not cross processes)"
        print(line)
    print(
        f"\n{'python':8} {'impl':8} {'process pool: cooperative cancel p50 (p99)':>44} "
        f"{'kill p50 (p99), us':>20} {'tasks/s':>9}"
    )
    for row in rows:
        pool = row.get("pool_us")
        if pool is None:
            print(f"{row['python']:8} {row['flavour']:8} {'(no process pool)':>44}")
            continue
        print(
            f"{row['python']:8} {row['flavour']:8} "
            f"{pool['cooperative']['median']:33.0f} ({pool['cooperative']['p99']:6.0f}) "
            f"{pool['kill']['median']:11.0f} ({pool['kill']['p99']:6.0f}) "
            f"{pool['tasks_per_s']:9.0f}"
        )


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        print(json.dumps(measure(int(argv[1]))))
        return
    samples = int(argv[0]) if argv and not argv[0].startswith("--") else 200
    pythons = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--python"] or [sys.executable]
    rows = run(samples, pythons)
    show(rows)
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
