"""``cancelflow bench``: cancellation latency and overhead, cancelflow and its peers side by side.

Everything runs in one measuring process, one cell after the other, so that ratios between
systems come from the same run on the same machine. Scenarios 1, 2, 3 (process) and 6 run
system by system on one long-lived 1-worker pool each; the others scenario by scenario.

A *sample* starts when the task itself has said that it runs (a line on a FIFO, or for
cancelflow a ``store_partial`` that the pool hands over), followed by a seeded random pause
(0-100 ms, 0-20 ms with ``--quick``) so that no system's polling loop lines up with ours.
Process deaths are timed event-driven by a small watcher *process* (real-time priority
where allowed) blocked in ``poll()`` on a pidfd of each worker and grandchild: a thread of
ours would stamp the time only once it got the GIL back from whichever pool thread holds it.

Fairness: process tasks are sent as ``exec(source, params)`` and the trivial tasks are
builtins, so no system's fresh worker imports a module of ours; and the measuring process
is started as ``python -c`` (see ``_CHILD``), so spawn-based peers do not re-import a main
script that imports cancelflow in every new worker.

Each system is stopped the way its documentation recommends; what it cannot do is a
result ("cannot", with the reason, verified where that is possible), and a system that
cannot be imported is reported as "skipped" with the import error. After every cell the
benchmark looks for what the system left behind (child processes, threads, ``/dev/shm``
entries), reports it per system, and kills leftover processes, so that the next cell
starts clean and nothing outlives the run (``/dev/shm`` entries are reported, never
removed: on a shared machine they may be another program's).

The measuring process makes itself a child subreaper for the run: orphans of a killed
worker (a task's grandchildren) are re-parented to it, so that it can see, report, kill
and reap them; where they go does not change whether a system kills them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import datetime
import functools
import importlib.metadata
import json
import logging
import math
import mmap
import multiprocessing
import multiprocessing.pool
import os
import platform
import random
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
import timeit
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _bench_tasks as tasks

__all__ = ("SYSTEMS", "add_parser", "child_main", "main_full", "measure", "run", "run_bench")

# == what is measured ============================================================================

#: Every system the suite reports on, in table order.
SYSTEMS: tuple[str, ...] = (
    "cancelflow",
    "raw",
    "pebble",
    "loky",
    "concurrent.futures",
    "multiprocessing.Pool",
    "anyio",
    "trio-parallel",
    "asyncio",
)

SYSTEM_TITLES = {
    "cancelflow": "cancelflow",
    "raw": "raw multiprocessing.Process + SIGKILL (the floor)",
    "pebble": "pebble",
    "loky": "loky",
    "concurrent.futures": "concurrent.futures",
    "multiprocessing.Pool": "multiprocessing.Pool",
    "anyio": "anyio",
    "trio-parallel": "trio-parallel",
    "asyncio": "asyncio run_in_executor",
}


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str  # "ms", "tasks/s", "ns", "results"
    higher_is_better: bool = False


@dataclass(frozen=True)
class Variant:
    key: str
    title: str
    metrics: tuple[Metric, ...]


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    variants: tuple[Variant, ...]


_CALLER = Metric("caller_unblocked", "cancel -> caller unblocked", "ms")
_GONE = Metric("worker_gone", "cancel -> worker process gone", "ms")
_NEXT = Metric("next_task", "cancel -> next task ran", "ms")
_GRAND = Metric("grandchild_gone", "cancel -> grandchild gone", "ms")
_RAISES = Metric("caller_raises", "cancel -> caller raises", "ms")
_STOPPED = Metric("task_stopped", "cancel -> task's finally ran", "ms")
_EXC = Metric("exception", "cancel -> exception", "ms")
_KEPT = Metric("partial_kept", "partial results kept", "results", higher_is_better=True)
_ERROR = Metric("caller_error", "crash -> caller gets the error", "ms")
_AGAIN = Metric("pool_runs_again", "crash -> pool ran the next task", "ms")
_TPUT = Metric("throughput", "trivial tasks per second, 2 workers", "tasks/s", higher_is_better=True)
_CHECK = Metric("check_cost", "one check, net of the loop", "ns")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "1",
        "Non-cooperative CPU task in a process (1 worker)",
        (
            Variant("loop", "pure-Python `while True` loop", (_CALLER, _GONE, _NEXT)),
            Variant("c_call", "one long C call (hashlib.pbkdf2_hmac): no signal handler runs", (_CALLER, _GONE, _NEXT)),
        ),
    ),
    Scenario(
        "2",
        "Task that started a grandchild process (`sleep 300`), then loops",
        (Variant("grandchild", "grandchild gone afterwards?", (_CALLER, _GONE, _GRAND)),),
    ),
    Scenario(
        "3",
        "Cooperative task checking its token (or stop flag) in a loop",
        (
            Variant("process", "in a process (peers poll a shared-memory byte)", (_RAISES,)),
            Variant("thread", "in a thread (peers poll a threading.Event)", (_RAISES, _STOPPED)),
        ),
    ),
    Scenario(
        "4",
        "Coroutine on the event loop, interrupt mode",
        (Variant("coroutine", "cancel -> CancelledException (asyncio/anyio: their Cancelled)", (_RAISES,)),),
    ),
    Scenario(
        "5",
        "3-wave pipeline (loop + thread + process nodes) cancelled mid-wave 1",
        (
            Variant("graceful", "graceful: the running wave finishes", (_EXC, _KEPT)),
            Variant("interrupt", "interrupt: running nodes are stopped", (_EXC, _KEPT)),
        ),
    ),
    Scenario(
        "6",
        "Worker crash (1 worker)",
        (
            Variant("exit", "the task calls os._exit(3)", (_ERROR, _AGAIN)),
            Variant("segfault", "the task segfaults (NULL read)", (_ERROR, _AGAIN)),
        ),
    ),
    Scenario(
        "7",
        "Throughput and token-check cost",
        (
            Variant("processes", "batches of 2,000 trivial tasks (400 with --quick), 2 worker processes", (_TPUT,)),
            Variant("threads", "batches of 2,000 trivial tasks (400 with --quick), 2 worker threads", (_TPUT,)),
            Variant("token_check", "cost of one cancellation check", (_CHECK,)),
        ),
    ),
)

# Why a peer is ahead where it is (shown in the headline next to the ratio). Keys are
# (system or "*", "metric/variant" or "metric"); the most specific one wins.
_KILL_PATH = (
    "it SIGKILLs its own child directly; cancelflow's stop goes through its supervisor thread "
    "and freezes and kills the whole process tree (SIGSTOP, /proc scan, SIGKILL, one pidfd per "
    "member) before it releases the caller"
)
_WHY_PEER_FASTER = {
    ("raw", "*"): "the floor: a bare fork and SIGKILL, no pool, nothing to reuse",
    ("raw", "*/thread"): "the floor: a bare thread, an Event and join()",
    ("loky", "caller_unblocked"): (
        "loky fails the future when shutdown(kill_workers=True) is called, before its worker "
        "is dead; cancelflow waits until the worker and its tree are confirmed gone"
    ),
    ("asyncio", "caller_unblocked"): (
        "asyncio only cancels the awaiting task; the worker runs on (it is never stopped)"
    ),
    ("*", "caller_unblocked"): _KILL_PATH,
    ("*", "worker_gone"): (
        "it SIGKILLs its own child directly; cancelflow's stop goes through its supervisor "
        "thread, which first freezes the worker (SIGSTOP) and walks its process tree in /proc"
    ),
    ("*", "caller_raises/process"): (
        "cancelflow's outcome travels worker -> supervisor thread -> caller thread (a thread "
        "hand-off under the GIL); not profiled further"
    ),
    ("anyio", "caller_raises/thread"): (
        "anyio's cancel only flags the scope, read by from_thread.check_cancelled(); cancelflow's "
        "token.cancel() runs Python (child-token propagation, callbacks that settle the future)"
    ),
    ("anyio", "task_stopped/thread"): (
        "anyio's cancel only flags the scope, read by from_thread.check_cancelled(); cancelflow's "
        "token.cancel() runs Python (child-token propagation, callbacks that settle the future)"
    ),
    ("*", "caller_raises/thread"): (
        "Event.set() is one C call; cancelflow's token.cancel() runs Python (child-token "
        "propagation, callbacks that settle the future) while the spinning task holds the GIL"
    ),
    ("*", "task_stopped/thread"): (
        "Event.set() is one C call; cancelflow's token.cancel() runs Python (child-token "
        "propagation, callbacks that settle the future) while the spinning task holds the GIL"
    ),
    ("*", "caller_raises/coroutine"): (
        "a bare Task.cancel()/cancel scope; cancelflow's executor also runs the registry, the "
        "cleanup handlers and the events, and unregisters the run before it raises"
    ),
    ("*", "caller_error"): (
        "cancelflow fails the future once the zygote has reported the worker's exit status "
        "(to name the signal or exit code), one more hop than reading the worker's death"
    ),
    ("multiprocessing.Pool", "throughput/processes"): (
        "apply_async pickles into one shared pipe served by handler threads; cancelflow's "
        "supervisor thread handles every task and result in Python"
    ),
    ("*", "throughput/processes"): "no per-task token, timer or partial-result channel",
    ("*", "throughput/threads"): (
        "every ThreadPool.submit creates a CancellationToken (a shared-memory cell) and takes "
        "the pool's Condition lock, which the worker threads also take: under the GIL that "
        "convoys; ThreadPoolExecutor hands off through a C SimpleQueue"
    ),
}


class Cannot(Exception):
    """The system cannot do what the cell measures; ``str(exc)`` says why."""


# == results =====================================================================================
@dataclass
class Row:
    """One system (one way of using it) in one scenario variant."""

    scenario: str
    variant: str
    system: str
    label: str
    status: str = "ok"  # ok | cannot | skipped | error
    reason: str | None = None
    primary: bool = True  # the row used for ratios when a system has several
    tag: str = ""  # tells apart several rows of one system (shown in the headline)
    samples: dict[str, list[float]] = field(default_factory=dict)
    cannot: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def cannot_all(self, reason: str) -> None:
        self.status, self.reason = "cannot", reason

    def error(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 0.5),
        "p90": percentile(values, 0.9),
        "p99": percentile(values, 0.99),
        "max": max(values),
    }


# == machinery ===================================================================================
@dataclass(frozen=True)
class Signal:
    seq: int
    pid: int
    gpid: int
    t: float


class Beacon:
    """A FIFO the tasks write ``"seq pid gpid t"`` lines to; read event-driven."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "beacon")
        os.mkfifo(self.path, 0o600)
        self.rfd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Our own writer keeps the FIFO from reporting EOF between tasks.
        self.wfd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._buffer = b""
        self._signals: dict[int, list[Signal]] = collections.defaultdict(list)

    def sink(self, key: str, value: Any) -> None:
        """A cancelflow ``partial_sink``: forwards the task's "running" line to the FIFO."""
        if key == "running":
            os.write(self.wfd, value)

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.rfd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            seq, pid, gpid, t = line.split()
            self._signals[int(seq)].append(Signal(int(seq), int(pid), int(gpid), float(t)))

    def _take(self, seq: int, count: int) -> list[Signal] | None:
        got = self._signals.get(seq, [])
        if len(got) >= count:
            del self._signals[seq]
            return got
        return None

    def wait(self, seq: int, timeout: float, count: int = 1) -> list[Signal]:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.rfd, select.POLLIN)
        while True:
            self._drain()
            got = self._take(seq, count)
            if got is not None:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"task {seq} did not signal within {timeout:g}s")
            poller.poll(remaining * 1e3)

    async def wait_async(self, seq: int, timeout: float, count: int = 1) -> list[Signal]:
        import anyio

        with anyio.fail_after(timeout):
            while True:
                self._drain()
                got = self._take(seq, count)
                if got is not None:
                    return got
                await anyio.wait_readable(self.rfd)

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


# The watcher runs in its own small process, so that the moment a pidfd fires is stamped at
# once, not when a thread of ours gets the GIL back from whichever pool thread holds it.
_WATCHER = r"""
import os, select, signal, sys, time
try:  # a real-time priority, so that it runs the moment a pidfd fires (it never spins)
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    realtime = 1
except (AttributeError, OSError):
    realtime = 0
rfd, wfd = sys.stdin.fileno(), sys.stdout.fileno()
os.write(wfd, f"r {realtime}\n".encode())
os.set_blocking(rfd, False)
poller = select.poll()
poller.register(rfd, select.POLLIN)
by_fd, by_pid, buf = {}, {}, b""
def out(text):
    os.write(wfd, text.encode())
while True:
    events = poller.poll()
    now = time.perf_counter()
    for fd, _ in events:
        if fd != rfd:
            pid = by_fd.pop(fd)
            del by_pid[pid]
            poller.unregister(fd)
            os.close(fd)
            out(f"g {pid} {now:.9f}\n")
            continue
        try:
            data = os.read(rfd, 65536)
        except BlockingIOError:
            continue
        if not data:
            sys.exit(0)
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            cmd, pid = line.split()
            pid = int(pid)
            if cmd == b"w":
                if pid not in by_pid:
                    try:
                        pfd = os.pidfd_open(pid)
                    except ProcessLookupError:
                        out(f"g {pid} {time.perf_counter():.9f}\n")
                        out(f"a {pid}\n")
                        continue
                    by_fd[pfd], by_pid[pid] = pid, pfd
                    poller.register(pfd, select.POLLIN)
                out(f"a {pid}\n")
            elif cmd == b"k":
                ok = 0
                if pid in by_pid:
                    try:
                        signal.pidfd_send_signal(by_pid[pid], signal.SIGKILL)
                        ok = 1
                    except OSError:
                        pass
                out(f"k {pid} {ok}\n")
"""


class Watched:
    """A process being watched; ``gone_at`` is the ``perf_counter()`` its pidfd fired at."""

    def __init__(self, watch: PidWatch, pid: int) -> None:
        self.pid = pid
        self._watch = watch

    @property
    def gone_at(self) -> float | None:
        return self._watch.gone.get(self.pid)

    def is_gone(self) -> bool:
        self._watch.pump(0)
        return self.pid in self._watch.gone

    def wait(self, timeout: float) -> bool:
        """Block until the process is gone or ``timeout`` seconds passed; ``True`` if gone."""
        deadline = time.monotonic() + max(0.0, timeout)
        while self.pid not in self._watch.gone:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._watch.pump(remaining)
        return True


class PidWatch:
    """Times process deaths event-driven: a helper process blocked in ``poll()`` on pidfds."""

    def __init__(self) -> None:
        import subprocess

        self._proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _WATCHER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        self._in = self._proc.stdin
        self._out = self._proc.stdout.fileno()
        os.set_blocking(self._out, False)
        self._buffer = b""
        self.realtime = False  # whether the helper got SCHED_FIFO (reported)
        self.gone: dict[int, float] = {}
        self._acks: set[int] = set()
        self._kills: dict[int, bool] = {}

    def _send(self, line: str) -> None:
        self._in.write(line.encode())

    def pump(self, timeout: float) -> None:
        """Read what the helper reported, waiting at most ``timeout`` seconds for it."""
        poller = select.poll()
        poller.register(self._out, select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1e3):
            return
        while True:
            try:
                data = os.read(self._out, 65536)
            except BlockingIOError:
                break
            if not data:
                raise RuntimeError("the pid watcher process died")
            self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            kind, pid, *rest = line.split()
            if kind == b"r":
                self.realtime = pid == b"1"
            elif kind == b"g":
                self.gone[int(pid)] = float(rest[0])
            elif kind == b"a":
                self._acks.add(int(pid))
            elif kind == b"k":
                self._kills[int(pid)] = rest[0] == b"1"

    def watch(self, pid: int) -> Watched:
        """Start watching ``pid`` (which must be alive or just gone); returns once armed."""
        self.gone.pop(pid, None)
        self._acks.discard(pid)
        self._send(f"w {pid}\n")
        deadline = time.monotonic() + 10
        while pid not in self._acks:
            if time.monotonic() > deadline:
                raise TimeoutError("the pid watcher did not answer")
            self.pump(0.1)
        return Watched(self, pid)

    def kill(self, watched: Watched) -> bool:
        """SIGKILL a watched process that is still there; ``True`` if a signal was sent."""
        if watched.is_gone():
            return False
        self._kills.pop(watched.pid, None)
        self._send(f"k {watched.pid}\n")
        deadline = time.monotonic() + 10
        while watched.pid not in self._kills:
            if time.monotonic() > deadline:
                return False
            self.pump(0.1)
        return self._kills.pop(watched.pid)

    def close(self) -> None:
        self._in.close()
        try:
            self._proc.wait(10)
        except Exception:  # noqa: BLE001 - never leave it behind
            self._proc.kill()
            self._proc.wait()
        assert self._proc.stdout is not None
        self._proc.stdout.close()


class Flag:
    """A one-byte shared-memory flag any process can open by path (the peers' stop flag)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "flag")
        with open(self.path, "wb") as file:
            file.write(b"\0")
        with open(self.path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), 1)

    def set(self) -> None:
        self._map[0] = 1

    def clear(self) -> None:
        self._map[0] = 0

    def close(self) -> None:
        self._map.close()


# -- leftovers --------------------------------------------------------------------------------
_HELPER_MARKERS = ("resource_tracker", "forkserver", "semaphore_tracker")


@dataclass
class Snapshot:
    threads: set[threading.Thread]
    children: dict[int, str]
    shm: set[str]
    fds: int


def _children() -> dict[int, str]:
    import psutil

    found: dict[int, str] = {}
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return found
    for proc in procs:
        try:
            cmd = " ".join(proc.cmdline()) or proc.name()
            if proc.status() == psutil.STATUS_ZOMBIE:
                cmd = "<zombie> " + cmd
        except psutil.Error:
            continue
        found[proc.pid] = cmd
    return found


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def _foreign_shm(names: set[str]) -> set[str]:
    """The ``/dev/shm`` entries among ``names`` that a process outside our tree maps or has
    open: on a shared machine they belong to someone else and are neither reported nor
    touched."""
    if not names:
        return set()
    ours = {os.getpid(), *_children()}
    found: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/maps") as file:
                text = file.read()
            links = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        for name in names - found:
            path = f"/dev/shm/{name}"
            if path in text or path in links:
                found.add(name)
    return found


def _held_by_us(names: set[str]) -> set[str]:
    """The ``/dev/shm`` entries among ``names`` that this process or a child maps or holds."""
    found: set[str] = set()
    for pid in (os.getpid(), *_children()):
        try:
            with open(f"/proc/{pid}/maps") as file:
                text = file.read()
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        found |= {n for n in names if f"/dev/shm/{n}" in text or f"/dev/shm/{n}" in links}
    return found


def _unclaimed_shm(before: set[str]) -> list[str]:
    """New ``/dev/shm`` entries that nobody else holds and that stay for half a second
    (other programs' transient semaphores come and go on a shared machine)."""
    candidates = _shm() - before
    candidates -= _foreign_shm(candidates)
    if candidates:
        time.sleep(0.5)
        candidates &= _shm()
        candidates -= _foreign_shm(candidates)
    return sorted(candidates)


def _fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def snapshot() -> Snapshot:
    return Snapshot(set(threading.enumerate()), _children(), _shm(), _fd_count())


def _is_helper(cmd: str) -> bool:
    return any(marker in cmd for marker in _HELPER_MARKERS)


class _Capture(logging.Handler):
    """Keeps what the ``asyncio`` logger says during the run (attributed per system)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:200])


class Leaks:
    """What each system left behind, cell by cell (and then removed by the benchmark)."""

    def __init__(self, patience: float) -> None:
        self.capture = _Capture()
        self.patience = patience
        self.by_system: dict[str, dict[str, Any]] = {}
        #: grandchildren the tasks started: re-parented to us when their worker dies
        self.orphans: set[int] = set()

    def _entry(self, system: str) -> dict[str, Any]:
        return self.by_system.setdefault(
            system,
            {
                "processes": [],
                "zombies": [],
                "orphans_reaped": 0,
                "threads": [],
                "shm": [],
                "shm_unattributed": [],
                "helpers": [],
                "killed_by_benchmark": 0,
                "asyncio_log": [],
                "cells": 0,
            },
        )

    def count_kill(self, system: str, count: int = 1) -> None:
        self._entry(system)["killed_by_benchmark"] += count

    @contextlib.contextmanager
    def track(self, system: str, cell: str) -> Iterator[None]:
        before = snapshot()
        logged = len(self.capture.messages)
        try:
            yield
        finally:
            self._entry(system)["asyncio_log"].extend(self.capture.messages[logged:])
            self._settle(system, cell, before)

    def _settle(self, system: str, cell: str, before: Snapshot) -> None:
        entry = self._entry(system)
        entry["cells"] += 1
        # Processes get ``patience`` to go; threads a moment (some pools keep idle threads
        # for seconds, e.g. trio's thread cache: they are reported, not waited for).
        started = time.monotonic()
        while True:
            threads = [t for t in threading.enumerate() if t not in before.threads and t.is_alive()]
            children = {p: c for p, c in _children().items() if p not in before.children}
            live = {p: c for p, c in children.items() if not _is_helper(c)}
            waited = time.monotonic() - started
            if (not live and (not threads or waited > 0.3)) or waited > self.patience:
                break
            time.sleep(0.02)
        shm = _unclaimed_shm(before.shm)
        held = _held_by_us(set(shm))
        for pid, cmd in children.items():
            item = f"{cell}: pid {pid} {cmd[:120]}"
            if _is_helper(cmd):
                entry["helpers"].append(item)
            elif cmd.startswith("<zombie>"):
                if pid in self.orphans:
                    entry["orphans_reaped"] += 1  # ours to reap, as the subreaper
                else:
                    entry["zombies"].append(item)
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
            else:
                entry["processes"].append(item)
                _kill_and_reap(pid)
        for thread in threads:
            entry["threads"].append(f"{cell}: {thread.name}")
        for name in shm:  # reported, never removed: it could be another program's orphan
            if name in held:
                entry["shm"].append(f"{cell}: /dev/shm/{name} (still held by this process)")
            else:
                entry["shm_unattributed"].append(f"{cell}: /dev/shm/{name}")

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for system, entry in self.by_system.items():
            leaked = bool(entry["processes"] or entry["zombies"] or entry["threads"] or entry["shm"])
            out[system] = {**entry, "leaked": leaked}
        return out


def _kill_and_reap(pid: int) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.kill()
        proc.wait(5)
    except (psutil.Error, psutil.TimeoutExpired):
        pass
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# == the run's settings and shared state ========================================================
@dataclass
class Settings:
    quick: bool = False
    samples: int = 30
    scenarios: tuple[str, ...] = tuple(s.key for s in SCENARIOS)
    systems: tuple[str, ...] = SYSTEMS
    seed: int = 1
    tasks: int = 2000
    check_calls: int = 200_000

    @property
    def max_pause(self) -> float:
        return 0.02 if self.quick else 0.1


BEACON_TIMEOUT = 60.0  # a fresh interpreter on a loaded machine can be slow
CALLER_BOUND = 10.0
GONE_BOUND = 10.0
VERIFY = 0.1  # how long "it runs on" is verified for
NEXT_TIMEOUT = 20.0


class Bench:
    """Shared state of one run: settings, RNG, FIFO, pid watcher, flag, leak tracker."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.dir = tempfile.mkdtemp(prefix="cancelflow-bench-")
        self.beacon = Beacon(self.dir)
        self.flag = Flag(self.dir)
        self.watch = PidWatch()
        self.leaks = Leaks(patience=1.0 if settings.quick else 2.0)
        self._seq = 0
        self.grand_bound = 0.1

    @property
    def samples(self) -> int:
        return self.settings.samples

    def seq(self) -> int:
        self._seq += 1
        return self._seq

    def pause(self) -> float:
        return self.rng.uniform(0.0, self.settings.max_pause)

    def finish_sample(self, system: str, worker: Watched | None, grand: Watched | None = None) -> None:
        """Kill what a sample left running (counted against ``system``); reap the orphaned
        grandchild (re-parented to us, the subreaper). Workers are their pool's to reap."""
        for item in (worker, grand):
            if item is not None and not item.is_gone() and self.watch.kill(item):
                self.leaks.count_kill(system)
                item.wait(GONE_BOUND)
        if grand is not None:
            self.leaks.orphans.add(grand.pid)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(grand.pid, os.WNOHANG)

    def close(self) -> None:
        self.watch.close()
        self.beacon.close()
        self.flag.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _wait_futures(futures: list[Any], timeout: float) -> bool:
    done, _ = concurrent.futures.wait(futures, timeout=timeout)
    return len(done) == len(futures)


def _future_error(future: Any) -> BaseException | None:
    try:
        return future.exception(timeout=0)  # type: ignore[no-any-return]
    except BaseException as exc:  # noqa: BLE001 - CancelledError is the outcome here
        return exc


# == process systems driven from a thread (sync APIs) ===========================================
class SyncProcs:
    """A process pool used through its synchronous API; subclasses wrap one system."""

    system = ""
    label = ""
    coop_label = ""
    tag = ""
    via_sink = False  # cancelflow: the task signals through store_partial
    quiet = False  # a bare Process: a cooperative stop exits 1 instead of raising
    caller_hangs: str | None = None  # why the caller is never released after a stop
    crash_caller_hangs: str | None = None

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def beacon_arg(self) -> str | None:
        return None if self.via_sink else self.bench.beacon.path

    def open(self, workers: int) -> None:
        raise NotImplementedError

    def ensure(self) -> None:
        """Make the pool usable for the next sample (after a stop that broke it)."""

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any, timeout: float) -> bool:
        return _wait_futures([handle], timeout)

    def error(self, handle: Any) -> BaseException | None:
        return _future_error(handle)

    def stop(self, handle: Any, signal_: Signal) -> None:
        raise NotImplementedError

    def next_task(self, timeout: float) -> None:
        raise NotImplementedError

    def throughput(self, n: int) -> None:
        futures = [self.submit(abs, (i,)) for i in range(n)]
        if not _wait_futures(futures, 20):
            raise TimeoutError(f"{sum(not f.done() for f in futures)} of {n} tasks did not finish within 20 s")

    def close(self) -> None:
        raise NotImplementedError


class CancelflowProcs(SyncProcs):
    system = "cancelflow"
    label = "ProcessPool, TaskFuture.cancel() (grace 0 + term grace 0: SIGKILL of the tree at once)"
    coop_label = "ProcessPool, token.cancel(); the task polls check_cancelled()"
    via_sink = True

    def open(self, workers: int) -> None:
        from ._process import ProcessPool

        self.pool = ProcessPool(workers, grace_period=0, term_grace_period=0, name="bench")
        self.pool.wait_ready(60)
        self.pool.submit(os.getpid).result(60)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        if token is None:
            return self.pool.submit_task(fn, args, partial_sink=self.bench.beacon.sink)
        # Cooperative: a long grace period, so that only the task's own check stops it.
        return self.pool.submit_task(
            fn, args, token=token, grace_period=60.0, partial_sink=self.bench.beacon.sink
        )

    def stop(self, handle: Any, signal_: Signal) -> None:
        handle.cancel()

    def next_task(self, timeout: float) -> None:
        self.pool.submit(os.getpid).result(timeout)

    def close(self) -> None:
        _close_process_pool(self.pool)


def _close_process_pool(pool: Any, timeout: float = 10.0) -> None:
    """Shut a cancelflow ``ProcessPool`` down without hanging the benchmark if it is stuck."""
    pool.shutdown(wait=False, cancel_futures=True, cancel_running=True)
    pool._thread.join(timeout)
    if pool._thread.is_alive():
        # Killing the zygote ends its workers and wakes the supervisor (end of file).
        with contextlib.suppress(Exception):
            pool._zygote.kill()
            pool._zygote.wait(5)
        pool._thread.join(timeout)
        raise RuntimeError(f"ProcessPool.shutdown() did not finish within {timeout:g}s (supervisor asleep)")


class PebbleProcs(SyncProcs):
    system = "pebble"
    label = "pebble.ProcessPool, future.cancel()"
    coop_label = "pebble.ProcessPool; the task polls a shared-memory flag"

    def open(self, workers: int) -> None:
        import pebble

        self.pool: Any = pebble.ProcessPool(max_workers=workers)
        self.pool.schedule(os.getpid).result(60)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.pool.schedule(fn, args=args)

    def stop(self, handle: Any, signal_: Signal) -> None:
        handle.cancel()

    def next_task(self, timeout: float) -> None:
        self.pool.schedule(os.getpid).result(timeout)

    def close(self) -> None:
        self.pool.close()
        self.pool.join(30)
        if self.pool.active:
            self.pool.stop()
            self.pool.join(30)


class LokyProcs(SyncProcs):
    system = "loky"
    label = "loky reusable executor, shutdown(kill_workers=True) (no per-task cancel)"
    coop_label = "loky reusable executor; the task polls a shared-memory flag"

    def open(self, workers: int) -> None:
        import loky

        self.workers = workers
        self.ex = loky.get_reusable_executor(max_workers=workers)
        self.ex.submit(os.getpid).result(60)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.ex.submit(fn, *args)

    def stop(self, handle: Any, signal_: Signal) -> None:
        self.shut = True
        self.ex.shutdown(wait=False, kill_workers=True)

    def ensure(self) -> None:
        if getattr(self, "shut", False):
            self.next_task(NEXT_TIMEOUT)

    def next_task(self, timeout: float) -> None:
        import loky

        self.ex = loky.get_reusable_executor(max_workers=self.workers)
        self.shut = False
        self.ex.submit(os.getpid).result(timeout)

    def close(self) -> None:
        self.ex.shutdown(wait=True, kill_workers=True)


class CfProcs(SyncProcs):
    system = "concurrent.futures"
    label = "ProcessPoolExecutor, future.cancel()"
    coop_label = "ProcessPoolExecutor; the task polls a shared-memory flag"

    def open(self, workers: int) -> None:
        self.workers = workers
        self.ex = concurrent.futures.ProcessPoolExecutor(max_workers=workers)
        self.ex.submit(os.getpid).result(60)
        self.broken = False

    def ensure(self) -> None:
        if self.broken:
            self.ex.shutdown(wait=True)
            self.open(self.workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.ex.submit(fn, *args)

    def stop(self, handle: Any, signal_: Signal) -> None:
        if not handle.cancel():
            self.broken = True  # the benchmark will kill the worker
            raise Cannot(
                "Future.cancel() returns False for a running call; the task runs on "
                "(Python 3.14 adds pool-wide terminate_workers() only)"
            )

    def next_task(self, timeout: float) -> None:
        self.broken = True
        raise Cannot("the executor is broken (BrokenProcessPool): a new executor is needed")

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class CfKillProcs(CfProcs):
    label = "ProcessPoolExecutor + SIGKILL of the worker by hand (not a documented cancel)"
    tag = "worker killed by hand"

    def stop(self, handle: Any, signal_: Signal) -> None:
        self.broken = True
        os.kill(signal_.pid, signal.SIGKILL)


class _ApplyAsync:
    """submit / wait / error for the multiprocessing pools (process and thread), whose
    handles are ``AsyncResult``s."""

    pool: Any

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.pool.apply_async(fn, args)

    def wait(self, handle: Any, timeout: float) -> bool:
        handle.wait(timeout)
        return bool(handle.ready())

    def error(self, handle: Any) -> BaseException | None:
        try:
            handle.get(0)
        except BaseException as exc:  # noqa: BLE001 - the outcome being measured
            return exc
        return None


class MpPoolProcs(_ApplyAsync, SyncProcs):
    system = "multiprocessing.Pool"
    label = "multiprocessing.Pool, terminate() (no per-task cancel)"
    coop_label = "multiprocessing.Pool.apply_async; the task polls a shared-memory flag"
    caller_hangs = "AsyncResult.get() never returns after terminate() (verified)"
    crash_caller_hangs = "AsyncResult.get() never returns when its worker dies (verified)"

    def open(self, workers: int) -> None:
        self.workers = workers
        self.pool = multiprocessing.Pool(workers)
        self.pool.apply(os.getpid)
        self.terminated = False

    def ensure(self) -> None:
        if self.terminated:
            self.pool.join()
            self.open(self.workers)

    def stop(self, handle: Any, signal_: Signal) -> None:
        self.terminated = True
        self.pool.terminate()

    def next_task(self, timeout: float) -> None:
        if self.terminated:
            raise Cannot("terminate() ends the pool: a new Pool is needed")
        self.pool.apply_async(os.getpid).get(timeout)

    def throughput(self, n: int) -> None:
        results = [self.pool.apply_async(abs, (i,)) for i in range(n)]
        for result in results:
            result.get(20)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class RawProcs(SyncProcs):
    system = "raw"
    label = "multiprocessing.Process (fork) per task, Process.kill() + join()"
    coop_label = "multiprocessing.Process (fork) per task; polls a shared-memory flag; join()"
    quiet = True

    def open(self, workers: int) -> None:
        self.ctx = multiprocessing.get_context("fork")

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        process = self.ctx.Process(target=fn, args=args, daemon=True)
        process.start()
        return process

    def wait(self, handle: Any, timeout: float) -> bool:
        handle.join(timeout)
        return handle.exitcode is not None

    def error(self, handle: Any) -> BaseException | None:
        code = handle.exitcode
        return None if code == 0 else RuntimeError(f"exit code {code}")

    def stop(self, handle: Any, signal_: Signal) -> None:
        handle.kill()

    def next_task(self, timeout: float) -> None:
        parent, child = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=tasks.send_pid, args=(child,), daemon=True)
        process.start()
        child.close()
        try:
            if not parent.poll(timeout):
                raise TimeoutError("the new process did not answer")
            parent.recv()
        finally:
            parent.close()
            process.join(timeout)

    def throughput(self, n: int) -> None:
        raise Cannot("no pool: one new process per task")

    def close(self) -> None:
        pass


# == process systems driven from an event loop (anyio harness) =================================
class AsyncProcs:
    """A process pool used from an event loop; every sample runs under anyio."""

    system = ""
    label = ""
    tag = ""
    coop_label = ""
    backend = "asyncio"
    kills_worker = True  # False: cancelling the awaiting task leaves the worker running

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    async def open(self, workers: int) -> None:
        raise NotImplementedError

    async def ensure(self) -> None:
        pass

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    async def next_task(self) -> None:
        await self.call(os.getpid)

    async def throughput(self, n: int) -> None:
        import anyio

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(self.call, abs, i)

    async def close(self) -> None:
        pass


class AnyioProcs(AsyncProcs):
    system = "anyio"
    label = "anyio.to_process.run_sync(cancellable=True), cancel scope"
    coop_label = "anyio.to_process.run_sync; the task polls a shared-memory flag"

    async def open(self, workers: int) -> None:
        import anyio

        self.limiter = anyio.CapacityLimiter(workers)
        await self.call(os.getpid)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        from anyio import to_process

        return await to_process.run_sync(fn, *args, cancellable=True, limiter=self.limiter)


class TrioParallelProcs(AsyncProcs):
    system = "trio-parallel"
    label = "trio_parallel run_sync(kill_on_cancel=True), cancel scope (spawn workers)"
    coop_label = "trio_parallel run_sync; the task polls a shared-memory flag"
    backend = "trio"

    async def open(self, workers: int) -> None:
        import trio
        import trio_parallel

        self.limiter = trio.CapacityLimiter(workers)
        self._cm = trio_parallel.open_worker_context()
        self.ctx = await self._cm.__aenter__()
        await self.call(os.getpid)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.ctx.run_sync(fn, *args, kill_on_cancel=True, limiter=self.limiter)

    async def close(self) -> None:
        await self._cm.__aexit__(None, None, None)


class AsyncioProcs(AsyncProcs):
    system = "asyncio"
    label = "loop.run_in_executor(ProcessPoolExecutor), Task.cancel()"
    coop_label = "loop.run_in_executor(ProcessPoolExecutor); the task polls a shared-memory flag"
    kills_worker = False

    async def open(self, workers: int) -> None:
        self.workers = workers
        self.ex = concurrent.futures.ProcessPoolExecutor(max_workers=workers)
        self.broken = False
        await self.call(os.getpid)

    async def ensure(self) -> None:
        if self.broken:
            self.ex.shutdown(wait=True, cancel_futures=True)
            await self.open(self.workers)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.ex, fn, *args)

    async def next_task(self) -> None:
        raise Cannot(
            "the only worker still runs the cancelled task (it never ends): the next task "
            "queues behind it"
        )

    async def throughput(self, n: int) -> None:
        await asyncio.gather(*(self.call(abs, i) for i in range(n)))

    async def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


_SYNC_PROCS: dict[str, list[type[SyncProcs]]] = {
    "cancelflow": [CancelflowProcs],
    "raw": [RawProcs],
    "pebble": [PebbleProcs],
    "loky": [LokyProcs],
    "concurrent.futures": [CfProcs, CfKillProcs],
    "multiprocessing.Pool": [MpPoolProcs],
}
_ASYNC_PROCS: dict[str, type[AsyncProcs]] = {
    "anyio": AnyioProcs,
    "trio-parallel": TrioParallelProcs,
    "asyncio": AsyncioProcs,
}


def _anyio_run(fn: Callable[[], Awaitable[None]], backend: str) -> None:
    import anyio

    anyio.run(fn, backend=backend)


# == scenarios 1 and 2: stop a non-cooperative task ============================================
def _record_stop(
    bench: Bench,
    row: Row,
    system: str,
    t0: float,
    t1: float,
    released: bool,
    caller_hangs: str | None,
    worker: Watched,
    grand: Watched | None,
    kills_worker: bool = True,
) -> None:
    if released:
        row.add("caller_unblocked", (t1 - t0) * 1e3)
    elif caller_hangs:
        row.cannot["caller_unblocked"] = caller_hangs
    else:
        row.error(f"caller not released within {CALLER_BOUND:g}s")
    if not kills_worker:
        if worker.wait(VERIFY):
            row.error("the worker died although the system does not stop it")
        else:
            row.cannot["worker_gone"] = (
                "the worker runs on: cancelling the awaiting task does not stop it "
                f"(verified: still running {VERIFY * 1e3:.0f} ms later)"
            )
            bench.finish_sample(system, worker)
    elif worker.wait(GONE_BOUND - (time.perf_counter() - t0)):
        assert worker.gone_at is not None
        row.add("worker_gone", (worker.gone_at - t0) * 1e3)
    else:
        row.error(f"worker still alive {GONE_BOUND:g}s after the cancel")
    if grand is not None:
        base = max(t1, worker.gone_at or t1)
        if grand.wait(base + bench.grand_bound - time.perf_counter()):
            assert grand.gone_at is not None
            row.add("grandchild_gone", (grand.gone_at - t0) * 1e3)
        else:
            row.extra["grandchild_left_alive"] = row.extra.get("grandchild_left_alive", 0) + 1


def _finish_grand_row(bench: Bench, row: Row, variant: str) -> None:
    if variant != "grandchild" or row.status != "ok":
        return
    left = row.extra.get("grandchild_left_alive", 0)
    total = left + len(row.samples.get("grandchild_gone", []))
    row.extra["grandchild_left_alive"] = f"{left}/{total}"
    if left and not row.samples.get("grandchild_gone"):
        row.cannot["grandchild_gone"] = (
            f"never: left alive in {left}/{total} samples "
            f"(still running {bench.grand_bound * 1e3:.0f} ms after the worker died; killed by the benchmark)"
        )
    elif left:
        row.notes.append(f"grandchild left alive in {left}/{total} samples")


def kill_sync(bench: Bench, procs: SyncProcs, variant: str, row: Row) -> None:
    """Scenarios 1 and 2 on an open pool: stop a running non-cooperative task."""
    caller_verified = False
    for _ in range(bench.samples):
        procs.ensure()
        seq = bench.seq()
        handle = procs.submit(*tasks.process_task("spin", procs.beacon_arg(), seq, kind=variant))
        sig = bench.beacon.wait(seq, BEACON_TIMEOUT)[0]
        worker = bench.watch.watch(sig.pid)
        grand = bench.watch.watch(sig.gpid) if sig.gpid else None
        time.sleep(bench.pause())
        t0 = time.perf_counter()
        try:
            procs.stop(handle, sig)
        except Cannot as exc:
            alive = not worker.wait(VERIFY)
            row.cannot_all(f"{exc}" + (f" (verified: still running {VERIFY * 1e3:.0f} ms later)" if alive else ""))
            bench.finish_sample(procs.system, worker, grand)
            return
        bound = CALLER_BOUND
        if procs.caller_hangs:  # verified once with a bound, then only checked
            bound, caller_verified = (0.0 if caller_verified else VERIFY), True
            worker.wait(GONE_BOUND)
        released = procs.wait(handle, bound)
        t1 = time.perf_counter()
        _record_stop(bench, row, procs.system, t0, t1, released, procs.caller_hangs, worker, grand)
        if variant != "grandchild":
            try:
                procs.next_task(NEXT_TIMEOUT)
                row.add("next_task", (time.perf_counter() - t0) * 1e3)
            except Cannot as exc:
                row.cannot["next_task"] = str(exc)
        bench.finish_sample(procs.system, worker, grand)
    _finish_grand_row(bench, row, variant)


async def kill_async(bench: Bench, procs: AsyncProcs, variant: str, row: Row) -> None:
    """Scenarios 1 and 2 on an open pool, from an event loop: cancel the awaiting scope."""
    import anyio

    for _ in range(bench.samples):
        await procs.ensure()
        seq = bench.seq()
        scope = anyio.CancelScope()
        done = anyio.Event()
        ended: list[float] = []

        async def runner(scope: anyio.CancelScope = scope, done: anyio.Event = done, ended: list[float] = ended, seq: int = seq) -> None:
            try:
                with scope:
                    fn, args = tasks.process_task("spin", bench.beacon.path, seq, kind=variant)
                    await procs.call(fn, *args)
            except Exception as exc:  # noqa: BLE001 - recorded as an error of the row
                row.error(f"call raised {exc!r}")
            finally:
                ended.append(time.perf_counter())
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            sig = (await bench.beacon.wait_async(seq, BEACON_TIMEOUT))[0]
            worker = bench.watch.watch(sig.pid)
            grand = bench.watch.watch(sig.gpid) if sig.gpid else None
            await anyio.sleep(bench.pause())
            t0 = time.perf_counter()
            scope.cancel()
            with anyio.move_on_after(CALLER_BOUND):
                await done.wait()
            released = done.is_set()
            t1 = ended[0] if released else time.perf_counter()
            if not released:
                tg.cancel_scope.cancel()
        _record_stop(bench, row, procs.system, t0, t1, released, None, worker, grand, procs.kills_worker)
        if not procs.kills_worker:
            procs.broken = True  # type: ignore[attr-defined]
        if variant != "grandchild":
            try:
                await procs.next_task()
                row.add("next_task", (time.perf_counter() - t0) * 1e3)
            except Cannot as exc:
                row.cannot["next_task"] = str(exc)
        bench.finish_sample(procs.system, worker, grand)
    _finish_grand_row(bench, row, variant)


# == scenario 3: cooperative task ===============================================================
def coop_process_sync(bench: Bench, procs: SyncProcs, variant: str, row: Row) -> None:
    """Scenario 3 in a process, on an open pool: cancelflow's token, the peers' flag."""
    from ._token import CancellationToken

    for _ in range(bench.samples):
        procs.ensure()
        seq = bench.seq()
        token: CancellationToken | None = None
        if procs.via_sink:
            token = CancellationToken(name=f"bench-{seq}")
            handle = procs.submit(*tasks.process_task("coop_token", None, seq), token=token)
        else:
            bench.flag.clear()
            handle = procs.submit(
                *tasks.process_task(
                    "coop_flag", procs.beacon_arg(), seq, flag_path=bench.flag.path, quiet=procs.quiet
                )
            )
        bench.beacon.wait(seq, BEACON_TIMEOUT)
        time.sleep(bench.pause())
        t0 = time.perf_counter()
        if token is not None:
            token.cancel("bench")
        else:
            bench.flag.set()
        released = procs.wait(handle, CALLER_BOUND)
        t1 = time.perf_counter()
        if not released:
            row.error("caller not released")
            continue
        error = procs.error(handle)
        if error is None:
            row.error("the task returned instead of raising")
        row.extra.setdefault("raised", type(error).__name__)
        row.add("caller_raises", (t1 - t0) * 1e3)


async def coop_process_async(bench: Bench, procs: AsyncProcs, variant: str, row: Row) -> None:
    """Scenario 3 in a process, from an event loop: the task polls the flag."""
    import anyio

    for _ in range(bench.samples):
        await procs.ensure()
        seq = bench.seq()
        bench.flag.clear()
        result: list[BaseException] = []
        ended: list[float] = []

        async def runner(seq: int = seq, result: list[BaseException] = result, ended: list[float] = ended) -> None:
            try:
                fn, args = tasks.process_task("coop_flag", bench.beacon.path, seq, flag_path=bench.flag.path)
                await procs.call(fn, *args)
            except Exception as exc:  # noqa: BLE001 - the outcome being measured
                result.append(exc)
            finally:
                ended.append(time.perf_counter())

        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            await bench.beacon.wait_async(seq, BEACON_TIMEOUT)
            await anyio.sleep(bench.pause())
            t0 = time.perf_counter()
            bench.flag.set()
        if not result:
            row.error("the task returned instead of raising")
        else:
            row.extra.setdefault("raised", type(result[0]).__name__)
        row.add("caller_raises", (ended[0] - t0) * 1e3)


# == scenario 6: worker crash ===================================================================
def crash_sync(bench: Bench, procs: SyncProcs, how: str, row: Row) -> None:
    """Scenario 6 on an open pool: the task kills its own worker."""
    caller_verified = False
    for _ in range(bench.samples):
        procs.ensure()
        seq = bench.seq()
        handle = procs.submit(
            *tasks.process_task("crash", procs.beacon_arg(), seq, how=how, pause=bench.pause())
        )
        sig = bench.beacon.wait(seq, BEACON_TIMEOUT)[0]
        worker = bench.watch.watch(sig.pid)
        if procs.crash_caller_hangs:
            if not worker.wait(GONE_BOUND):
                row.error("the worker did not die")
                continue
            try:
                procs.next_task(NEXT_TIMEOUT)
                row.add("pool_runs_again", (time.perf_counter() - sig.t) * 1e3)
            except Cannot as exc:
                row.cannot["pool_runs_again"] = str(exc)
            if procs.wait(handle, 0.0 if caller_verified else VERIFY):
                row.error("the caller was released after all")
            else:
                row.cannot["caller_error"] = procs.crash_caller_hangs
            caller_verified = True
            continue
        released = procs.wait(handle, CALLER_BOUND)
        t1 = time.perf_counter()
        if not released:
            row.error("caller not released")
            bench.finish_sample(procs.system, worker)
            continue
        row.extra.setdefault("error", repr(procs.error(handle))[:160])
        row.add("caller_error", (t1 - sig.t) * 1e3)
        try:
            procs.next_task(NEXT_TIMEOUT)
            row.add("pool_runs_again", (time.perf_counter() - sig.t) * 1e3)
        except Cannot as exc:
            row.cannot["pool_runs_again"] = str(exc)
        bench.finish_sample(procs.system, worker)


async def crash_async(bench: Bench, procs: AsyncProcs, how: str, row: Row) -> None:
    """Scenario 6 from an event loop."""
    for _ in range(bench.samples):
        await procs.ensure()
        seq = bench.seq()
        try:
            fn, args = tasks.process_task("crash", bench.beacon.path, seq, how=how, pause=bench.pause())
            await procs.call(fn, *args)
            row.error("the crashing task returned")
        except Exception as exc:  # noqa: BLE001 - the outcome being measured
            row.extra.setdefault("error", repr(exc)[:160])
        t1 = time.perf_counter()
        sig = (await bench.beacon.wait_async(seq, BEACON_TIMEOUT))[0]
        row.add("caller_error", (t1 - sig.t) * 1e3)
        if isinstance(procs, AsyncioProcs):
            procs.broken = True
            row.cannot["pool_runs_again"] = (
                "the executor is broken (BrokenProcessPool): a new executor is needed"
            )
            continue
        await procs.next_task()
        row.add("pool_runs_again", (time.perf_counter() - sig.t) * 1e3)


# == scenarios 1, 2, 3 (process) and 6 share one 1-worker pool per system ======================
_GROUP = (("1", "loop"), ("1", "c_call"), ("2", "grandchild"), ("3", "process"), ("6", "exit"), ("6", "segfault"))
_SYNC_FILL: dict[str, Callable[[Bench, SyncProcs, str, Row], None]] = {
    "1": kill_sync,
    "2": kill_sync,
    "3": coop_process_sync,
    "6": crash_sync,
}
_ASYNC_FILL: dict[str, Callable[[Bench, AsyncProcs, str, Row], Awaitable[None]]] = {
    "1": kill_async,
    "2": kill_async,
    "3": coop_process_async,
    "6": crash_async,
}


def _group_rows(bench: Bench, system: str, cells: list[tuple[str, str]]) -> list[tuple[Row, int]]:
    """The rows of the pool group for ``system``, each with the index of its adapter."""
    out: list[tuple[Row, int]] = []
    classes: list[type[SyncProcs | AsyncProcs]] = (
        list(_SYNC_PROCS[system]) if system in _SYNC_PROCS else [_ASYNC_PROCS[system]]
    )
    for key, variant in cells:
        for index, cls in enumerate(classes):
            if index and key in ("3", "6"):
                continue  # the second way of using an executor only differs in how it stops
            label = cls.coop_label if key == "3" else cls.label.split(",")[0] if key == "6" else cls.label
            row = Row(key, variant, system, label, primary=index == 0, tag=cls.tag)
            out.append((row, index))
    return out


def run_pool_group(bench: Bench, system: str, cells: list[tuple[str, str]]) -> list[Row]:
    """Run every cell of the group for one system on one long-lived 1-worker pool."""
    planned = _group_rows(bench, system, cells)

    def run_one(row: Row, fill: Callable[[], None]) -> bool:
        started = time.perf_counter()
        ok = True
        try:
            fill()
        except Exception as exc:  # noqa: BLE001 - a failing cell is reported, the run goes on
            row.error(f"{type(exc).__name__}: {exc}")
            ok = False
        _progress(f"  [{row.scenario + '/' + row.variant:<18}] {system:<20} {time.perf_counter() - started:6.1f}s  {_brief(row)}")
        return ok

    with bench.leaks.track(system, "scenarios 1, 2, 3/process, 6"):
        if system in _SYNC_PROCS:
            adapters = [cls(bench) for cls in _SYNC_PROCS[system]]
            opened: set[int] = set()
            try:
                for row, index in planned:
                    procs = adapters[index]
                    if index not in opened:
                        procs.open(1)
                        opened.add(index)
                    if not run_one(row, functools.partial(_SYNC_FILL[row.scenario], bench, procs, row.variant, row)):
                        opened.discard(index)  # it may be wedged: the next cell gets a fresh pool
                        try:
                            procs.close()
                        except Exception as exc:  # noqa: BLE001 - reported on the row
                            row.error(f"closing the pool: {exc}")
            finally:
                for index in opened:
                    with contextlib.suppress(Exception):
                        adapters[index].close()
        else:
            aprocs = _ASYNC_PROCS[system](bench)

            async def main() -> None:
                await aprocs.open(1)
                try:
                    for row, _ in planned:
                        started = time.perf_counter()
                        try:
                            await _ASYNC_FILL[row.scenario](bench, aprocs, row.variant, row)
                        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                            row.error(f"{type(exc).__name__}: {exc}")
                            await aprocs.close()  # it may be wedged: continue on a fresh pool
                            await aprocs.open(1)
                        _progress(
                            f"  [{row.scenario + '/' + row.variant:<18}] {system:<20} "
                            f"{time.perf_counter() - started:6.1f}s  {_brief(row)}"
                        )
                finally:
                    await aprocs.close()

            _anyio_run(main, aprocs.backend)
    return [row for row, _ in planned]


class SyncThreads:
    """A thread pool used through its synchronous API."""

    system = ""
    label = ""
    uses_token = False

    def open(self, workers: int) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any, timeout: float) -> bool:
        return _wait_futures([handle], timeout)

    def error(self, handle: Any) -> BaseException | None:
        return _future_error(handle)

    def throughput(self, n: int) -> None:
        futures = [self.submit(abs, (i,)) for i in range(n)]
        if not _wait_futures(futures, 20):
            raise TimeoutError(f"{sum(not f.done() for f in futures)} of {n} tasks did not finish within 20 s")

    def close(self) -> None:
        raise NotImplementedError


class CancelflowThreads(SyncThreads):
    system = "cancelflow"
    label = "ThreadPool, token.cancel(); the task polls check_cancelled()"
    uses_token = True

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def open(self, workers: int) -> None:
        from ._thread_pool import ThreadPool

        self.pool = ThreadPool(workers, name="bench")

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.pool.submit_task(fn, args, token=token, partial_sink=self.bench.beacon.sink)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)


class CfThreads(SyncThreads):
    system = "concurrent.futures"
    label = "ThreadPoolExecutor; the task polls a threading.Event"

    def open(self, workers: int) -> None:
        self.ex = concurrent.futures.ThreadPoolExecutor(max_workers=workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.ex.submit(fn, *args)

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class PebbleThreads(SyncThreads):
    system = "pebble"
    label = "pebble.ThreadPool; the task polls a threading.Event"

    def open(self, workers: int) -> None:
        import pebble

        self.pool: Any = pebble.ThreadPool(max_workers=workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        return self.pool.schedule(fn, args=args)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class MpThreads(_ApplyAsync, SyncThreads):
    system = "multiprocessing.Pool"
    label = "multiprocessing.pool.ThreadPool; the task polls a threading.Event"

    def open(self, workers: int) -> None:
        self.pool = multiprocessing.pool.ThreadPool(workers)

    def throughput(self, n: int) -> None:
        results = [self.pool.apply_async(abs, (i,)) for i in range(n)]
        for result in results:
            result.get(20)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class RawThreads(SyncThreads):
    system = "raw"
    label = "threading.Thread per task; polls a threading.Event; join()"

    def open(self, workers: int) -> None:
        pass

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...], token: Any = None) -> Any:
        errors: list[BaseException] = []

        def target() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors.append(exc)

        thread = threading.Thread(target=target, name="bench-raw-thread")
        thread.start()
        return (thread, errors)

    def wait(self, handle: Any, timeout: float) -> bool:
        handle[0].join(timeout)
        return not handle[0].is_alive()

    def error(self, handle: Any) -> BaseException | None:
        errors: list[BaseException] = handle[1]
        return errors[0] if errors else None

    def throughput(self, n: int) -> None:
        raise Cannot("no pool: one new thread per task")

    def close(self) -> None:
        pass


_SYNC_THREADS: dict[str, type[SyncThreads]] = {
    "concurrent.futures": CfThreads,
    "pebble": PebbleThreads,
    "multiprocessing.Pool": MpThreads,
    "raw": RawThreads,
}


def coop_thread_sync(bench: Bench, threads: SyncThreads, row: Row) -> None:
    from ._token import CancellationToken

    threads.open(1)
    try:
        for _ in range(bench.samples):
            seq = bench.seq()
            record: dict[str, float] = {}
            event = threading.Event()
            token: CancellationToken | None = None
            if threads.uses_token:
                token = CancellationToken(name=f"bench-{seq}")
                handle = threads.submit(tasks.coop_token, (None, seq, record), token=token)
            else:
                handle = threads.submit(tasks.coop_event, (bench.beacon.path, seq, event, record))
            bench.beacon.wait(seq, BEACON_TIMEOUT)
            time.sleep(bench.pause())
            t0 = time.perf_counter()
            if token is not None:
                token.cancel("bench")
            else:
                event.set()
            released = threads.wait(handle, CALLER_BOUND)
            t1 = time.perf_counter()
            if not released:
                row.error("caller not released")
                event.set()
                continue
            error = threads.error(handle)
            if error is None:
                row.error("the task returned instead of raising")
            row.extra.setdefault("raised", type(error).__name__)
            row.add("caller_raises", (t1 - t0) * 1e3)
            deadline = time.monotonic() + CALLER_BOUND
            while "stopped" not in record and time.monotonic() < deadline:
                time.sleep(0.001)  # the thread may still be unwinding (cancelflow releases at once)
            if "stopped" in record:
                row.add("task_stopped", (record["stopped"] - t0) * 1e3)
            else:
                row.error("the task did not stop")
    finally:
        threads.close()


def coop_thread_async(bench: Bench, system: str, row: Row) -> None:
    import anyio

    async def cell() -> None:
        tpe = concurrent.futures.ThreadPoolExecutor(max_workers=1) if system == "asyncio" else None
        limiter = anyio.CapacityLimiter(1)
        try:
            for _ in range(bench.samples):
                seq = bench.seq()
                record: dict[str, float] = {}
                event = threading.Event()
                scope = anyio.CancelScope()
                raised: list[BaseException] = []
                ended: list[float] = []

                async def runner(
                    seq: int = seq,
                    record: dict[str, float] = record,
                    event: threading.Event = event,
                    scope: anyio.CancelScope = scope,
                    raised: list[BaseException] = raised,
                    ended: list[float] = ended,
                ) -> None:
                    try:
                        with scope:
                            if tpe is not None:
                                await asyncio.get_running_loop().run_in_executor(
                                    tpe, tasks.coop_event, bench.beacon.path, seq, event, record
                                )
                            else:
                                await anyio.to_thread.run_sync(
                                    tasks.coop_anyio_thread, bench.beacon.path, seq, record, limiter=limiter
                                )
                    except Exception as exc:  # noqa: BLE001 - the outcome being measured
                        raised.append(exc)
                    finally:
                        ended.append(time.perf_counter())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(runner)
                    await bench.beacon.wait_async(seq, BEACON_TIMEOUT)
                    await anyio.sleep(bench.pause())
                    t0 = time.perf_counter()
                    if tpe is not None:
                        event.set()
                    else:
                        scope.cancel()
                row.extra.setdefault("raised", type(raised[0]).__name__ if raised else "Cancelled")
                row.add("caller_raises", (ended[0] - t0) * 1e3)
                deadline = time.monotonic() + CALLER_BOUND
                while "stopped" not in record and time.monotonic() < deadline:  # noqa: ASYNC110 - set by a worker thread
                    await anyio.sleep(0.001)
                if "stopped" in record:
                    row.add("task_stopped", (record["stopped"] - t0) * 1e3)
                else:
                    row.error("the task did not stop")
        finally:
            if tpe is not None:
                tpe.shutdown(wait=True)

    _anyio_run(cell, "asyncio")


# == scenario 4: a coroutine, interrupt mode ====================================================
async def _wait_for_ever(started: asyncio.Event) -> None:
    started.set()
    await asyncio.sleep(tasks.SAFETY_SECONDS)


async def _node_wait(ctx: Any) -> None:
    await _wait_for_ever(ctx.context["started"])


def coroutine_cell(bench: Bench, system: str, row: Row) -> None:
    async def cell() -> None:
        executor: Any = None
        if system == "cancelflow":
            from ._executor import PipelineExecutor

            executor = PipelineExecutor()
        try:
            for _ in range(bench.samples):
                seq = bench.seq()
                started = asyncio.Event()
                t0 = 0.0
                if system == "cancelflow":
                    from ._exceptions import CancelledException
                    from ._node import Node
                    from ._token import CancellationToken

                    token = CancellationToken(name=f"bench-{seq}")
                    task = asyncio.ensure_future(
                        executor.execute_pipeline(
                            f"bench-{seq}",
                            [Node("wait", _node_wait, run_in="loop")],
                            {"started": started},
                            mode="interrupt",
                            cancel_token=token,
                        )
                    )
                    await started.wait()
                    await asyncio.sleep(bench.pause())
                    t0 = time.perf_counter()
                    token.cancel("bench")
                    try:
                        await task
                        row.error("the pipeline completed")
                    except CancelledException as exc:
                        row.extra.setdefault("raised", type(exc).__name__)
                elif system == "asyncio":
                    task = asyncio.ensure_future(_wait_for_ever(started))
                    await started.wait()
                    await asyncio.sleep(bench.pause())
                    t0 = time.perf_counter()
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        row.extra.setdefault("raised", "CancelledError")
                else:  # anyio
                    import anyio

                    scope = anyio.CancelScope()

                    async def victim(scope: anyio.CancelScope = scope, started: asyncio.Event = started) -> None:
                        with scope:
                            await _wait_for_ever(started)

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(victim)
                        await started.wait()
                        await anyio.sleep(bench.pause())
                        t0 = time.perf_counter()
                        scope.cancel()
                    row.extra.setdefault("raised", "Cancelled (caught by its scope)")
                row.add("caller_raises", (time.perf_counter() - t0) * 1e3)
        finally:
            if executor is not None:
                await asyncio.wait_for(executor.aclose(), 60)

    _anyio_run(cell, "asyncio")


# == scenario 5: a 3-wave pipeline =============================================================
def pipeline_cell(bench: Bench, mode: str, row: Row) -> None:
    from ._exceptions import CancelledException
    from ._executor import PipelineExecutor
    from ._node import Node
    from ._token import CancellationToken

    duration = 0.1 if bench.settings.quick else 0.2
    nodes = [
        Node("first", tasks.node_first, run_in="thread"),
        Node("loop", tasks.node_wave_loop, deps=["first"], run_in="loop"),
        Node("thread", tasks.node_wave_thread, deps=["first"], run_in="thread"),
        Node("process", tasks.node_wave_process, deps=["first"], run_in="process"),
        Node("last", tasks.node_last, deps=["loop", "thread", "process"], run_in="thread"),
    ]
    row.extra["duration_s"] = duration

    async def cell() -> None:
        executor = PipelineExecutor()
        try:
            for _ in range(bench.samples):
                seq = bench.seq()
                token = CancellationToken(name=f"bench-{seq}")
                context = {"beacon": bench.beacon.path, "seq": seq, "duration": duration}
                task = asyncio.ensure_future(
                    executor.execute_pipeline(
                        f"bench-{seq}", nodes, context, mode=mode, cancel_token=token  # type: ignore[arg-type]
                    )
                )
                signalled = asyncio.ensure_future(bench.beacon.wait_async(seq, BEACON_TIMEOUT, count=3))
                await asyncio.wait({signalled, task}, return_when=asyncio.FIRST_COMPLETED)
                if not signalled.done():
                    signalled.cancel()
                    try:
                        await task
                        row.error("the pipeline completed before its nodes signalled")
                    except Exception as exc:  # noqa: BLE001 - reported as the row's error
                        row.error(f"the pipeline ended before wave 1 ran: {exc!r}"[:300])
                    continue
                await asyncio.sleep(bench.rng.uniform(0.0, min(bench.settings.max_pause, duration / 2)))
                t0 = time.perf_counter()
                token.cancel("bench")
                try:
                    await asyncio.wait_for(task, 30)
                    row.error("the pipeline completed")
                    continue
                except CancelledException as exc:
                    t1 = time.perf_counter()
                    kept = sorted(exc.partial_results)
                    row.add("exception", (t1 - t0) * 1e3)
                    row.add("partial_kept", float(len(kept)))
                    row.extra["partial_results_last"] = kept
                    row.extra["wave_num_last"] = exc.wave_num
        finally:
            await asyncio.wait_for(executor.aclose(), 60)

    _anyio_run(cell, "asyncio")


# == scenario 7: throughput and check cost ======================================================
def throughput_sync(bench: Bench, pool: SyncProcs | SyncThreads, row: Row) -> None:
    pool.open(2)
    try:
        pool.throughput(50)  # warm every worker
        for _ in range(bench.samples):
            t0 = time.perf_counter()
            pool.throughput(bench.settings.tasks)
            row.add("throughput", bench.settings.tasks / (time.perf_counter() - t0))
    finally:
        pool.close()


def throughput_async(bench: Bench, system: str, variant: str, row: Row) -> None:
    import anyio

    async def cell() -> None:
        n = bench.settings.tasks
        if variant == "processes":
            procs = _ASYNC_PROCS[system](bench)
            await procs.open(2)
            try:
                await procs.throughput(50)
                for _ in range(bench.samples):
                    t0 = time.perf_counter()
                    await procs.throughput(n)
                    row.add("throughput", n / (time.perf_counter() - t0))
            finally:
                await procs.close()
            return
        if system == "asyncio":
            tpe = concurrent.futures.ThreadPoolExecutor(max_workers=2)
            loop = asyncio.get_running_loop()
            try:
                for rep in range(bench.samples + 1):
                    t0 = time.perf_counter()
                    await asyncio.gather(*(loop.run_in_executor(tpe, abs, i) for i in range(n)))
                    if rep:
                        row.add("throughput", n / (time.perf_counter() - t0))
            finally:
                tpe.shutdown(wait=True)
            return
        limiter = anyio.CapacityLimiter(2)
        for rep in range(bench.samples + 1):
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(functools.partial(anyio.to_thread.run_sync, abs, i, limiter=limiter))
            if rep:
                row.add("throughput", n / (time.perf_counter() - t0))

    _anyio_run(cell, "trio" if system == "trio-parallel" else "asyncio")


def _net_ns(stmt: str, namespace: dict[str, Any], calls: int) -> float:
    timed = timeit.Timer(stmt, globals=namespace).timeit(calls)
    empty = timeit.Timer("pass").timeit(calls)
    return max(0.0, (timed - empty) / calls * 1e9)


def check_cost_cell(bench: Bench, system: str, row: Row, which: str = "") -> None:
    calls = bench.settings.check_calls
    if system == "cancelflow":
        from ._context import check_cancelled, task_scope
        from ._token import CancellationToken

        token = CancellationToken(name="bench-check")
        with task_scope(token):
            for _ in range(bench.samples):
                if which == "check_cancelled":
                    row.add("check_cost", _net_ns("check()", {"check": check_cancelled}, calls))
                else:
                    row.add("check_cost", _net_ns("token.is_cancelled", {"token": token}, calls))
        token.close()
        return
    if system == "concurrent.futures":
        event = threading.Event()
        for _ in range(bench.samples):
            row.add("check_cost", _net_ns("is_set()", {"is_set": event.is_set}, calls))
        return
    if system == "multiprocessing.Pool":
        mp_event = multiprocessing.get_context("fork").Event()
        for _ in range(bench.samples):
            row.add("check_cost", _net_ns("is_set()", {"is_set": mp_event.is_set}, calls))
        del mp_event
        return
    # anyio: from_thread.check_cancelled() inside a to_thread worker.

    def in_worker() -> list[float]:
        from anyio.from_thread import check_cancelled

        return [_net_ns("check()", {"check": check_cancelled}, calls) for _ in range(bench.samples)]

    async def cell() -> None:
        import anyio

        for value in await anyio.to_thread.run_sync(in_worker):
            row.add("check_cost", value)

    _anyio_run(cell, "asyncio")


# == the plan: which rows each cell produces ===================================================
def _availability() -> dict[str, str | None]:
    """``None`` if the system can be imported, else why not."""
    needs = {
        "pebble": ("pebble",),
        "loky": ("loky",),
        "anyio": ("anyio",),
        "trio-parallel": ("trio", "trio_parallel", "anyio"),
        "asyncio": ("anyio",),  # the harness of every event-loop peer
    }
    out: dict[str, str | None] = {}
    for system in SYSTEMS:
        out[system] = None
        for module in needs.get(system, ()):
            try:
                __import__(module)
            except Exception as exc:  # noqa: BLE001 - any import failure is a skip reason
                out[system] = f"cannot import {module}: {exc!r}"
                break
    return out


_NO_COROUTINES = "runs no coroutines (a process/thread pool for sync callables)"
_NO_PIPELINE = "no pipeline executor: waves, a graceful mode and kept partial results are not offered"
_NO_TOKEN = "no cancellation token a task can check"


def _cells(bench: Bench, scenario: Scenario, variant: Variant, system: str) -> list[tuple[Row, Callable[[], None] | None]]:
    """The rows of one cell, each with the callable that fills it (``None``: already final)."""
    key, v = scenario.key, variant.key

    def row(label: str, primary: bool = True) -> Row:
        return Row(key, v, system, label, primary=primary)

    def cannot(reason: str, label: str = "") -> list[tuple[Row, Callable[[], None] | None]]:
        r = row(label or SYSTEM_TITLES[system])
        r.cannot_all(reason)
        return [(r, None)]

    if key == "3":
        if system == "cancelflow":
            threads: SyncThreads = CancelflowThreads(bench)
        elif system in _SYNC_THREADS:
            threads = _SYNC_THREADS[system]()
        elif system == "anyio":
            r = row("anyio.to_thread.run_sync, cancel scope; the task polls from_thread.check_cancelled()")
            return [(r, functools.partial(coop_thread_async, bench, system, r))]
        elif system == "asyncio":
            r = row("loop.run_in_executor(ThreadPoolExecutor); the task polls a threading.Event")
            return [(r, functools.partial(coop_thread_async, bench, system, r))]
        else:
            return cannot(f"{system} runs tasks in processes only")
        r = row(threads.label)
        return [(r, functools.partial(coop_thread_sync, bench, threads, r))]
    if key == "4":
        if system == "cancelflow":
            r = row("PipelineExecutor, mode='interrupt', token.cancel() -> CancelledException")
        elif system == "asyncio":
            r = row("Task.cancel() -> CancelledError")
        elif system == "anyio":
            r = row("CancelScope.cancel() (asyncio backend)")
        else:
            return cannot(_NO_COROUTINES)
        return [(r, functools.partial(coroutine_cell, bench, system, r))]
    if key == "5":
        if system != "cancelflow":
            return cannot(_NO_PIPELINE)
        r = row(f"PipelineExecutor, mode={v!r}, token.cancel()")
        return [(r, functools.partial(pipeline_cell, bench, v, r))]
    # scenario 7
    if v == "processes":
        if system == "raw":
            return cannot("no pool: one new process per task")
        if system in _SYNC_PROCS:
            procs = _SYNC_PROCS[system][0](bench)
            r = row(procs.label.split(",")[0])
            return [(r, functools.partial(throughput_sync, bench, procs, r))]
        r = row(_ASYNC_PROCS[system].label.split(",")[0].split(" run_sync")[0])
        return [(r, functools.partial(throughput_async, bench, system, v, r))]
    if v == "threads":
        if system == "cancelflow":
            t = CancelflowThreads(bench)
            r = row("ThreadPool.submit")
            return [(r, functools.partial(throughput_sync, bench, t, r))]
        if system in _SYNC_THREADS and system != "raw":
            t2 = _SYNC_THREADS[system]()
            r = row(t2.label.split(";")[0])
            return [(r, functools.partial(throughput_sync, bench, t2, r))]
        if system == "anyio":
            r = row("anyio.to_thread.run_sync")
            return [(r, functools.partial(throughput_async, bench, system, v, r))]
        if system == "asyncio":
            r = row("loop.run_in_executor(ThreadPoolExecutor)")
            return [(r, functools.partial(throughput_async, bench, system, v, r))]
        if system == "raw":
            return cannot("no pool: one new thread per task")
        return cannot(f"{system} runs tasks in processes only")
    # token_check
    if system == "cancelflow":
        r1 = row("CancellationToken.is_cancelled")
        r2 = row("check_cancelled() inside a task", primary=False)
        r2.tag = "check_cancelled()"
        return [
            (r1, functools.partial(check_cost_cell, bench, system, r1)),
            (r2, functools.partial(check_cost_cell, bench, system, r2, "check_cancelled")),
        ]
    if system == "concurrent.futures":
        r = row("threading.Event.is_set() (what a ThreadPoolExecutor task can poll)")
    elif system == "multiprocessing.Pool":
        r = row("multiprocessing.Event.is_set() (what a Pool task can poll)")
    elif system == "anyio":
        r = row("anyio.from_thread.check_cancelled() in a to_thread worker")
    else:
        return cannot(_NO_TOKEN)
    return [(r, functools.partial(check_cost_cell, bench, system, r))]


# == the run ====================================================================================
def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("cancelflow", "pebble", "loky", "anyio", "trio", "trio-parallel", "psutil", "matplotlib"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _machine() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg_start": list(os.getloadavg()),
    }


def run_bench(settings: Settings) -> dict[str, Any]:
    """Run the suite; return everything (settings, machine, rows, leaks) as a JSON-able dict."""
    from loguru import logger

    from ._platform import set_child_subreaper

    started = time.perf_counter()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = _machine()
    available = _availability()
    logger.disable("cancelflow")
    subreaper = set_child_subreaper(True)
    before_run = snapshot()
    bench = Bench(settings)
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(bench.leaks.capture)
    asyncio_logger.propagate = False
    rows: list[Row] = []
    watcher_realtime = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            group = [cell for cell in _GROUP if cell[0] in settings.scenarios]
            if group:  # system by system, each on one long-lived pool
                for system in SYSTEMS:
                    reason = _skip_reason(settings, available, system)
                    if reason is not None:
                        rows.extend(_skipped(scn, var, system, reason) for scn, var in group)
                    else:
                        rows.extend(run_pool_group(bench, system, group))
            for scenario in SCENARIOS:
                if scenario.key not in settings.scenarios:
                    continue
                for variant in scenario.variants:
                    if (scenario.key, variant.key) in _GROUP:
                        continue
                    for system in SYSTEMS:
                        rows.extend(_run_cell(bench, scenario, variant, system, available))
        watcher_realtime = bench.watch.realtime
    finally:
        bench.close()
        logger.enable("cancelflow")
        asyncio_logger.removeHandler(bench.leaks.capture)
        asyncio_logger.propagate = True
    leftovers = _final_leftovers(before_run)
    if subreaper:
        set_child_subreaper(False)
    machine["loadavg_end"] = list(os.getloadavg())
    return {
        "date": date,
        "mode": "quick" if settings.quick else "full",
        "settings": {
            "samples": settings.samples,
            "max_pause_ms": settings.max_pause * 1e3,
            "seed": settings.seed,
            "tasks": settings.tasks,
            "check_calls": settings.check_calls,
            "scenarios": list(settings.scenarios),
            "systems": list(settings.systems),
        },
        "machine": machine,
        "watcher_realtime": watcher_realtime,
        "versions": _versions(),
        "runtime_s": time.perf_counter() - started,
        "scenarios": [
            {
                "key": s.key,
                "title": s.title,
                "variants": [
                    {
                        "key": v.key,
                        "title": v.title,
                        "metrics": [
                            {"key": m.key, "title": m.title, "unit": m.unit, "higher_is_better": m.higher_is_better}
                            for m in v.metrics
                        ],
                    }
                    for v in s.variants
                ],
            }
            for s in SCENARIOS
            if s.key in settings.scenarios
        ],
        "systems": list(SYSTEMS),
        "rows": [_row_json(r) for r in rows],
        "leaks": bench.leaks.as_json(),
        "leftovers_after_run": leftovers,
    }


def _run_cell(
    bench: Bench, scenario: Scenario, variant: Variant, system: str, available: dict[str, str | None]
) -> list[Row]:
    name = f"{scenario.key}/{variant.key}"
    reason = _skip_reason(bench.settings, available, system)
    if reason is not None:
        return [_skipped(scenario.key, variant.key, system, reason)]
    try:
        plan = _cells(bench, scenario, variant, system)
    except ImportError as exc:
        r = Row(scenario.key, variant.key, system, SYSTEM_TITLES[system], status="skipped")
        r.reason = f"cannot import: {exc}"
        return [r]
    out: list[Row] = []
    for row, fill in plan:
        out.append(row)
        if fill is None:
            continue
        started = time.perf_counter()
        try:
            with bench.leaks.track(system, f"{name} {row.label[:40]}"):
                fill()
        except ImportError as exc:
            row.status, row.reason = "skipped", f"cannot import: {exc}"
        except Exception as exc:  # noqa: BLE001 - a failing cell is reported, the run goes on
            row.error(f"{type(exc).__name__}: {exc}")
        _progress(f"  [{name:<18}] {system:<20} {time.perf_counter() - started:6.1f}s  {_brief(row)}")
    return out


def _skip_reason(settings: Settings, available: dict[str, str | None], system: str) -> str | None:
    if system not in settings.systems:
        return "not selected (--systems)"
    return available[system]


def _skipped(scenario: str, variant: str, system: str, reason: str) -> Row:
    return Row(scenario, variant, system, SYSTEM_TITLES[system], status="skipped", reason=reason)


def _brief(row: Row) -> str:
    if row.status != "ok":
        return f"{row.status}: {row.reason}"
    parts = [f"{k} p50 {percentile(v, 0.5):.3g}" for k, v in row.samples.items() if v]
    if row.errors:
        parts.append(f"errors: {row.errors[0]}")
    return ", ".join(parts)


def _row_json(row: Row) -> dict[str, Any]:
    variant = next(v for s in SCENARIOS if s.key == row.scenario for v in s.variants if v.key == row.variant)
    metrics: dict[str, Any] = {}
    status, reason = row.status, row.reason
    if status == "ok":
        for metric in variant.metrics:
            values = row.samples.get(metric.key)
            if values:
                metrics[metric.key] = {"unit": metric.unit, "samples": values, **summarize(values)}
                if metric.key in row.cannot:
                    metrics[metric.key]["note"] = row.cannot[metric.key]
            elif metric.key in row.cannot:
                metrics[metric.key] = {"unit": metric.unit, "cannot": row.cannot[metric.key]}
            elif metric.key == "task_stopped" and row.system == "cancelflow" and row.scenario == "3":
                metrics[metric.key] = {"unit": metric.unit, "error": "no samples"}
            else:
                metrics[metric.key] = {"unit": metric.unit, "error": "no samples"}
        if row.errors:
            status = "error"
            reason = "; ".join(row.errors[:3])
        elif any("error" in m for m in metrics.values()):
            status, reason = "error", "a metric has no samples"
    return {
        "scenario": row.scenario,
        "variant": row.variant,
        "system": row.system,
        "label": row.label,
        "primary": row.primary,
        "tag": row.tag,
        "status": status,
        "reason": reason,
        "metrics": metrics,
        "notes": row.notes,
        "errors": row.errors,
        "extra": row.extra,
    }


def _final_leftovers(before: Snapshot) -> dict[str, Any]:
    """What is still there after the whole run (after the benchmark's own cleanup)."""
    started = time.monotonic()
    while True:
        threads = [t.name for t in threading.enumerate() if t not in before.threads and t.is_alive()]
        children = {p: c for p, c in _children().items() if p not in before.children}
        live = {p: c for p, c in children.items() if not _is_helper(c)}
        waited = time.monotonic() - started
        if (not live and (not threads or waited > 0.5)) or waited > 5:
            break
        time.sleep(0.05)
    return {
        "threads": threads,
        "processes": [f"pid {p} {c[:120]}" for p, c in live.items()],
        "helpers": [f"pid {p} {c[:120]}" for p, c in children.items() if _is_helper(c)],
        "shm": _unclaimed_shm(before.shm),
        "helpers_note": (
            "interpreter-lifetime helpers (multiprocessing/loky resource trackers) exit with "
            "this process; they are not counted as leaks"
        ),
    }


# == the report =================================================================================
def _fmt(value: float, unit: str) -> str:
    if unit == "tasks/s":
        return f"{value:,.0f}"
    if unit == "results":
        return f"{value:.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.3g}"


def headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """cancelflow p50 / peer p50 for every metric both measured, in the same run."""
    out: list[dict[str, Any]] = []
    rows = data["rows"]
    for scenario in data["scenarios"]:
        for variant in scenario["variants"]:
            here = [r for r in rows if r["scenario"] == scenario["key"] and r["variant"] == variant["key"]]
            ours = next((r for r in here if r["system"] == "cancelflow" and r["primary"]), None)
            if ours is None:
                continue
            for metric in variant["metrics"]:
                mine = ours["metrics"].get(metric["key"], {})
                if "p50" not in mine or mine["p50"] <= 0:
                    continue
                for peer in here:
                    if peer["system"] == "cancelflow":
                        continue
                    theirs = peer["metrics"].get(metric["key"], {})
                    if "p50" not in theirs or theirs["p50"] <= 0:
                        continue
                    ratio = mine["p50"] / theirs["p50"]
                    better = ratio > 1 if metric["higher_is_better"] else ratio < 1
                    out.append(
                        {
                            "scenario": scenario["key"],
                            "variant": variant["key"],
                            "metric": metric["key"],
                            "metric_title": metric["title"],
                            "unit": metric["unit"],
                            "peer": peer["system"] + (f" ({peer['tag']})" if peer["tag"] else ""),
                            "peer_label": peer["label"],
                            "cancelflow_p50": mine["p50"],
                            "peer_p50": theirs["p50"],
                            "ratio": ratio,
                            "faster": "cancelflow" if better else ("tie" if ratio == 1 else "peer"),
                            "close": 0.8 <= ratio <= 1.25,
                            "why": "" if better else _why(peer["system"], metric["key"], variant["key"]),
                        }
                    )
    return out


def _why(system: str, metric: str, variant: str) -> str:
    for key in (
        (system, f"{metric}/{variant}"),
        (system, metric),
        (system, f"*/{variant}"),
        (system, "*"),
        ("*", f"{metric}/{variant}"),
        ("*", metric),
    ):
        if key in _WHY_PEER_FASTER:
            return _WHY_PEER_FASTER[key]
    return ""


def format_report(data: dict[str, Any]) -> str:
    lines: list[str] = []
    m = data["machine"]
    v = data["versions"]
    s = data["settings"]
    lines.append(f"cancelflow bench ({data['mode']} run) - {data['date']}")
    lines.append(
        f"machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable) {m['cpu_model']}; {m['platform']}; "
        f"{m['python']}; load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end"
    )
    lines.append("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    lines.append(
        f"samples per cell: {s['samples']}; random pause after the task signalled: 0-{s['max_pause_ms']:.0f} ms "
        f"(seed {s['seed']}); runtime {data['runtime_s']:.0f} s"
    )
    lines.append("times in ms from the cancel (or the crash) unless stated; p50/p90/p99/max over n samples")
    lines.append(
        "process deaths are stamped by a separate pidfd watcher process"
        + (" (SCHED_FIFO)" if data.get("watcher_realtime") else " (normal priority: may lag on a loaded machine)")
    )
    for scenario in data["scenarios"]:
        for variant in scenario["variants"]:
            lines.append("")
            lines.append(f"## {scenario['key']}. {scenario['title']} - {variant['title']}")
            units = {mt["key"]: mt for mt in variant["metrics"]}
            lines.append(f"   {'system / metric':<43} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'n':>4}")
            for row in data["rows"]:
                if row["scenario"] != scenario["key"] or row["variant"] != variant["key"]:
                    continue
                lines.append(f"   {row['system']}: {row['label']}")
                if row["status"] in ("cannot", "skipped") or (row["status"] == "error" and not row["metrics"]):
                    lines.append(f"      {row['status']}: {row['reason']}")
                    continue
                for key, cell in row["metrics"].items():
                    title = f"{units[key]['title']} ({units[key]['unit']})"
                    if "cannot" in cell:
                        lines.append(f"      {title:<40} cannot: {cell['cannot']}")
                    elif "error" in cell:
                        lines.append(f"      {title:<40} ERROR: {cell['error']}")
                    else:
                        unit = cell["unit"]
                        lines.append(
                            f"      {title:<40} {_fmt(cell['p50'], unit):>8} {_fmt(cell['p90'], unit):>8} "
                            f"{_fmt(cell['p99'], unit):>8} {_fmt(cell['max'], unit):>8} {cell['n']:>4}"
                        )
                extras = {k: val for k, val in row["extra"].items() if k in ("grandchild_left_alive", "raised", "error")}
                if extras:
                    lines.append("      " + "; ".join(f"{k}: {val}" for k, val in extras.items()))
                for note in row["notes"]:
                    lines.append(f"      note: {note}")
                if row["status"] == "error":
                    lines.append(f"      ERROR: {row['reason']}")
    heads = headline(data)
    lines.append("")
    lines.append("## Headline: cancelflow p50 / peer p50, same run")
    lines.append(
        "   (latency: below 1 = cancelflow faster; throughput: above 1 = cancelflow faster; "
        "(~) = within 25%, about the noise of this shared machine)"
    )
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for item in heads:
        groups[(item["scenario"], item["variant"], item["metric_title"])].append(item)
    for (scn, var, title), items in groups.items():
        parts = [
            f"{it['peer']} {_ratio_text(it['ratio'])}"
            + (" (peer faster)" if it["faster"] == "peer" and not it["close"] else "")
            + (" (~)" if it["close"] else "")
            for it in items
        ]
        lines.append(f"   {scn} {var:<11} {title:<36} " + ", ".join(parts))
    lines.append("")
    lines.append("## Where a peer is faster (p50)")
    slower = [it for it in heads if it["faster"] == "peer"]
    if not slower:
        lines.append("   nowhere")
    for close in (False, True):
        group = [it for it in slower if it["close"] == close]
        if close and group:
            lines.append("   within 25% (about the noise here):")
        for it in group:
            unit = it["unit"]
            lines.append(
                f"   {it['scenario']} {it['variant']}, {it['metric_title']}: {it['peer']} "
                f"{_fmt(it['peer_p50'], unit)} vs cancelflow {_fmt(it['cancelflow_p50'], unit)} {unit}"
                + (f" (cancelflow {it['ratio'] if unit != 'tasks/s' else 1 / it['ratio']:.2g}x slower)" if not close else "")
                + (f" - {it['why']}" if it["why"] and not close else "")
            )
    lines.append("")
    lines.append("## Leftovers per system (found after each cell, then removed by the benchmark)")
    for system in data["systems"]:
        entry = data["leaks"].get(system)
        if entry is None:
            lines.append(f"   {system:<22} not run")
            continue
        found = []
        for key in ("processes", "zombies", "threads", "shm"):
            if entry[key]:
                found.append(f"{len(entry[key])} {key} (e.g. {entry[key][0]})")
        if entry["killed_by_benchmark"]:
            found.append(
                f"{entry['killed_by_benchmark']} processes it left running (workers it cannot stop, "
                "grandchildren) were killed by the benchmark"
            )
        if entry["shm_unattributed"]:
            found.append(
                f"{len(entry['shm_unattributed'])} /dev/shm entries appeared that nobody holds "
                "(owner unknown: on this shared machine, likely another program's)"
            )
        if entry["asyncio_log"]:
            found.append(f"{len(entry['asyncio_log'])} asyncio log warnings (e.g. {entry['asyncio_log'][0]!r})")
        if entry["orphans_reaped"]:
            found.append(f"{entry['orphans_reaped']} orphaned grandchildren reaped by the benchmark")
        if entry["helpers"]:
            found.append(f"helpers started: {len(entry['helpers'])} (interpreter-lifetime)")
        lines.append(f"   {system:<22} " + ("; ".join(found) if found else "nothing left"))
    left = data["leftovers_after_run"]
    lines.append(
        "   after the run: "
        + (
            "nothing left"
            if not (left["threads"] or left["processes"] or left["shm"])
            else f"threads {left['threads']}, processes {left['processes']}, shm {left['shm']}"
        )
        + (f" (helpers living until exit: {len(left['helpers'])})" if left["helpers"] else "")
    )
    return "\n".join(lines)


def write_plot(data: dict[str, Any], path: str) -> str:
    """Write the latency distributions as PNG; return a line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib not installed"
    panels: list[tuple[str, str, list[tuple[str, list[float]]]]] = []
    for scenario in data["scenarios"]:
        for variant in scenario["variants"]:
            for metric in variant["metrics"]:
                series = [
                    (r["system"] + ("" if r["primary"] else " (2)"), r["metrics"][metric["key"]]["samples"])
                    for r in data["rows"]
                    if r["scenario"] == scenario["key"]
                    and r["variant"] == variant["key"]
                    and "samples" in r["metrics"].get(metric["key"], {})
                ]
                if series:
                    panels.append(
                        (f"{scenario['key']} {variant['key']}: {metric['title']}", metric["unit"], series)
                    )
    if not panels:
        return "plot skipped: no samples"
    cols = 3
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 0.45 * 9 * rows_n + 1), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, unit, series) in zip(axes.flat, panels, strict=False):
        labels = [name for name, _ in series]
        ax.boxplot([vals for _, vals in series], vert=False, showfliers=True)
        ax.set_yticks(range(1, len(labels) + 1), labels)
        for y, (_, vals) in enumerate(series, start=1):
            ax.scatter(vals, [y] * len(vals), s=6, alpha=0.4)
        if unit in ("ms", "ns") and all(min(vals) > 0 for _, vals in series):
            ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(unit)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"cancelflow bench ({data['mode']}), {data['date']}, {data['machine']['python']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plot written to {path}"


# == the command ================================================================================
def add_parser(sub: Any) -> None:
    """Register ``cancelflow bench`` on the CLI's subparsers."""
    parser = sub.add_parser(
        "bench",
        help="measure cancellation latency and overhead against the peers",
        description=(
            "Measure cancelflow and its peers (pebble, loky, concurrent.futures, "
            "multiprocessing, anyio, trio-parallel, asyncio, a raw fork+SIGKILL floor) on "
            "the same work in one run; print p50/p90/p99/max per cell and cancelflow/peer ratios."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="a handful of samples per cell (well under a minute)")
    parser.add_argument("--samples", type=int, default=None, metavar="N", help="samples per cell (default 30, quick 3)")
    parser.add_argument("--json", metavar="PATH", help="write every raw sample and the leak report as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write the latency distributions as PNG (needs matplotlib)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=[s.key for s in SCENARIOS],
        metavar="N",
        help="only these scenarios (1-7)",
    )
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), metavar="NAME", help="only these systems")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random pauses (default 1)")
    parser.set_defaults(run=run)


def settings_from(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    samples = args.samples if args.samples is not None else (3 if quick else 30)
    if samples < 1:
        raise SystemExit("--samples must be >= 1")
    return Settings(
        quick=quick,
        samples=samples,
        scenarios=tuple(args.scenarios) if args.scenarios else tuple(s.key for s in SCENARIOS),
        systems=tuple(args.systems) if args.systems else SYSTEMS,
        seed=args.seed,
        tasks=400 if quick else 2000,
        check_calls=20_000 if quick else 200_000,
    )


# The measuring process is started as ``python -c``: its ``__main__`` then has no file, so
# the workers of spawn-based peers (loky, anyio, trio-parallel), which re-import the
# parent's main module, do not import a script that imports cancelflow (~250 ms each).
_CHILD = "import sys; from cancelflow._bench import child_main; sys.exit(child_main(sys.argv[1:]))"


def _argv(args: argparse.Namespace) -> list[str]:
    argv: list[str] = []
    if args.quick:
        argv.append("--quick")
    if args.samples is not None:
        argv += ["--samples", str(args.samples)]
    if args.json:
        argv += ["--json", os.path.abspath(args.json)]
    if args.plot:
        argv += ["--plot", os.path.abspath(args.plot)]
    if args.scenarios:
        argv += ["--scenarios", *args.scenarios]
    if args.systems:
        argv += ["--systems", *args.systems]
    argv += ["--seed", str(args.seed)]
    return argv


def run(args: argparse.Namespace) -> int:
    """Run ``cancelflow bench`` (in a fresh ``python -c`` process, see ``_CHILD``)."""
    import subprocess

    settings_from(args)  # reject bad options here
    try:
        return subprocess.call([sys.executable, "-c", _CHILD, *_argv(args)])
    except KeyboardInterrupt:
        return 130


def child_main(argv: list[str]) -> int:
    """The measuring process: parse the options again and run the suite here."""
    parser = argparse.ArgumentParser(prog="cancelflow bench")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    return measure(parser.parse_args(["bench", *argv]))


def measure(args: argparse.Namespace) -> int:
    """Run the suite in this process; exit code 1 if a cell failed (a "cannot" is a result)."""
    settings = settings_from(args)
    _progress(
        f"cancelflow bench: {'quick' if settings.quick else 'full'} run, {settings.samples} samples per cell"
    )
    data = run_bench(settings)
    data["headline"] = headline(data)
    print(format_report(data))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(data, file, indent=1)
        print(f"\nraw samples written to {args.json}")
    if args.plot:
        print(write_plot(data, args.plot))
    failed = [r for r in data["rows"] if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} cells failed: " + ", ".join(f"{r['scenario']}/{r['variant']} {r['system']}" for r in failed))
    return 1 if failed else 0


def main_full(argv: list[str] | None = None) -> int:
    """``python -m benchmarks``: the full suite, writing JSON and PNG next to the cwd by default."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="cancelflow's full benchmark suite")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    if args.json is None:
        args.json = "bench-results.json"
    if args.plot is None:
        args.plot = "bench-results.png"
    code: int = args.run(args)
    return code
