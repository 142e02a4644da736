"""What the pool's processes say to each other, and the memory they share.

Every message is a small :class:`~typing.NamedTuple`, so a type checker follows each one
from the line that sends it to the ``match`` that handles it. On the wire a message is a
plain tuple ``(kind, *fields)`` of builtins (:func:`wire`; :func:`read` turns it back), so
the frame that carries a task's value can always be unpickled by the other side: a
value that cannot travels inside as its own pickle (a ``blob``) and fails its task alone.

Two channels:

* parent <-> zygote: length-prefixed pickled records on a stream socket, descriptors
  passed with a record's first bytes (:func:`send_record` / :func:`recv_record`);
* parent <-> worker: length-prefixed frames on a stream socket per worker
  (:mod:`._channel`).

Shared memory: each worker has a token slot (the task's cancel flag and reason) and a
:class:`Control` block in the pool's chunk, both written without asking the other side.
"""

from __future__ import annotations

import ctypes
import pickle
import socket
import struct
import threading
from typing import Any, Literal, NamedTuple

from .._cell import SLOT_SIZE

__all__ = (
    "DEEP_BYTES",
    "DEPTH",
    "QUICK_TASK",
    "SHALLOW",
    "TASK_TOKEN_ID",
    "Cancel",
    "Control",
    "Exited",
    "Held",
    "InitFailed",
    "Outcome",
    "Partial",
    "PrepareFailed",
    "Ready",
    "Release",
    "Result",
    "Retire",
    "RunTask",
    "Setup",
    "Spawn",
    "Spawned",
    "Sweep",
    "SweepStrays",
    "Swept",
    "WORKER_SLOTS",
    "WorkerMessage",
    "ZygoteMessage",
    "ZygoteReady",
    "full_barrier",
    "read",
    "recv_record",
    "send_record",
    "wire",
)

#: the persistent id under which a task's own token travels inside its payload
TASK_TOKEN_ID = "cancelflow.task-token"


#: The most tasks a worker holds: the one it runs and those handed to it to start after
#: it, each on its own token slot (see _supervisor.Supervisor._dispatch). Deep enough
#: that a worker finishing short tasks does not wait for the supervisor's turn, which on
#: a machine with as many busy workers as cores comes once per scheduler slice (trivial
#: tasks on 2 workers: 4 → 16 took ``benchmarks/bench_pool_throughput.py`` from
#: ~25k to ~34k tasks/s).
DEPTH = 16
#: A busy worker is handed tasks to start after its running one up to this many ...
SHALLOW = 3
#: ... and beyond that (up to ``DEPTH - 1``) only if its last task took less than
#: ``QUICK_TASK`` seconds (where the supervisor's turn is what it waits for; tasks of a
#: tenth of a second stay in the pool's queue, where ``cancel()`` and
#: ``shutdown(cancel_futures=True)`` drop them, as the stdlib's) ...
QUICK_TASK = 0.001
#: ... and while the calls waiting in its hands total at most this many pickled bytes
#: (big arguments do not pile up in a worker's memory and socket buffers).
DEEP_BYTES = 256 * 1024


class Control(ctypes.Structure):
    """Per-worker words the parent reads without asking the worker."""

    _fields_ = (
        ("critical_until", ctypes.c_double),  # CLOCK_MONOTONIC deadline, 0 = none
        ("pid", ctypes.c_int32),
        # 1 while the parent defers a stop step for a critical section: the worker, leaving
        # its outermost one, clears it and says so (CriticalEnded)
        ("step_waits", ctypes.c_int32),
        # 1 from just before a SIGKILL is decided (critical_until read) until the worker's
        # next task: a section the task enters meanwhile does not start
        ("kill_pending", ctypes.c_int32),
        # The seq of the last task the worker claimed (0: none yet): written just before
        # it starts one, after which it reads ``stop_for`` (see _worker._Worker.claim)
        ("running", ctypes.c_int64),
        # The seq of the last task the pool decided to signal (SIGTERM, SIGKILL, the
        # freeze of its tree): written just before it reads ``running`` (see
        # _supervisor.Supervisor._may_signal). A worker that finished that task holds
        # the next one until the pool releases it (Held, Release).
        ("stop_for", ctypes.c_int64),
        # Per token slot, the seq of the last task on it the pool took back to run on
        # another worker; written and read in the same order as ``stop_for`` (see
        # _supervisor.Supervisor._steal): several can be taken back at once
        ("steal_for", ctypes.c_int64 * DEPTH),
        # The seq of the last task the worker started (0: none yet), written once its
        # claim succeeded, before any of the task's code runs: a worker that dies hands
        # back what it holds after it (``running`` alone cannot tell: a worker may die
        # between writing it and learning it must hold or not start the task)
        ("started", ctypes.c_int64),
        # The seq of the last task that ended stopped (it raised its CancelledException
        # once its token was cancelled), written once its tree is reaped, just before its
        # result, after ``stopped_frames`` (how many frames it sent before its result:
        # partial results, its own cancel...), and then ``ended`` is bumped: a caller
        # blocked in its future's result() settles it from this, once the pool has handled
        # that many frames of it, without waiting for the pool to read the result (see
        # Supervisor.wait_on_worker)
        ("stopped_frames", ctypes.c_int64),
        ("stopped", ctypes.c_int64),
        # A futex word that callers blocked in a result() of this worker's task sleep on:
        # bumped (futex_bump: add 1 and wake, atomically) by the worker after ``stopped``,
        # and by the parent when it resolves a future that such a caller waits for
        ("ended", ctypes.c_uint32),
        # What the worker waits for for a moment after bumping ``ended`` for a task a
        # caller waits for (``waiting``): that caller writes the task's seq (its low 32
        # bits) here once it settled the future, and the worker sends the result then.
        # The worker polls it first; a futex word it sleeps on only after writing
        # ``ack_sleeping``, which the caller reads after its write to decide whether to
        # wake it (see _Worker.tell_callers_stopped)
        ("acked", ctypes.c_uint32),
        # The seq of the last task a caller blocked in result() waited for on ``ended``
        ("waiting", ctypes.c_int64),
        # The seq of the last task whose worker went to sleep on ``acked``
        ("ack_sleeping", ctypes.c_int64),
        # 1 once a task left the worker serving other processes (a RemoteToken server):
        # a closing pool lets such a worker exit on its own, which ends the server (see
        # Supervisor._let_idle_workers_exit)
        ("serves", ctypes.c_int32),
    )


#: Chunk slots per worker in a pool's shared memory: its DEPTH token slots, then its
#: Control block (in as many slots as it takes).
WORKER_SLOTS = DEPTH + -(-ctypes.sizeof(Control) // SLOT_SIZE)

_barrier = threading.Lock()


def full_barrier() -> None:
    """Order a store to shared memory before a later load (an atomic read-modify-write:
    a lock's acquire and release). The pool writes ``Control.kill_pending`` then reads
    ``critical_until``; the worker writes ``critical_until`` then reads
    ``kill_pending``: with this between, at least one of them sees the other's write."""
    _barrier.acquire()
    _barrier.release()


# -- parent -> worker ----------------------------------------------------------------------
class RunTask(NamedTuple):
    """Run this task: ``payload`` is the pickled ``(fn, args, kwargs)``; its token is the
    worker's token slot number ``slot`` (a worker holds a few tasks, the one it runs and
    those it starts after it, each on its own slot)."""

    seq: int
    payload: bytes
    slot: int


class Release(NamedTuple):
    """Go on with the task the worker holds (see :class:`Held`): no signal of the pool
    for the task before it is on its way."""


# -- worker -> parent ----------------------------------------------------------------------
class Held(NamedTuple):
    """The worker holds task ``seq`` without starting it: the pool decided to signal the
    task before it (``Control.stop_for``), and the signal may still be on its way. The
    pool answers :class:`Release` unless it is killing the worker."""

    seq: int


class Ready(NamedTuple):
    """The worker's initializer ran; it takes tasks from now on."""

    pid: int


class InitFailed(NamedTuple):
    """The pool's ``initializer`` raised in this worker (the pool breaks)."""

    pid: int
    text: str
    traceback: str


class Retire(NamedTuple):
    """Task ``seq`` changed the worker for good: it takes no more tasks and exits."""

    seq: int
    why: str


class Partial(NamedTuple):
    """Task ``seq`` stored ``key`` (the value pickled in ``blob``)."""

    seq: int
    key: str
    blob: bytes
    type_name: str


class Cancel(NamedTuple):
    """Task ``seq`` cancelled its own token."""

    seq: int
    reason: str | None


class CriticalEnded(NamedTuple):
    """Task ``seq`` left its outermost :func:`~cancelflow.critical_section` while the pool
    deferred a stop step for it (``Control.step_waits``): the step may go now."""

    seq: int


#: Never started: "moved", the pool took the task back before the worker claimed it;
#: "revoked", it was stopped before (its token slot cancelled, or the pool stopping it)
Outcome = Literal["ok", "error", "stopped", "terminated", "moved", "revoked"]


class Result(NamedTuple):
    """Task ``seq`` ended: returned (``ok``), raised (``error``), raised
    :class:`~cancelflow.CancelledException` once its token was cancelled (``stopped``: the
    pool makes the caller's exception itself, so nothing travels) or took SIGTERM.

    ``blob`` is the value or exception pickled on its own (``None`` when stopped or
    terminated); ``text`` is the worker's traceback text of an exception, or the value's
    type name.
    """

    seq: int
    outcome: Outcome
    blob: bytes | None
    text: str


WorkerMessage = Ready | InitFailed | Retire | Partial | Cancel | CriticalEnded | Result | Held


# -- parent -> zygote ----------------------------------------------------------------------
class Setup(NamedTuple):
    """The setup file (spawn's preparation data, the pool's options) is the passed fd."""


class Spawn(NamedTuple):
    """Fork worker number ``worker``; its socket is the passed fd; its token slots are
    the slots from ``token_offset`` up to its control block at ``control_offset`` of
    the chunk."""

    worker: int
    token_offset: int
    control_offset: int


class Sweep(NamedTuple):
    """Worker ``pid`` died: reap it and kill every stray left of its tree."""

    pid: int


class SweepStrays(NamedTuple):
    """A task was stopped and its worker lives on: kill every stray (no answer).

    The worker killed its own tree; what a task started as the worker's *sibling*
    (``clone(CLONE_PARENT)``) is in no worker's tree, only among the zygote's children.
    """


# -- zygote -> parent ----------------------------------------------------------------------
class ZygoteReady(NamedTuple):
    """The zygote imported ``__main__`` and takes spawn requests."""

    pid: int


class Spawned(NamedTuple):
    """Worker number ``worker`` was forked as ``pid``."""

    worker: int
    pid: int


class Swept(NamedTuple):
    """Worker ``pid`` was reaped with ``status`` (``None``: unknown); ``strays`` processes
    left of its tree were killed."""

    pid: int
    status: int | None
    strays: int


class Exited(NamedTuple):
    """Worker ``pid`` exited (sent only where the parent has no pidfd to watch it)."""

    pid: int


class PrepareFailed(NamedTuple):
    """The zygote could not import ``__main__`` (tasks defined there will fail)."""

    text: str


ZygoteMessage = ZygoteReady | Spawned | Swept | Exited | PrepareFailed

_CLASSES: dict[str, Any] = {
    "task": RunTask,
    "release": Release,
    "held": Held,
    "ready": Ready,
    "init-failed": InitFailed,
    "retire": Retire,
    "partial": Partial,
    "cancel": Cancel,
    "critical-ended": CriticalEnded,
    "result": Result,
    "setup": Setup,
    "spawn": Spawn,
    "sweep": Sweep,
    "sweep-strays": SweepStrays,
    "zygote-ready": ZygoteReady,
    "spawned": Spawned,
    "swept": Swept,
    "exited": Exited,
    "prepare-failed": PrepareFailed,
}
_KINDS: dict[type, str] = {cls: kind for kind, cls in _CLASSES.items()}


def wire(message: NamedTuple) -> tuple[Any, ...]:
    """The message as it travels: ``(kind, *fields)``, builtins only."""
    return (_KINDS[type(message)], *message)


def read(raw: tuple[Any, ...]) -> Any:
    """The message a wire tuple stands for (``ValueError`` for an unknown kind)."""
    try:
        cls = _CLASSES[raw[0]]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"not a cancelflow pool message: {raw!r:.80}") from None
    return cls(*raw[1:])


def send_record(sock: socket.socket, message: NamedTuple, fds: list[int] | None = None) -> None:
    """Send one record (and descriptors) on a blocking stream socket.

    A record is a 4-byte big-endian length and the pickle; the descriptors ride on its
    first bytes (``SCM_RIGHTS``), so they reach the reader with the record's length. A
    stream, not ``SOCK_SEQPACKET``: macOS and the BSDs have no such local socket.
    """
    data = pickle.dumps(wire(message), protocol=pickle.HIGHEST_PROTOCOL)
    frame = _RECORD_HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [frame], fds) if fds else sock.send(frame)
    if sent < len(frame):
        sock.sendall(memoryview(frame)[sent:])


def recv_record(sock: socket.socket) -> tuple[Any, list[int]]:
    """Receive one record and its descriptors from a blocking stream socket;
    ``(None, fds)`` at end-of-file (also in the middle of a record: the writer died)."""
    fds: list[int] = []
    header = _recv_exact(sock, _RECORD_HEADER.size, fds)
    if header is None:
        return None, fds
    (size,) = _RECORD_HEADER.unpack(header)
    data = _recv_exact(sock, size, fds)
    if data is None:
        return None, fds
    return read(pickle.loads(data)), fds


_RECORD_HEADER = struct.Struct("!I")
#: descriptors a record may carry (one today: a worker's socket, or the setup file)
_MAX_FDS = 4


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> bytes | None:
    """``size`` bytes, collecting every descriptor that comes with them; ``None`` at
    end-of-file."""
    data = b""
    while len(data) < size:
        chunk, received, _flags, _addr = socket.recv_fds(sock, size - len(data), _MAX_FDS)
        fds.extend(received)
        if not chunk:
            return None
        data += chunk
    return data
