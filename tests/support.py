"""Helpers shared by test modules (imported by name: tests/ is on sys.path).

Fixtures live in ``tests/conftest.py``; everything a test module calls lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.process
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
import pytest

from cancelflow._platform import FLAVOUR, PROCESS_POOLS, TOKENS_CROSS_PROCESSES

if TYPE_CHECKING:
    from loguru import Message, Record

    from cancelflow import CancellationToken, NodeContext, ProcessPool

T = TypeVar("T")

WAIT = 30  # watchdog for anything awaited in a test (never a measure of speed)
#: every multiprocessing start method (tests/conftest.py's ``mp_context`` fixture)
START_METHODS = ("fork", "spawn", "forkserver")

#: for tests of what the "posix" and "windows" implementations of the platform layer
#: (CANCELFLOW_PLATFORM, see cancelflow._platform) do not run: they check the clear error
#: instead (tests/test_portable.py)
needs_process_pools = pytest.mark.skipif(
    not PROCESS_POOLS, reason=f"no process pool on the {FLAVOUR!r} platform implementation"
)
needs_shared_tokens = pytest.mark.skipif(
    not TOKENS_CROSS_PROCESSES,
    reason="a token reaches other processes through token.remote() on the 'windows' "
    "platform implementation",
)
#: this directory: programs that tests start put it on their path to import its modules
TESTS = os.path.dirname(os.path.abspath(__file__))


# -- waiting ----------------------------------------------------------------------------------


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


def wait(event: threading.Event) -> None:
    """Wait until ``event`` is set; fail (not hang) if it never is."""
    assert event.wait(WAIT), "watchdog: the event was never set"


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


def names(argument: str) -> str:
    """A ``match=`` pattern: the message names ``argument`` as a word."""
    return r"(?<![\w.])" + re.escape(argument) + r"(?!\w)"


# -- tokens -----------------------------------------------------------------------------------


class Recorder:
    """A callback that counts its calls and remembers what it saw."""

    def __init__(self, token: CancellationToken | None = None) -> None:
        self.calls = 0
        self.token = token
        self.reasons: list[str | None] = []
        self.called = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        if self.token is not None:
            self.reasons.append(self.token.cancel_reason)
        self.called.set()


def share(token: CancellationToken) -> None:
    """Make ``token`` shared, as handing it to a starting process does.

    From then on other processes may cancel it (see ``CancellationToken.__reduce__``):
    cross-process locking, futex wake-ups, no slot reuse, a hub thread for its callbacks.
    """
    token._export()


def memfds() -> set[int]:
    """This process's descriptors of token shared memory (``cancelflow-tokens`` memfds)."""
    found: set[int] = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "cancelflow-tokens" in os.readlink(f"/proc/self/fd/{name}"):
                found.add(int(name))
    return found


# -- asyncio ----------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
    """Run ``coro`` in a new loop under a watchdog timeout."""

    async def guarded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(guarded())


async def let_ready_callbacks_run() -> None:
    """Give every task that can run a turn (cooperative yields, not a timed wait)."""
    for _ in range(20):
        await asyncio.sleep(0)


def other_tasks() -> set[asyncio.Task[Any]]:
    """The tasks of the running loop other than the current one."""
    current = asyncio.current_task()
    return {task for task in asyncio.all_tasks() if task is not current}


async def value_of(ctx: NodeContext) -> str:
    """A node whose output is its own id."""
    return ctx.node_id


# -- child processes --------------------------------------------------------------------------


@contextlib.contextmanager
def running(
    ctx: multiprocessing.context.BaseContext, target: Callable[..., object], *args: object
) -> Iterator[multiprocessing.process.BaseProcess]:
    """Start a process, and always join (or kill) and close it."""
    proc: multiprocessing.process.BaseProcess = ctx.Process(  # type: ignore[attr-defined]
        target=target, args=args
    )
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


_EXITED = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def listening_beyond_loopback(pids: Iterable[int]) -> list[str]:
    """The sockets of these processes that listen (TCP) or are bound unconnected (UDP)
    on an address other than loopback, as ``"pid ip:port"``; ``[]`` if none."""
    found: list[str] = []
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue  # gone meanwhile: it listens nowhere
        for connection in connections:
            listening = connection.status == psutil.CONN_LISTEN or (
                connection.type == socket.SOCK_DGRAM and not connection.raddr
            )
            if listening and not ipaddress.ip_address(connection.laddr.ip).is_loopback:
                found.append(f"{pid} {connection.laddr.ip}:{connection.laddr.port}")
    return found


def ours_and_descendants() -> list[int]:
    """This process and every process under it."""
    me = psutil.Process()
    return [me.pid, *(child.pid for child in me.children(recursive=True))]


def zygote_pid(pool: ProcessPool) -> int:
    """The pid of ``pool``'s zygote, from its statistics; the pool must be started."""
    pid = pool.statistics().zygote_pid
    assert pid is not None, f"{pool!r} has no zygote"
    return pid


def assert_gone(pid: int, *, already_exited: bool = False) -> None:
    """The process has exited and been reaped (no zombie left); bounded wait.

    With ``already_exited``, it must also have exited when this is called (a zombie
    that its parent has not reaped yet counts as exited): for promises such as "the
    call returns only once the process is gone".
    """
    try:
        proc = psutil.Process(pid)
        if already_exited:
            status = proc.status()
            assert status in _EXITED, f"process {pid} is still running: {status}"
        proc.wait(timeout=WAIT)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        pytest.fail(f"process {pid} is still there: {proc.status()}")


#: whether a pool reaps what its tasks leave (``"linux"``: workers and zygote are
#: subreapers); elsewhere a task's orphan is re-parented to init, which reaps it when it
#: will (some containers' PID 1 never does), and a zombie of init runs nothing
REAPS_ORPHANS = FLAVOUR == "linux"


def ended(pid: int) -> bool:
    """Whether the process has exited and, where the pool reaps orphans
    (:data:`REAPS_ORPHANS`), been reaped; elsewhere a zombie counts as ended."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return True
    return not REAPS_ORPHANS and status in _EXITED


def assert_not_running(pid: int, timeout: float = WAIT) -> None:
    """The process exits within ``timeout``; a zombie counts as exited.

    For orphans: once their parent is gone they belong to an init, which may never
    reap them (some containers' PID 1), and a zombie runs nothing.
    """

    def exited() -> bool:
        try:
            return psutil.Process(pid).status() in _EXITED
        except psutil.NoSuchProcess:
            return True

    assert wait_until(exited, timeout), f"process {pid} is still running"


# -- programs ---------------------------------------------------------------------------------

#: What every program run by :func:`run_script` starts with.
_SCRIPT_PROLOGUE = f"""\
import faulthandler, os, sys
sys.path.insert(0, {TESTS!r})
if __name__ == "__main__":  # the program itself, not a pool's zygote importing its __main__
    # A hang dumps every thread's stack and exits. The dumping thread does not survive a
    # fork, and a child that exits with it armed hangs in CPython: re-armed around forks.
    def _arm_watchdog():
        faulthandler.dump_traceback_later({WAIT}, exit=True)
    _arm_watchdog()
    os.register_at_fork(
        before=faulthandler.cancel_dump_traceback_later,
        after_in_parent=_arm_watchdog,
        after_in_child=_arm_watchdog,
    )
"""


def run_script(
    body: str, *args: str, cwd: str | None = None, path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``body`` as a program's ``__main__`` with tests/ on its path, in a fresh
    interpreter; a hang dumps its stacks and fails the test.

    With ``path``, the program is that file (``python path``), else ``python -c``.
    """
    script = _SCRIPT_PROLOGUE + textwrap.dedent(body)
    command = [sys.executable, "-c", script]
    if path is not None:
        path.write_text(script)
        command = [sys.executable, str(path)]
    try:
        return subprocess.run(
            [*command, *args],
            capture_output=True,
            text=True,
            timeout=WAIT + 15,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - the child's watchdog failed
        pytest.fail(f"watchdog: the script did not end: {exc.stderr!r}")


class WrappedLock:
    """A lock standing in for one under test: behaves as ``lock``; subclasses change
    what :meth:`acquire` does around it."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        return bool(self.lock.acquire(*args, **kwargs))

    def release(self) -> None:
        self.lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lock, name)


class SignallingLock(WrappedLock):
    """A lock that raises ``signum`` in the main thread the first time the main thread
    takes it once :attr:`armed` (the handler runs before :meth:`acquire` returns).

    For programs run by :func:`run_script`: put one in place of a lock under test to
    make a signal handler run right while the lock is held.
    """

    def __init__(self, lock: Any, signum: int = signal.SIGUSR1) -> None:
        super().__init__(lock)
        self.signum, self.armed = signum, False

    def acquire(self, *args: Any, **kwargs: Any) -> bool:
        got = super().acquire(*args, **kwargs)
        if got and self.armed and threading.current_thread() is threading.main_thread():
            self.armed = False
            signal.raise_signal(self.signum)
        return got


class ContendedLock(WrappedLock):
    """A lock that sets :attr:`tried` when the thread ``watched`` finds it held (then
    waits for it as asked)."""

    def __init__(self, lock: Any, watched: int) -> None:
        super().__init__(lock)
        self.watched, self.tried = watched, threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self.lock.acquire(False):
            return True
        if threading.get_ident() == self.watched:
            self.tried.set()
        return bool(self.lock.acquire(blocking, timeout)) if blocking else False


# -- logs -------------------------------------------------------------------------------------

_LEVELS = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "SUCCESS": 25, "WARNING": 30, "ERROR": 40}


class LogCapture:
    """Every loguru record emitted while a test runs (tests/conftest.py's ``logs``).

    :meth:`cancelflow` and :meth:`messages` read the library's own records (bound with
    ``cancelflow=True``); :meth:`wait_for` blocks until one of them matches.
    """

    def __init__(self) -> None:
        self.records: list[Record] = []
        # Re-entrant: a signal handler may log while this thread is inside sink().
        self._cond = threading.Condition(threading.RLock())

    def __repr__(self) -> str:
        # Short: an assertion's report would render every record (and its traceback).
        return f"<{len(self.records)} log records>"

    def sink(self, message: Message) -> None:
        with self._cond:
            self.records.append(message.record)
            self._cond.notify_all()

    def cancelflow(self, level: str = "TRACE") -> list[Record]:
        """cancelflow's records at ``level`` or above, in order."""
        least = _LEVELS[level]
        return [
            r for r in list(self.records) if r["extra"].get("cancelflow") and r["level"].no >= least
        ]

    def messages(self, level: str = "TRACE") -> list[str]:
        """The messages of :meth:`cancelflow`'s records."""
        return [r["message"] for r in self.cancelflow(level)]

    def wait_for(self, match: Callable[[Record], bool]) -> Record:
        """The first of cancelflow's records that matches, once there is one; bounded."""

        def found() -> list[Record]:
            return [r for r in self.cancelflow() if match(r)]

        with self._cond:
            assert self._cond.wait_for(found, WAIT), "watchdog: no such log record"
            return found()[0]

    def clear(self) -> None:
        """Drop every record (their tracebacks hold frames, and frames hold tokens)."""
        with self._cond:
            self.records.clear()
