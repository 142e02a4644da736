"""Process deaths, timed event-driven by a small watcher process blocked on pidfds."""

from __future__ import annotations

import os
import select
import sys
import time

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
