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

__all__ = ("FrameReader", "encode", "send")

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


def recv_frame(sock: socket.socket) -> Any:
    """Blocking read of exactly one frame (worker side); ``EOFError`` at end of stream."""
    header = _recv_exact(sock, 4)
    (size,) = _HEADER.unpack(header)
    return pickle.loads(_recv_exact(sock, size))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise EOFError("channel closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
