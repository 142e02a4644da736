"""Module-level task functions for process-pool tests (workers import them by name)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

import cancelflow
from cancelflow import _context


def add(a: int, b: int) -> int:
    return a + b


def whoami() -> int:
    return os.getpid()


def announce_and_spin() -> None:
    """Never checks its token: a pure-Python busy loop."""
    _context.store_partial("pid", os.getpid())
    while True:
        pass


def announce_and_spin_holding_memory() -> None:
    """As announce_and_spin, holding 128 MiB of written memory: the kernel takes tens of
    milliseconds to tear the process down after a SIGKILL, a wide window in which it
    still holds its children."""
    held = b"\x01" * (128 << 20)
    _context.store_partial("pid", os.getpid())
    while held:
        pass


def announce_and_wait_cooperatively() -> str:
    token = _context.current_token()
    _context.store_partial("pid", os.getpid())
    while not token.is_cancelled:
        pass
    token.raise_if_cancelled()
    return "unreachable"


def announce_and_finish_in_finally() -> None:
    try:
        _context.store_partial("pid", os.getpid())
        while True:
            pass
    finally:
        _context.store_partial("finally", "ran")


def announce_then_critical(seconds: float) -> str:
    with cancelflow.critical_section(seconds):
        _context.store_partial("pid", os.getpid())
        deadline = time.monotonic() + seconds / 2
        while time.monotonic() < deadline:
            pass
        _context.store_partial("critical", "completed")
    while True:
        pass


def overrun_critical_section(seconds: float) -> None:
    """Declare a critical section of ``seconds`` (storing "pid" in it) and never leave
    it; the ``finally`` stores "finally"."""
    try:
        with cancelflow.critical_section(seconds):
            _context.store_partial("pid", os.getpid())
            while True:
                pass
    finally:
        _context.store_partial("finally", "ran")


def spin_then_clean_up_for(seconds: float) -> None:
    """Spin (storing "pid") until stopped; the ``finally`` then works for ``seconds`` and
    stores "cleanup" when it is done."""
    try:
        _context.store_partial("pid", os.getpid())
        while True:
            pass
    finally:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass
        _context.store_partial("cleanup", "done")


def critical_until_cancelled_then_spin(seconds: float) -> None:
    """Declare a critical section of ``seconds``, leave it as soon as the token is
    cancelled (storing "left"), then spin without checking again."""
    token = _context.current_token()
    with cancelflow.critical_section(seconds):
        _context.store_partial("pid", os.getpid())
        while not token.is_cancelled:
            time.sleep(0.001)
        _context.store_partial("left", True)
    while True:
        pass


def sigterm_self_in_critical_section() -> None:
    """Sends itself SIGTERM inside a critical section, then stores what it reached."""
    with cancelflow.critical_section(60):
        os.kill(os.getpid(), signal.SIGTERM)  # handled right after kill returns: in the block
        _context.store_partial("inside", "after the signal")
    _context.store_partial("after", "the block")  # never reached: stopped as the block ends


def chdir_into_removed_directory(path: str) -> int:
    """Leaves its worker in a working directory that no longer exists."""
    os.mkdir(path)
    os.chdir(path)
    os.rmdir(path)
    return os.getpid()


def spawn_stubborn_tree() -> None:
    """Start a child that ignores SIGTERM and a grandchild in its own session, then spin."""
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import signal, time\\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\nwhile True: time.sleep(1)'], "
        "start_new_session=True)\n"
        "print(g.pid, flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    _context.store_partial("tree", [child.pid, grandchild])
    while True:
        pass


def leave_a_session_leader_under_a_child() -> None:
    """Fork a child that forks a grandchild in a session of its own (``setsid()``, so in
    no group of the worker's); both sleep until killed. Store "tree" ([child, grandchild])
    and sleep (never checking the token)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        grandchild = os.fork()
        if grandchild == 0:
            os.setsid()
            os.write(write, b"x")
            while True:
                time.sleep(1)
        while True:
            time.sleep(1)
    os.read(read, 1)  # the grandchild is in its own session now
    grandchild = next(p.pid for p in psutil.Process(child).children())
    _context.store_partial("tree", [child, grandchild])
    while True:
        time.sleep(0.01)


def slow_down_the_first_kill_of_a_reap() -> None:
    """A pool initializer: the first SIGKILL this worker's reap of a stopped task's tree
    sends is followed by a 0.5 s pause (as a reap of a large tree takes long), so that the
    pool's own steps may land in the middle of the reap."""
    from cancelflow._platform import _tree

    real = _tree.send_signal  # type: ignore[attr-defined]
    first = [True]

    def send_signal(pid: int, signum: int) -> bool:
        sent = real(pid, signum)
        if signum == signal.SIGKILL and first:
            first.clear()
            time.sleep(0.5)
        return sent

    _tree.send_signal = send_signal  # type: ignore[attr-defined]


def fork_then_spin() -> None:
    """Fork a child that sleeps until killed; store "pid" and "child", then spin."""
    child = os.fork()
    if child == 0:
        while True:
            time.sleep(1)
    _context.store_partial("child", child)
    _context.store_partial("pid", os.getpid())
    while True:
        pass


#: ``clone``'s system call number, where the tests know it (its pointer arguments, whose
#: order differs between these, are all 0 here)
_CLONE = {"x86_64": 56, "aarch64": 220}
CAN_CLONE_PARENT = sys.platform.startswith("linux") and os.uname().machine in _CLONE


def start_sibling(then_stop_cooperatively: bool) -> None:
    """Start a process as this worker's *sibling* (``clone(CLONE_PARENT)``: a child of the
    worker's parent, in no tree of the worker's) that sleeps until killed; store its pid
    as "sibling"; then poll the task's token (or spin without ever checking it)."""
    number = _CLONE[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    clone_parent, sigchld = 0x00008000, signal.SIGCHLD
    # No new stack: like fork, the child runs on a copy of this one.
    pid = libc.syscall(number, clone_parent | sigchld, 0, 0, 0, 0)
    if pid == 0:
        try:
            while True:
                time.sleep(1)
        finally:
            os._exit(0)
    assert pid > 0, os.strerror(ctypes.get_errno())
    _context.store_partial("sibling", pid)
    token = _context.current_token()
    while not (then_stop_cooperatively and token.is_cancelled):
        pass
    token.raise_if_cancelled()


def critical_sections_in_a_loop(path: str) -> None:
    """Loop over short critical sections, each writing "E" to ``path`` as it starts and
    "X" as it ends (a log that ends in "E" was stopped inside one); stores "pid" first."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _context.store_partial("pid", os.getpid())
    while True:
        with cancelflow.critical_section(30):
            os.write(fd, b"E")
            deadline = time.monotonic() + 0.0005
            while time.monotonic() < deadline:
                pass
            os.write(fd, b"X")


class FalseyError(Exception):
    """An exception that is false in a boolean context."""

    def __bool__(self) -> bool:
        return False


def raise_falsey(message: str) -> None:
    raise FalseyError(message)


def segfault() -> None:
    _context.store_partial("pid", os.getpid())
    ctypes.string_at(0)


def exit_hard(code: int) -> None:
    os._exit(code)


def store_then_spin(count: int) -> None:
    for index in range(count):
        _context.store_partial(f"step-{index}", index * index)
    _context.store_partial("pid", os.getpid())
    while True:
        pass


def wait_cooperatively_then_tell(fifo: str) -> str:
    """Like ``announce_and_wait_cooperatively``, then writes a byte to ``fifo`` before
    raising: the test hears that the task saw its cancel without asking the pool."""
    token = _context.current_token()
    _context.store_partial("pid", os.getpid())
    while not token.is_cancelled:
        pass
    with open(fifo, "wb") as channel:
        channel.write(b"x")
    token.raise_if_cancelled()
    return "unreachable"


def wait_cooperatively_then_raise_unpicklable() -> None:
    """Stops on its cancel with a CancelledException that cannot be pickled."""
    token = _context.current_token()
    _context.store_partial("pid", os.getpid())
    while not token.is_cancelled:
        pass
    raise cancelflow.CancelledException("stopped", {"lock": threading.Lock()})


def own_token_is_cancelled() -> bool:
    return _context.current_token().is_cancelled


def cancel_own_token(reason: str) -> str:
    _context.current_token().cancel(reason)
    _context.current_token().raise_if_cancelled()
    return "unreachable"


def token_argument_is_current(token: cancelflow.CancellationToken) -> bool:
    return token is _context.current_token() and not token.is_cancelled


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def sleep_forever_in_c() -> None:
    _context.store_partial("pid", os.getpid())
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    time.sleep(3600)


def node_report_then_spin(ctx: cancelflow.NodeContext) -> None:
    """A process node that never checks its token; reports its pid through a FIFO."""
    ctx.store_partial("pid", os.getpid())
    with open(ctx.context["fifo"], "w") as fifo:
        fifo.write(f"{os.getpid()}\n")
    while True:
        pass


def node_report_then_block_sigterm(ctx: cancelflow.NodeContext) -> None:
    """A process node that blocks SIGTERM and sleeps: only SIGKILL stops it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    ctx.store_partial("pid", os.getpid())
    with open(ctx.context["fifo"], "w") as fifo:
        fifo.write(f"{os.getpid()}\n")
    time.sleep(3600)


def poll_remote_token(handle: cancelflow.RemoteToken, seconds: float) -> str:
    """Store a partial result, then poll the handle (a local read) until it is cancelled
    or ``seconds`` pass; report which."""
    handle.store_partial("started", os.getpid())
    deadline = time.monotonic() + seconds
    while not handle.is_cancelled:
        if time.monotonic() > deadline:
            return "not cancelled"
        time.sleep(0.001)  # a worker's loop of work between checks
    return f"stopped: {handle.cancel_reason}"


def cancel_remote_token(handle: cancelflow.RemoteToken, reason: str) -> bool:
    """Cancel the owner's token from this process; wait until the cancel comes back."""
    handle.cancel(reason)
    return handle.wait(30)


def remote_reader_threads(handle: cancelflow.RemoteToken) -> int:
    """How many RemoteToken reader threads this process runs (the handle is in use)."""
    assert not handle.is_cancelled
    return sum(t.name == "cancelflow-remote-token" for t in threading.enumerate())


def remote_reader_thread_count() -> int:
    """How many RemoteToken reader threads this process runs now."""
    return sum(t.name == "cancelflow-remote-token" for t in threading.enumerate())


def remote_in_fork_child(parent_address: str) -> bool:
    """In a forked child of a process serving RemoteTokens: a new handle gets this
    process's own server (not the parent's copy, whose threads did not survive the fork)."""
    handle = cancelflow.CancellationToken().remote()
    try:
        return handle._address != parent_address
    finally:
        handle.close()


def record_run(path: str) -> str:
    """Append one line to ``path`` per run: a test counts the runs."""
    with open(path, "a") as file:
        file.write("ran\n")
    return "ran"


def record_name(path: str, name: str) -> str:
    """Append ``name`` as a line to ``path``: a test reads the order tasks ran in."""
    with open(path, "a") as file:
        file.write(f"{name}\n")
    return name


def wait_for_path(path: str) -> str:
    """Return once ``path`` exists (the test creates it)."""
    while not os.path.exists(path):
        time.sleep(0.001)
    return "went"


def mark_then_wait_for_path(mark: str, path: str) -> str:
    """Create ``mark`` (a sign the task started that needs no pool message), then return
    once ``path`` exists."""
    with open(mark, "w"):
        pass
    return wait_for_path(path)


def wait_then_exit_hard(path: str) -> None:
    """Exit the worker (no result) once ``path`` exists."""
    wait_for_path(path)
    os._exit(3)


def wait_cooperatively_then_store_progress(progress: int) -> str:
    """Announces its pid, polls its token; on its cancel, stores ``progress`` as a partial
    result (as a task saving its work on a stop does), then lets the stop go on."""
    token = _context.current_token()
    _context.store_partial("pid", os.getpid())
    try:
        while True:
            token.raise_if_cancelled()
    except cancelflow.CancelledException:
        _context.store_partial("progress", progress)
        raise


def imported_modules() -> list[str]:
    """The names of the modules the worker running this has imported."""
    return sorted(sys.modules)


def missing_public_names() -> list[str]:
    """The names of ``cancelflow.__all__`` a task cannot reach as ``cancelflow.X``."""
    import cancelflow as package

    return [name for name in package.__all__ if not hasattr(package, name)]


def public_modules_of_public_names() -> list[str]:
    """The ``__module__`` of every public class of :mod:`cancelflow`, seen in a worker."""
    namespace: dict[str, object] = {}
    exec("from cancelflow import *", namespace)
    return sorted(
        {
            getattr(value, "__module__", "cancelflow")
            for value in namespace.values()
            if isinstance(value, type)
        }
    )


def module_of_cancelled_exception() -> str:
    """What the worker's ``CancelledException`` says it lives in, reached by its private
    module (no task asked ``cancelflow`` for it)."""
    from cancelflow import _exceptions

    return _exceptions.CancelledException.__module__


def store_at_gates(*gates: str) -> str:
    """For each of ``gates`` but the last in turn: wait until the path exists, then
    store a partial result ``gate-<i>``; return once the last path exists."""
    for i, gate in enumerate(gates[:-1]):
        wait_for_path(gate)
        _context.store_partial(f"gate-{i}", i)
    return wait_for_path(gates[-1])


#: handles a task keeps open for the rest of its process (see remote_handle_directory)
_kept_handles: list[cancelflow.RemoteToken] = []


def remote_handle_directory() -> str:
    """Make a token's remote handle here, keep it open (a handle collected ends its share,
    and the last share the server), and return its server's directory."""
    handle = cancelflow.CancellationToken().remote()
    _kept_handles.append(handle)
    return os.path.dirname(handle._address)


def remote_token_kind() -> str:
    """Make a token's remote handle in the worker (its module imports ``secrets``)."""
    return type(cancelflow.CancellationToken().remote()).__name__


def package_docstring() -> str | None:
    """``cancelflow.__doc__`` as a task sees it."""
    return cancelflow.__doc__
