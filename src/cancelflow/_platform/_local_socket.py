"""A listening endpoint for this machine's other processes, named by a file path.

POSIX flavours: an ``AF_UNIX`` socket at the path (its directory's mode decides who may
connect). ``"windows"``: Python has no ``AF_UNIX`` there, so the endpoint is a TCP socket
on 127.0.0.1, and the path is a small file holding its port (a *rendezvous* file in the
same private directory). Either way connections are authenticated with the caller's key
(:mod:`multiprocessing.connection`'s handshake), and the path is all a client needs.
"""

from __future__ import annotations

import contextlib
import os
import socket
from multiprocessing.connection import Client, Connection, Listener

from ._flavour import FLAVOUR

__all__ = ("connect_local", "knock_local", "listen_local", "local_pair")

_UNIX = FLAVOUR != "windows"


def listen_local(path: str, authkey: bytes) -> Listener:
    """Listen at ``path`` (which must not exist yet); only 127.0.0.1 for TCP."""
    if _UNIX:
        return Listener(path, family="AF_UNIX", authkey=authkey)
    listener = Listener(("127.0.0.1", 0), family="AF_INET", authkey=authkey)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as rendezvous:
            rendezvous.write(str(listener.address[1]))
    except BaseException:
        listener.close()
        raise
    return listener


def _address(path: str) -> tuple[str, int]:
    with open(path) as rendezvous:
        return ("127.0.0.1", int(rendezvous.read()))


def connect_local(path: str, authkey: bytes) -> Connection:
    """Connect to the endpoint at ``path`` and authenticate; raises ``OSError`` (or
    :class:`multiprocessing.AuthenticationError`) if it cannot."""
    if _UNIX:
        return Client(path, family="AF_UNIX", authkey=authkey)
    return Client(_address(path), family="AF_INET", authkey=authkey)


def knock_local(path: str) -> None:
    """Connect and hang up at once, without a handshake: wakes a thread blocked in the
    endpoint's ``accept()``. Never raises."""
    with contextlib.suppress(OSError, ValueError):
        if _UNIX:
            with socket.socket(socket.AF_UNIX) as knock:
                knock.connect(path)
        else:
            socket.create_connection(_address(path), timeout=1.0).close()


def local_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected stream sockets (for a wake-up between threads): ``socketpair`` where
    there is ``AF_UNIX``, else a loopback TCP connection made by hand."""
    if hasattr(socket, "AF_UNIX"):
        return socket.socketpair(socket.AF_UNIX)
    with socket.socket(socket.AF_INET) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        try:
            server, _ = listener.accept()
        except BaseException:
            client.close()
            raise
    return server, client
