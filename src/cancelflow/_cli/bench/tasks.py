"""The work ``cancelflow bench`` runs.

Process tasks are sent as ``exec(PROCESS_SOURCE, params)``: ``exec`` is a builtin, so no
system's fresh worker has to import a module of ours (importing the ``cancelflow``
package, with loguru, costs a fresh interpreter ~250 ms, which would be charged to the
peers' "next task" times). The trivial tasks are builtins too (``os.getpid``, ``abs``).
Thread tasks and pipeline nodes are plain functions of this module.

Each task tells the benchmark that it runs by writing one line, ``"seq pid gpid t\\n"``
(``t`` is ``time.perf_counter()``, which is ``CLOCK_MONOTONIC`` and so comparable across
processes), either to the benchmark's FIFO (``beacon`` is its path) or, in a cancelflow
pool, through ``store_partial("running", line)`` (``beacon`` is ``None``): the pool hands
the line to the benchmark on its supervisor thread.

Every endless task has a safety deadline (``SAFETY_SECONDS``) so that nothing spins for
ever if the benchmark itself dies; it is far beyond any bound the benchmark waits for.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = (
    "MAIN_SQUARE",
    "PROCESS_SOURCE",
    "SAFETY_SECONDS",
    "Stopped",
    "coop_anyio_thread",
    "coop_event",
    "coop_token",
    "main_square",
    "node_first",
    "node_last",
    "node_wave_loop",
    "node_wave_process",
    "node_wave_thread",
    "process_task",
    "signal_running",
)

#: An endless task returns by itself after this many seconds (a safety net only).
SAFETY_SECONDS = 120.0

#: The process tasks, run as ``exec(PROCESS_SOURCE, params)``. ``params["task"]`` is one of
#: ``spin`` (``kind``: ``loop``, ``c_call`` or ``grandchild``), ``coop_token`` (cancelflow:
#: polls ``check_cancelled()``), ``coop_flag`` (polls the one-byte ``mmap`` of
#: ``flag_path``, then raises ``RuntimeError``) and ``crash`` (``how``: ``exit`` or
#: ``segfault``, after ``pause`` seconds). ``quiet``: exit with code 1 instead of raising
#: (a bare ``multiprocessing.Process`` would print the traceback).
PROCESS_SOURCE = """
import os, sys, time

def _signal(gpid=0):
    line = f"{seq} {os.getpid()} {gpid} {time.perf_counter():.9f}\\n".encode()
    if beacon is None:
        from cancelflow._context import store_partial
        store_partial("running", line)
        return
    fd = os.open(beacon, os.O_WRONLY)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)

def _spin():
    gpid = 0
    if kind == "grandchild":
        import shutil, subprocess
        sleep = shutil.which("sleep")
        argv = [sleep, "300"] if sleep else [sys.executable, "-c", "import time; time.sleep(300)"]
        gpid = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL).pid
    _signal(gpid)
    deadline = time.monotonic() + safety
    if kind == "c_call":
        import hashlib
        hashlib.pbkdf2_hmac("sha256", b"cancelflow", b"bench", 60_000_000)  # ~30-60 s in C
    while time.monotonic() < deadline:
        for _ in range(1_000_000):
            pass

def _coop_token():
    from cancelflow._context import check_cancelled
    _signal()
    deadline = time.monotonic() + safety
    while time.monotonic() < deadline:
        for _ in range(10_000):
            check_cancelled()

def _coop_flag():
    import mmap
    with open(flag_path, "r+b") as file:
        flag = mmap.mmap(file.fileno(), 1)
    try:
        _signal()
        deadline = time.monotonic() + safety
        while time.monotonic() < deadline:
            for _ in range(10_000):
                if flag[0]:
                    if quiet:
                        sys.exit(1)
                    raise RuntimeError(f"task {seq} stopped by its flag")
    finally:
        flag.close()

def _crash():
    import ctypes, faulthandler, resource
    time.sleep(pause)
    faulthandler.disable()
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    _signal()
    if how == "segfault":
        ctypes.string_at(0)
    os._exit(3)

{"spin": _spin, "coop_token": _coop_token, "coop_flag": _coop_flag, "crash": _crash}[task]()
"""


def process_task(
    task: str, beacon: str | None, seq: int, **params: Any
) -> tuple[Any, tuple[Any, ...]]:
    """``(fn, args)`` that run process task ``task`` (see ``PROCESS_SOURCE``)."""
    namespace = {
        "task": task,
        "beacon": beacon,
        "seq": seq,
        "safety": SAFETY_SECONDS,
        "quiet": False,
        "kind": "",
        "flag_path": "",
        "how": "",
        "pause": 0.0,
        **params,
    }
    return exec, (PROCESS_SOURCE, namespace)


class Stopped(Exception):
    """Raised by a cooperative thread task once it sees its stop flag."""


def signal_running(beacon: str | None, seq: int, gpid: int = 0) -> None:
    """Tell the benchmark that task ``seq`` runs in this process (and its grandchild)."""
    line = f"{seq} {os.getpid()} {gpid} {time.perf_counter():.9f}\n".encode()
    if beacon is None:
        from cancelflow._context import store_partial

        store_partial("running", line)
        return
    fd = os.open(beacon, os.O_WRONLY)
    try:
        os.write(fd, line)  # one write below PIPE_BUF: atomic
    finally:
        os.close(fd)


def coop_token(beacon: str | None, seq: int, record: dict[str, float]) -> None:
    """A cooperative cancelflow thread task: polls ``check_cancelled()`` until it raises."""
    from cancelflow._context import check_cancelled

    signal_running(beacon, seq)
    deadline = time.monotonic() + SAFETY_SECONDS
    try:
        while time.monotonic() < deadline:
            for _ in range(10_000):
                check_cancelled()
    finally:
        record["stopped"] = time.perf_counter()


def coop_event(
    beacon: str | None, seq: int, event: threading.Event, record: dict[str, float]
) -> None:
    """A cooperative peer task in a thread: polls ``event.is_set()``, then raises ``Stopped``."""
    signal_running(beacon, seq)
    deadline = time.monotonic() + SAFETY_SECONDS
    try:
        while time.monotonic() < deadline:
            for _ in range(10_000):
                if event.is_set():
                    raise Stopped(f"task {seq} stopped")
    finally:
        record["stopped"] = time.perf_counter()


def coop_anyio_thread(beacon: str | None, seq: int, record: dict[str, float]) -> None:
    """A cooperative task in an ``anyio.to_thread`` worker: polls
    ``anyio.from_thread.check_cancelled()`` (anyio's documented way)."""
    from anyio.from_thread import check_cancelled

    signal_running(beacon, seq)
    deadline = time.monotonic() + SAFETY_SECONDS
    try:
        while time.monotonic() < deadline:
            for _ in range(1_000):
                check_cancelled()
    finally:
        record["stopped"] = time.perf_counter()


# -- pipeline nodes (scenario 5) -------------------------------------------------------------
def _node_signal(ctx: Any) -> None:
    signal_running(ctx.context["beacon"], ctx.context["seq"])


def node_first(ctx: Any) -> str:
    """Wave 0: returns at once."""
    return "first"


def node_last(ctx: Any) -> str:
    """Wave 2: never reached when the run is cancelled in wave 1."""
    return "last"


async def node_wave_loop(ctx: Any) -> str:
    """Wave 1, on the event loop: works for ``ctx.context["duration"]`` seconds."""
    _node_signal(ctx)
    end = time.monotonic() + ctx.context["duration"]
    ticks = 0
    while time.monotonic() < end:
        await asyncio.sleep(0.005)
        ticks += 1
        if ticks % 4 == 0:
            ctx.store_partial("ticks", ticks)
    return "loop"


def node_wave_thread(ctx: Any) -> str:
    """Wave 1, in a thread: works for ``duration`` seconds, checking its token."""
    return _work(ctx, "thread")


def node_wave_process(ctx: Any) -> str:
    """Wave 1, in a process: works for ``duration`` seconds, checking its token."""
    return _work(ctx, "process")


def _work(ctx: Any, name: str) -> str:
    _node_signal(ctx)
    end = time.monotonic() + ctx.context["duration"]
    ticks = 0
    while time.monotonic() < end:
        ctx.token.raise_if_cancelled()
        time.sleep(0.001)
        ticks += 1
        if ticks % 20 == 0:
            ctx.store_partial("ticks", ticks)
    return name


#: The name :func:`main_square` defines in the program's ``__main__``.
MAIN_SQUARE = "cancelflow_bench_square"


def main_square() -> Callable[[int], int]:
    """A trivial function of the program's ``__main__``, as a user's script or REPL
    defines it: a pool that cannot name it for its workers sends it by value. Defined
    once, before the pools of the cell start, so that a pool whose workers are forks of
    this process finds it by name there."""
    main = sys.modules["__main__"]
    fn = getattr(main, MAIN_SQUARE, None)
    if fn is None:
        exec(f"def {MAIN_SQUARE}(x):\n    return x * x\n", vars(main))
        fn = getattr(main, MAIN_SQUARE)
    return fn  # type: ignore[no-any-return]
