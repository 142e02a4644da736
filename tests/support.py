"""Helpers shared by test modules (imported by name: tests/ is on sys.path)."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.process
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

WAIT = 30  # watchdog for anything awaited in a test (never a measure of speed)
#: every multiprocessing start method (tests/conftest.py's ``mp_context`` fixture)
START_METHODS = ("fork", "spawn", "forkserver")


class Announcements:
    """A partial_sink that lets the test wait until the task stored a key."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _event(self, key: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault(key, threading.Event())

    def __call__(self, key: str, value: Any) -> None:
        self.values[key] = value
        self._event(key).set()

    def wait(self, key: str, timeout: float = WAIT) -> Any:
        assert self._event(key).wait(timeout), f"watchdog: the task never stored {key!r}"
        return self.values[key]


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds (checked every ms).

    For states that have no event to wait on (a future becoming ``running()``); the
    timeout is a watchdog, never a measure of speed.
    """
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.001)
    return True


@contextlib.contextmanager
def running(
    ctx: multiprocessing.context.BaseContext, target: Callable[..., object], *args: object
) -> Iterator[multiprocessing.process.BaseProcess]:
    """Start a process, and always join (or kill) and close it."""
    proc = ctx.Process(target=target, args=args)  # type: ignore[attr-defined]
    proc.start()
    try:
        yield proc
    finally:
        proc.join(WAIT)
        if proc.is_alive():
            proc.kill()
            proc.join()
        proc.close()


@contextlib.contextmanager
def pipe() -> Iterator[
    tuple[multiprocessing.connection.Connection, multiprocessing.connection.Connection]
]:
    """A one-way pipe (reader, writer), always closed."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    try:
        yield reader, writer
    finally:
        reader.close()
        writer.close()


def receive(conn: multiprocessing.connection.Connection) -> Any:
    """The next object a child sends on ``conn``; bounded."""
    assert conn.poll(WAIT), "watchdog: the child process sent nothing"
    return conn.recv()


def assert_gone(pid: int) -> None:
    """The process has exited and been reaped (no zombie left); bounded wait."""
    try:
        proc = psutil.Process(pid)
        proc.wait(timeout=WAIT)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        pytest.fail(f"process {pid} is still there: {proc.status()}")
