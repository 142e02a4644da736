"""Shared fixtures: every test is checked for leaked threads, child processes and fds."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

# Before loguru is imported: every handler (loguru's default stderr one, the tests' capture
# sinks, and those of the programs tests start) formats a logged exception with just its
# own frames. With loguru's defaults each expected error of a test was rendered with the
# whole pytest stack and every local value in it; with ~900 collected items that costs
# about a second per record, and a signal-storm test that logs a few dozen errors ran
# past its timeout in full runs only.
os.environ.setdefault("LOGURU_BACKTRACE", "False")
os.environ.setdefault("LOGURU_DIAGNOSE", "False")
assert "loguru" not in sys.modules, "loguru was imported before the test configuration"

import psutil  # noqa: E402
import pytest  # noqa: E402
from loguru import logger  # noqa: E402

from cancelflow import ThreadPool, _timer  # noqa: E402
from support import START_METHODS, LogCapture  # noqa: E402

# Processes that multiprocessing itself keeps for the life of the interpreter.
_MP_SINGLETONS = ("resource_tracker", "forkserver")


def _children() -> dict[int, str]:
    found: dict[int, str] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE:
                cmd = "<zombie> " + cmd
        except psutil.Error:
            continue
        if any(name in cmd for name in _MP_SINGLETONS):
            continue
        found[child.pid] = cmd
    return found


# The process-wide token arena (one memfd, or an unlinked file without memfd, shared by
# every CancellationToken) lives as long as any token does, which a test's traceback can
# prolong; tests/test_token.py checks that it is released once the tokens are collected.
# The timer thread's alarm (a timerfd on Linux) is opened with the first timer thread and
# kept for the life of the process; tests/test_timer.py checks that it is the only one.
# Everything else counts.
_SHARED_ARENA = "cancelflow-tokens"


def _fds() -> set[int]:
    found: set[int] = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        if int(name) == _timer._alarm_fd:
            continue
        try:
            if _SHARED_ARENA in os.readlink(f"/proc/self/fd/{name}"):
                continue
        except OSError:
            continue
        found.add(int(name))
    return found


def _wait_until(check: Callable[[], bool], patience: float) -> bool:
    deadline = time.monotonic() + patience
    while True:
        gc.collect()
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves threads, child processes or file descriptors behind."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    threads_before = set(threading.enumerate())
    children_before = set(_children())
    fds_before = _fds()
    yield
    new_threads: list[threading.Thread] = []
    new_children: dict[int, str] = {}
    new_fds: set[int] = set()

    def clean() -> bool:
        nonlocal new_threads, new_children, new_fds
        new_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        new_children = {p: c for p, c in _children().items() if p not in children_before}
        new_fds = _fds() - fds_before
        return not new_threads and not new_children and not new_fds

    if not _wait_until(clean, patience=10.0):
        details = []
        if new_threads:
            details.append(f"threads: {[t.name for t in new_threads]}")
        if new_children:
            details.append(f"child processes: {new_children}")
        if new_fds:
            links: dict[int, str] = {}
            for fd in new_fds:
                try:
                    links[fd] = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:
                    pass
            details.append(f"file descriptors: {links}")
        pytest.fail("test left resources behind: " + "; ".join(details))


@pytest.fixture(scope="module")
def mp_singletons() -> None:
    """Start multiprocessing's lifelong helpers before the leak check's snapshot."""
    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.ensure_running()


@pytest.fixture(params=START_METHODS)
def mp_context(
    request: pytest.FixtureRequest, mp_singletons: None
) -> multiprocessing.context.BaseContext:
    """A multiprocessing context, once per start method."""
    method: str = request.param
    return multiprocessing.get_context(method)


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every loguru record emitted while the test runs (any level, any source)."""
    capture = LogCapture()
    handler = logger.add(capture.sink, level="TRACE")
    logger.enable("cancelflow")  # the library is silent unless enabled
    yield capture
    logger.disable("cancelflow")
    logger.remove(handler)
    capture.clear()


@pytest.fixture
def thread_pool() -> Iterator[ThreadPool]:
    """A four-thread pool with a short grace period, shut down after the test."""
    pool = ThreadPool(4, grace_period=0.05, name="test-threads")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def one_worker() -> Iterator[ThreadPool]:
    """A one-thread pool (tasks run one after the other), stopped after the test."""
    pool = ThreadPool(1, grace_period=0.05, name="one-worker")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True, cancel_running=True)
