"""Length-prefixed pickle frames over one socket per worker.

Each process worker has its own socket pair with the parent: nothing on the task path is
shared between workers, so a worker that dies mid-write can corrupt only its own channel,
which dies with it (a peer of pebble's shared-queue deadlock cannot happen here).
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ("FrameReader", "FrameSource", "encode", "send")

_HEADER = struct.Struct("!I")


def encode(obj: Any) -> bytes:
    """One frame: a 4-byte big-endian length, then the pickle."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def send(sock: socket.socket, obj: Any) -> None:
    """Send one frame, blocking until the kernel has all of it."""
    sock.sendall(encode(obj))


class FrameReader:
    """Reassembles frames from the bytes a socket delivers: the pool's side feeds it
    what each non-blocking read returns, a worker's reads through :class:`FrameSource`.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> Iterator[Any]:
        """Add received bytes (:meth:`add`); yield every frame now complete, unpickled."""
        self.add(data)
        while not self.missing():
            yield self.pop()

    def add(self, data: bytes | memoryview) -> None:
        """Add received bytes (copied: ``data`` may be reused by the caller)."""
        self._buffer += data

    def missing(self) -> int:
        """How many more bytes the next frame needs (0: it is complete)."""
        buffer = self._buffer
        if len(buffer) < 4:
            return 4 - len(buffer)
        size: int = _HEADER.unpack_from(buffer)[0]
        return max(0, 4 + size - len(buffer))

    def pop(self) -> Any:
        """The next frame (complete: see :meth:`missing`), unpickled; consumed even if
        it does not unpickle, so the frame after it reads."""
        buffer = self._buffer
        end: int = 4 + _HEADER.unpack_from(buffer)[0]
        view = memoryview(buffer)
        try:
            return pickle.loads(view[4:end])
        finally:
            view.release()
            del buffer[:end]


class FrameSource:
    """Blocking reads of whole frames from one socket (a worker's side of its channel).

    Buffered: one ``recv`` takes every frame the pool has sent so far, so frames sent
    together cost one system call. Nothing else may read the socket. ``before_wait``,
    if given, is called before each ``recv`` (which may block): never when the next
    frame was buffered already.
    """

    __slots__ = ("_before_wait", "_reader", "_sock")

    def __init__(
        self, sock: socket.socket, before_wait: Callable[[], object] | None = None
    ) -> None:
        self._sock = sock
        self._reader = FrameReader()
        self._before_wait = before_wait

    def buffered(self) -> bool:
        """Whether the next frame was read already (:meth:`next` will not wait)."""
        return not self._reader.missing()

    def next(self) -> Any:
        """The next frame, unpickled; ``EOFError`` at the end of the stream."""
        reader = self._reader
        while missing := reader.missing():
            if self._before_wait is not None:
                self._before_wait()
            chunk = self._sock.recv(min(max(missing, 1 << 16), 1 << 20))
            if not chunk:
                raise EOFError("channel closed")
            reader.add(chunk)
        return reader.pop()
