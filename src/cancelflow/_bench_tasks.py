"""The work ``cancelflow bench`` runs: module-level callables every peer's workers can import.

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
import contextlib
import ctypes
import hashlib
import mmap
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = (
    "SAFETY_SECONDS",
    "Stopped",
    "coop_anyio_thread",
    "coop_event",
    "coop_flag",
    "coop_token",
    "crash",
    "node_first",
    "node_last",
    "node_wave_loop",
    "node_wave_process",
    "node_wave_thread",
    "noop",
    "send_pid",
    "signal_running",
    "spin",
    "trivial",
)

#: An endless task returns by itself after this many seconds (a safety net only).
SAFETY_SECONDS = 120.0
# One long C call: Python signal handlers cannot run until it returns (~30-60 s here).
_PBKDF2_ITERATIONS = 60_000_000


class Stopped(Exception):  # noqa: N818 - the outcome of a cooperative stop, not an error
    """Raised by a cooperative task once it sees its stop flag."""


def signal_running(beacon: str | None, seq: int, gpid: int = 0) -> None:
    """Tell the benchmark that task ``seq`` runs in this process (and its grandchild)."""
    line = f"{seq} {os.getpid()} {gpid} {time.perf_counter():.9f}\n".encode()
    if beacon is None:
        from ._context import store_partial

        store_partial("running", line)
        return
    fd = os.open(beacon, os.O_WRONLY)
    try:
        os.write(fd, line)  # one write below PIPE_BUF: atomic
    finally:
        os.close(fd)


def _start_grandchild() -> int:
    sleep = shutil.which("sleep")
    argv = [sleep, "300"] if sleep else [sys.executable, "-c", "import time; time.sleep(300)"]
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return child.pid


def spin(beacon: str | None, seq: int, kind: str) -> None:
    """A non-cooperative task: ``"loop"`` (pure Python), ``"c_call"`` (one long C call
    that holds off signal handlers) or ``"grandchild"`` (starts ``sleep 300``, then loops)."""
    gpid = _start_grandchild() if kind == "grandchild" else 0
    signal_running(beacon, seq, gpid)
    deadline = time.monotonic() + SAFETY_SECONDS
    if kind == "c_call":
        hashlib.pbkdf2_hmac("sha256", b"cancelflow", b"bench", _PBKDF2_ITERATIONS)
    while time.monotonic() < deadline:
        for _ in range(1_000_000):
            pass


def coop_token(beacon: str | None, seq: int, record: dict[str, float] | None = None) -> None:
    """A cooperative cancelflow task: polls ``check_cancelled()`` until it raises."""
    from ._context import check_cancelled

    signal_running(beacon, seq)
    deadline = time.monotonic() + SAFETY_SECONDS
    try:
        while time.monotonic() < deadline:
            for _ in range(10_000):
                check_cancelled()
    finally:
        if record is not None:
            record["stopped"] = time.perf_counter()


def coop_flag(beacon: str | None, seq: int, flag_path: str) -> None:
    """A cooperative peer task in a process: polls a shared-memory byte (an ``mmap`` of
    ``flag_path``, the cheapest flag every process can open), then raises ``Stopped``."""
    with open(flag_path, "r+b") as file:
        flag = mmap.mmap(file.fileno(), 1)
    try:
        signal_running(beacon, seq)
        deadline = time.monotonic() + SAFETY_SECONDS
        while time.monotonic() < deadline:
            for _ in range(10_000):
                if flag[0]:
                    raise Stopped(f"task {seq} stopped")
    finally:
        flag.close()


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


def crash(beacon: str | None, seq: int, how: str, pause: float) -> None:
    """Wait ``pause`` seconds, signal, then die: ``"exit"`` (``os._exit(3)``) or
    ``"segfault"`` (a NULL read; no core file)."""
    time.sleep(pause)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal_running(beacon, seq)
    if how == "segfault":
        ctypes.string_at(0)
    os._exit(3)


def trivial() -> int:
    """The "next task": returns the worker's pid."""
    return os.getpid()


def noop(value: int) -> int:
    """The throughput task."""
    return value


def send_pid(conn: Any) -> None:
    """The raw baseline's "next task": send the pid through a ``multiprocessing`` pipe."""
    conn.send(os.getpid())
    conn.close()


# -- pipeline nodes (scenarios 4 and 5) -------------------------------------------------------
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
    _node_signal(ctx)
    end = time.monotonic() + ctx.context["duration"]
    ticks = 0
    while time.monotonic() < end:
        ctx.token.raise_if_cancelled()
        time.sleep(0.001)
        ticks += 1
        if ticks % 20 == 0:
            ctx.store_partial("ticks", ticks)
    return "thread"


def node_wave_process(ctx: Any) -> str:
    """Wave 1, in a process: works for ``duration`` seconds, checking its token."""
    _node_signal(ctx)
    end = time.monotonic() + ctx.context["duration"]
    ticks = 0
    while time.monotonic() < end:
        ctx.token.raise_if_cancelled()
        time.sleep(0.001)
        ticks += 1
        if ticks % 20 == 0:
            ctx.store_partial("ticks", ticks)
    return "process"
