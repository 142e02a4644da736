"""Helpers shared by test modules (imported by name: tests/ is on sys.path)."""

from __future__ import annotations

import threading
from typing import Any

WAIT = 30  # watchdog for anything awaited in a test (never a measure of speed)


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
