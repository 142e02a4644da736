"""Length-prefixed pickle frames over one socket per worker.

Each process worker has its own socket pair with the parent: nothing on the task path is
shared between workers, so a worker that dies mid-write can corrupt only its own channel,
which dies with it (a peer of pebble's shared-queue deadlock cannot happen here).
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Iterator
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
    """Reassembles frames from the bytes a non-blocking socket delivers."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> Iterator[Any]:
        """Add received bytes (copied: ``data`` may be reused by the caller once this
        returns); yield every frame now complete, unpickled."""
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= 4:
            (size,) = _HEADER.unpack_from(buffer, offset)
            if len(buffer) - offset - 4 < size:
                break
            start = offset + 4
            yield pickle.loads(memoryview(buffer)[start : start + size])
            offset = start + size
        if offset:
            del buffer[:offset]


class FrameSource:
    """Blocking reads of whole frames from one socket (a worker's side of its channel).

    Buffered: one ``recv`` takes every frame the pool has sent so far, so frames sent
    together cost one system call. Nothing else may read the socket.
    """

    __slots__ = ("_buffer", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def next(self) -> Any:
        """The next frame, unpickled; ``EOFError`` at the end of the stream."""
        buffer = self._buffer
        while True:
            want = 4
            if len(buffer) >= 4:
                (size,) = _HEADER.unpack_from(buffer)
                want = 4 + size
                if len(buffer) >= want:
                    view = memoryview(buffer)
                    try:
                        return pickle.loads(view[4:want])
                    finally:  # (consumed even if it does not unpickle)
                        view.release()
                        del buffer[:want]
            chunk = self._sock.recv(min(max(want - len(buffer), 1 << 16), 1 << 20))
            if not chunk:
                raise EOFError("channel closed")
            buffer += chunk
