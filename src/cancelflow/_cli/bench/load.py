"""Background CPU load: how much CPU *other* processes used while a fill ran.

Around each fill (one system, one cell, one round) the machine's busy CPU time
(``psutil.cpu_times()``: all but idle, iowait and steal) and the CPU time of our own process
tree (this process, the pid watcher, every pool's workers and their children, with the
times of the children they reaped) are read before and after; what the machine spent
beyond our tree, divided by the wall time, is the background load in CPUs (1.0 = one
core busy with other programs' work the whole time). ``/proc/stat`` ticks at 10 ms, so a
short fill's figure is coarse; the one-minute load average is kept next to it.

A cell is *noisy* when the background during one of its rounds exceeded
``NOISY_BACKGROUND`` CPUs, or when its rounds' p50s differ by more than ``NOISY_SPREAD``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

#: Background load (CPUs, averaged over a round) above which a cell is flagged noisy.
NOISY_BACKGROUND = 0.5
#: Largest / smallest per-round p50 of a metric above which a cell is flagged noisy.
NOISY_SPREAD = 2.0
#: Rounds with fewer samples than this are not compared (their p50 is one sample's luck).
MIN_ROUND_SAMPLES = 3


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every CPU, every process)."""
    import psutil

    t = psutil.cpu_times()
    return float(sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq")))


def tree_cpu() -> float:
    """CPU seconds of this process and every live descendant, with what they reaped."""
    import psutil

    total = 0.0
    try:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
    except psutil.Error:
        return total
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


class LoadMeter:
    """Measures the background load around a fill (``measure``); the two readers can be
    replaced (tests inject a load)."""

    def __init__(
        self,
        busy: Callable[[], float] = machine_busy,
        ours: Callable[[], float] = tree_cpu,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.busy, self.ours, self.clock = busy, ours, clock

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, Any]]:
        """Yields a dict filled on exit: ``wall_s``, ``background_cpu`` and ``own_cpu``
        (CPUs, averaged over the wall time) and ``loadavg1`` (at the end)."""
        out: dict[str, Any] = {}
        busy0, ours0, t0 = self.busy(), self.ours(), self.clock()
        try:
            yield out
        finally:
            wall = max(1e-9, self.clock() - t0)
            busy, ours = self.busy() - busy0, self.ours() - ours0
            out["wall_s"] = wall
            out["own_cpu"] = max(0.0, ours) / wall
            out["background_cpu"] = max(0.0, busy - ours) / wall
            try:
                out["loadavg1"] = os.getloadavg()[0]
            except OSError:
                out["loadavg1"] = None


def noisy_reasons(rounds: list[dict[str, Any]]) -> list[str]:
    """Why a row's cell is noisy (empty: it is not). ``rounds``: the row's rounds, each
    with ``background_cpu`` and ``p50`` (metric -> p50 of that round's samples) and ``n``."""
    why: list[str] = []
    loads = [r["background_cpu"] for r in rounds if r.get("background_cpu") is not None]
    if loads and max(loads) > NOISY_BACKGROUND:
        why.append(f"background load {max(loads):.2f} CPUs in a round (> {NOISY_BACKGROUND:g})")
    metrics = {k for r in rounds for k in r.get("p50", {})}
    for key in sorted(metrics):
        p50s = [
            r["p50"][key]
            for r in rounds
            if key in r.get("p50", {}) and r.get("n", {}).get(key, 0) >= MIN_ROUND_SAMPLES
        ]
        if len(p50s) < 2 or min(p50s) <= 0:
            continue
        spread = max(p50s) / min(p50s)
        if spread > NOISY_SPREAD:
            why.append(f"{key}: round p50s differ {spread:.1f}x (> {NOISY_SPREAD:g}x)")
    return why
