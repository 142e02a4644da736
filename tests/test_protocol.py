"""Tests for :mod:`cancelflow._process._protocol`: the pool's typed messages and the
records that carry them between the supervisor, the zygote and the workers."""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Iterator

import pytest

from cancelflow._process._protocol import (
    PrepareFailed,
    Spawn,
    Sweep,
    Swept,
    read,
    recv_record,
    send_record,
    wire,
)


class TestWire:
    def test_a_message_travels_as_its_kind_and_fields_in_builtins(self) -> None:
        """Test that wire() gives a plain tuple of the kind and the fields, which pickles
        without naming any cancelflow class."""
        raw = wire(Swept(42, 9, 2))
        assert type(raw) is tuple
        assert raw[1:] == (42, 9, 2)
        assert b"cancelflow" not in pickle.dumps(raw)

    def test_read_gives_back_the_typed_message(self) -> None:
        """Test that read(wire(m)) == m and has m's type."""
        message = Swept(42, 9, 1)
        copy = read(wire(message))
        assert copy == message
        assert type(copy) is Swept

    @pytest.mark.parametrize("raw", [(), ("no-such-kind", 1), (7,), "text"])
    def test_read_refuses_what_is_not_a_pool_message(self, raw: object) -> None:
        """Test that an unknown or malformed record raises ValueError naming it."""
        with pytest.raises(ValueError, match="not a cancelflow pool message"):
            read(raw)  # type: ignore[arg-type]


class TestRecords:
    @pytest.fixture
    def channel(self) -> Iterator[tuple[socket.socket, socket.socket]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            yield ours, theirs

    def test_a_record_arrives_whole_with_its_descriptors(
        self, channel: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that a record sent with descriptors arrives as sent, with descriptors that
        refer to the same files."""
        ours, theirs = channel
        reader, writer = os.pipe()
        try:
            send_record(ours, Spawn(1, 128, 256), [writer])
            message, fds = recv_record(theirs)
            assert message == Spawn(1, 128, 256)
            assert type(message) is Spawn
            assert len(fds) == 1
            os.write(fds[0], b"x")
            os.close(fds[0])
            assert os.read(reader, 1) == b"x"
        finally:
            os.close(reader)
            os.close(writer)

    def test_records_keep_their_boundaries(
        self, channel: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that two records sent back to back are received one at a time."""
        ours, theirs = channel
        send_record(ours, Sweep(7))
        send_record(ours, Sweep(8))
        assert recv_record(theirs) == (Sweep(7), [])
        assert recv_record(theirs) == (Sweep(8), [])

    def test_a_closed_peer_reads_as_no_record(
        self, channel: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that once the other end is closed a read gives (None, [])."""
        ours, theirs = channel
        ours.close()
        assert recv_record(theirs) == (None, [])

    def test_back_to_back_records_each_bring_their_own_descriptor(
        self, channel: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that two records sent with one descriptor each, before either is read, are
        received one at a time, each with the descriptor sent with it (a stream has no
        record boundaries of its own)."""
        ours, theirs = channel
        pipes = [os.pipe(), os.pipe()]
        try:
            send_record(ours, Spawn(0, 1, 2), [pipes[0][1]])
            send_record(ours, Spawn(1, 3, 4), [pipes[1][1]])
            for index, (reader, _writer) in enumerate(pipes):
                message, fds = recv_record(theirs)
                assert message == Spawn(index, 1 + 2 * index, 2 + 2 * index)
                assert len(fds) == 1
                os.write(fds[0], b"%d" % index)
                os.close(fds[0])
                assert os.read(reader, 1) == b"%d" % index
        finally:
            for pair in pipes:
                for fd in pair:
                    os.close(fd)

    def test_a_record_cut_short_by_its_writer_reads_as_no_record(
        self, channel: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that a writer that dies in the middle of a record is end-of-file, not a
        half record and not a hang."""
        ours, theirs = channel
        ours.sendall(b"\x00\x00\x00\x10half")
        ours.close()
        assert recv_record(theirs) == (None, [])

    def test_a_large_record_arrives_whole(
        self, channel: tuple[socket.socket, socket.socket]
    ) -> None:
        """Test that a record larger than the socket's buffer arrives whole, read while
        it is still being written."""
        import threading

        ours, theirs = channel
        message = PrepareFailed("é" * 500_000)
        sender = threading.Thread(target=send_record, args=(ours, message))
        sender.start()
        try:
            assert recv_record(theirs) == (message, [])
        finally:
            sender.join(timeout=10)
