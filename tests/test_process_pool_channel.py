"""Specification of the channel between a ProcessPool and each of its workers.

Frames (a length, then a pickle) travel over one stream socket per worker. The pool's
supervisor sends the frames it queues for a worker in one turn of its loop together,
without ever blocking; what the socket cannot take yet waits, in order, until it can.
The worker reads whole frames, however the stream was cut.
"""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import contractloads
from cancelflow import ProcessPool
from cancelflow._process._channel import FrameSource, encode
from cancelflow._process._supervisor import Supervisor
from support import WAIT


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


class TestFrameSource:
    def test_reads_frames_sent_in_one_write_one_by_one(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that several frames arriving together are read whole, in order."""
        ours, theirs = pair
        ours.sendall(encode("first") + encode(("second", 2)) + encode(b"third"))
        source = FrameSource(theirs)
        assert [source.next() for _ in range(3)] == ["first", ("second", 2), b"third"]

    def test_reads_a_frame_cut_anywhere(self, pair: tuple[socket.socket, socket.socket]) -> None:
        """Test that a frame split inside its length or its pickle is read whole."""
        ours, theirs = pair
        data = encode("x" * 1000) + encode("after")
        source = FrameSource(theirs)
        ours.sendall(data[:2])
        theirs.settimeout(0.0)
        with pytest.raises(BlockingIOError):  # (half a length: it waits for the rest)
            source.next()
        theirs.settimeout(WAIT)
        ours.sendall(data[2:500])
        ours.sendall(data[500:])
        assert source.next() == "x" * 1000
        assert source.next() == "after"

    def test_reads_a_frame_larger_than_one_read(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that a frame of several megabytes arrives whole."""
        ours, theirs = pair
        blob = bytes(range(256)) * (12 << 12)  # 12 MiB
        data = encode(blob)
        source = FrameSource(theirs)
        theirs.settimeout(WAIT)

        received: list[Any] = []
        reader = threading.Thread(target=lambda: received.append(source.next()))
        reader.start()
        ours.sendall(data)
        reader.join(WAIT)
        assert received == [blob]

    def test_a_frame_that_does_not_unpickle_is_consumed(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that a frame whose pickle is broken raises, and the next frame reads."""
        ours, theirs = pair
        broken = b"\x80\x05not a pickle"
        ours.sendall(struct.pack("!I", len(broken)) + broken + encode("next"))
        source = FrameSource(theirs)
        with pytest.raises(pickle.UnpicklingError):
            source.next()
        assert source.next() == "next"

    def test_says_end_of_stream_when_the_peer_closes(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that EOFError, not a partial frame, ends the stream."""
        ours, theirs = pair
        ours.sendall(encode("whole")[:3])
        ours.close()
        with pytest.raises(EOFError):
            FrameSource(theirs).next()


class _Handle:
    """What Supervisor._flush reads of a worker's handle."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.outbox: list[bytes | memoryview] = []
        self.writable_watched = False


class _Recorder:
    """Stands in for the supervisor: records the writability watches asked for."""

    def __init__(self) -> None:
        self.watched: list[bool] = []

    def _watch_writable(self, worker: _Handle, writable: bool) -> None:
        worker.writable_watched = writable
        self.watched.append(writable)


class TestSupervisorFlush:
    def test_sends_the_frames_of_one_turn_in_order_and_keeps_what_does_not_fit(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that a flush sends as much as the socket takes, keeps the rest (a frame
        cut in the middle included) for when it is writable, and sends it in order."""
        ours, theirs = pair
        ours.setblocking(False)
        frames = [encode(bytes([n]) * (300_000 if n % 2 else 10)) for n in range(6)]
        handle, supervisor = _Handle(ours), _Recorder()
        handle.outbox.extend(frames)
        Supervisor._flush(supervisor, handle)  # type: ignore[arg-type]
        assert handle.outbox, "the socket took 900 kB at once: the test proves nothing"
        assert supervisor.watched == [True]
        received = bytearray()
        theirs.settimeout(WAIT)
        while handle.outbox:
            received += theirs.recv(1 << 20)
            Supervisor._flush(supervisor, handle)  # type: ignore[arg-type]
        assert supervisor.watched == [True, False]
        expected = b"".join(frames)
        while len(received) < len(expected):
            received += theirs.recv(1 << 20)
        assert received == expected

    def test_a_closed_worker_socket_drops_what_waits(
        self, pair: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that frames for a worker whose socket is gone are dropped, not sent
        anywhere (its number may be reused)."""
        ours, _ = pair
        handle, supervisor = _Handle(ours), _Recorder()
        handle.outbox.append(encode("late"))
        ours.close()
        Supervisor._flush(supervisor, handle)  # type: ignore[arg-type]
        assert handle.outbox == []
        assert supervisor.watched == []


class TestThroughThePool:
    def test_large_and_small_arguments_queued_together_all_arrive(self) -> None:
        """Test that tasks whose arguments do not fit a socket's buffer, queued together
        with small ones for the same busy workers, each get their own argument."""
        sizes = [(4 << 20) if n % 3 == 0 else n for n in range(24)]
        with ProcessPool(2) as pool:
            futures = [pool.submit(contractloads.size_of, bytes(size)) for size in sizes]
            assert [future.result(timeout=WAIT) for future in futures] == sizes
