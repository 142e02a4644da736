"""The final check: is any process or thread that the demo started still there? And the
two process checks the story makes while it runs (``remember``, ``alive``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from typing import Any

import psutil


def remember(seen: dict[int, psutil.Process], pid: int) -> None:
    if pid not in seen:
        with contextlib.suppress(psutil.Error):
            seen[pid] = psutil.Process(pid)


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting to be reaped does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def leftovers(
    seen: Mapping[int, psutil.Process],
    seen_threads: set[threading.Thread],
    threads_before: set[threading.Thread],
    patience: float = 5.0,
    ignore_threads: tuple[str, ...] = (),
    ignore_pids: frozenset[int] = frozenset(),
) -> tuple[list[dict[str, Any]], list[str], int, int]:
    """What the demo started and is still there, after waiting at most ``patience`` s.

    Returns the processes and threads left, and how many of each were checked. Threads
    whose name starts with one of ``ignore_threads``, and the processes ``ignore_pids``
    (children that existed before the demo started), are not the demo's: not counted.
    """
    me = psutil.Process()
    seen = dict(seen)
    with contextlib.suppress(psutil.Error):
        for child in me.children(recursive=True):
            if child.pid not in ignore_pids:
                seen.setdefault(child.pid, child)
    deadline = time.monotonic() + patience

    def running_procs() -> list[psutil.Process]:
        out = []
        for proc in seen.values():
            try:
                if proc.is_running() and (
                    proc.status() != psutil.STATUS_ZOMBIE or proc.ppid() == me.pid
                ):
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def ours(thread: threading.Thread) -> bool:
        return thread not in threads_before and not thread.name.startswith(ignore_threads)

    def new_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if ours(t) and t.is_alive()]

    started_threads = {t for t in seen_threads if ours(t)} | {
        t for t in threading.enumerate() if ours(t)
    }
    while True:
        procs, threads = running_procs(), new_threads()
        remaining = deadline - time.monotonic()
        if (not procs and not threads) or remaining <= 0:
            break
        if procs:
            psutil.wait_procs(procs, timeout=min(remaining, 0.5))
        for thread in threads:
            thread.join(timeout=max(0.0, min(deadline - time.monotonic(), 0.5)))
    left_procs = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            left_procs.append({"pid": proc.pid, "cmdline": " ".join(proc.cmdline())[:120]})
    return left_procs, [t.name for t in threads], len(seen), len(started_threads)
