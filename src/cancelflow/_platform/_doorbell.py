"""Wake-ups across processes without ``futex``: datagram sockets in a shared directory.

A shared chunk of token slots has a *doorbell*: a private directory (mode 0700, made by
the chunk's owner, its path written in the chunk) where each process's hub, and each
thread blocked in ``wait_blocking`` on a shared token, binds one ``AF_UNIX`` datagram
socket (:class:`DoorbellListener`).
:func:`ring` sends one byte to each socket in the directory; a listener blocks in
``recv`` until one comes. Event-driven on every POSIX system, macOS included.

A :class:`Ringer` is the fast way to ring: it keeps one socket *connected* to each
listener, up to :data:`MAX_CONNECTED` of them (a ``send`` on it costs a third of a
``sendto`` by path, and no directory is listed), and lists the directory again only
when the *listener count* its caller reads from shared memory changed (each new
listener bumps it after binding, see ``Chunk._new_listener``), or when a send found a
listener gone. It rings other processes' sockets before its own process's, and can
leave out its own process's hubs (for a cancel made here, which the canceller delivers
here itself: a hub woken for nothing would take a CPU from the processes woken).

Guarantees: a ring that happens after a listener is bound wakes it (the datagram waits
in its queue if it is not blocked yet; a full queue means wake-ups are already pending).
With a :class:`Ringer`, "after" means after the listener's bump of the count is visible
to the ringing process; a ring that read the count a moment earlier can miss a socket
bound in that moment, which is why a new listener's first :meth:`DoorbellListener.wait`
returns after at most :data:`FRESH_WAIT` seconds (its caller re-reads shared memory):
such a race costs at most that delay, never a lost wake-up.
:func:`ring` and :meth:`Ringer.ring` never block, wait for no lock and allocate nothing
shared, so they are safe in a signal handler (a ring that finds its ringer busy, in
another thread or in the frame the handler interrupted, rings like :func:`ring`; a sender
whose budget is spent on rings nobody read gets a fresh socket under the same
descriptor). A listener's socket is removed when it closes (or its process
exits); the directory by its maker's :func:`discard`, by a chunk's last listener, or by
the exit of any process that listened in it, once empty; a process killed while
listening leaves a socket file that the next :func:`ring` finds refused, and removes.
A directory can still be left behind when no process of its chunk rings again: every one
was SIGKILLed, or ended with ``os._exit`` (a forked ``multiprocessing`` child does) while
listening. Those are swept by the next process that makes a private directory (a
doorbell, a ``RemoteToken`` server's) in the same temporary directory
(:func:`._scratch.sweep`: this user's ``cf-*`` directories, mode 0700, whose every
entry belongs to a process that is gone).

Not promised: a wake-up is only a hint (anyone who can write to the directory can send
one), so the listener re-reads shared memory, which is the truth.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import socket
import threading
import weakref

from . import _scratch
from ._fork import at_fork

__all__ = ("FRESH_WAIT", "DoorbellListener", "Ringer", "discard", "make_directory", "ring")

_ids = itertools.count(1)
#: the most listeners a Ringer keeps a socket connected to (each is a descriptor of the
#: ringing process); beyond, it rings by path like :func:`ring`
MAX_CONNECTED = 64
#: what marks a hub's socket in its name (``<maker>.h<n>``; a waiter's is ``<maker>.<n>``, see
#: _scratch.entry_name)
_HUB = "h"
#: the longest a new listener's first wait lasts before its caller re-reads shared memory
#: (see the module docstring: a ring racing with its bind)
FRESH_WAIT = 0.005


def make_directory() -> str:
    """Make a new doorbell directory (mode 0700) and return its path (see
    :func:`._scratch.make_directory`, which first sweeps the ones left behind)."""
    path = _scratch.make_directory()
    _made.add(path)
    return path


def ring(directory: str) -> None:
    """Wake every listener bound in ``directory``; never blocks, never raises."""
    try:
        names = os.listdir(directory)
    except OSError:
        return  # nobody listens any more
    sender = _sender
    for name in names:
        path = os.path.join(directory, name)
        try:
            try:
                sender.sendto(b"\0", path)
            except BlockingIOError:
                # Either its queue is full (wake-ups are pending already) or our socket's
                # send budget is spent on datagrams nobody has read yet (Linux charges
                # them to the sender): retry once with a fresh socket.
                _renew(sender)
                sender.sendto(b"\0", path)
        except BlockingIOError:
            continue  # its queue is full: wake-ups are pending already
        except ConnectionRefusedError:
            with contextlib.suppress(OSError):  # its process was killed while listening
                os.unlink(path)
        except OSError:
            continue  # gone meanwhile


class Ringer:
    """This process's connected sockets to every listener of one doorbell directory.

    :meth:`ring` wakes them all. :meth:`close` closes the sockets for good (a ring made
    after it lists the directory, as :func:`ring` does). One per chunk and process; a
    forked child drops the sockets it inherited (:meth:`forget`).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        #: the listener count the sockets were made for (``None``: list the directory)
        self._count: int | None = None
        #: other processes' sockets first, then this process's waiters' (see the module
        #: docstring); this process's hubs apart (see ring)
        self._socks: tuple[socket.socket, ...] = ()
        self._own_hubs: tuple[socket.socket, ...] = ()
        self._by_name: dict[str, socket.socket] = {}
        #: held by the one ring that may use and change the sockets; never waited for
        self._busy = threading.Lock()
        self._closed = False
        #: more listeners than MAX_CONNECTED: ring by path, keep no socket
        self._crowded = False
        _ringers.add(self)

    def ring(self, count: int | None, *, own_hubs: bool = True) -> None:
        """Wake every listener bound in the directory; never blocks, never raises.

        ``count`` is the directory's listener count as the caller just read it from
        shared memory (``None``: unknown, list the directory). ``own_hubs=False`` leaves
        out this process's hub listeners (a cancel made here, whose caller delivers it
        here itself: waking the hub would only take a CPU from the processes woken).
        """
        if self._closed or not self._busy.acquire(False):
            ring(self.directory)  # another thread, or the frame a signal handler cut
            return
        try:
            if count is None or count != self._count:
                self._refresh(count)
            if self._crowded:
                ring(self.directory)
            elif self._send_all(own_hubs):
                self._refresh(None)  # a listener left (or was killed): list again
                self._send_all(own_hubs)
        except Exception:  # noqa: BLE001 - a ring never raises: fall back to a listing
            self._count = None
            ring(self.directory)
        except BaseException:  # a signal handler raised: list again next time
            self._count = None
            raise
        finally:
            self._busy.release()
        if self._closed:  # closed meanwhile, by a thread that found us ringing
            self.close()

    def _send_all(self, own_hubs: bool) -> bool:
        """Send to every socket; return whether one found its listener gone (that socket
        is dropped, so that a listing connects afresh to whatever has its name now)."""
        gone = []
        for socks in (self._socks, self._own_hubs) if own_hubs else (self._socks,):
            for sock in socks:
                try:
                    sock.send(b"\0")
                except BlockingIOError:
                    continue  # its queue is full: wake-ups are pending already
                except OSError:
                    gone.append(sock)
        if not gone:
            return False
        self._set({name: s for name, s in self._by_name.items() if s not in gone})
        for sock in gone:
            sock.close()
        return True

    def _refresh(self, count: int | None) -> None:
        self._count = count
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []  # nobody listens any more
        old, fresh = dict(self._by_name), {}
        self._crowded = len(names) > MAX_CONNECTED
        for name in names if not self._crowded else ():
            sock = old.pop(name, None)
            if sock is None:
                sock = _connect(os.path.join(self.directory, name))
                if sock is None:
                    continue
            fresh[name] = sock
        self._set(fresh)
        for sock in old.values():  # listeners that left
            sock.close()

    def _set(self, by_name: dict[str, socket.socket]) -> None:
        mine, hub = _scratch.entry_name(""), _scratch.entry_name(_HUB)
        self._by_name = by_name
        self._socks = tuple(
            sock
            for name, sock in sorted(by_name.items(), key=lambda item: item[0].startswith(mine))
            if not name.startswith(hub)
        )
        self._own_hubs = tuple(sock for name, sock in by_name.items() if name.startswith(hub))

    def forget(self) -> None:
        """In a forked child: close this process's copies of the parent's sockets (and
        make its own at the next ring)."""
        self._busy = threading.Lock()
        self._drop()

    def close(self) -> None:
        """Close every socket, for good (a ring in progress in another thread closes
        them when it ends)."""
        self._closed = True
        if self._busy.acquire(False):
            try:
                self._drop()
            finally:
                self._busy.release()

    def _drop(self) -> None:
        socks, self._count = self._by_name, None
        self._set({})
        for sock in socks.values():
            sock.close()


def _connect(path: str) -> socket.socket | None:
    """A non-blocking socket connected to the listener at ``path`` (``None`` if there
    is none; a socket file left by a killed listener is removed)."""
    sock = _new_sender()
    try:
        sock.connect(path)
    except ConnectionRefusedError:
        sock.close()
        with contextlib.suppress(OSError):  # its process was killed while listening
            os.unlink(path)
        return None
    except OSError:
        sock.close()
        return None
    return sock


def discard(directory: str) -> None:
    """Remove ``directory`` if no live listener is bound in it (the chunk's owner, on close)."""
    _made.discard(directory)
    ring(directory)  # drops the sockets of dead listeners
    with contextlib.suppress(OSError):
        os.rmdir(directory)


class DoorbellListener:
    """This process's socket in a doorbell directory; :meth:`wait` blocks until a ring.

    ``hub``: the socket of a chunk's hub thread, which a :class:`Ringer` of the same
    process may leave out (see :meth:`Ringer.ring`).
    """

    def __init__(self, directory: str, *, hub: bool = False) -> None:
        self.directory = directory
        kind = _HUB if hub else ""
        self.path = os.path.join(directory, _scratch.entry_name(f"{kind}{next(_ids)}"))
        #: True until the first wait (see FRESH_WAIT)
        self.fresh = True
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # blocking; see drain
        try:
            for attempt in range(3):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory, 0o700)  # removed when its last listener left
                try:
                    self.sock.bind(self.path)
                    break
                except FileNotFoundError:  # removed again between mkdir and bind
                    if attempt == 2:
                        raise
        except BaseException:
            self.sock.close()
            raise
        _listening.add(self)
        _used.add(directory)

    def wait(self, timeout: float | None = None) -> None:
        """Block until a ring arrives (or ``timeout`` seconds pass; the first wait of a
        new listener at most :data:`FRESH_WAIT`), taking one. Rings left unread only make
        a later wait return early (:meth:`drain` takes them before a reuse). A signal's
        handler runs meanwhile (and may end the wait by raising)."""
        if self.fresh:
            self.fresh = False
            timeout = FRESH_WAIT if timeout is None else min(timeout, FRESH_WAIT)
        sock = self.sock
        if timeout is None:
            sock.recv(16)
        else:
            sock.settimeout(min(max(timeout, 0.0), 86_400.0))
            try:
                sock.recv(16)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: a timeout of 0
                pass
            finally:
                sock.settimeout(None)  # also when a signal handler raised

    def drain(self) -> None:
        """Take every ring that arrived (a listener reused for another wait)."""
        with contextlib.suppress(OSError):
            while self.sock.recv(64, socket.MSG_DONTWAIT):
                pass

    def close(self, *, last: bool = True) -> None:
        """Leave: remove the socket, and the directory if it is empty now (only when
        ``last`` says this may be the last listener: a failed ``rmdir`` costs hundreds
        of µs on some file systems)."""
        _listening.discard(self)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if last:
            with contextlib.suppress(OSError):
                os.rmdir(self.directory)

    def abandon(self) -> None:
        """In a forked child: close this process's copy of the parent's socket, leaving
        the parent's listener bound."""
        _listening.discard(self)
        self.sock.close()


def _renew(sender: socket.socket) -> None:
    """Put a fresh socket under ``sender``'s descriptor (same number, a new send budget)."""
    fresh = _new_sender()
    try:
        os.dup2(fresh.fileno(), sender.fileno(), inheritable=False)
    finally:
        fresh.close()


def _new_sender() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


#: the one unbound socket this process rings doorbells with
_sender: socket.socket
try:
    _sender = _new_sender()
except (AttributeError, OSError):  # no AF_UNIX (the windows flavour never rings)
    pass


#: directories this process made and has not discarded, its listeners, and every directory
#: it listened in (removed at exit if empty by then) - none of them a fork's
_made: set[str] = set()
_listening: weakref.WeakSet[DoorbellListener] = weakref.WeakSet()
_ringers: weakref.WeakSet[Ringer] = weakref.WeakSet()
_used: set[str] = set()


@atexit.register
def _leave() -> None:
    # Hub threads are daemons: they never close their listeners at exit.
    for listener in list(_listening):
        listener.close(last=False)
    for directory in list(_made):
        discard(directory)
    for directory in list(_used):
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # the last process of a chunk to exit takes it along
    sender = globals().get("_sender")
    if sender is not None:
        sender.close()  # a later ring fails quietly (OSError), as for a gone listener


def _after_fork_in_child() -> None:
    global _made, _listening, _used
    for listener in list(_listening):
        listener.abandon()  # the parent's sockets: ours would read its rings
    for ringer in list(_ringers):
        ringer.forget()
    _made = set()  # the parent's, removed by the parent
    _listening = weakref.WeakSet()
    _used = set()


at_fork(after_in_child=_after_fork_in_child)
