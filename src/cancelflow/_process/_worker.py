"""A worker of :class:`cancelflow.ProcessPool`: runs one task at a time, in a clean process.

Process layout, per pool::

    your program (pool supervisor thread)
      └── zygote      fresh interpreter; single-threaded; subreaper (see ._zygote)
            ├── worker 0   forked from the zygote; subreaper; one socket to the parent
            │     └── whatever the task starts (children, grandchildren, daemons)
            └── worker 1 ...

Why subreapers: a task's grandchildren whose parent exits are re-parented to the worker
(not to PID 1), so the worker's process tree always holds everything the task started;
when a worker is killed, what is left is re-parented to the zygote, which reaps it. No
zombies pile up even where PID 1 never reaps (containers).

Why no orphans: workers get a parent-death signal tied to the zygote: ``SIGKILL`` while
idle, ``SIGSTOP`` while a task runs, so that if the zygote dies a busy worker freezes
*with its task's tree still under it* (a dead worker's children would go to PID 1), and
the parent, which knows every worker's pid (``Control.pid``, written by the worker before
anything else), kills each frozen tree and starts a new zygote.

A task's SIGTERM (the ladder's second step) becomes :class:`~cancelflow._exceptions.Terminated`
in the task, deferred inside ``critical_section``. After each task the worker kills what
the task left (if it was stopped) or reaps it, and restores its process state; what
cannot be restored retires the worker.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import collections
import contextlib
import ctypes
import functools
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Literal

try:
    import resource
except ImportError:  # the "windows" flavour: importable, never runs a worker
    resource = None  # type: ignore[assignment]

from .. import _cell, _context
from .._exceptions import CancelledException, Terminated, UnreadableResultError
from .._platform import (
    HAVE_FUTEX,
    contain_descendants,
    futex_bump,
    futex_wait,
    kill_group_members,
    kill_tree,
    set_parent_death_signal,
)
from .._token import CancellationToken, token_on_slot
from ._channel import FrameSource, encode
from ._pickling import dump_result
from ._protocol import (
    TASK_TOKEN_ID,
    Cancel,
    Control,
    CriticalEnded,
    Held,
    InitFailed,
    Outcome,
    Partial,
    Ready,
    Release,
    Result,
    Retire,
    RunTask,
    WorkerMessage,
    full_barrier,
    read,
    wire,
)


class _State:
    running = False
    critical_depth = 0
    #: when the outermost critical section's declared time runs out (monotonic)
    critical_until = 0.0
    term_pending = False
    #: how this worker keeps its task's orphans (``contain_descendants``)
    containment: str | None = None
    #: a task called ``resource.setrlimit`` or ``resource.prlimit`` (see watch_limits)
    limits_touched = False


_state = _State()


def watch_limits() -> None:
    """Have ``resource.setrlimit`` and ``resource.prlimit`` note that they were called.

    Reading every limit back after each task (16 system calls on Linux) cost more than a
    trivial task itself; a task changes a limit through these two functions, so only a
    task that called one has its limits compared and put back. The zygote wraps them
    before it imports the program's ``__main__`` (a module that binds the name then
    binds the wrapper). Not seen: a limit changed behind :mod:`resource`'s back (by C
    code or ctypes calling ``setrlimit``, by another process), or through a name bound
    to the original before the zygote started (in ``cancelflow``'s own imports).
    Idempotent.
    """
    for name in ("setrlimit", "prlimit"):
        original = getattr(resource, name, None)
        if original is None or getattr(original, "__wrapped__", None) is not None:
            continue

        def watched(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            _state.limits_touched = True
            return _original(*args, **kwargs)

        setattr(resource, name, functools.wraps(original)(watched))


def _on_sigterm(signum: int, frame: object) -> None:
    if not _state.running:
        return
    if _state.critical_depth and time.monotonic() < _state.critical_until:
        _state.term_pending = True  # raised when the section ends
        return
    raise Terminated()  # (also inside a section that overran its declared time)


@contextlib.contextmanager
def _critical_section(
    seconds: float, control: Control, on_outer_exit: Callable[[], None]
) -> Iterator[None]:
    """A critical section in a worker: ``control.critical_until`` tells the pool to defer
    its SIGTERM and SIGKILL steps until then; the outermost block's end clears it, and
    calls ``on_outer_exit`` (which tells the pool if it deferred a step, see
    :meth:`_Worker.critical_ended`), then raises the SIGTERM that came meanwhile."""
    outer = _state.critical_depth == 0
    if outer:
        _state.critical_until = control.critical_until = time.monotonic() + seconds
        full_barrier()
        if control.kill_pending:
            # The pool is killing this task (at once, or as soon as the section open when
            # it decided has ended): the kill may land any moment, so the block must not
            # start.
            _state.critical_until = control.critical_until = 0.0
            on_outer_exit()
            raise CancelledException("the task is being killed: its critical section did not start")
    _state.critical_depth += 1
    try:
        yield
    finally:
        _state.critical_depth -= 1
        if outer:
            control.critical_until = 0.0
            on_outer_exit()
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


def _load_call(payload: bytes, token: CancellationToken) -> Any:
    """The task's ``(fn, args, kwargs)``; what fails to unpickle here (even with
    ``SystemExit``) is an :class:`UnreadableResultError` (``what="call"``, a
    ``BrokenProcessPool`` as the stdlib raises), failing this task alone."""
    try:
        return _TaskUnpickler(payload, token).load()
    except Terminated:
        raise
    except BaseException as exc:
        raise UnreadableResultError(
            f"the task's function or arguments could not be unpickled in the worker: {exc!r}",
            what="call",
            remote_text=remote_traceback_text(exc),
        ) from exc


def kill_and_reap_tree() -> None:
    """Kill everything this worker's task left and wait until each one is reaped.

    A subreaper worker (``"linux"``) gets orphaned grandchildren back; each round kills
    every current descendant, so the blocking wait returns promptly. For the same reason
    such a worker without a child has no descendant at all: then nothing is scanned (the
    scan of ``/proc`` is most of a cooperative stop's cost in the worker). A worker that
    leads a process group instead (``"posix"``) always looks: an orphan went to init, and
    only the group (which ``kill_tree`` of this process covers) still reaches it.
    """
    try:
        os.waitpid(-1, os.WNOHANG)  # reaps one zombie, if any; the loop does the rest
    except ChildProcessError:
        if _state.containment != "group":
            return  # no child, so no descendant: an orphan would have come back to us
        kill_group_members()  # its orphans, still in this worker's group
        return
    while True:
        kill_tree(os.getpid())
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
#: The C function behind signal.pthread_sigmask, whose wrapper turns every signal of the
#: returned set into an enum (most of a restore's cost after a task).
#: (The "windows" flavour has none, and never runs a worker.)
_sigmask: Callable[[int, Any], Any] = getattr(_signal, "pthread_sigmask", lambda how, mask: set())
#: Signals whose disposition a task can change (all but SIGKILL and SIGSTOP).
_SIGNALS = tuple(
    sig
    for sig in sorted(signal.valid_signals())
    if sig not in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None))
)


class _ProcessState:
    """What a task may change in its worker's process, put back after each task.

    A task runs in a long-lived worker, so a change it makes to the process would
    otherwise reach every later task of that worker: a lowered ``RLIMIT_AS`` makes
    them all fail with ``MemoryError``, a task's own SIGTERM handler (or ``SIG_IGN``)
    defeats the ladder's second step. Restored after each task: the signal mask, every
    signal's disposition (as set through :mod:`signal`), resource limits (as set through
    :mod:`resource`), the working directory and the environment. The worker *retires*
    (the pool replaces it) when something cannot be put back: a hard limit lowered for
    good, a working directory that is gone, or a thread the task started that is still
    running.

    In steps, so that the caller does not wait for the last: as soon as the task is
    over, :meth:`restore_handlers` (a signal the ladder sends while the result is built
    and sent must reach the worker's handler, not one the task installed); then
    :meth:`check` puts back what may fail and so retire the worker, which the pool must
    hear before the result; after the result is sent, :meth:`reset` puts back the
    environment and the signal mask (last: a signal the task blocked and left pending is
    delivered to the worker's own handler).

    Not restored (documented): file descriptors the task left open, module-level state
    it changed (imports, globals, caches), dispositions and limits changed behind the back
    of :mod:`signal` and :mod:`resource` (``sigaction`` or ``setrlimit`` through ctypes,
    ``prlimit`` from another process). Use ``max_tasks_per_child`` to bound those.
    """

    def __init__(self) -> None:
        _state.limits_touched = False
        self.limits = {limit: resource.getrlimit(limit) for limit in _RLIMITS}
        self.mask = _sigmask(signal.SIG_BLOCK, ())
        self.handlers = list(map(_getsignal, _SIGNALS))
        self.cwd = os.getcwd()
        self.environ: dict[bytes, bytes] = dict(_environ_data())
        self.threads = {t.ident for t in threading.enumerate()}

    def check(self) -> str | None:
        """Put back the limits (if the task set one) and the working directory; return
        why the worker must retire (this or a thread the task left running), else
        ``None``."""
        if _state.limits_touched:
            try:
                for limit, values in self.limits.items():
                    if resource.getrlimit(limit) != values:
                        try:
                            resource.setrlimit(limit, values)
                        except (ValueError, OSError) as exc:
                            return f"a resource limit changed by the task cannot be restored: {exc}"
            finally:
                _state.limits_touched = False  # (after: this very setrlimit sets it)
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

    def restore_handlers(self) -> None:
        """Put back every signal's disposition (as set through :mod:`signal`)."""
        if list(map(_getsignal, _SIGNALS)) == self.handlers:  # (one C-level pass)
            return
        for sig, handler in zip(_SIGNALS, self.handlers, strict=True):
            if _getsignal(sig) is not handler:
                signal.signal(sig, handler)

    def reset(self) -> None:
        """Put back the environment, then the signal mask (cannot fail)."""
        if _environ_data() != self.environ:
            os.environ.clear()
            os.environ.update(
                {os.fsdecode(key): os.fsdecode(value) for key, value in self.environ.items()}
            )
        _sigmask(signal.SIG_SETMASK, self.mask)


def _environ_data() -> dict[bytes, bytes]:
    data: dict[bytes, bytes] = os.environ._data  # type: ignore[attr-defined]
    return data


class _TaskToken(CancellationToken):
    """The worker's view of a task's token: a cancel made here is also sent to the parent."""

    _has_twin = True

    def cancel(self, reason: str | None = None) -> bool:
        won = super().cancel(reason)
        if won:
            with contextlib.suppress(OSError):
                self._worker.send(Cancel(self._seq, reason))
        return won


#: the longest a worker holds the result of a stopped task for the caller that settles it
#: (see _Worker.tell_callers_stopped)
_HEAD_START = 0.002
#: how long of that it polls for the caller's word before it sleeps on it: the caller,
#: usually under way already, then acknowledges with a plain store, no system call
_ACK_POLL = 0.0003
#: the longest the pool's kill of a worker waits for the worker's reap of a stopped
#: task's tree (see _Worker.reap_stopped_tree): far more than a reap takes
_REAP_BOUND = 2.0


def _type_name(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


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
        control_offset: int,
        control: Control,
        max_tasks: int | None,
    ) -> None:
        self.sock = sock
        self.frames = FrameSource(sock, before_wait=self.die_with_zygote)
        #: the parent-death signal is SIGSTOP (see run_task), else SIGKILL
        self.freezes = False
        self.chunk = chunk
        #: the worker's token slots, up to its control block: a task's RunTask names its
        #: own (a worker holds several tasks: the one it runs and those after it)
        self.token_offsets = tuple(range(token_offset, control_offset, _cell.SLOT_SIZE))
        self.control = control
        #: the seq of the task run last (0: none yet), and the tasks claimed since it,
        #: it first (run or not started): a signal for any of them may be on its way
        self.ran = 0
        self.since: list[int] = []
        #: tasks that arrived while the worker held one (see claim), in order
        self.arrived: collections.deque[RunTask] = collections.deque()
        # Re-entrant, with a queue for re-entry: a signal handler in the task may cancel
        # the task's token (which sends) while this thread is inside send().
        self.send_lock = threading.RLock()
        self.sending = False
        self.pending: list[bytes] = []
        #: frames sent so far (a stopped task says how many it sent: see run_task)
        self.sent = 0
        self.state = _ProcessState()
        self.retiring: str | None = None
        #: the task running now (see critical_ended)
        self.seq: int | None = None
        self.tasks_left = max_tasks
        self.pid = os.getpid()

    def send(self, message: WorkerMessage) -> None:
        """Send one frame; safe from another thread and from a signal handler.

        A frame sent by a signal handler that interrupted a send on the same thread is
        queued and sent right after the interrupted one: frames never interleave.
        """
        data = encode(wire(message))
        with self.send_lock:
            self.sent += 1
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
        control = self.control  # critical sections of this worker's tasks defer its stops
        ended = self.critical_ended
        _context.set_critical_hook(lambda seconds: _critical_section(seconds, control, ended))
        try:
            self.send(Ready(os.getpid()))
        except OSError:  # the pool closed this worker's channel while it was starting
            return
        while True:
            task = self.arrived.popleft() if self.arrived else self.receive()
            if task is None:
                return
            token = token_on_slot(
                self.chunk, self.token_offsets[task.slot], name=f"task-{task.seq}", kind=_TaskToken
            )
            verdict = self.claim(task.seq, task.slot, token)
            if verdict is None:
                return
            if verdict != "run":  # stopped before it started, or moved: nothing ran
                self.idle_unless_next()
                self.send(Result(task.seq, verdict, None, ""))
                continue
            self.run_task(task.seq, task.payload, token)
            if self.retiring is not None:
                return  # the pool was told; it replaces this worker once it exits

    def receive(self) -> RunTask | None:
        """The next task from the pool (``None``: the channel closed). A ``Release`` read
        here is a late one, for a hold that ended already: skipped."""
        while True:
            try:
                message = read(self.frames.next())
            except (EOFError, OSError):
                return None
            if isinstance(message, RunTask):
                return message

    def claim(
        self, seq: int, slot: int, token: CancellationToken
    ) -> Literal["run", "revoked", "moved"] | None:
        """Claim task ``seq`` (whose token is ``token``, on token slot ``slot``) before
        it starts: ``"run"`` it, or not: ``"revoked"`` (stopped before it started),
        ``"moved"`` to another worker; ``None`` if the channel closed.

        The pool may hand a worker its next task while the current one runs, and stops
        a task with signals to the worker's process, so a signal meant for one task must
        never reach another. The worker writes ``Control.running`` (it claims the task),
        then reads ``Control.stop_for``; the pool writes ``stop_for`` (the task it is
        about to signal), then reads ``running`` and signals only if it names that task
        (:meth:`Supervisor._may_signal`), with a full barrier on both sides: at least one
        of them sees the other's write. So:

        * ``stop_for`` names this task: the pool is stopping it, maybe with a signal on
          its way: it never starts. So it does not when its token is cancelled: the pool
          cancels it before it reads ``running`` to learn whether a waiting task it
          stops was claimed (:meth:`Supervisor._revoke`);
        * ``steal_for`` of its slot names this task: the pool took it back to run it on
          another worker, if this worker had not claimed it yet; it does not start
          here, and the pool learns from this worker's answer where it did not know;
        * it names the task run last or one claimed since (which did not start: the
          pool may signal a task it has not heard of as not started): a signal for
          that one may still be on its way: the worker holds this task, says so
          (``Held``) and waits until the pool, which has sent every signal it decided by
          then, says ``Release`` (or kills it).

        While the worker does not run the task, ``running`` names the task it ran last.
        """
        control = self.control
        while True:
            control.running = seq
            full_barrier()
            stop, moved = control.stop_for, control.steal_for[slot] == seq
            if stop == seq or token.is_cancelled or moved:
                control.running = self.ran
                self.since.append(seq)
                return "moved" if moved else "revoked"
            if stop not in self.since:
                self.since = [seq]
                self.ran = control.started = seq
                return "run"
            control.running = self.ran
            with contextlib.suppress(OSError):
                self.send(Held(seq))
            while True:  # tasks sent meanwhile wait their turn
                try:
                    message = read(self.frames.next())
                except (EOFError, OSError):
                    return None
                if isinstance(message, Release):
                    break
                if isinstance(message, RunTask):
                    self.arrived.append(message)

    def idle_unless_next(self) -> None:
        """No task's tree is under this worker now: it dies with the zygote, unless it
        goes on with a next task it has read already (and does not retire)."""
        if self.retiring is not None or not (self.arrived or self.frames.buffered()):
            self.die_with_zygote()

    def die_with_zygote(self) -> None:
        """Called before the worker may block reading its channel: from now on it dies
        with the zygote instead of freezing (it holds no task's tree; the pool kills a
        frozen worker all the same, whatever it did)."""
        if self.freezes:
            self.freezes = False
            set_parent_death_signal(signal.SIGKILL)

    def critical_ended(self) -> None:
        """The task left its outermost critical section: if the pool deferred a stop step
        for it (``Control.step_waits``), say so once, and the pool takes the step now
        instead of at the section's declared end. (Not promised: a deferral decided in
        the same instant, the flag read before the pool's write lands; that step then
        waits for the declared end, the bound the section gave.)"""
        control, seq = self.control, self.seq
        if control.step_waits and seq is not None:
            control.step_waits = 0
            with contextlib.suppress(OSError):
                self.send(CriticalEnded(seq))

    def initialize(self, payload: bytes) -> bool:
        """Run the pool's ``initializer``; on failure tell the pool (it breaks) and end."""
        try:
            fn, args = pickle.loads(payload)
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the pool, which breaks
            with contextlib.suppress(OSError):
                self.send(InitFailed(os.getpid(), f"{exc!r}", remote_traceback_text(exc)))
            return False
        return True

    def run_task(self, seq: int, payload: bytes, token: _TaskToken) -> None:
        token._worker = self
        token._seq = seq

        def sink(key: str, value: Any) -> None:
            self.send(Partial(seq, key, dump_result(value), _type_name(value)))

        kind: Outcome
        value: Any = None
        # While a task runs, the zygote's death freezes this worker with the task's tree
        # under it (the pool then kills the tree); an idle worker just dies with it. (On
        # "posix", where the worker's group holds the tree, both kill the group at once.)
        # It keeps freezing until it may block for the pool (die_with_zygote): one
        # task to the next one already sent costs no system call.
        if not self.freezes:
            self.freezes = True
            set_parent_death_signal(signal.SIGSTOP)
        self.seq = seq
        sent = self.sent
        try:
            _state.running = True
            with _context.task_scope(token, sink):
                fn, args, kwargs = _load_call(payload, token)
                value = fn(*args, **kwargs)
            kind = "ok"
        except Terminated:
            kind = "terminated"
        except BaseException as exc:  # noqa: BLE001 - every error goes back to the caller
            kind, value = "error", exc
        finally:
            _state.running = False
            _state.term_pending = False
            self.seq = None
        if os.getpid() != self.pid:
            # A process the task forked returned (or raised) out of the task: it must not
            # answer for the task nor read the worker's channel.
            os._exit(1 if kind == "error" else 0)
        self.state.restore_handlers()
        stopped = token.is_cancelled
        if kind == "terminated" or stopped:
            self.reap_stopped_tree()
        else:
            _reap_children()
        if stopped and kind == "error" and isinstance(value, CancelledException):
            kind = "stopped"  # the pool makes the caller's error: nothing to pickle
        frames = self.sent - sent  # what the pool reads of it before its result
        if not self.control.serves and _serving():
            self.control.serves = 1
        self.retiring = self.state.check()
        if self.retiring is None and self.tasks_left is not None:
            self.tasks_left -= 1
            if self.tasks_left <= 0:
                self.retiring = "max_tasks_per_child reached"
        # Its tree is gone: unless it runs a next task (here already), it dies with the
        # zygote from now on, before anything it sends may tell the pool (and whoever
        # watches it) it is idle, and before anything that may take long (the callers'
        # acknowledgement, pickling the result).
        self.idle_unless_next()
        if self.retiring is not None:
            # Said before the result, so that the pool never hands this worker a task.
            self.send(Retire(seq, self.retiring))
        if kind == "stopped":
            self.tell_callers_stopped(seq, frames)
        self.send(self.outcome(seq, kind, value))
        self.state.reset()  # before the next task is read; the caller need not wait

    def reap_stopped_tree(self) -> None:
        """Kill and reap what a stopped task left, as a critical section (at most
        :data:`_REAP_BOUND`): the pool's SIGKILL of this worker waits for it, since one
        landing between the reap's freezes and its kills would leave the frozen processes
        stopped for good where the pool's own kill cannot find them (on ``"posix"``, an
        orphan that left this worker's group with ``setsid()``). If the pool is killing
        this worker already, the reap is left to that kill, which takes this worker's
        whole tree from outside, this worker frozen first."""
        try:
            with _critical_section(_REAP_BOUND, self.control, self.critical_ended):
                kill_and_reap_tree()
        except CancelledException:
            pass  # the pool's kill is on its way: it takes the tree

    def tell_callers_stopped(self, seq: int, frames: int) -> None:
        """Task ``seq`` ended stopped, its tree reaped, having sent ``frames`` frames
        before the result about to go: say so in ``Control.stopped`` and wake the callers
        blocked in its future's ``result()``, which settle it without waiting for the pool
        to read that result, once the pool has handled those frames (the pool would
        decide the same, from nothing more).

        If a caller waits (``Control.waiting``), the result goes once it says it settled
        the future (``Control.acked`` reads the task's seq), or after at most
        :data:`_HEAD_START`: the pool's thread, woken by the result, would otherwise take
        the parent's GIL first and keep the caller waiting for its whole turn. It polls
        the word for :data:`_ACK_POLL` (yielding its CPU between reads), so that the caller
        acknowledges with a store; then it says it sleeps (``Control.ack_sleeping``) and
        sleeps on the word, and the caller, reading that after its store, wakes it."""
        control = self.control
        control.stopped_frames = frames
        full_barrier()  # (read after ``stopped``)
        control.stopped = seq
        if not HAVE_FUTEX:
            return
        futex_bump(ctypes.addressof(control) + Control.ended.offset)
        if control.waiting != seq:
            return
        mine = seq & 0xFFFFFFFF
        now = time.monotonic()
        until, poll_until = now + _HEAD_START, now + _ACK_POLL
        while control.acked != mine:
            if time.monotonic() >= poll_until:
                break
            os.sched_yield()
        else:
            return
        control.ack_sleeping = seq
        full_barrier()  # (written before ``acked`` is read again: see _supervisor._ack_stopped)
        while (seen := control.acked) != mine and (left := until - time.monotonic()) > 0:
            futex_wait(ctypes.addressof(control) + Control.acked.offset, seen, left)

    def outcome(self, seq: int, kind: Outcome, value: Any) -> Result:
        """The result message: builtins outside, the value as its own pickle inside.

        A value that does not pickle here is replaced by the pickling error (as
        ``ProcessPoolExecutor`` does); the worker's text of an exception travels beside it
        so that the parent can attach it as ``__cause__``, or report it if the exception
        cannot be unpickled there.
        """
        if kind == "terminated" or kind == "stopped":
            return Result(seq, kind, None, "")
        text = remote_traceback_text(value) if kind == "error" else ""
        try:
            blob = dump_result(value)
        except BaseException as exc:  # noqa: BLE001 - the value would not pickle
            what_failed = "result" if kind == "ok" else "exception"
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
                blob = dump_result(what)
            except BaseException as again:  # noqa: BLE001 - even the pickling error
                blob = dump_result(
                    UnreadableResultError(
                        f"the task's {what_failed} cannot be pickled: {again!r}",
                        remote_text=text,
                    )
                )
            return Result(seq, "error", blob, text)
        return Result(seq, kind, blob, text or _type_name(value))


def worker_main(
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
    _state.containment = contain_descendants()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    sock = socket.socket(fileno=sock_fd)
    worker = _Worker(sock, chunk, token_offset, control_offset, control, options.get("max_tasks"))
    try:
        worker.serve(options.get("initializer"))
    finally:
        kill_and_reap_tree()
        _end_services()
        os._exit(0)


def _serving() -> bool:
    """Whether a task left this worker serving other processes (see :func:`_end_services`)."""
    remote = sys.modules.get("cancelflow._remote")
    return remote is not None and bool(remote.serving())


def _end_services() -> None:
    """End what cancelflow serves from this worker for other processes, which ``atexit``
    would end in a process that exits normally: the server of ``RemoteToken`` handles
    that a task made (its socket directory goes with it). A closing pool lets a worker
    that says so (``Control.serves``) exit on its own. Never raises."""
    remote = sys.modules.get("cancelflow._remote")
    if remote is not None:
        with contextlib.suppress(Exception):
            remote.close_server()
