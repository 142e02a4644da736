"""The run's settings and shared state (``Bench``), and the bounds every cell waits for."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .beacon import Beacon, Flag
from .census import Leaks
from .load import LoadMeter
from .results import Row
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
    rounds: int = 1

    def __post_init__(self) -> None:
        self.rounds = max(1, min(self.rounds, self.samples))

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
        self.load = LoadMeter()
        self._seq = 0
        self.grand_bound = 0.1
        #: how many samples the fill being run takes (its share of the current round)
        self.samples = settings.samples
        #: every fill in the order it ran: ``{"round", "scenario", "variant", "system"}``
        self.order: list[dict[str, Any]] = []

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

    @contextlib.contextmanager
    def measured(self, row: Row, round_: int, position: int, samples: int) -> Iterator[None]:
        """Run one fill of ``row`` (its share ``samples`` of round ``round_``, at
        ``position`` in that round's order): record the order, where its samples start,
        and the background load while it ran."""
        self.samples = samples
        start = {k: len(v) for k, v in row.samples.items()}
        self.order.append(
            {
                "round": round_,
                "position": position,
                "scenario": row.scenario,
                "variant": row.variant,
                "system": row.system,
                "tag": row.tag,
            }
        )
        load: dict[str, Any] = {}
        try:
            with self.load.measure() as load:
                yield
        finally:
            row.rounds.append({"round": round_, "position": position, "start": start, **load})

    def close(self) -> None:
        self.watch.close()
        self.beacon.close()
        self.flag.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def split_samples(samples: int, rounds: int) -> list[int]:
    """``samples`` split into ``rounds`` near-equal shares (the first rounds take the rest)."""
    rounds = max(1, min(rounds, samples))
    base, extra = divmod(samples, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def rotated(systems: list[str], round_: int, rounds: int) -> list[str]:
    """The order ``systems`` are measured in during round ``round_``: rotated by an even
    share per round, so that each system goes first (and last) in turn."""
    if not systems:
        return []
    n, rounds = len(systems), max(1, rounds)
    shift = (round_ * n) // rounds if rounds <= n else round_ % n
    return systems[shift:] + systems[:shift]


@dataclass
class BlockedCaller:
    """The caller: a thread blocked in the system's *own* wait (``future.result()``,
    ``AsyncResult.get()``, ``Process.join()``), started before the cancel. ``released_at``
    is the ``perf_counter()`` at which that wait returned; ``released`` whether it returned
    with the call's outcome (``False``: its own timeout passed first). The cancelling thread
    only stamps the cancel, so no system is timed through another library's wait helper.
    """

    block: Callable[[float], bool]
    timeout: float
    released: bool = False
    released_at: float | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)
    _armed: threading.Event = field(default_factory=threading.Event, repr=False)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-caller", daemon=True)
        self._thread.start()
        self._armed.wait()

    def _run(self) -> None:
        self._armed.set()
        try:
            self.released = bool(self.block(self.timeout))
        except BaseException:  # noqa: BLE001 - the wait itself failing is not a release
            self.released = False
        finally:
            self.released_at = time.perf_counter()

    def join(self, timeout: float) -> bool:
        """Wait at most ``timeout`` for the caller's wait to return; ``True`` if released."""
        assert self._thread is not None
        self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive() and self.released


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def anyio_run(fn: Callable[[], Awaitable[None]], backend: str) -> None:
    import anyio

    anyio.run(fn, backend=backend)
