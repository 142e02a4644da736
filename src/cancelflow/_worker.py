"""The processes behind :class:`cancelflow.ProcessPool`: a zygote and its workers.

Process layout, per pool::

    your program (pool supervisor thread)
      └── zygote      python -m cancelflow._worker; single-threaded; subreaper
            ├── worker 0   forked from the zygote; subreaper; one socket to the parent
            │     └── whatever the task starts (children, grandchildren, daemons)
            └── worker 1 ...

Why a zygote: a fresh interpreter costs ~100 ms; a fork of the already-initialised,
single-threaded zygote costs a few ms, so a killed worker is replaced almost at once, and
no fork ever happens in your (threaded) program. The zygote imports your ``__main__``
the way ``multiprocessing``'s spawn does, so functions defined there can be sent.

Why subreapers: a task's grandchildren whose parent exits are re-parented to the worker
(not to PID 1), so the worker's process tree always holds everything the task started;
when a worker is killed, what is left is re-parented to the zygote, which reaps it. No
zombies pile up even where PID 1 never reaps (containers).

Why no orphans: the zygote exits (killing every descendant) when its channel to the
parent reaches end-of-file, which the kernel delivers even if the parent is SIGKILLed;
workers get ``PR_SET_PDEATHSIG=SIGKILL`` tied to the zygote.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import resource
import selectors
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from . import _cell, _context
from ._channel import encode, recv_frame
from ._platform import descendants, set_child_subreaper, set_parent_death_signal
from ._token import CancellationToken

TASK_TOKEN_ID = "cancelflow.task-token"


class Control(ctypes.Structure):
    """Per-worker words the parent reads without asking the worker."""

    _fields_ = (
        ("critical_until", ctypes.c_double),  # CLOCK_MONOTONIC deadline, 0 = none
        ("pid", ctypes.c_int32),
    )


class Terminated(BaseException):
    """Raised in a task when the pool sends SIGTERM (the ladder's second step).

    A ``BaseException`` so that ``except Exception`` in user code does not swallow it;
    ``finally`` blocks and context managers run.
    """


class _State:
    running = False
    critical_depth = 0
    term_pending = False


_state = _State()


def _on_sigterm(signum: int, frame: object) -> None:
    if not _state.running:
        return
    if _state.critical_depth:
        _state.term_pending = True
        return
    raise Terminated()


@contextlib.contextmanager
def _critical_section(seconds: float, control: Control) -> Iterator[None]:
    outer = _state.critical_depth == 0
    if outer:
        control.critical_until = time.monotonic() + seconds
    _state.critical_depth += 1
    try:
        yield
    finally:
        _state.critical_depth -= 1
        if outer:
            control.critical_until = 0.0
            if _state.term_pending:
                _state.term_pending = False
                raise Terminated()


class _TaskUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, token: CancellationToken) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._token = token

    def persistent_load(self, pid: Any) -> Any:
        if pid == TASK_TOKEN_ID:
            return self._token
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def kill_tree_of(pid: int) -> None:
    """SIGKILL every descendant of ``pid`` (not ``pid`` itself), freezing them first."""
    stopped: set[int] = set()
    for _ in range(4):  # freeze until nothing new appears, so nothing forks past us
        found = [p for p in descendants(pid) if p not in stopped]
        if not found:
            break
        for child in found:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGSTOP)
            stopped.add(child)
    for child in stopped:
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


def _kill_and_reap_tree() -> None:
    """Kill everything this worker's task left and wait until each one is reaped.

    The worker is a subreaper, so orphaned grandchildren come back to it; each round kills
    every current descendant, so the blocking wait returns promptly.
    """
    while True:
        kill_tree_of(os.getpid())
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


#: Every resource limit this platform has (RLIMIT_AS, RLIMIT_NOFILE, ...).
_RLIMITS = tuple(
    getattr(resource, name) for name in sorted(dir(resource)) if name.startswith("RLIMIT_")
)


class _ProcessState:
    """What a task may change in its worker's process, put back after each task.

    A task runs in a long-lived worker, so a change it makes to the process would
    otherwise reach every later task of that worker: a lowered ``RLIMIT_AS`` makes
    them all fail with ``MemoryError``, a blocked SIGTERM defeats the ladder's second
    step. Resource limits and the signal mask are restored; a limit the task lowered
    for good (a hard limit, which an unprivileged process cannot raise again) makes
    the worker retire, so that the pool replaces it.
    """

    def __init__(self) -> None:
        self.limits = {limit: resource.getrlimit(limit) for limit in _RLIMITS}
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def restore(self) -> str | None:
        """Restore the worker's state; return why it cannot be, else ``None``."""
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        for limit, values in self.limits.items():
            if resource.getrlimit(limit) != values:
                try:
                    resource.setrlimit(limit, values)
                except (ValueError, OSError) as exc:
                    return f"a resource limit changed by the task cannot be restored: {exc}"
        return None


class _TaskToken(CancellationToken):
    """The worker's view of a task's token: a cancel made here is also sent to the parent."""

    def cancel(self, reason: str | None = None) -> bool:
        won = super().cancel(reason)
        if won:
            with contextlib.suppress(OSError):
                self._worker.send(("cancel", self._seq, reason))
        return won


class _Worker:
    def __init__(self, sock: socket.socket, chunk: _cell.Chunk, token_offset: int, control: Control) -> None:
        self.sock = sock
        self.chunk = chunk
        self.token_offset = token_offset
        self.control = control
        self.send_lock = threading.Lock()
        self.state = _ProcessState()
        self.retiring: str | None = None

    def send(self, message: Any) -> None:
        data = encode(message)
        with self.send_lock:
            self.sock.sendall(data)

    def serve(self) -> None:
        try:
            self.send(("ready", os.getpid()))
        except OSError:  # the pool closed this worker's channel while it was starting
            return
        while True:
            try:
                message = recv_frame(self.sock)
            except (EOFError, OSError):
                return
            if message[0] == "task":
                self.run_task(message[1], message[2])
                if self.retiring is not None:
                    return  # the pool was told; it replaces this worker once it exits
            elif message[0] == "exit":
                return

    def run_task(self, seq: int, payload: bytes) -> None:
        token = _TaskToken._on_slot(self.chunk, self.token_offset, name=f"task-{seq}")
        token._worker = self
        token._seq = seq

        def sink(key: str, value: Any) -> None:
            self.send(("partial", seq, key, value))

        control = self.control
        _context._critical_hook = lambda seconds: _critical_section(seconds, control)
        kind: str
        value: Any = None
        try:
            _state.running = True
            with _context.task_scope(token, sink):
                fn, args, kwargs = _TaskUnpickler(payload, token).load()
                value = fn(*args, **kwargs)
            kind = "ok"
        except Terminated:
            kind = "terminated"
        except BaseException as exc:  # noqa: BLE001 - every error goes back to the caller
            kind, value = "error", exc
        finally:
            _state.running = False
            _state.term_pending = False
        if kind == "terminated" or token.is_cancelled:
            _kill_and_reap_tree()
        else:
            _reap_children()
        self.retiring = self.state.restore()
        if self.retiring is not None:
            # Said before the result, so that the pool never hands this worker a task.
            self.send(("retire", seq, self.retiring))
        try:
            self.send(("result", seq, kind, value))
        except Exception as exc:  # noqa: BLE001 - the result or error would not pickle
            error = RuntimeError(f"task {kind} value could not be sent back: {exc!r}")
            self.send(("result", seq, "error", error))


def _worker_main(sock_fd: int, chunk: _cell.Chunk, token_offset: int, control_offset: int, zygote: int) -> None:
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != zygote:  # the zygote died before we could ask to die with it
        os._exit(1)
    set_child_subreaper(True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    control = Control.from_buffer(chunk.mm, control_offset)
    control.pid = os.getpid()
    sock = socket.socket(fileno=sock_fd)
    worker = _Worker(sock, chunk, token_offset, control)
    try:
        worker.serve()
    finally:
        _kill_and_reap_tree()
        os._exit(0)


def zygote_main(control_fd: int, chunk_fd: int) -> None:
    """Entry point of the zygote process (started by the pool with two inherited fds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctrl = socket.socket(fileno=control_fd)
    chunk = _cell.attach_chunk(chunk_fd, pinned=True)
    set_child_subreaper(True)
    prep = recv_seq(ctrl)
    if prep is None:
        os._exit(0)
    try:
        import multiprocessing.spawn

        multiprocessing.spawn.prepare(prep)
    except BaseException as exc:  # noqa: BLE001 - tasks from __main__ will fail, others work
        _send_or_exit(ctrl, ("prepare-failed", repr(exc)))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    workers: set[int] = set()
    selector = selectors.DefaultSelector()
    selector.register(ctrl, selectors.EVENT_READ, "ctrl")
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    _send_or_exit(ctrl, ("zygote-ready", os.getpid()))
    zygote_pid = os.getpid()
    running = True
    while running:
        for key, _ in selector.select():
            if key.data == "wake":
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
            else:
                try:
                    message, fds = recv_seq_fds(ctrl)
                except OSError:
                    message, fds = None, []
                if message is None:
                    running = False
                    break
                if message[0] == "spawn":
                    _, index, token_offset, control_offset = message
                    pid = os.fork()
                    if pid == 0:
                        selector.close()
                        ctrl.close()
                        os.close(wake_r)
                        os.close(wake_w)
                        _worker_main(fds[0], chunk, token_offset, control_offset, zygote_pid)
                    os.close(fds[0])
                    workers.add(pid)
                    try:
                        send_seq(ctrl, ("spawned", index, pid))
                    except OSError:
                        running = False
                        break
        # Reap everything that ended: workers (reported) and adopted orphans (silent).
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in workers:
                workers.discard(pid)
                with contextlib.suppress(OSError):
                    send_seq(ctrl, ("exited", pid, status))
    # The parent closed the channel or died: nothing may outlive it.
    for pid in list(workers):
        kill_tree_of(pid)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    kill_tree_of(os.getpid())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            break
    os._exit(0)


def _send_or_exit(ctrl: socket.socket, message: Any) -> None:
    """Send to the parent from a zygote with no worker yet; if the parent has already
    gone (a pool shut down while its zygote was starting), exit quietly."""
    try:
        send_seq(ctrl, message)
    except OSError:
        os._exit(0)


# -- SOCK_SEQPACKET records between the parent and the zygote ------------------------------
def send_seq(sock: socket.socket, message: Any, fds: list[int] | None = None) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv_seq_fds(sock: socket.socket) -> tuple[Any, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 4)
    if not data:
        return None, fds
    return pickle.loads(data), fds


def recv_seq(sock: socket.socket) -> Any:
    return recv_seq_fds(sock)[0]

