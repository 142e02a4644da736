"""What each system left behind: child processes, threads, ``/dev/shm`` entries.

A snapshot is taken before each cell; what is new afterwards is reported per system,
and leftover processes are killed so that the next cell starts clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_HELPER_MARKERS = ("resource_tracker", "forkserver", "semaphore_tracker")
_FORKED_BY_HELPER = "<forked by a helper> "


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
            if _is_helper(cmd) and proc.ppid() != os.getpid():
                # forked by a helper (the forkserver's children carry its command line):
                # a task's process, not the helper, so counted and killed like any other
                cmd = _FORKED_BY_HELPER + cmd
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
            links = [
                os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")
            ]
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
    if _FORKED_BY_HELPER in cmd:
        return False
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
            leaked = bool(
                entry["processes"] or entry["zombies"] or entry["threads"] or entry["shm"]
            )
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


def final_leftovers(before: Snapshot) -> dict[str, Any]:
    """What is still there after the whole run (after the benchmark's own cleanup)."""
    started = time.monotonic()
    while True:
        threads = [
            t.name for t in threading.enumerate() if t not in before.threads and t.is_alive()
        ]
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
