"""The run's settings and shared state (``Bench``), and the bounds every cell waits for."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .beacon import Beacon, Flag
from .census import Leaks
from .scenarios import SCENARIOS, SYSTEMS
from .watch import PidWatch, Watched


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

    def finish_sample(
        self, system: str, worker: Watched | None, grand: Watched | None = None
    ) -> None:
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


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def anyio_run(fn: Callable[[], Awaitable[None]], backend: str) -> None:
    import anyio

    anyio.run(fn, backend=backend)
