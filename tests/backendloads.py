"""Task functions for the pool-backend contract (tests/test_backend_contract.py).

Module-level, so every backend's workers import them by name (tests/ is on their
``sys.path``: a ProcessPool worker and a Dask worker process get the parent's path, as
spawn does). Every wait here is on the task's token or on a file the test creates, and
each one has a watchdog, so a task never outlives a failed test by more than ``WAIT``.
"""

from __future__ import annotations

import os
import threading

from cancelflow import check_cancelled, current_token, store_partial

#: watchdog for anything a task waits on (never a measure of speed)
WAIT = 30.0


def add(a: int, b: int) -> int:
    return a + b


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def touch(path: str) -> None:
    """Create ``path`` (so the test can tell whether this ever ran)."""
    with open(path, "x"):
        pass


def store_then_poll(count: int) -> str:
    """Store ``step-0`` .. ``step-{count-1}``, then poll ``check_cancelled()`` until
    cancelled (each poll waits on the token, so a cancel is seen at once)."""
    for index in range(count):
        store_partial(f"step-{index}", index)
    token = current_token()
    for _ in range(int(WAIT / 0.01)):
        check_cancelled()
        token.wait_blocking(0.01)
    return "watchdog: never cancelled"


def report_cancel() -> str:
    """Store ``started``, wait until the task's own token is cancelled, store its reason
    as ``seen``, then raise ``CancelledException``."""
    token = current_token()
    store_partial("started", os.getpid())
    if not token.wait_blocking(WAIT):
        return "watchdog: never cancelled"
    store_partial("seen", token.cancel_reason)
    check_cancelled()
    return "unreachable"


def cancel_own_token(reason: str) -> str:
    """Cancel the task's own token from inside the task, then stop cooperatively."""
    current_token().cancel(reason)
    check_cancelled()
    return "unreachable"


def store_in_order(count: int) -> int:
    for index in range(count):
        store_partial(f"k{index}", index)
    return count


def _wait_for_file(path: str) -> None:
    tick = threading.Event()
    for _ in range(int(WAIT / 0.002)):
        if os.path.exists(path):
            return
        tick.wait(0.002)  # polling a file the test creates


def clean_up_behind_gate(gate: str) -> str:
    """Store ``started``; once cancelled, store ``cleaning`` and stay in the cleanup until
    the file ``gate`` exists, then store ``cleaned`` and stop cooperatively."""
    token = current_token()
    store_partial("started", os.getpid())
    if not token.wait_blocking(WAIT):
        return "watchdog: never cancelled"
    store_partial("cleaning", True)
    _wait_for_file(gate)
    store_partial("cleaned", True)
    check_cancelled()
    return "unreachable"


def finish_behind_gate(gate: str) -> str:
    """Store ``started``, wait until the file ``gate`` exists, store ``done``, return."""
    store_partial("started", os.getpid())
    _wait_for_file(gate)
    store_partial("done", True)
    return "done"
