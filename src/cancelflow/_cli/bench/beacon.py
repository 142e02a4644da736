"""How a task tells the benchmark that it runs, and how a peer's task is told to stop.

``Beacon``: a FIFO the tasks write ``"seq pid gpid t"`` lines to (cancelflow's tasks
go through ``store_partial``, handed over by ``Beacon.sink``). ``Flag``: a one-byte
shared-memory flag that the peers' cooperative tasks poll.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import select
import time
from dataclasses import dataclass
from typing import Any


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
