"""Module-level workloads for the reliability tests (faults, signals, properties, soak).

Process workers import these by name, so everything a process node or task runs lives
here. A node tells the test that it has reached a point through a :class:`Beacon`: a Unix
socket the test listens on, to which any thread or process can send one line. Nothing
here sleeps to wait for anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import cancelflow
from cancelflow import NodeContext

# -- the beacon ------------------------------------------------------------------------------


def send_beacon(path: str, key: str, value: object = "") -> None:
    """Tell the test listening on ``path`` that ``key`` happened (any thread or process)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(f"{key} {value}\n".encode())


class Beacon:
    """A Unix socket server that collects ``key value`` lines; wait for keys with events."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.values: dict[str, str] = {}
        self._events: dict[str, asyncio.Event] = {}

    def _event(self, key: str) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        for line in data.decode().splitlines():
            key, _, value = line.partition(" ")
            self.values[key] = value
            self._event(key).set()

    async def wait(self, key: str, watchdog: float = 30.0) -> str:
        """The value sent with ``key``, once it arrives (fails after ``watchdog`` seconds)."""
        try:
            async with asyncio.timeout(watchdog):
                await self._event(key).wait()
        except TimeoutError:
            raise AssertionError(f"watchdog: beacon {key!r} never arrived") from None
        return self.values[key]


@contextlib.asynccontextmanager
async def open_beacon() -> AsyncIterator[Beacon]:
    """A listening :class:`Beacon` in a private directory, removed afterwards."""
    directory = tempfile.mkdtemp(prefix="cfb")
    beacon = Beacon(os.path.join(directory, "s"))
    server = await asyncio.start_unix_server(beacon._on_connect, beacon.path)
    try:
        yield beacon
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def sync_beacon() -> Iterator[tuple[str, dict[str, threading.Event], dict[str, str]]]:
    """A Unix socket served by a thread, for tests without an event loop.

    Yields ``(path, events, values)``: ``events[key]`` is set when ``key`` arrives.
    """
    directory = tempfile.mkdtemp(prefix="cfb")
    path = os.path.join(directory, "s")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    events: dict[str, threading.Event] = {}
    values: dict[str, str] = {}
    lock = threading.Lock()
    stop_r, stop_w = os.pipe()

    def event(key: str) -> threading.Event:
        with lock:
            return events.setdefault(key, threading.Event())

    def serve() -> None:
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_READ)
            selector.register(stop_r, selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if stop_r in ready:
                    return
                conn, _ = server.accept()
                with conn:
                    data = b""
                    while chunk := conn.recv(4096):
                        data += chunk
                for line in data.decode().splitlines():
                    key, _, value = line.partition(" ")
                    values[key] = value
                    event(key).set()

    class Events(dict[str, threading.Event]):
        def __missing__(self, key: str) -> threading.Event:
            return event(key)

    thread = threading.Thread(target=serve, name="sync-beacon")
    thread.start()
    try:
        yield path, Events(), values
    finally:
        os.write(stop_w, b"x")
        thread.join()
        os.close(stop_r)
        os.close(stop_w)
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- process nodes (ctx.context["beacon"] is the beacon's path) ------------------------------


def node_segfault(ctx: NodeContext) -> None:
    """Report the worker's pid, then dereference NULL (SIGSEGV)."""
    send_beacon(ctx.context["beacon"], f"{ctx.node_id}.pid", os.getpid())
    ctypes.string_at(0)


def node_spin(ctx: NodeContext) -> None:
    """Report the worker's pid, then spin without ever looking at the token."""
    ctx.store_partial("pid", os.getpid())
    send_beacon(ctx.context["beacon"], f"{ctx.node_id}.pid", os.getpid())
    while True:
        pass


def node_wait_for_token(ctx: NodeContext) -> str:
    """Report, then block until the node's token is cancelled; a cooperative node."""
    ctx.store_partial("pid", os.getpid())
    send_beacon(ctx.context["beacon"], f"{ctx.node_id}.pid", os.getpid())
    ctx.token.wait_blocking()
    ctx.token.raise_if_cancelled()
    return "unreachable"


def node_exhaust_memory(ctx: NodeContext) -> None:
    """Lower RLIMIT_AS (soft and hard) a little above what is mapped now, then allocate
    far past it: the allocation fails with MemoryError."""
    limit = _mapped_bytes() + 64 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    ctx.store_partial("limit", limit)
    hog = bytearray(4 * limit)
    hog[-1] = 1


def node_c_call_ignoring_sigterm(ctx: NodeContext) -> None:
    """Block SIGTERM, report, then sleep in C: only SIGKILL can stop it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    ctx.store_partial("pid", os.getpid())
    send_beacon(ctx.context["beacon"], f"{ctx.node_id}.pid", os.getpid())
    signal.sigwait([signal.SIGUSR2])  # never sent: a C call that never returns


def node_pbkdf2_forever(ctx: NodeContext) -> bytes:
    """Report, then run a key derivation that would take days, in one C call: the SIGTERM
    handler cannot run until it returns."""
    ctx.store_partial("pid", os.getpid())
    send_beacon(ctx.context["beacon"], f"{ctx.node_id}.pid", os.getpid())
    return hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 2**31 - 1)


_STUBBORN_CHILD = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "sys.stdout.write('up\\n'); sys.stdout.flush()\n"
    "while True: time.sleep(60)\n"
)


def _start_stubborn(new_session: bool) -> int:
    child = subprocess.Popen(
        [sys.executable, "-c", _STUBBORN_CHILD],
        stdout=subprocess.PIPE,
        start_new_session=new_session,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"up\n"  # its SIGTERM handler is installed
    child.stdout.close()
    return child.pid


def node_grandchild_ignoring_sigterm(ctx: NodeContext) -> None:
    """Start a child that ignores SIGTERM, report both pids, then spin (SIGTERM ends the
    node itself; the worker must kill the child)."""
    pid = _start_stubborn(new_session=False)
    ctx.store_partial("child", pid)
    send_beacon(ctx.context["beacon"], f"{ctx.node_id}.pid", f"{os.getpid()},{pid}")
    while True:
        pass


def node_grandchild_new_session(ctx: NodeContext) -> None:
    """Start a child in its own session and process group that ignores SIGTERM; block
    SIGTERM here too, so the pool must SIGKILL the worker and find the child itself."""
    pid = _start_stubborn(new_session=True)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    ctx.store_partial("child", pid)
    send_beacon(ctx.context["beacon"], f"{ctx.node_id}.pid", f"{os.getpid()},{pid}")
    signal.sigwait([signal.SIGUSR2])


def node_value(ctx: NodeContext) -> str:
    """A process node that returns at once: its id and its inputs."""
    return f"{ctx.node_id}<{','.join(sorted(ctx.inputs))}>"


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


# -- pool tasks ------------------------------------------------------------------------------


def allocate(megabytes: int) -> int:
    """Allocate and touch ``megabytes`` MiB; return how many bytes."""
    block = bytearray(megabytes * 1024 * 1024)
    block[::4096] = b"\1" * len(block[::4096])
    return len(block)


def rlimit_as() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_AS)


def rlimit_nofile() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def lower_soft_nofile_limit_with_prlimit() -> int:
    """Lower the soft RLIMIT_NOFILE through ``prlimit`` on this process, by a name
    imported in the task; return the worker's pid."""
    from resource import prlimit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    prlimit(os.getpid(), resource.RLIMIT_NOFILE, (min(soft, 64), hard))
    return os.getpid()


def exhaust_memory() -> None:
    """The task form of :func:`node_exhaust_memory`."""
    limit = _mapped_bytes() + 64 * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    hog = bytearray(4 * limit)
    hog[-1] = 1


def lower_soft_memory_limit() -> int:
    """Lower the soft RLIMIT_AS (the hard one stays); return the worker's pid."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_mapped_bytes() + 256 * 1024 * 1024, hard))
    return os.getpid()


def block_sigterm_and_return() -> int:
    """Block SIGTERM in the worker and return its pid."""
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    return os.getpid()


def leave_sigterm_pending_to_own_handler() -> int:
    """Install a SIGTERM handler that ends the process, block SIGTERM, send it to this
    process (it stays pending) and return the pid."""
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(7))
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    os.kill(os.getpid(), signal.SIGTERM)
    return os.getpid()


class SignalsWhilePickled:
    """A value that sends SIGTERM to the process that pickles it (a ladder's SIGTERM
    landing while a worker sends a task's result) and waits until it was handled."""

    def __reduce__(self) -> tuple[type[SignalsWhilePickled], tuple[()]]:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between two bytecodes of this loop
            pass
        return (SignalsWhilePickled, ())


def return_while_own_sigterm_handler_exits() -> SignalsWhilePickled:
    """Install a SIGTERM handler that exits, then return a value whose pickling is
    interrupted by SIGTERM."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    return SignalsWhilePickled()


def wait_for_token(beacon: str) -> str:
    """A task that reports and blocks until its token is cancelled."""
    token = cancelflow.current_token()
    send_beacon(beacon, "running", os.getpid())
    token.wait_blocking()
    token.raise_if_cancelled()
    return "unreachable"


def echo(value: Any) -> Any:
    return value


# -- property-test nodes (tests/test_properties.py) ------------------------------------------


def expected_output(node_id: str) -> str:
    return f"out-{node_id}"


def checked_output(ctx: NodeContext, deps: list[str]) -> str:
    """The node's output if it got exactly its dependencies' outputs, else a marker the
    property test reports."""
    expected = {dep: expected_output(dep) for dep in deps}
    if dict(ctx.inputs) != expected:
        return f"bad-inputs-{ctx.node_id}:{dict(ctx.inputs)!r}"
    return expected_output(ctx.node_id)


def prop_process_node(ctx: NodeContext) -> str:
    """A process node whose behaviour the test chose (``ctx.context["behaviours"]``):
    quick, slow (bounded, ignores its token), block (waits for its token: cooperative),
    stubborn (spins ignoring its token: only SIGTERM stops it) or fail."""
    behaviour = ctx.context["behaviours"][ctx.node_id]
    if behaviour == "slow":
        total = 0
        for index in range(200_000):
            total += index
    elif behaviour == "block":
        ctx.token.wait_blocking()
        ctx.token.raise_if_cancelled()
    elif behaviour == "stubborn":
        while True:
            pass
    elif behaviour == "fail":
        raise ValueError(f"{ctx.node_id} failed")
    return checked_output(ctx, ctx.context["deps"][ctx.node_id])


def store_then_kill_zygote(count: int) -> None:
    """Store ``count`` partial results, then SIGKILL the pool's zygote (this worker's
    parent): every store returned, so the parent's kernel has all of them."""
    for index in range(count):
        cancelflow.store_partial(f"step-{index}", index)
    os.kill(os.getppid(), signal.SIGKILL)
    while True:
        pass


def start_child_then_kill_zygote() -> None:
    """Start a long-lived child, store its pid, then SIGKILL the pool's zygote."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    cancelflow.store_partial("child", child.pid)
    os.kill(os.getppid(), signal.SIGKILL)
    while True:
        pass
