"""A token for processes cancelflow did not start: :class:`RemoteToken`.

The library's own pools hand a task its token through shared memory. A process that
already runs — a worker of your own ``ProcessPoolExecutor``, ``multiprocessing.Pool`` or
loky — cannot map it. For those, :meth:`CancellationToken.remote` makes a small picklable
handle, served by the owning process:

* **the server** (one per owning process, started with the first handle): a Unix socket
  in a private directory (mode 0700), authenticated with a random key
  (:mod:`multiprocessing.connection`, as the stdlib's managers are), one thread per
  connected process. A cancel of the token is pushed to every connected handle at once;
  a handle's ``cancel()`` and ``store_partial()`` come back the other way.
* **the handle**, unpickled in another process, connects at once and keeps a reader
  thread that sets its local flag when the cancel arrives: ``is_cancelled`` is an
  attribute read, never a round trip.

Guaranteed: a cancel (from any thread, signal handler or process) reaches every
connected handle without polling; ``store_partial`` values reach the owner's sink in the
order one handle sent them. If the owner is gone (exited, killed, closed the handle, or
dropped both the token and the handle made here, which then end the sharing: the share
holds its token weakly, the owner's handle strongly), a handle reports itself cancelled
with a reason that says so, so work stops rather than runs on for nobody. A receiving
process holds the last 8 handles it received (``_recent``: one sent with every task keeps
its connection) and the others weakly: a handle collected hangs up, which ends its reader
thread there and its serving thread in the owner. The server ends, and its socket
directory is removed, when its last share ends, at interpreter exit, or when the
cancelflow worker whose task made it ends (a closing pool lets such a worker exit on its
own where it watches exits with pidfd, ``"linux"``); ending it hangs up every connected
handle, which then reports the owner gone. The directory of an owner that could not
remove it (SIGKILLed, ended with ``os._exit``, a worker the zygote ended) is removed by
the next process that makes one in the same temporary directory (``_platform._scratch``).

Not promised: a handle that crosses a ``fork`` keeps its flag but not its reader thread
(unpickle a fresh one in the child); values stored must pickle.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import mmap
import os
import secrets
import shutil
import socket
import threading
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ._exceptions import CancelledException
from ._log import safe_log
from ._platform import (
    connect_local,
    knock_local,
    listen_local,
    local_pair,
    make_scratch_directory,
    scratch_entry,
)
from ._token import CallbackHandle

__all__ = ("RemoteToken",)

PartialSink = Callable[[str, Any], None]
#: bound on waiting for the server's threads when it closes
_JOIN_SECONDS = 5.0


_REASON_MAX = 1000
_NO_REASON = 0xFFFFFFFF


_FLAG_FIELDS = (
    ("is_cancelled", ctypes.c_bool),
    ("_pad", ctypes.c_uint8 * 3),
    ("_reason_len", ctypes.c_uint32),
    ("_reason", ctypes.c_char * _REASON_MAX),
)


class _Flag(ctypes.Structure):
    """A share's state in a small shared file, as the owner writes it (a
    :class:`RemoteToken` is the same layout, read by the handles)."""

    _fields_ = _FLAG_FIELDS


def _set_flag(flag: Any, reason: str | None) -> None:
    """Write ``reason``, then raise the flag: memory writes only (signal-safe)."""
    if reason is None:
        flag._reason_len = _NO_REASON
    else:
        data = reason.encode("utf-8", "surrogatepass")[:_REASON_MAX]
        flag._reason = data
        flag._reason_len = len(data)
    flag.is_cancelled = True


#: the reasons a handle reads when its owner stopped serving it
_OWNER_CLOSED = "the token's owner closed this handle"
_OWNER_GONE = "the token's owner is gone"


def _map(path: str, create: bool) -> mmap.mmap:
    """Map the flag file at ``path`` (shared, read-write); ``create`` makes it first."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, ctypes.sizeof(_Flag))
        return mmap.mmap(fd, ctypes.sizeof(_Flag), access=mmap.ACCESS_WRITE)
    finally:
        os.close(fd)


class _Share:
    """One token served to other processes (in the owner)."""

    def __init__(self, token: Any, sink: PartialSink | None, path: str) -> None:
        #: weak: a share ends with its token (see _Server.add)
        self.token_ref = weakref.ref(token)
        self.sink = sink
        self.path = path
        self.flag = _Flag.from_buffer(_map(path, create=True))
        self.connections: list[Connection] = []
        self.closed = False
        #: set by the token's callback (any thread, a signal handler): the pusher sends
        self.cancel_pending = False
        self.lock = threading.Lock()
        #: the id of the token's callback that pushes its cancel (a CallbackHandle would
        #: hold the token)
        self.callback_id: int | None = None


class _Server:
    """The owner's side: accepts handles, pushes cancels, receives partials and cancels."""

    def __init__(self) -> None:
        self.pid = os.getpid()  # a fork's copy is not this server (its threads are gone)
        self.authkey = secrets.token_bytes(32)
        for attempt in range(3):
            self.directory = make_scratch_directory()  # (sweeps what dead owners left)
            self.address = os.path.join(self.directory, scratch_entry("tokens"))
            try:
                self.listener = listen_local(self.address, self.authkey)
                break
            except FileNotFoundError:
                # Another process's sweep took the directory while it was still empty
                # (between its making and the bind): make another one.
                if attempt == 2:
                    raise
        _directories[self.directory] = self.pid
        self.shares: dict[str, _Share] = {}
        #: every accepted connection not closed yet (hung up when the server closes)
        self.connections: set[Connection] = set()
        self.lock = threading.Lock()
        self.closed = False
        #: its last share ended: it closes, and takes no new share (see add)
        self.ending = False
        #: shares whose token was collected, for the pusher to end (see _token_gone)
        self._gone: list[str] = []
        # A cancel may come from a signal handler: its callback only sets a flag and
        # writes a byte here (no lock); the pusher thread does the sending.
        self._wake_r, self._wake_w = local_pair()
        self._wake_w.setblocking(False)
        self.threads = [
            threading.Thread(target=self._accept, name="cancelflow-remote-tokens", daemon=True),
            threading.Thread(target=self._pusher, name="cancelflow-remote-push", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def add(self, token: Any, sink: PartialSink | None) -> str | None:
        """Serve ``token``; its share's id, or ``None`` if this server is ending (its last
        share ended meanwhile, maybe on the pusher thread): then serve it on a new one."""
        share_id = scratch_entry(secrets.token_hex(8))  # (the name of its flag file)
        try:
            share = _Share(token, sink, os.path.join(self.directory, share_id))
        except OSError:
            if self.ending or self.closed:  # its directory is gone, or going
                return None
            raise
        with self.lock:
            ending = self.ending
            if not ending:
                self.shares[share_id] = share
        if ending:
            with contextlib.suppress(OSError):
                os.unlink(share.path)
            return None
        share.callback_id = token.on_cancel(lambda: self._push_cancel(share))._id
        # Ended when the token is collected (the share holds it weakly; the handle made
        # here holds it, for as long as the owner keeps that): nothing can cancel it then,
        # and its handles hear the owner is gone. Not at exit: the server's own close
        # ends every share then.
        weakref.finalize(token, self._token_gone, share_id).atexit = False
        return share_id

    def _token_gone(self, share_id: str) -> None:
        """A shared token was collected: the pusher ends its share. (A finalizer runs
        wherever the last reference went, maybe under one of this server's locks: it
        takes none, as :meth:`_push_cancel`.)"""
        self._gone.append(share_id)
        with contextlib.suppress(OSError):  # full buffer: a wake-up is pending already
            self._wake_w.send(b"x")

    def remove(self, share_id: str) -> None:
        with self.lock:
            share = self.shares.pop(share_id, None)
            last = not self.shares
            self.ending = self.ending or last  # (no share is added from here on)
        if share is not None:
            token = share.token_ref()
            if token is not None and share.callback_id is not None:
                CallbackHandle(token, share.callback_id).remove()
            del token
            if not share.flag.is_cancelled:  # every handle sees it at once
                _set_flag(share.flag, _OWNER_CLOSED)
            with contextlib.suppress(OSError):
                os.unlink(share.path)  # mapped handles keep their mapping
            with share.lock:
                share.closed = True
                for connection in share.connections:
                    with contextlib.suppress(OSError, ValueError):
                        connection.send(("gone", _OWNER_CLOSED))
                    _hang_up(connection)  # its serving thread wakes, and closes it
        if last:
            self.close()

    def close(self) -> None:
        global _server
        with _server_lock:
            if _server is self:
                _server = None
        # Every connection still open is hung up: its serving thread ends at once (so the
        # joins below wait for nobody), and its handle hears that the owner is gone. Under
        # the lock: one accepted later sees ``closed`` under it and is closed there, and a
        # serving thread forgets its connection under it before closing it, so no
        # descriptor hung up here can be another's by now.
        with self.lock:
            if self.closed:
                return
            self.closed = True
            for connection in self.connections:
                _hang_up(connection)
        # Closing a listening socket does not wake a thread blocked in accept(): a
        # connection that fails the handshake does, and the accept thread sees closed.
        knock_local(self.address)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")  # the pusher sees closed and ends
        if threading.current_thread() not in self.threads:
            for thread in list(self.threads):  # each ends at once now (bounded anyway)
                thread.join(_JOIN_SECONDS)

    # -- threads ---------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            while not self.closed:
                try:
                    connection = self.listener.accept()
                except Exception:  # noqa: BLE001 - a client that failed the handshake
                    continue
                with self.lock:  # (close() hangs up every connection added before it)
                    closed = self.closed
                    if not closed:
                        self.connections.add(connection)
                if closed:
                    connection.close()
                    return
                server = threading.Thread(
                    target=self._serve,
                    args=(connection,),
                    name="cancelflow-remote-token",
                    daemon=True,
                )
                # (the serving threads that ended are forgotten: one per connection made)
                self.threads[2:] = [t for t in self.threads[2:] if t.is_alive()]
                self.threads.append(server)
                server.start()
        finally:
            with contextlib.suppress(OSError):
                self.listener.close()
            shutil.rmtree(self.directory, ignore_errors=True)
            _directories.pop(self.directory, None)

    def _serve(self, connection: Connection) -> None:
        share: _Share | None = None
        try:
            kind, share_id = connection.recv()
            with self.lock:
                share = self.shares.get(share_id) if kind == "attach" else None
            if share is None:
                connection.send(("gone", _OWNER_CLOSED))
                return
            with share.lock:
                if share.closed:
                    connection.send(("gone", _OWNER_CLOSED))
                    return
                share.connections.append(connection)
                token = share.token_ref()
                if token is not None and token.is_cancelled:
                    connection.send(("cancelled", token.cancel_reason))
                del token
            while True:
                message = connection.recv()
                if message[0] == "partial" and share.sink is not None:
                    try:
                        share.sink(message[1], message[2])
                    except Exception as exc:  # noqa: BLE001 - a sink must not break the stream
                        safe_log("ERROR", "partial_sink raised", exception=exc)
                elif message[0] == "cancel":
                    token = share.token_ref()
                    if token is not None:
                        token.cancel(message[1])
                    del token
        except (EOFError, OSError):
            pass  # the handle's process closed it or ended
        finally:
            if share is not None:
                with share.lock, contextlib.suppress(ValueError):
                    share.connections.remove(connection)
            with self.lock:
                self.connections.discard(connection)
            with contextlib.suppress(OSError):
                connection.close()

    def _push_cancel(self, share: _Share) -> None:
        """The token's callback: any thread or a signal handler; takes no lock. The flag
        every handle reads is set here (reason first); the pusher wakes their waiters."""
        token = share.token_ref()
        _set_flag(share.flag, None if token is None else token.cancel_reason)
        share.cancel_pending = True
        if self.closed:
            return
        with contextlib.suppress(OSError):  # full buffer: a wake-up is pending already
            self._wake_w.send(b"x")

    def _pusher(self) -> None:
        try:
            while True:
                self._wake_r.recv(512)
                if self.closed:
                    return
                while self._gone:
                    self.remove(self._gone.pop())  # (its last share: closes the server)
                if self.closed:
                    return
                with self.lock:
                    shares = [share for share in self.shares.values() if share.cancel_pending]
                for share in shares:
                    share.cancel_pending = False
                    token = share.token_ref()
                    reason = None if token is None else token.cancel_reason
                    del token
                    with share.lock:
                        for connection in share.connections:
                            with contextlib.suppress(OSError, ValueError):
                                connection.send(("cancelled", reason))
        finally:
            for sock in (self._wake_r, self._wake_w):
                sock.close()


def _hang_up(connection: Connection) -> None:
    """Shut the connection's socket down: a thread blocked reading it wakes (end of file),
    and so does the other side; closing it alone would not wake the reader."""
    with contextlib.suppress(OSError, ValueError):
        # A view of the connection's own socket, detached again (on Windows its fileno()
        # is a socket handle, which os.dup cannot copy).
        sock = socket.socket(fileno=connection.fileno())
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()


_server: _Server | None = None
_server_lock = threading.Lock()


def _get_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None or _server.ending or _server.closed or _server.pid != os.getpid():
            _server = _Server()
        return _server


def serving() -> bool:
    """Whether this process runs a server (a handle of one of its tokens may be in use)."""
    server = _server
    return server is not None and not server.closed and server.pid == os.getpid()


@atexit.register
def close_server() -> None:
    """End this process's server, if it runs one (its handles report the owner gone) and
    remove its directory. At interpreter exit, and when a cancelflow worker ends (with
    ``os._exit``, which runs no ``atexit`` callback)."""
    server = _server
    if server is not None and server.pid == os.getpid():
        server.close()
    # A server that closed on its own thread (its last share ended) just before exit may
    # not have removed its directory yet: its accept thread, a daemon, dies with us.
    for directory, pid in list(_directories.items()):
        if pid == os.getpid():
            shutil.rmtree(directory, ignore_errors=True)
            _directories.pop(directory, None)


#: the directories of this process's servers not removed yet, and the pid that made each
#: (a fork's copy names its parent's)
_directories: dict[str, int] = {}


class RemoteToken(ctypes.Structure):
    """A picklable view of a :class:`CancellationToken` for any process (see the module).

    Made by :meth:`CancellationToken.remote` in the owning process; send it through any
    queue, pipe or executor. In the receiving process:

    * ``is_cancelled``: one read of memory shared with the owner (as cheap as
      ``is_cancelled`` of a token shared with another process), true the moment the
      owner's token is cancelled, or once the owner stopped serving the handle (it
      closed it, or exited);
    * :attr:`cancel_reason`, :meth:`raise_if_cancelled`, :meth:`wait`;
    * :meth:`cancel`: cancels the owner's token;
    * :meth:`store_partial`: hands ``value`` to the owner's ``partial_sink``.

    In the owning process, :meth:`close` ends the sharing (connected handles then report
    themselves cancelled: "the token's owner closed this handle").
    """

    # ``is_cancelled`` is the ctypes field: a C getter over the shared flag.
    _fields_ = _FLAG_FIELDS
    is_cancelled: bool

    _address: str
    _authkey: bytes
    _share_id: str
    _owner_pid: int
    _event: threading.Event
    _send_lock: threading.Lock
    _connection: Connection | None
    _connection_lock: threading.Lock
    #: in the owner: the token (kept alive while its owner keeps this handle)
    _token: Any
    _memory: mmap.mmap | bytearray

    @classmethod
    def _open(cls, address: str, authkey: bytes, share_id: str, owner_pid: int) -> RemoteToken:
        """The handle of share ``share_id``: mapped over its flag file, connected to the
        owner's server when this is another process."""
        memory: mmap.mmap | bytearray
        try:
            memory = _map(os.path.join(os.path.dirname(address), share_id), create=False)
            missing = False
        except OSError:  # the owner removed it (closed the handle, or exited)
            memory, missing = bytearray(ctypes.sizeof(_Flag)), True
        self = cls.from_buffer(memory)
        self._memory = memory
        self._address = address
        self._authkey = authkey
        self._share_id = share_id
        self._owner_pid = owner_pid
        self._event = threading.Event()
        self._send_lock = threading.Lock()
        self._connection = None
        if missing:
            self._set_gone(_OWNER_GONE)
        elif os.getpid() != owner_pid:
            self._connect()
        return self

    @property
    def cancel_reason(self) -> str | None:
        """The reason of the owner's cancel, or why the owner stopped serving the handle;
        ``None`` while not cancelled (or cancelled without a reason)."""
        if not self.is_cancelled or self._reason_len == _NO_REASON:
            return None
        return bytes(self._reason[: self._reason_len]).decode("utf-8", "surrogatepass")

    # -- pickling ----------------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        return (_receive, (self._address, self._authkey, self._share_id, self._owner_pid))

    def __repr__(self) -> str:
        state = "cancelled" if self.is_cancelled else "live"
        return f"<RemoteToken {self._share_id} of pid {self._owner_pid} {state}>"

    # -- the receiving process ---------------------------------------------------------------
    def _connect(self) -> None:
        try:
            connection = connect_local(self._address, self._authkey)
            connection.send(("attach", self._share_id))
        except Exception:  # noqa: BLE001 - the owner is gone (or never reachable)
            self._set_gone(_OWNER_GONE)
            return
        self._connection = connection
        # The reader holds the handle weakly: once the handle is collected (the task that
        # got it is over), the connection is hung up, which ends the reader here and the
        # owner's thread serving it. The lock keeps a hang-up off a descriptor the reader
        # closed (and the system may have reused).
        lock = self._connection_lock = threading.Lock()
        weakref.finalize(self, _hang_up_unless_closed, connection, lock)
        threading.Thread(
            target=_read,
            args=(weakref.ref(self), connection, lock),
            name="cancelflow-remote-token",
            daemon=True,
        ).start()

    def _set_gone(self, reason: str) -> None:
        if not self.is_cancelled:  # visible to every handle of this share
            _set_flag(self, reason)
        self._event.set()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`CancelledException` (with the reason) if cancelled."""
        if self.is_cancelled:
            reason = self.cancel_reason
            raise CancelledException(reason or "operation cancelled", reason=reason)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled or ``timeout`` seconds passed; return ``is_cancelled``."""
        if self._connection is None and os.getpid() == self._owner_pid:
            raise RuntimeError("in the owning process, wait on the CancellationToken itself")
        if not self.is_cancelled:
            self._event.wait(timeout)
        return self.is_cancelled

    def cancel(self, reason: str | None = None) -> None:
        """Cancel the owner's token (the first reason wins there)."""
        self._send(("cancel", reason))

    def store_partial(self, key: str, value: Any) -> None:
        """Hand ``value`` to the owner's ``partial_sink`` under ``key``.

        Raises:
            TypeError: ``key`` is not a string.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        self._send(("partial", key, value))

    def _send(self, message: tuple[Any, ...]) -> None:
        connection = self._connection
        if connection is None:
            raise RuntimeError(
                "this RemoteToken is not connected: use it in another process (in the owner, "
                "use the CancellationToken), or its owner is gone"
            )
        with self._send_lock, contextlib.suppress(OSError):
            connection.send(message)

    # -- the owning process ------------------------------------------------------------------
    def close(self) -> None:
        """In the owner: stop serving this handle (idempotent); the connected handles
        report themselves cancelled. In another process: disconnect."""
        if os.getpid() == self._owner_pid:
            server = _server
            if server is not None:
                server.remove(self._share_id)
            return
        connection, self._connection = self._connection, None
        if connection is not None:
            _hang_up_unless_closed(connection, self._connection_lock)  # the reader closes it


def _read(
    handle_ref: weakref.ref[RemoteToken], connection: Connection, lock: threading.Lock
) -> None:
    """A received handle's reader thread: the owner's messages, until it hangs up or the
    handle is collected."""
    try:
        while True:
            kind, reason = connection.recv()
            handle = handle_ref()
            if handle is None:
                return
            if kind == "gone":
                handle._set_gone(reason)
                return
            handle._event.set()  # cancelled: the flag is set already; wake waiters
            del handle
    except (EOFError, OSError):
        handle = handle_ref()
        if handle is not None:
            handle._set_gone(_OWNER_GONE)
    finally:
        with lock, contextlib.suppress(OSError):
            connection.close()


def _hang_up_unless_closed(connection: Connection, lock: threading.Lock) -> None:
    with lock:
        if not connection.closed:
            _hang_up(connection)


#: the handles this process received, by (address, share): a handle sent again (with every
#: task of a pool, say) reuses its connection and reader thread
_received: weakref.WeakValueDictionary[tuple[str, str], RemoteToken] = weakref.WeakValueDictionary()
_received_lock = threading.Lock()


#: the handles this process received last, held (the rest only weakly, see _connect): a
#: handle sent with every task keeps its connection between tasks, and a process sent a
#: new handle with each task holds a few connections at most, not one more per task
_recent: collections.deque[RemoteToken] = collections.deque(maxlen=8)


def _receive(address: str, authkey: bytes, share_id: str, owner_pid: int) -> RemoteToken:
    """Unpickle a handle: the one this process already holds for that share, if any."""
    with _received_lock:
        handle = _received.get((address, share_id))
        if handle is None or handle._connection is None:
            handle = RemoteToken._open(address, authkey, share_id, owner_pid)
            _received[(address, share_id)] = handle
        if not _recent or _recent[-1] is not handle:
            _recent.append(handle)
        return handle


def make_remote(token: Any, partial_sink: PartialSink | None) -> RemoteToken:
    """The handle behind :meth:`CancellationToken.remote`."""
    if partial_sink is not None and not callable(partial_sink):
        raise TypeError(f"partial_sink must be callable, not {type(partial_sink).__name__}")
    while True:
        server = _get_server()
        share_id = server.add(token, partial_sink)
        if share_id is not None:
            break
    handle = RemoteToken._open(server.address, server.authkey, share_id, os.getpid())
    handle._token = token  # (see _Server.add)
    return handle
