"""Specification of ``cancelflow._cell``: the shared-memory chunks behind every token.

A chunk is one memfd cut into 128-byte slots (slot 0 is the header); a token's flag and
reason live in its slot, so a forked or started process sees the same bytes. Most tests
go through tokens; the slot bookkeeping, the reason encoding, the cross-process slot lock
and the generation word are tested through the module's own functions.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cancelflow import CancellationToken, _cell
from cancelflow._platform import HAVE_FUTEX, _doorbell, futex_wait
from cancelflow._token import token_on_slot
from support import WAIT, Recorder, memfds, needs_shared_tokens, pipe, receive, running, share

SLOT = _cell.SLOT_SIZE
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def chunk() -> Iterator[_cell.Chunk]:
    """A private four-slot chunk (three token slots), closed afterwards."""
    made = _cell.Chunk(4, pinned=True)
    yield made
    made.close()


def _child_tries_slot_lock(fd: int, offset: int, conn: Any) -> None:
    """In a forked child: whether it can take the slot's lock without waiting."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, SLOT, offset)
    except OSError:
        conn.send(False)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, SLOT, offset)
        conn.send(True)


def _child_cancels(token: CancellationToken) -> None:
    token.cancel("from the child")


def _child_allocates(parent_chunk: _cell.Chunk, conn: Any) -> None:
    """In a forked child: whether the parent's chunk is still its own, and whether a new
    token slot comes from another chunk."""
    chunk, offset = _cell.allocate_slot()
    conn.send((parent_chunk.owned, chunk is not parent_chunk))
    chunk.release(offset, reusable=True)


class TestReasonEncoding:
    @pytest.mark.parametrize(
        "reason", ["", "stop", "caf\udce9", "\U0001f6d1 now", "a" * _cell.REASON_MAX]
    )
    def test_a_reason_that_fits_reads_back_exactly(self, reason: str) -> None:
        """Test that a reason whose UTF-8 fits in a slot decodes to itself (lone
        surrogates included)."""
        raw = _cell.encode_reason(reason)
        assert len(raw) <= _cell.REASON_MAX
        assert _cell.decode_reason(raw) == reason

    @pytest.mark.parametrize("char", ["a", "\u00e9", "\u20ac", "\U0001f6d1", "\udce9"])
    def test_a_long_reason_is_cut_between_code_points(self, char: str) -> None:
        """Test that a reason too long for a slot is stored as its longest prefix of whole
        code points that fits (1-, 2-, 3- and 4-byte characters)."""
        reason = char * _cell.REASON_MAX
        raw = _cell.encode_reason(reason)
        width = len(char.encode("utf-8", "surrogatepass"))
        assert len(raw) == _cell.REASON_MAX - _cell.REASON_MAX % width
        assert _cell.decode_reason(raw) == char * (_cell.REASON_MAX // width)

    def test_bytes_no_encoding_wrote_decode_without_raising(self) -> None:
        """Test that bytes that are not UTF-8 decode with a replacement character each."""
        assert _cell.decode_reason(b"ab\xff\xfe") == "ab\ufffd\ufffd"


class TestSlots:
    def test_slots_are_distinct_and_never_the_header(self, chunk: _cell.Chunk) -> None:
        """Test that a chunk hands out each of its slots once, never slot 0 (the header),
        then says it has none left."""
        offsets = [chunk.allocate() for _ in range(3)]
        assert sorted(o for o in offsets if o is not None) == [SLOT, 2 * SLOT, 3 * SLOT]
        assert chunk.allocate() is None

    def test_a_released_slot_is_reused_only_when_reusable(self, chunk: _cell.Chunk) -> None:
        """Test that a slot given back as reusable is handed out again, and one that
        another process may still read is not."""
        first, second = chunk.allocate(), chunk.allocate()
        assert first is not None
        assert second is not None
        chunk.release(first, reusable=True)
        chunk.release(second, reusable=False)
        assert chunk.allocate() == first
        assert chunk.allocate() not in (first, second)
        assert chunk.allocate() is None

    def test_an_unpinned_chunk_closes_with_its_last_slot(self) -> None:
        """Test that an unpinned chunk closes its descriptor once its last slot is given
        back, and hands out nothing after."""
        made = _cell.Chunk(4)
        offset = made.allocate()
        assert offset is not None
        assert made.fd >= 0
        made.release(offset, reusable=True)
        assert made.fd == -1
        assert made.allocate() is None

    def test_a_pinned_chunk_stays_open_until_closed(self, chunk: _cell.Chunk) -> None:
        """Test that a pinned chunk keeps its descriptor when its last slot is given back."""
        offset = chunk.allocate()
        assert offset is not None
        chunk.release(offset, reusable=True)
        assert chunk.fd >= 0
        chunk.close()
        assert chunk.fd == -1

    def test_a_new_slot_after_a_fork_comes_from_the_childs_own_chunk(self) -> None:
        """Test that in a forked child the parent's chunk is no longer one that hands out
        slots, and a new token's slot comes from another chunk."""
        made = _cell.Chunk(4, pinned=True)
        try:
            with pipe() as (reader, writer), running(FORK, _child_allocates, made, writer):
                assert receive(reader) == (False, True)
            assert made.owned
        finally:
            made.close()

    def test_a_fork_marks_every_chunk_shared(self, chunk: _cell.Chunk) -> None:
        """Test that a chunk is private until the process forks, and shared after (the
        child may read every slot)."""
        assert not chunk.shared
        with running(FORK, os.getpid) as child:
            child.join(WAIT)
        assert chunk.shared


def _child_listens_past_its_first_wait(chunk: _cell.Chunk, conn: Any) -> None:
    """In a forked child: bind a doorbell socket, let its first (short) wait pass, say
    so, then report whether the next wait was ended by a ring (not its timeout)."""
    listener = chunk.listen()
    assert listener is not None
    try:
        listener.wait(0)
        conn.send("listening")
        started = time.monotonic()
        listener.wait(WAIT)
        conn.send(time.monotonic() - started < WAIT / 2)
    finally:
        listener.close(last=False)


@needs_shared_tokens
class TestAcrossProcesses:
    def test_a_slot_lock_excludes_other_processes_from_that_slot_only(
        self, chunk: _cell.Chunk
    ) -> None:
        """Test that while this process holds a slot's lock another process cannot take
        it, but can take another slot's, and can take it once released."""
        with pipe() as (reader, writer):
            with chunk.lock_slot(SLOT):
                with running(FORK, _child_tries_slot_lock, chunk.fd, SLOT, writer):
                    assert receive(reader) is False
                with running(FORK, _child_tries_slot_lock, chunk.fd, 2 * SLOT, writer):
                    assert receive(reader) is True
            with running(FORK, _child_tries_slot_lock, chunk.fd, SLOT, writer):
                assert receive(reader) is True

    @pytest.mark.skipif(not HAVE_FUTEX, reason="no futex on this platform")
    def test_ring_bumps_the_generation_and_wakes_a_waiter(self, chunk: _cell.Chunk) -> None:
        """Test that ring() changes the generation word and wakes a futex waiter on it."""
        assert chunk.header is not None
        generation = chunk.header.generation
        woke = threading.Event()

        def waiter() -> None:
            while chunk.header is not None and chunk.header.generation == generation:
                futex_wait(chunk.gen_address, generation, WAIT)
            woke.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        chunk.ring()
        thread.join(WAIT)
        assert woke.is_set()
        assert chunk.header.generation == (generation + 1) & 0xFFFFFFFF

    @pytest.mark.skipif(HAVE_FUTEX, reason="doorbells: the implementations without futex")
    def test_a_ring_reaches_a_listener_bound_after_this_process_last_rang(
        self, chunk: _cell.Chunk
    ) -> None:
        """Test that a listener another process binds after this process's last ring is
        woken by the next one: binding bumps the header's listener count, and a ringer
        that reads a new count connects to the new socket."""
        chunk.ring()  # this process's ringer now knows the listeners of this moment
        with pipe() as (reader, writer):
            with running(FORK, _child_listens_past_its_first_wait, chunk, writer):
                assert receive(reader) == "listening"
                chunk.ring()
                assert receive(reader) is True

    @pytest.mark.skipif(HAVE_FUTEX, reason="doorbells: the implementations without futex")
    def test_a_listener_that_cannot_be_counted_is_closed(
        self, chunk: _cell.Chunk, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that when the listener count in the chunk's header cannot be bumped (its
        record lock fails: the chunk closing meanwhile), the socket just bound is closed,
        not leaked (seen once as a ResourceWarning from a hub)."""

        def fail(*args: object) -> None:
            raise OSError(errno.EBADF, "closed meanwhile")

        before = set(_doorbell._listening)
        monkeypatch.setattr(_cell, "lock_range", fail)
        with pytest.raises(OSError, match="closed meanwhile"):
            chunk._new_listener()
        assert set(_doorbell._listening) == before

    @pytest.mark.skipif(HAVE_FUTEX, reason="doorbells: the implementations without futex")
    def test_a_cancel_made_here_reaches_other_objects_on_its_slot_without_the_hub(
        self,
    ) -> None:
        """Test that a cancel made in this process runs the callbacks of this process's
        other token objects on the same slot itself, before it returns: it does not ring
        this process's hub (which would take a CPU from the processes it wakes)."""
        first = CancellationToken()
        share(first)
        second = token_on_slot(first._chunk, first._offset, name="task-2")
        ran_in: list[int] = []
        first.on_cancel(lambda: ran_in.append(threading.get_ident()))
        # The hub runs now; a cancel from another process takes it past its first wait.
        other = CancellationToken()
        share(other)
        heard = Recorder()
        other.on_cancel(heard)
        with running(FORK, _child_cancels, other):
            assert heard.called.wait(WAIT)
        second.cancel("through the other object")
        assert ran_in == [threading.get_ident()]

    def test_a_cancel_from_another_process_is_announced_once(self) -> None:
        """Test that a cancel made in another process rings the chunk once: the hub that
        delivers it here runs the callbacks and rings nobody again (regression: every
        receiving process re-rang, waking every hub once more per process)."""
        token = CancellationToken()
        share(token)
        recorder = Recorder()
        token.on_cancel(recorder)  # a listener: this process's hub watches the chunk
        header = token._chunk.header
        assert header is not None
        before = header.generation
        with running(FORK, _child_cancels, token):
            assert recorder.called.wait(WAIT)
        assert token.cancel_reason == "from the child"
        assert (header.generation - before) & 0xFFFFFFFF == 1

    def test_an_attached_chunk_maps_the_same_memory_once_per_process(
        self, chunk: _cell.Chunk
    ) -> None:
        """Test that attaching a chunk made elsewhere maps the same bytes, and attaching
        it again gives the same chunk (the extra descriptor is closed)."""
        attached = _cell.attach_chunk(os.dup(chunk.fd), pinned=True)
        try:
            before = memfds()
            assert _cell.attach_chunk(os.dup(chunk.fd), pinned=True) is attached
            assert memfds() == before
            ctypes.c_uint32.from_buffer(chunk.mm, SLOT).value = 0xC0FFEE
            assert ctypes.c_uint32.from_buffer(attached.mm, SLOT).value == 0xC0FFEE
            assert not attached.owned
            assert attached.allocate() is None
        finally:
            attached.close()


class TestTokenResources:
    def test_collected_token_releases_its_descriptor(self) -> None:
        """Test that the shared-memory descriptor closes once its tokens are collected."""
        gc.collect()
        before = memfds()
        token = CancellationToken()
        fd = token._chunk.fd
        assert fd in memfds()
        del token
        gc.collect()
        assert memfds() == before

    def test_many_tokens_share_one_descriptor(self) -> None:
        """Test that a thousand live tokens hold no more than one shared-memory chunk."""
        gc.collect()
        before = memfds()
        tokens = [CancellationToken() for _ in range(1000)]
        assert len({id(t._chunk) for t in tokens}) == 1
        assert len(memfds() - before) <= 2  # the memfd and the mapping's own duplicate
        del tokens
        gc.collect()
        assert memfds() == before

    @needs_shared_tokens
    def test_collected_shared_token_stops_its_hub(self) -> None:
        """Test that dropping a shared token that still has callbacks ends the hub thread."""
        gc.collect()
        before = memfds()
        token = CancellationToken()
        share(token)
        token.on_cancel(Recorder())
        hubs = [t for t in threading.enumerate() if t.name == "cancelflow-token-hub"]
        assert len(hubs) == 1
        del token
        gc.collect()
        hubs[0].join(WAIT)
        assert not hubs[0].is_alive()
        assert memfds() == before

    @needs_shared_tokens
    def test_a_hub_ends_once_a_cancel_made_here_delivered_its_last_listener(self) -> None:
        """Test that the hub thread ends when a cancel made in this process delivers to
        the last listened token object of the chunk (regression: the delivery took the
        token out of the hub's sight without telling it, and the hub slept forever)."""
        chunk = _cell.Chunk(4, pinned=True)
        try:
            first = token_on_slot(chunk, SLOT, name="listened")
            second = token_on_slot(chunk, SLOT, name="cancelled here")
            other = token_on_slot(chunk, 2 * SLOT, name="cancelled elsewhere")
            before = set(threading.enumerate())
            recorder, heard = Recorder(), Recorder()
            first.on_cancel(recorder)
            other.on_cancel(heard)
            hubs = [
                t for t in set(threading.enumerate()) - before if t.name == "cancelflow-token-hub"
            ]
            assert len(hubs) == 1
            with running(FORK, _child_cancels, other):  # the hub delivers it: it now sleeps
                assert heard.called.wait(WAIT)
            second.cancel("here")
            assert recorder.calls == 1
            hubs[0].join(WAIT)
            assert not hubs[0].is_alive()
        finally:
            chunk.close()

    @needs_shared_tokens
    @pytest.mark.skipif(HAVE_FUTEX, reason="doorbells: the implementations without futex")
    def test_a_hub_that_outlives_its_chunk_removes_the_doorbell(self) -> None:
        """Test that when the chunk closes while its hub still runs, the hub's leaving
        removes the doorbell directory (regression: empty directories piled up until the
        process exited)."""
        chunk = _cell.Chunk(4, pinned=True)
        token = token_on_slot(chunk, SLOT, name="listened")
        before = set(threading.enumerate())
        token.on_cancel(Recorder())  # a shared token with a callback: the hub runs
        hubs = [t for t in set(threading.enumerate()) - before if t.name == "cancelflow-token-hub"]
        assert len(hubs) == 1
        directory = chunk.doorbell
        chunk.close()  # its owner's discard cannot remove it: the hub's socket is bound
        del token
        gc.collect()  # the token's release rings the hub, which finds nothing to watch
        for hub in hubs:
            hub.join(WAIT)
        assert not os.path.exists(directory)

    @needs_shared_tokens
    def test_tokens_on_one_slot_each_get_callbacks(self) -> None:
        """Test that two token objects on one shared slot (a pool's per-task tokens) both
        have their callbacks run by a cancel made through either."""
        first = CancellationToken()
        share(first)
        second = token_on_slot(first._chunk, first._offset, name="task-2")
        first_recorder, second_recorder = Recorder(), Recorder()
        first.on_cancel(first_recorder)
        second.on_cancel(second_recorder)
        second.cancel("through the other object")
        assert first_recorder.called.wait(WAIT)
        assert (first_recorder.calls, second_recorder.calls) == (1, 1)
        assert first.cancel_reason == "through the other object"
