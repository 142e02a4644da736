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
parent reaches end-of-file, which the kernel delivers even if the parent is SIGKILLed.
Workers get a parent-death signal tied to the zygote: ``SIGKILL`` while idle, ``SIGSTOP``
while a task runs, so that if the zygote dies a busy worker freezes *with its task's tree
still under it* (a dead worker's children would go to PID 1), and the parent, which knows
every worker's pid (``Control.pid``, written by the worker before anything else), kills
each frozen tree and starts a new zygote. The zygote ends its workers itself on SIGTERM,
SIGHUP and SIGQUIT, as on its parent's end-of-file.

Why sweeps: a process that a task forks while its tree is being killed can escape the
freeze; when its parent dies it is re-parented to the nearest subreaper, the zygote. So
anything under the zygote that is not a live worker is, by definition, what is left of a
stopped tree. After every worker's death the parent asks the zygote to *sweep*: kill and
reap every such process, then report the worker's exit status. The parent settles the
worker's task only after the sweep, so "the tree is gone" is true when the caller hears.

The wire: parent <-> zygote are pickled records on a ``SOCK_SEQPACKET`` socket
(``spawn``/``sweep`` one way, ``zygote-ready``/``spawned``/``swept`` the other). Parent
<-> worker are length-prefixed frames (:mod:`._channel`) whose outer tuple holds only
builtins; a task's value travels inside as its own pickle (``blob``), so a value that
the parent cannot unpickle fails that task alone and never the channel.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
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
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from . import _cell, _context
from ._channel import encode, recv_frame
from ._exceptions import CancelledException, Terminated, UnreadableResultError
from ._platform import (
    children,
    descendants,
    send_signal,
    set_child_subreaper,
    set_parent_death_signal,
)
from ._token import CancellationToken

TASK_TOKEN_ID = "cancelflow.task-token"

#: True while a zygote imports the program's ``__main__``: a pool made then would be made
#: by the zygote itself (a script without an ``if __name__ == "__main__":`` guard).
importing_main = False


class Control(ctypes.Structure):
    """Per-worker words the parent reads without asking the worker."""

    _fields_ = (
        ("critical_until", ctypes.c_double),  # CLOCK_MONOTONIC deadline, 0 = none
        ("pid", ctypes.c_int32),
    )


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


def kill_tree_of(pid: int) -> list[int]:
    """SIGKILL every descendant of ``pid`` (not ``pid`` itself), freezing them first.

    Freezes (SIGSTOP) in rounds until a round finds nothing new, so that nothing forks
    past the walk, then kills every frozen process. Returns the pids it killed. A process
    forked in the instant between a walk and its parent's freeze can still escape; the
    zygote's sweep (see the module docstring) catches it once its parent is dead.
    """
    stopped: list[int] = []
    seen: set[int] = set()
    for _ in range(64):
        found = [p for p in descendants(pid) if p not in seen]
        if not found:
            break
        for child in found:
            seen.add(child)
            with contextlib.suppress(ValueError):
                send_signal(child, signal.SIGSTOP)
            stopped.append(child)
    for child in stopped:
        with contextlib.suppress(ValueError):
            send_signal(child, signal.SIGKILL)
    return stopped


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
#: The C function behind signal.getsignal, without its conversion to enums (60x faster).
_getsignal: Callable[[int], Any] = getattr(_signal, "getsignal", signal.getsignal)
#: Signals whose disposition a task can change (all but SIGKILL and SIGSTOP).
_SIGNALS = tuple(
    sig for sig in sorted(signal.valid_signals()) if sig not in (signal.SIGKILL, signal.SIGSTOP)
)


class _ProcessState:
    """What a task may change in its worker's process, put back after each task.

    A task runs in a long-lived worker, so a change it makes to the process would
    otherwise reach every later task of that worker: a lowered ``RLIMIT_AS`` makes
    them all fail with ``MemoryError``, a task's own SIGTERM handler (or ``SIG_IGN``)
    defeats the ladder's second step. Restored after each task: the signal mask, every
    signal's disposition (as set through :mod:`signal`), resource limits, the working
    directory and the environment. The worker *retires* (the pool replaces it) when
    something cannot be put back: a hard limit lowered for good, a working directory
    that is gone, or a thread the task started that is still running.

    Not restored (documented): file descriptors the task left open, module-level state
    it changed (imports, globals, caches), dispositions changed behind :mod:`signal`'s
    back (``sigaction`` through ctypes). Use ``max_tasks_per_child`` to bound those.
    """

    def __init__(self) -> None:
        self.limits = {limit: resource.getrlimit(limit) for limit in _RLIMITS}
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.handlers = [(sig, _getsignal(sig)) for sig in _SIGNALS]
        self.cwd = os.getcwd()
        self.environ: dict[bytes, bytes] = dict(_environ_data())
        self.threads = {t.ident for t in threading.enumerate()}

    def restore(self) -> str | None:
        """Restore the worker's state; return why it cannot be, else ``None``."""
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        getsignal = _getsignal
        for sig, handler in self.handlers:
            if getsignal(sig) is not handler:
                signal.signal(sig, handler)
        for limit, values in self.limits.items():
            if resource.getrlimit(limit) != values:
                try:
                    resource.setrlimit(limit, values)
                except (ValueError, OSError) as exc:
                    return f"a resource limit changed by the task cannot be restored: {exc}"
        if _environ_data() != self.environ:
            os.environ.clear()
            os.environ.update(
                {os.fsdecode(key): os.fsdecode(value) for key, value in self.environ.items()}
            )
        try:
            if os.getcwd() != self.cwd:
                os.chdir(self.cwd)
        except OSError as exc:
            return f"the working directory cannot be restored: {exc}"
        if threading.active_count() == len(self.threads):
            return None
        left = [
            t.name
            for t in threading.enumerate()
            if t.ident not in self.threads and t.is_alive() and not t.name.startswith("cancelflow-")
        ]
        if left:
            return f"the task left threads running: {', '.join(left)}"
        return None


def _environ_data() -> dict[bytes, bytes]:
    data: dict[bytes, bytes] = os.environ._data  # type: ignore[attr-defined]
    return data


class _TaskToken(CancellationToken):
    """The worker's view of a task's token: a cancel made here is also sent to the parent."""

    def cancel(self, reason: str | None = None) -> bool:
        won = super().cancel(reason)
        if won:
            with contextlib.suppress(OSError):
                self._worker.send(("cancel", self._seq, reason))
        return won


def _type_name(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _blob(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def remote_traceback_text(exc: BaseException) -> str:
    """The worker's text of ``exc``, formatted as ``ProcessPoolExecutor`` formats it."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f'\n"""\n{text}"""'


def run_chunk(fn: Callable[..., Any], chunk: list[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn`` over one chunk of :meth:`ProcessPool.map`'s arguments, in order."""
    return [fn(*args) for args in chunk]


class _Worker:
    def __init__(
        self,
        sock: socket.socket,
        chunk: _cell.Chunk,
        token_offset: int,
        control: Control,
        max_tasks: int | None,
    ) -> None:
        self.sock = sock
        self.chunk = chunk
        self.token_offset = token_offset
        self.control = control
        # Re-entrant, with a queue for re-entry: a signal handler in the task may cancel
        # the task's token (which sends) while this thread is inside send().
        self.send_lock = threading.RLock()
        self.sending = False
        self.pending: list[bytes] = []
        self.state = _ProcessState()
        self.retiring: str | None = None
        self.tasks_left = max_tasks
        self.pid = os.getpid()

    def send(self, message: Any) -> None:
        """Send one frame; safe from another thread and from a signal handler.

        A frame sent by a signal handler that interrupted a send on the same thread is
        queued and sent right after the interrupted one: frames never interleave.
        """
        data = encode(message)
        with self.send_lock:
            if self.sending:
                self.pending.append(data)
                return
            self.sending = True
            try:
                self.sock.sendall(data)
                while self.pending:
                    self.sock.sendall(self.pending.pop(0))
            finally:
                self.sending = False

    def serve(self, initializer: bytes | None) -> None:
        if initializer is not None and not self.initialize(initializer):
            return
        self.state = _ProcessState()  # what the initializer set up is the clean state
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

    def initialize(self, payload: bytes) -> bool:
        """Run the pool's ``initializer``; on failure tell the pool (it breaks) and end."""
        try:
            fn, args = pickle.loads(payload)
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the pool, which breaks
            with contextlib.suppress(OSError):
                self.send(("init-failed", os.getpid(), f"{exc!r}", remote_traceback_text(exc)))
            return False
        return True

    def run_task(self, seq: int, payload: bytes) -> None:
        token = _TaskToken._on_slot(self.chunk, self.token_offset, name=f"task-{seq}")
        token._worker = self
        token._seq = seq

        def sink(key: str, value: Any) -> None:
            self.send(("partial", seq, key, _blob(value), _type_name(value)))

        control = self.control
        _context._critical_hook = lambda seconds: _critical_section(seconds, control)
        kind: str
        value: Any = None
        # While a task runs, the zygote's death freezes this worker with the task's tree
        # under it (the pool then kills the tree); an idle worker just dies with it.
        set_parent_death_signal(signal.SIGSTOP)
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
        if os.getpid() != self.pid:
            # A process the task forked returned (or raised) out of the task: it must not
            # answer for the task nor read the worker's channel.
            os._exit(1 if kind == "error" else 0)
        set_parent_death_signal(signal.SIGKILL)
        if kind == "terminated" or token.is_cancelled:
            _kill_and_reap_tree()
        else:
            _reap_children()
        self.retiring = self.state.restore()
        if self.retiring is None and self.tasks_left is not None:
            self.tasks_left -= 1
            if self.tasks_left <= 0:
                self.retiring = "max_tasks_per_child reached"
        if self.retiring is not None:
            # Said before the result, so that the pool never hands this worker a task.
            self.send(("retire", seq, self.retiring))
        self.send(self.outcome(seq, kind, value, token))

    def outcome(self, seq: int, kind: str, value: Any, token: CancellationToken) -> tuple[Any, ...]:
        """The result message: builtins outside, the value as its own pickle inside.

        A value that does not pickle here is replaced by the pickling error (as
        ``ProcessPoolExecutor`` does); the worker's text of an exception travels beside it
        so that the parent can attach it as ``__cause__``, or report it if the exception
        cannot be unpickled there.
        """
        text = ""
        if kind == "error":
            stopped = isinstance(value, CancelledException) and token.is_cancelled
            if not stopped:  # the pool makes its own error for a stopped task
                text = remote_traceback_text(value)
        if kind == "terminated":
            return ("result", seq, kind, None, "")
        try:
            blob = _blob(value)
        except BaseException as exc:  # noqa: BLE001 - the value would not pickle
            if kind == "ok":
                kind, text = "error", remote_traceback_text(exc)
                what = exc
            else:
                what = UnreadableResultError(
                    f"the task raised {_type_name(value)}, which cannot be pickled: {exc!r}",
                    what="exception",
                    remote_text=text,
                )
            try:
                blob = _blob(what)
            except BaseException as again:  # noqa: BLE001 - even the pickling error
                blob = _blob(
                    UnreadableResultError(
                        f"the task's {'result' if kind == 'ok' else 'exception'} cannot be "
                        f"pickled: {again!r}",
                        remote_text=text,
                    )
                )
            return ("result", seq, "error", blob, text)
        return ("result", seq, kind, blob, text or _type_name(value))


def _worker_main(
    sock_fd: int,
    chunk: _cell.Chunk,
    token_offset: int,
    control_offset: int,
    zygote: int,
    options: dict[str, Any],
) -> None:
    control = Control.from_buffer(chunk.mm, control_offset)
    control.pid = os.getpid()  # first: the parent can find this process if the zygote dies
    set_parent_death_signal(signal.SIGKILL)  # SIGSTOP while a task runs, see run_task
    if os.getppid() != zygote:  # the zygote died before we could ask to die with it
        os._exit(1)
    set_child_subreaper(True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    sock = socket.socket(fileno=sock_fd)
    worker = _Worker(sock, chunk, token_offset, control, options.get("max_tasks"))
    try:
        worker.serve(options.get("initializer"))
    finally:
        _kill_and_reap_tree()
        os._exit(0)


def zygote_main(control_fd: int, chunk_fd: int) -> None:
    """Entry point of the zygote process (started by the pool with two inherited fds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctrl = socket.socket(fileno=control_fd)
    chunk = _cell.attach_chunk(chunk_fd, pinned=True)
    set_child_subreaper(True)
    try:
        message, fds = recv_seq_fds(ctrl)
    except OSError:
        message, fds = None, []
    if message is None or not fds:
        os._exit(0)
    with os.fdopen(fds[0], "rb") as setup_file:  # a file: the setup may be large
        prep, options = pickle.load(setup_file)
    global importing_main
    importing_main = True
    try:
        import multiprocessing.spawn

        multiprocessing.spawn.prepare(prep)
    except BaseException as exc:  # noqa: BLE001 - tasks from __main__ will fail, others work
        _send_or_exit(ctrl, ("prepare-failed", repr(exc)))
    finally:
        importing_main = False
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # A termination signal (a whole process group's SIGTERM, a hang-up) ends the zygote
    # the way the parent's end-of-file does: every worker tree is killed first.
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, lambda signum, _: stopping.append(signum))
    workers: set[int] = set()
    statuses: dict[int, int] = {}  # reaped workers whose sweep was not asked for yet
    selector = selectors.DefaultSelector()
    selector.register(ctrl, selectors.EVENT_READ, "ctrl")
    selector.register(wake_r, selectors.EVENT_READ, "wake")
    _send_or_exit(ctrl, ("zygote-ready", os.getpid()))
    zygote_pid = os.getpid()
    running = True
    while running and not stopping:
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
                        _worker_main(
                            fds[0], chunk, token_offset, control_offset, zygote_pid, options
                        )
                    os.close(fds[0])
                    workers.add(pid)
                    try:
                        send_seq(ctrl, ("spawned", index, pid))
                    except OSError:
                        running = False
                        break
                elif message[0] == "sweep":
                    pid = message[1]
                    status, swept = _sweep(pid, workers, statuses)
                    try:
                        send_seq(ctrl, ("swept", pid, status, swept))
                    except OSError:
                        running = False
                        break
        # Reap everything that ended: workers (status kept for their sweep) and strays.
        _reap(workers, statuses)
    # The parent closed the channel or died: nothing may outlive it.
    _kill_and_reap_tree()
    os._exit(0)


def _reap(workers: set[int], statuses: dict[int, int]) -> None:
    """Reap every child that ended; keep the exit status of workers for their sweep."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in workers:
            workers.discard(pid)
            statuses[pid] = status


def _sweep(worker: int, workers: set[int], statuses: dict[int, int]) -> tuple[int | None, int]:
    """After ``worker`` died: reap it, then kill and reap every stray process.

    A stray is any child of the zygote that is not a live worker: what is left of a
    stopped tree (re-parented here when its parent died). Loops until none is left, since
    killing a stray re-parents its own children here. Returns the worker's exit status
    (``None`` if it could not be had within the bound) and how many strays were killed.
    """
    deadline = time.monotonic() + 10.0
    swept = 0
    while True:
        _reap(workers, statuses)
        if worker in workers:  # not exited yet (the parent saw it die, so it is a zombie
            try:  # or about to be one): wait for it
                pid, status = os.waitpid(worker, 0)
            except ChildProcessError:
                workers.discard(worker)
            else:
                workers.discard(pid)
                statuses[pid] = status
            continue
        strays = [pid for pid in children(os.getpid()) if pid not in workers]
        if not strays or time.monotonic() > deadline:
            return statuses.pop(worker, None), swept
        for stray in strays:
            swept += 1 + len(kill_tree_of(stray))
            with contextlib.suppress(ValueError):
                send_signal(stray, signal.SIGKILL)
        for stray in strays:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(stray, 0)


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
