"""Shared-memory chunks that hold every token's flag and reason.

A :class:`Chunk` is one shared-memory descriptor (a ``memfd`` on Linux, see
:func:`cancelflow._platform.shared_memory`) mapped shared and cut into fixed 128-byte
slots; slot 0 is the header (a 32-bit *generation* word that every cross-process cancel
bumps, and, without futex, the path of the chunk's doorbell).
A token's flag lives in its slot from the token's birth, so a process forked later, or
started with the token as an argument, sees the same byte: no copy, no message, no lock.

Invariants this layer gives :mod:`cancelflow._token`:

* A slot is never handed out twice while any process may still read it: the slot of a
  token that was shared (pickled for a process start, built on another process's slot,
  or alive when the process forked) is not reused.
* Sharing is per token, not per chunk: a token made after its chunk's other tokens went
  to other processes stays private, and pays for nothing cross-process (no slot lock, no
  futex wake, no hub thread) until it is shared itself.
* A chunk's descriptor is closed once no live token uses it; the mapping goes with the
  last token object (each token holds the buffer it was built on).
* :meth:`Chunk.lock_slot` serialises first-cancel-wins *between processes* with an
  ``fcntl`` record lock, which the kernel drops if the holder dies: no lock can be left
  held by a dead process. (The ``"windows"`` flavour never shares a chunk, and locks
  nothing.) Threads of one process are serialised before that, by the
  token's own atomic step.
* Each process has at most one *hub* thread per chunk, running only while shared tokens of
  that chunk have listeners (callbacks, asyncio waiters, and without futex also blocked
  waiters). It sleeps on the generation word with ``futex`` (or, without futex, in
  ``recv`` on its socket in the chunk's doorbell directory) and applies cancels made by
  other processes to local listeners.
  Listeners are keyed by token object, not by slot: several token objects of one process
  may sit on the same slot (a pool's per-task tokens). A cancel made in this process is
  delivered to this process's other objects on its slot by the canceller itself
  (:meth:`Chunk.deliver_slot`); without futex it does not wake this process's hub. A hub
  that stops keeps its doorbell socket for the next one (a new socket makes every other
  process list the doorbell again).
* :meth:`Chunk.lock_slot` and the header's listener-count lock never nest in one thread,
  so the ``EDEADLK`` the kernel reports for them (record locks belong to processes) is a
  false cycle, retried by :func:`cancelflow._platform.lock_range`.
* Slot accounting (``allocate``/``adopt``/``release``) is serialised by one re-entrant
  lock, so a token created or collected on any thread (or in a ``__del__`` run by the
  garbage collector inside that very code) cannot close a chunk that is being handed out.
* Callbacks are per process. After a fork the child drops the callbacks it inherited on
  every token (they are the parent's, and run there), so the child starts like a spawned
  one: no callbacks, no hub. A child that registers callbacks gets its own hub.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from ._log import safe_log
from ._platform import (
    HAVE_FUTEX,
    TOKENS_CROSS_PROCESSES,
    DoorbellListener,
    DoorbellRinger,
    at_fork,
    discard_doorbell,
    futex_wait,
    futex_wake,
    lock_range,
    make_doorbell,
    map_shared,
    shared_memory,
)

if TYPE_CHECKING:
    from ._token import TokenRef

SLOT_SIZE = 128
#: doorbell sockets kept per chunk between waits (see Chunk.unlisten)
_IDLE_LISTENERS = 4
#: bytes of a reason that fit in shared memory; longer reasons are cut (see encode_reason)
REASON_MAX = SLOT_SIZE - 8
REASON_NONE = 0xFFFFFFFF
DEFAULT_SLOTS = 4096
#: UTF-8 that also carries lone surrogates (``os.fsdecode`` of undecodable bytes), 3 bytes
#: each: every ``str`` encodes, and decoding gives back exactly the same code points
_REASON_ERRORS = "surrogatepass"


def encode_reason(reason: str) -> bytes:
    """The bytes a reason is stored as in a slot: at most :data:`REASON_MAX`, never raises.

    Any ``str`` is accepted (lone surrogates included). A reason whose encoding is longer
    than :data:`REASON_MAX` is cut to its longest *prefix of whole code points* that fits:
    never inside a multi-byte sequence, so the stored bytes always decode, to
    ``reason[:k]`` for some ``k``. (The cut is by code point: it may split a surrogate
    pair given as two code points, a base letter from its combining mark, or an emoji
    ZWJ sequence; no marker is added.)
    """
    raw = reason.encode("utf-8", _REASON_ERRORS)
    if len(raw) <= REASON_MAX:
        return raw
    cut = REASON_MAX
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # a continuation byte: back to a lead byte
        cut -= 1
    return raw[:cut]


def decode_reason(raw: bytes) -> str:
    """The reason stored as ``raw`` (see :func:`encode_reason`); never raises.

    Bytes that :func:`encode_reason` could not have written (a slot written by something
    else) decode with U+FFFD for each bad byte instead of raising.
    """
    try:
        return raw.decode("utf-8", _REASON_ERRORS)
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace")


_DOORBELL_MAX = SLOT_SIZE - 12


class _Header(ctypes.Structure):
    _fields_ = (
        ("generation", ctypes.c_uint32),
        # without futex: bumped (under the header's record lock) by every listener that
        # binds in the doorbell, so that ringers know when to list the directory again
        ("listeners", ctypes.c_uint32),
        ("doorbell_len", ctypes.c_uint32),
        ("doorbell", ctypes.c_char * _DOORBELL_MAX),
    )


class Chunk:
    """A shared-memory arena of token slots (see the module docstring)."""

    def __init__(
        self,
        nslots: int = DEFAULT_SLOTS,
        *,
        fd: int | None = None,
        pinned: bool = False,
        label: str = "cancelflow-tokens",
    ) -> None:
        #: a pinned chunk is closed by its owner (a pool), never when its last token goes
        self.pinned = pinned
        self.size = nslots * SLOT_SIZE
        self.owned = fd is None
        if fd is None:
            fd = shared_memory(label, self.size)
        else:
            self.size = os.fstat(fd).st_size
        self.fd: int = fd
        self.mm = map_shared(fd, self.size)
        header = _Header.from_buffer(self.mm, 0)
        self.header: _Header | None = header
        self.gen_address = ctypes.addressof(header)
        #: without futex: the directory whose sockets a ring wakes (see _platform._doorbell)
        self.doorbell = ""
        if not HAVE_FUTEX and TOKENS_CROSS_PROCESSES:
            if self.owned:  # at most ~76 bytes (a socket path's limit less a name)
                path = os.fsencode(make_doorbell())
                header.doorbell = path
                header.doorbell_len = len(path)
            self.doorbell = os.fsdecode(bytes(header.doorbell[: header.doorbell_len]))
        self._ringer = DoorbellRinger(self.doorbell) if self.doorbell else None
        # Owned chunks hand slots out; attached ones (from another process) never do.
        self._free: list[int] = (
            list(range(self.size - SLOT_SIZE, 0, -SLOT_SIZE)) if self.owned else []
        )
        self.live = 0
        #: True once another process may read this chunk (fork, pickling, attached)
        self.shared = not self.owned
        #: token ``_id`` -> token (weakly), for the tokens of this process that have listeners
        self.listeners: dict[int, TokenRef] = {}
        self._hub_ticket: list[int] = [1]
        #: without futex: doorbell sockets of this process free for the next wait
        self._idle_listeners: list[DoorbellListener] = []
        #: without futex: the socket of this process's last hub, kept for the next one (a
        #: new socket would make every ringer list the doorbell again)
        self._idle_hub: DoorbellListener | None = None
        #: (process being started, what this chunk was pickled as for it), see _token
        self.exported_to: tuple[weakref.ref[Any], weakref.ref[Any]] | None = None
        _all_chunks.add(self)

    # -- slots -------------------------------------------------------------------------
    def allocate(self) -> int | None:
        """Return a fresh slot offset, or ``None`` if this chunk has none left to give."""
        with _slots_lock:
            if self.fd < 0:
                return None
            self.live += 1  # first: a release re-entering from gc must not close us now
            try:
                return self._free.pop()
            except IndexError:
                self.live -= 1
                return None

    def adopt(self) -> None:
        """Count a token built on a slot of this chunk that it did not allocate."""
        with _slots_lock:
            self.live += 1

    def release(self, offset: int, *, reusable: bool, key: int | None = None) -> None:
        """Give a slot back; close the descriptor once nothing uses the chunk.

        ``key`` is the releasing token's ``_id``, dropped from the listeners.
        """
        if key is not None:
            self._forget(key)
        with _slots_lock:
            if reusable and self.owned:
                self._free.append(offset)
            self.live -= 1
            if self.live <= 0 and not self.pinned:
                self.close()

    def close(self) -> None:
        global _current
        with _slots_lock:
            if _current is self:
                _current = None
            fd, self.fd = self.fd, -1
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                idle, self._idle_listeners = self._idle_listeners, []
                if self._idle_hub is not None:
                    idle.append(self._idle_hub)
                    self._idle_hub = None
                for listener in idle:
                    listener.close(last=False)
                if self._ringer is not None:
                    self._ringer.close()
                if self.doorbell and self.owned:
                    discard_doorbell(self.doorbell)
                elif idle:
                    with contextlib.suppress(OSError):
                        os.rmdir(self.doorbell)  # if we were the last to listen

    def lock_slot(self, offset: int) -> contextlib.AbstractContextManager[None]:
        """Hold a cross-process lock on one slot (dropped by the kernel if we die)."""
        fd = self.fd
        return _NO_LOCK if fd < 0 else lock_range(fd, offset, SLOT_SIZE)

    # -- cross-process notification ----------------------------------------------------
    def ring(self, *, own_hub: bool = True) -> None:
        """Tell every hub in every process that some slot of this chunk changed (and,
        without futex, every thread blocked on one of its tokens).

        ``own_hub=False``: not this process's hub, if the doorbell can leave it out (a
        cancel made here, delivered here by :meth:`deliver_slot`); with futex it is
        woken too, and finds nothing left to do.
        """
        header = self.header
        if header is None:
            return
        header.generation = (header.generation + 1) & 0xFFFFFFFF
        if HAVE_FUTEX:
            futex_wake(self.gen_address)
        elif self._ringer is not None:
            self._ringer.ring(header.listeners, own_hubs=own_hub)  # closed: rings by path

    def _new_listener(self, *, hub: bool = False) -> DoorbellListener:
        """Bind a socket in the doorbell, then count it in the header (so that ringers
        connect to it; see _platform._doorbell for the race its first wait covers)."""
        listener = DoorbellListener(self.doorbell, hub=hub)
        header = self.header
        if header is not None and self.fd >= 0:
            try:
                # Threads of one process are not kept apart by a record lock: the RLock
                # does (re-entrant for a signal handler that waits while its thread was
                # binding).
                with _listeners_lock, lock_range(self.fd, 0, SLOT_SIZE):
                    header.listeners = (header.listeners + 1) & 0xFFFFFFFF
            except BaseException:  # (the chunk closed meanwhile, an interrupt): not counted
                listener.close(last=False)
                raise
        return listener

    def listen(self) -> DoorbellListener | None:
        """Without futex: a socket in the chunk's doorbell for this thread alone until
        :meth:`unlisten`, which every cross-process ring of the chunk wakes (``None``
        with futex, or if it cannot be made: then the hub delivers). Sockets are reused
        between waits (binding one costs a few system calls); a reused one starts with
        no ring pending."""
        if not self.doorbell or self.fd < 0:
            return None
        try:
            listener = self._idle_listeners.pop()
        except IndexError:
            try:
                return self._new_listener()
            except OSError:
                return None
        listener.drain()
        return listener

    def unlisten(self, listener: DoorbellListener) -> None:
        """Give back a socket from :meth:`listen`: kept for the next wait (a few at most:
        an idle socket's unread rings count against the sender), else closed."""
        if self.fd < 0 or len(self._idle_listeners) >= _IDLE_LISTENERS:
            listener.close(last=False)
        else:
            self._idle_listeners.append(listener)

    def watch(self, ref: TokenRef) -> None:
        """Deliver cancels that other processes make on ``ref``'s token to its local
        listeners.

        The caller re-checks the flag afterwards: a cancel made before the hub saw this
        listener is the caller's to deliver.
        """
        self.listeners[ref.key] = ref
        if ref.shared():
            self.ensure_hub()

    def unwatch(self, key: int) -> None:
        """Stop delivering to the token whose ``_id`` is ``key`` (it has no listener left)."""
        self._forget(key)

    def _forget(self, key: int) -> None:
        ref = self.listeners.pop(key, None)
        if ref is None or self._hub_ticket:
            return  # not listening, or no hub runs
        token = ref()
        if token is None or ref.shared():
            self.ring()  # lets the hub notice when it has nothing left to watch

    def mark_shared(self) -> None:
        """Note that some token of this chunk may be read by another process."""
        self.shared = True

    def ensure_hub(self) -> None:
        """Start this process's hub for the chunk, unless it runs already."""
        if not HAVE_FUTEX and not self.doorbell:
            return  # nothing crosses processes here ("windows"): nothing to listen to
        try:
            self._hub_ticket.pop()
        except IndexError:
            return  # a hub runs already; it rescans at the next ring
        # Safe from a signal handler (on_cancel of a shared token): Thread.start() takes
        # threading's module lock, which is re-entrant, and a daemon thread takes no other.
        threading.Thread(target=self._hub, name="cancelflow-token-hub", daemon=True).start()

    def _hub(self) -> None:
        if HAVE_FUTEX:
            self._hub_loop(None)
            return
        with _slots_lock:
            listener, self._idle_hub = self._idle_hub, None
        try:
            if listener is None:
                listener = self._new_listener(hub=True)
            else:
                listener.drain()  # rings that came while no hub ran: _deliver looks anyway
        except OSError as exc:
            safe_log("ERROR", "token hub cannot listen for cancels", exception=exc)
            self._hub_ticket.append(1)
            return
        try:
            self._hub_loop(listener)
        finally:
            with _slots_lock:  # against close(), which closes an idle hub's socket
                if self.fd >= 0 and self._idle_hub is None:
                    self._idle_hub = listener
                else:  # the last to leave a closed chunk's doorbell removes it
                    listener.close(last=self.fd < 0)

    def _hub_loop(self, listener: DoorbellListener | None) -> None:
        while True:
            header = self.header
            if header is None:
                self._hub_ticket.append(1)
                return
            generation = header.generation
            try:
                watching = self._deliver()
            except BaseException as exc:  # noqa: BLE001 - the hub must outlive one bad token
                safe_log("ERROR", "token hub failed to deliver a cancel", exception=exc)
                watching = True
            if not watching:
                self._hub_ticket.append(1)
                if not self._watching():
                    return
                try:  # a listener arrived while we were leaving: keep running if we can
                    self._hub_ticket.pop()
                except IndexError:
                    return
            if listener is None:
                futex_wait(self.gen_address, generation, None)
            elif header.generation == generation:
                listener.wait()

    def _deliver(self) -> bool:
        """Apply cancels made elsewhere to this process's listeners; return whether any
        shared token is still listened to."""
        # A method of its own so that no token stays referenced from the hub's frame while
        # it sleeps (that would keep the token, and its descriptor, alive forever).
        watching = False
        for key, ref in list(self.listeners.items()):
            token = ref()
            if token is None:
                self.listeners.pop(key, None)
            elif not ref.shared():
                continue  # only this process can cancel it, and delivers it itself
            elif token.is_cancelled:
                self.listeners.pop(key, None)
                ref.take_remote_cancel()
            else:
                watching = True
        return watching

    def deliver_slot(self, offset: int) -> None:
        """Apply a cancel made in this process on the slot at ``offset`` to this
        process's other token objects on that slot (their callbacks run now, in the
        calling thread: the hub is not woken for a cancel made here)."""
        for key, ref in list(self.listeners.items()):
            if ref.offset != offset:
                continue
            token = ref()
            if token is None:
                self._forget(key)
            elif token.is_cancelled:
                # Left in the listeners: its delivery unwatches it, and so tells a running
                # hub when nothing is left to watch (popping it here kept the hub alive).
                ref.take_remote_cancel()

    def _watching(self) -> bool:
        return any(ref.shared() for ref in list(self.listeners.values()))


_NO_LOCK = contextlib.nullcontext()
_slots_lock = threading.RLock()
#: serialises this process's bumps of a header's listener count (see Chunk._new_listener)
_listeners_lock = threading.RLock()
#: how many times this process forked (a token made before a fork is shared with it)
fork_epoch = 0
_all_chunks: weakref.WeakSet[Chunk] = weakref.WeakSet()
_current: Chunk | None = None
_attached: weakref.WeakValueDictionary[tuple[int, int], Chunk] = weakref.WeakValueDictionary()


def allocate_slot() -> tuple[Chunk, int]:
    """Return ``(chunk, offset)`` for a new token, making a new chunk when needed."""
    global _current
    with _slots_lock:
        chunk = _current
        if chunk is not None:
            offset = chunk.allocate()
            if offset is not None:
                return chunk, offset
        chunk = _current = Chunk()
        offset = chunk.allocate()
        assert offset is not None
        return chunk, offset


def attach_chunk(fd: int, *, pinned: bool = False) -> Chunk:
    """Map a chunk made by another process, once per process (``fd`` is consumed)."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _slots_lock:
        chunk = _attached.get(key)
        if chunk is not None and chunk.fd >= 0:
            os.close(fd)
            return chunk
        chunk = Chunk(fd=fd, pinned=pinned)
        _attached[key] = chunk
        return chunk


def _before_fork() -> None:
    # Every token alive now may be read by the child: it is shared from here on. No
    # thread is started here (a thread born just before fork() is a hazard for the child).
    # The slots' lock is held across the fork (released in both after-hooks): no other
    # thread is then in the middle of a slot operation, and the child's forking thread
    # holds it (re-entrant) until its after-hook replaces it, so what runs in the child
    # before that hook (finalizers a free-threaded build deferred: a token's release)
    # takes it instead of waiting forever for a thread the child does not have.
    global fork_epoch
    _slots_lock.acquire()
    fork_epoch += 1
    for chunk in list(_all_chunks):
        chunk.mark_shared()


def _after_fork_in_parent() -> None:
    _slots_lock.release()
    for chunk in list(_all_chunks):
        if chunk.listeners:  # all of them shared now: the child may cancel them
            chunk.ensure_hub()


def _after_fork_in_child() -> None:
    global _current, _slots_lock, _listeners_lock
    _slots_lock = threading.RLock()  # another thread may have held it at the fork
    _listeners_lock = threading.RLock()
    _current = None  # the child allocates from chunks of its own
    for chunk in list(_all_chunks):
        chunk.owned = False
        chunk._free = []
        for ref in chunk.listeners.values():
            ref.drop_callbacks()  # the parent's callbacks run in the parent
        chunk.listeners = {}
        chunk._hub_ticket = [1]  # hub threads do not survive a fork
        idle, chunk._idle_listeners = chunk._idle_listeners, []
        if chunk._idle_hub is not None:
            idle.append(chunk._idle_hub)
            chunk._idle_hub = None
        for listener in idle:
            listener.abandon()  # the parent's sockets: ours would read its rings


at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
