"""Tests for :mod:`cancelflow._platform`."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cancelflow._platform import (
    DOORBELL_FRESH_WAIT,
    FLAVOUR,
    HAVE_FUTEX,
    DoorbellListener,
    DoorbellRinger,
    ProcessView,
    UnsafeSignalTarget,
    _tree,
    _wake,
    children,
    discard_doorbell,
    futex_wait,
    futex_wake,
    kill_tree,
    lock_range,
    make_doorbell,
    pidfd_open,
    ring_doorbell,
    set_child_subreaper,
    set_parent_death_signal,
)
from cancelflow._platform._scratch import _mark_of
from support import TESTS, WAIT, assert_not_running, wait_until

needs_futex = pytest.mark.skipif(not HAVE_FUTEX, reason="no futex on this platform")
#: pidfd and the child subreaper exist only in the "linux" implementation
linux_only = pytest.mark.skipif(FLAVOUR != "linux", reason="the 'linux' implementation only")


def _word(value: int = 0) -> ctypes.c_uint32:
    return ctypes.c_uint32(value)


class TestFutex:
    def test_linux_flavour_has_futex(self) -> None:
        """Test that the futex path is used exactly when the "linux" flavour runs."""
        assert HAVE_FUTEX == (FLAVOUR == "linux")

    def test_wait_returns_at_once_when_word_differs(self) -> None:
        """Test that futex_wait() returns without blocking when the word is not ``expected``."""
        word = _word(1)
        futex_wait(ctypes.addressof(word), 0, None)  # would hang if it blocked

    def test_wait_returns_after_timeout(self) -> None:
        """Test that futex_wait() returns once the timeout passes."""
        word = _word(0)
        futex_wait(ctypes.addressof(word), 0, 0.01)

    def test_wait_accepts_full_32_bit_expected(self) -> None:
        """Test that an ``expected`` above 2**31 (a wrapped generation) is accepted."""
        word = _word(0xFFFFFFFE)
        futex_wait(ctypes.addressof(word), 0xFFFFFFFE, 0.001)

    @needs_futex
    def test_wake_wakes_thread(self) -> None:
        """Test that futex_wake() wakes a thread blocked on the word."""
        word = _word(0)
        address = ctypes.addressof(word)
        started = threading.Event()

        def waiter() -> None:
            started.set()
            while word.value == 0:
                futex_wait(address, 0, None)

        thread = threading.Thread(target=waiter)
        thread.start()
        assert started.wait(WAIT)
        word.value = 1
        futex_wake(address)
        thread.join(WAIT)
        assert not thread.is_alive()

    @needs_futex
    def test_huge_timeout_still_blocks(self) -> None:
        """Test that a timeout too large for a timespec blocks rather than returning at once."""
        word = _word(0)
        address = ctypes.addressof(word)
        returns: list[int] = []

        def waiter() -> None:
            futex_wait(address, 0, 1e19)
            returns.append(word.value)

        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(0.2)
        assert thread.is_alive()  # still blocked after a while: the bound is the behaviour
        word.value = 1
        futex_wake(address)
        thread.join(WAIT)
        assert returns == [1]

    @needs_futex
    def test_wake_crosses_processes(self) -> None:
        """Test that futex_wake() in one process wakes a waiter on shared memory in another."""
        shared = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED | MAP_ANONYMOUS
        word = ctypes.c_uint32.from_buffer(shared)
        ready = ctypes.c_uint32.from_buffer(shared, 4)
        address = ctypes.addressof(word)
        pid = os.fork()
        if pid == 0:  # child: announce, then wait for the parent's change
            code = 1
            try:
                ready.value = 1
                futex_wake(ctypes.addressof(ready))
                while word.value == 0:
                    futex_wait(address, 0, WAIT)
                code = 0 if word.value == 7 else 2
            finally:
                os._exit(code)
        try:
            while ready.value == 0:
                futex_wait(ctypes.addressof(ready), 0, WAIT)
            word.value = 7
            futex_wake(address)
        finally:
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        del word, ready
        shared.close()


def _until_parked(address: int) -> None:
    deadline = time.monotonic() + WAIT
    while address not in _wake._parked:
        assert time.monotonic() < deadline, "the thread never parked"
        time.sleep(0)  # yield the GIL to the parking thread


class TestParkingLot:
    """futex_wait / futex_wake without a futex (the "posix" and "windows" flavours)."""

    @pytest.fixture(autouse=True)
    def _no_futex(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_wake, "HAVE_FUTEX", False)

    def test_wait_returns_at_once_when_word_differs(self) -> None:
        """Test that a wait on a word that is not ``expected`` does not block."""
        word = _word(1)
        futex_wait(ctypes.addressof(word), 0, None)  # would hang if it blocked

    def test_wait_returns_after_timeout(self) -> None:
        """Test that a parked wait returns once its timeout passes, and leaves the lot empty."""
        word = _word(0)
        futex_wait(ctypes.addressof(word), 0, 0.01)
        assert ctypes.addressof(word) not in _wake._parked

    def test_wake_releases_parked_thread(self) -> None:
        """Test that futex_wake() wakes a thread parked on the word, without a timeout."""
        word = _word(0)
        address = ctypes.addressof(word)
        woke = threading.Event()

        def waiter() -> None:
            while word.value == 0:
                futex_wait(address, 0, None)
            woke.set()

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        _until_parked(address)  # the wake below must be what releases it
        word.value = 1
        futex_wake(address)
        assert woke.wait(WAIT)
        thread.join(WAIT)

    def test_wake_reaches_only_its_address(self) -> None:
        """Test that a wake on one word leaves a thread parked on another word parked."""
        mine, other = _word(0), _word(0)
        parked = threading.Event()
        done = threading.Event()

        def waiter() -> None:
            parked.set()
            futex_wait(ctypes.addressof(mine), 0, WAIT)
            done.set()

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        assert parked.wait(WAIT)
        _until_parked(ctypes.addressof(mine))
        futex_wake(ctypes.addressof(other))
        assert not done.wait(0.05)
        mine.value = 1
        futex_wake(ctypes.addressof(mine))
        assert done.wait(WAIT)
        thread.join(WAIT)

    def test_wake_without_waiters_is_a_no_op(self) -> None:
        """Test that futex_wake() on a word nobody waits on does nothing and does not fail."""
        word = _word(0)
        futex_wake(ctypes.addressof(word))
        futex_wake(ctypes.addressof(word))

    @pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
    def test_wake_from_a_signal_handler_of_the_parked_thread(self) -> None:
        """Test that a signal handler running on the parked thread itself can wake it."""
        word = _word(0)
        address = ctypes.addressof(word)

        def handler(signum: int, frame: object) -> None:
            word.value = 1
            futex_wake(address)

        previous = signal.signal(signal.SIGUSR1, handler)
        try:
            timer = threading.Timer(
                0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1)
            )
            timer.start()
            while word.value == 0:
                futex_wait(address, 0, WAIT)
            timer.join(WAIT)
        finally:
            signal.signal(signal.SIGUSR1, previous)
        assert word.value == 1


@linux_only
class TestPidfdOpen:
    def test_live_process_gives_descriptor(self) -> None:
        """Test that pidfd_open() of a live process returns a descriptor."""
        fd = pidfd_open(os.getpid())
        if fd is None:
            pytest.skip("no pidfd on this kernel")
        os.close(fd)

    def test_reaped_process_gives_none(self) -> None:
        """Test that pidfd_open() of a process that is gone returns None."""
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        assert pidfd_open(pid) is None


@linux_only
class TestSetChildSubreaper:
    def test_succeeds_in_child(self) -> None:
        """Test that set_child_subreaper() works (tried in a child, to leave pytest alone)."""
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if set_child_subreaper(True) is True else 1)
            finally:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


#: A child that starts a shell, which starts ``sleep``; it prints both pids.
_CHAIN = """
import subprocess, sys
shell = subprocess.Popen(["sh", "-c", "sleep 1000 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
print(shell.pid, shell.stdout.readline().strip(), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def chain() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """A child process with a shell child and a ``sleep`` grandchild: (child, shell, sleep)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHAIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdin is not None
    try:
        shell, sleeper = map(int, child.stdout.readline().split())
        yield child, shell, sleeper
    finally:
        for pid in (shell, sleeper):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        child.stdin.close()
        child.stdout.close()
        child.wait(WAIT)


class TestKillTree:
    def test_kills_every_descendant_but_not_the_process_itself(
        self, chain: tuple[subprocess.Popen[str], int, int]
    ) -> None:
        """Test that kill_tree kills the children and grandchildren of a process,
        returns their pids, and leaves the process itself running."""
        child, shell, sleeper = chain
        assert sorted(kill_tree(child.pid)) == sorted([shell, sleeper])
        assert_not_running(shell)
        assert_not_running(sleeper)
        assert child.poll() is None

    def test_a_process_without_children_is_left_alone(self) -> None:
        """Test that kill_tree on a process without children kills nothing."""
        lone = subprocess.Popen(["sleep", "1000"])
        try:
            assert kill_tree(lone.pid) == {}
            assert lone.poll() is None
        finally:
            lone.kill()
            lone.wait(WAIT)

    def test_include_root_kills_the_process_too(
        self, chain: tuple[subprocess.Popen[str], int, int]
    ) -> None:
        """Test that with include_root the process itself dies, after its descendants,
        and is not among the returned pids."""
        child, shell, sleeper = chain
        assert sorted(kill_tree(child.pid, include_root=True)) == sorted([shell, sleeper])
        assert child.wait(WAIT) == -signal.SIGKILL
        assert_not_running(shell)
        assert_not_running(sleeper)

    @linux_only
    def test_watch_gives_a_descriptor_readable_once_each_process_is_gone(
        self, chain: tuple[subprocess.Popen[str], int, int]
    ) -> None:
        """Test that with watch each killed descendant comes with a pidfd that becomes
        readable once that process has exited."""
        child, shell, sleeper = chain
        killed = kill_tree(child.pid, watch=True)
        try:
            assert sorted(killed) == sorted([shell, sleeper])
            for fd in killed.values():
                assert fd is not None
                readable, _, _ = select.select([fd], [], [], WAIT)
                assert readable == [fd]
        finally:
            for fd in killed.values():
                if fd is not None:
                    os.close(fd)

    @linux_only  # the walk of /proc children lists; "posix" takes snapshots (psutil)
    def test_a_round_reads_only_what_is_new(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Test that a tree growing while it is frozen (orphans re-parented to the root
        round after round, as a forking chain does, beside 1,000 zombies) costs each
        process's children to be read twice at most, not once per round: the whole tree
        re-walked every round let a chain outrun the rounds for seconds (killing a
        worker with 4,000 zombies took 13 s)."""
        root, zombies = 10_000, list(range(20_000, 21_000))
        arrivals = iter(range(30_000, 30_006))  # one orphan per read of the root
        reads: list[int] = []
        frozen: list[int] = []

        def children_of(pid: int, view: object = None) -> list[int]:
            reads.append(pid)
            if pid != root:
                return []
            late = next(arrivals, None)
            if late is not None:
                zombies.append(late)
            return list(zombies)

        def send_signal(pid: int, signum: int) -> bool:
            if signum == signal.SIGSTOP:
                frozen.append(pid)
            return True

        monkeypatch.setattr(_tree, "_children_of", children_of)
        monkeypatch.setattr(_tree, "send_signal", send_signal)
        killed = kill_tree(root, include_root=True)
        assert sorted(killed) == sorted(zombies)  # every one, the late ones too
        assert frozen[0] == root
        assert sorted(frozen[1:]) == sorted(zombies)
        assert len(reads) <= 2 * len(zombies) + 10
        assert reads.count(root) == 7  # a round per arrival, and one that finds nothing

    def test_refuses_this_process_before_sending_anything(self) -> None:
        """Test that asking to kill this process's own tree with its root raises
        UnsafeSignalTarget instead of stopping the test runner."""
        with pytest.raises(UnsafeSignalTarget):
            kill_tree(os.getpid(), include_root=True)


def _blocked_on_a_record_lock(pid: int) -> bool:
    """Whether process ``pid`` waits for an fcntl record lock (Linux: ``/proc/locks``
    shows a waiter with ``->``)."""
    with open("/proc/locks", encoding="ascii") as locks:
        return any("->" in fields and str(pid) in fields for fields in map(str.split, locks))


_FORK_TWO = (
    "import os, sys, time\n"
    "kids = []\n"
    "for _ in range(2):\n"
    "    kid = os.fork()\n"
    "    if kid == 0:\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "    kids.append(kid)\n"
    "print(*kids, flush=True)\n"
    "sys.stdin.readline()\n"
    "os.kill(kids[0], 9)\n"
    "os.waitpid(kids[0], 0)\n"
    "print('reaped', flush=True)\n"
    "sys.stdin.readline()\n"
    "os.kill(kids[1], 9)\n"
    "os.waitpid(kids[1], 0)\n"
)


@contextlib.contextmanager
def _viewed_sleeping_child() -> Iterator[tuple[int, ProcessView]]:
    """A forked child that sleeps, with a view of it; killed and reaped at the end."""
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    view = ProcessView(pid)
    try:
        yield pid, view
    finally:
        view.close()
        try:
            running = os.waitpid(pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            running = False  # reaped by the test: its pid may be another's by now
        if running:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _kill_and_see_exit(pid: int) -> None:
    """SIGKILL a child and wait until it has exited (a zombie, not reaped)."""
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        assert select.select([pidfd], [], [], WAIT)[0], "the child did not exit"
    finally:
        os.close(pidfd)


@linux_only
class TestProcessView:
    """Descriptors held open on a process's /proc entries, for a fast kill of its tree."""

    def test_reads_the_children_of_a_single_threaded_process_as_they_change(self) -> None:
        """Test that a view reads the process's children, fresh at each read: a child
        reaped since the last read is no longer there."""
        with subprocess.Popen(
            [sys.executable, "-c", _FORK_TWO],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as proc:
            assert proc.stdin is not None
            assert proc.stdout is not None
            view = ProcessView(proc.pid)
            try:
                kids = [int(pid) for pid in proc.stdout.readline().split()]
                assert len(kids) == 2
                assert sorted(view.children() or []) == sorted(kids)
                assert sorted(children(proc.pid)) == sorted(kids)
                proc.stdin.write("\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() == "reaped"
                assert view.children() == [kids[1]]
                proc.stdin.write("\n")
                proc.stdin.flush()
                assert proc.wait(WAIT) == 0
            finally:
                view.close()
                if proc.poll() is None:
                    proc.kill()

    def test_gives_no_children_for_a_process_with_several_threads(self) -> None:
        """Test that a view of a process running more than one thread returns None (the
        other threads' children are in their own files): the walk reads them all."""
        release = threading.Event()
        thread = threading.Thread(target=release.wait)
        thread.start()
        view = ProcessView(os.getpid())
        try:
            assert view.children() is None
        finally:
            release.set()
            thread.join()
            view.close()

    def test_still_parent_until_the_process_is_a_zombie(self) -> None:
        """Test that still_parent() is True while the process lives, False once it
        exited (a zombie) and once it is reaped, and that a reaped process's view reads
        nothing (its pid, free again, is never read through it)."""
        with _viewed_sleeping_child() as (pid, view):
            assert view.open
            assert view.still_parent()
            _kill_and_see_exit(pid)
            assert not view.still_parent()  # a zombie: not reaped yet
            os.waitpid(pid, 0)
            assert not view.still_parent()
            assert view.children() is None

    def test_childless_while_a_process_with_no_child_lives_not_once_it_exited(
        self,
    ) -> None:
        """Test that childless() is True for a live single-threaded process with no
        child, and False once it exited (what it held is no longer its own to list)."""
        with _viewed_sleeping_child() as (pid, view):
            assert view.childless()
            _kill_and_see_exit(pid)
            assert not view.childless()

    def test_not_childless_with_a_child(self) -> None:
        """Test that childless() is False for a process that has children."""
        with subprocess.Popen(
            [sys.executable, "-c", _FORK_TWO], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        ) as proc:
            assert proc.stdin is not None
            assert proc.stdout is not None
            view = ProcessView(proc.pid)
            kids: list[int] = []
            try:
                kids = [int(pid) for pid in proc.stdout.readline().split()]
                assert len(kids) == 2
                assert not view.childless()
                proc.stdin.write(b"\n\n")  # the program kills and reaps both, then ends
                proc.stdin.flush()
                assert proc.wait(WAIT) == 0
            finally:
                view.close()
                if proc.poll() is None:
                    proc.kill()
                    for kid in kids:  # (orphans now: they would sleep on for a minute)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(kid, signal.SIGKILL)

    def test_not_childless_with_several_threads(self) -> None:
        """Test that childless() is False for a process with no child that runs more
        than one thread (the other threads' children would not be in the view)."""
        code = (
            "import sys, threading\n"
            "threading.Thread(target=sys.stdin.readline).start()\n"
            "print('ready', flush=True)\n"
        )
        with subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        ) as proc:
            assert proc.stdin is not None
            assert proc.stdout is not None
            view = ProcessView(proc.pid)
            try:
                assert proc.stdout.readline().strip() == b"ready"
                assert view.children() is None
                assert not view.childless()
            finally:
                view.close()
                proc.stdin.write(b"\n")
                proc.stdin.flush()
                assert proc.wait(WAIT) == 0

    def test_close_releases_both_descriptors_and_is_idempotent(self) -> None:
        """Test that close() closes what the view opened, and may be called again."""
        before = len(os.listdir("/proc/self/fd"))
        view = ProcessView(os.getpid())
        assert view.open
        assert len(os.listdir("/proc/self/fd")) == before + 2
        view.close()
        view.close()
        assert not view.open
        assert len(os.listdir("/proc/self/fd")) == before
        assert view.children() is None
        assert not view.still_parent()

    def test_kill_tree_walks_through_the_view(self) -> None:
        """Test that kill_tree with a view kills the root's child found through it."""
        code = (
            "import os, time\n"
            "kid = os.fork()\n"
            "if kid:\n"
            "    print(kid, flush=True)\n"
            "time.sleep(60)\n"
        )
        with subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
        ) as proc:
            assert proc.stdout is not None

            class Counting(ProcessView):
                reads = 0

                def children(self) -> list[int] | None:
                    Counting.reads += 1
                    return super().children()

            view = Counting(proc.pid)
            try:
                child = int(proc.stdout.readline())
                killed = kill_tree(proc.pid, include_root=True, view=view)
                assert list(killed) == [child]
                assert Counting.reads >= 1
                assert proc.wait(WAIT) == -signal.SIGKILL
            finally:
                view.close()
                if proc.poll() is None:
                    proc.kill()


@pytest.mark.skipif(
    FLAVOUR == "windows" or not os.path.exists("/proc/locks"), reason="needs /proc/locks"
)
class TestLockRange:
    def test_a_deadlock_the_kernel_sees_between_threads_is_waited_out(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a wait the kernel refuses with EDEADLK because record locks belong
        to processes (a thread here holds range 1 for a moment while another waits for
        range 2, held by a process that waits for range 1) is retried until it succeeds
        (regression: cancel() raised OSError EDEADLK under threads binding doorbell
        sockets while other processes cancelled)."""
        retried = threading.Event()
        real_sleep = time.sleep

        def sleep(seconds: float) -> None:
            retried.set()
            real_sleep(seconds)

        monkeypatch.setattr(time, "sleep", sleep)  # the pause before a retry
        with tempfile.TemporaryFile() as file:
            fd = file.fileno()
            os.ftruncate(fd, 4096)
            taken = threading.Event()
            errors: list[BaseException] = []

            def hold_first() -> None:
                with lock_range(fd, 0, 128):
                    taken.set()
                    retried.wait(WAIT)  # until the other thread met EDEADLK and retries

            holder = threading.Thread(target=hold_first)
            holder.start()
            assert taken.wait(WAIT)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child: holds range 2, waits for range 1
                os.close(read)
                code = 1
                try:
                    with lock_range(fd, 128, 128):
                        os.write(write, b"x")
                        with lock_range(fd, 0, 128):
                            code = 0
                finally:
                    os._exit(code)
            os.close(write)
            try:
                assert os.read(read, 1) == b"x"
                assert wait_until(lambda: _blocked_on_a_record_lock(pid))
                try:
                    with lock_range(fd, 128, 128):  # the kernel sees: us -> child -> us
                        pass
                except OSError as exc:
                    errors.append(exc)
            finally:
                retried.set()
                holder.join(WAIT)
                os.close(read)
                _, status = os.waitpid(pid, 0)
            assert errors == []
            assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def directory() -> Iterator[str]:
    """A doorbell directory, which must be gone after its maker's discard."""
    path = make_doorbell()
    yield path
    discard_doorbell(path)
    assert not os.path.exists(path)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="doorbells need AF_UNIX")
class TestDoorbell:
    """Wake-ups across processes without futex (_platform._doorbell)."""

    def test_a_ring_wakes_a_listener_bound_before_it(self, directory: str) -> None:
        """Test that a ring made after a listener is bound, before it waits, still wakes it."""
        listener = DoorbellListener(directory)
        try:
            ring_doorbell(directory)
            listener.wait(WAIT)  # returns at once: the ring waits in its queue
        finally:
            listener.close()

    def test_a_ring_from_another_process_wakes_a_waiting_listener(self, directory: str) -> None:
        """Test that a ring made by a forked child wakes a listener blocked in the parent."""
        listener = DoorbellListener(directory)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                time.sleep(0.05)  # the parent blocks meanwhile (not required for the check)
                ring_doorbell(directory)
                os._exit(0)
            listener.wait(WAIT)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            listener.close()

    def test_drain_leaves_no_ring_pending(self, directory: str) -> None:
        """Test that drain() takes every pending ring, so the next wait blocks until its
        timeout."""
        listener = DoorbellListener(directory)
        try:
            listener.wait(0)  # a new listener's first wait is short (see the next class)
            for _ in range(3):
                ring_doorbell(directory)
            listener.drain()
            started = time.monotonic()
            listener.wait(0.05)
            assert time.monotonic() - started >= 0.04
        finally:
            listener.close()

    def test_a_dead_listeners_socket_is_removed_by_the_next_ring(self, directory: str) -> None:
        """Test that the socket file of a listener whose process died (never closed) is
        removed by the next ring, and the directory by the owner's discard."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child binds, then dies without closing
            DoorbellListener(directory)
            os._exit(0)
        os.waitpid(pid, 0)
        assert len(os.listdir(directory)) == 1
        ring_doorbell(directory)
        assert os.listdir(directory) == []

    def test_the_last_listener_to_leave_removes_the_directory(self) -> None:
        """Test that a listener closed last removes the (empty) directory."""
        directory = make_doorbell()
        listener = DoorbellListener(directory)
        listener.close()
        assert not os.path.exists(directory)
        discard_doorbell(directory)  # nothing left to do: no error

    def test_a_ring_reaches_a_listener_when_others_never_read(self, directory: str) -> None:
        """Test that listeners which never read (their unread rings count against the
        sender on Linux) do not stop a ring from reaching a listener that does
        (regression: the sender's budget ran out and every send failed EAGAIN)."""
        deaf = [DoorbellListener(directory) for _ in range(40)]
        try:
            for _ in range(12):
                ring_doorbell(directory)
            listener = DoorbellListener(directory)
            try:
                ring_doorbell(directory)
                started = time.monotonic()
                listener.wait(WAIT)
                assert time.monotonic() - started < WAIT / 2, "the ring never arrived"
            finally:
                listener.close(last=False)
        finally:
            for other in deaf:
                other.close(last=False)

    def test_drain_after_an_interrupted_wait_does_not_block(self, directory: str) -> None:
        """Test that a listener left blocking (a signal handler raised inside wait())
        drains without blocking (regression: the next wait_blocking hung in drain)."""
        listener = DoorbellListener(directory)
        try:
            listener.sock.setblocking(True)  # what an exception out of recv() left behind
            listener.drain()
        finally:
            listener.close(last=False)

    def test_a_huge_timeout_is_clamped(self, directory: str) -> None:
        """Test that wait() with a timeout beyond the platform's time_t does not raise."""
        listener = DoorbellListener(directory)
        try:
            ring_doorbell(directory)
            listener.wait(1e12)
        finally:
            listener.close(last=False)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="doorbells need AF_UNIX")
class TestDoorbellRinger:
    """A process's connected sockets to a doorbell's listeners (_doorbell.Ringer)."""

    @pytest.fixture
    def ringer(self, directory: str) -> Iterator[DoorbellRinger]:
        ringer = DoorbellRinger(directory)
        yield ringer
        ringer.close()

    @staticmethod
    def _listener(directory: str) -> DoorbellListener:
        listener = DoorbellListener(directory)
        listener.wait(0)  # past its first, short wait: only a ring ends a wait now
        return listener

    @staticmethod
    def _woken(listener: DoorbellListener) -> bool:
        started = time.monotonic()
        listener.wait(WAIT)
        return time.monotonic() - started < WAIT / 2

    def test_a_new_count_reaches_a_listener_bound_after_the_last_ring(
        self, directory: str, ringer: DoorbellRinger
    ) -> None:
        """Test that a ring with a changed listener count reaches a listener that bound
        after the ringer's previous ring."""
        first = self._listener(directory)
        second = None
        try:
            ringer.ring(1)
            assert self._woken(first)
            second = self._listener(directory)
            ringer.ring(2)
            assert self._woken(second)
        finally:
            for listener in (first, second):
                if listener is not None:
                    listener.close(last=False)

    def test_a_ring_skips_the_listing_while_the_count_stays(
        self, directory: str, ringer: DoorbellRinger
    ) -> None:
        """Test that a ring with an unchanged count sends on the sockets it has, without
        listing the directory (a socket bound meanwhile is not rung: its own first wait
        covers that moment)."""
        first = self._listener(directory)
        late = DoorbellListener(directory)
        try:
            ringer.ring(1)
            os.rename(directory, directory + "-moved")  # a listing would now find nothing
            try:
                ringer.ring(1)
            finally:
                os.rename(directory + "-moved", directory)
            assert self._woken(first)
            assert late.sock.recv(16, socket.MSG_DONTWAIT)  # the first ring listed it
        finally:
            first.close(last=False)
            late.close(last=False)

    def test_a_new_listeners_first_wait_is_short(self, directory: str) -> None:
        """Test that the first wait of a new listener ends after DOORBELL_FRESH_WAIT
        without a ring (what covers a ring that read the count just before its bump)."""
        listener = DoorbellListener(directory)
        try:
            started = time.monotonic()
            listener.wait(WAIT)
            assert time.monotonic() - started < WAIT / 2
            assert DOORBELL_FRESH_WAIT < 0.1
        finally:
            listener.close(last=False)

    def test_a_listener_gone_since_the_last_ring_makes_it_list_again(
        self, directory: str, ringer: DoorbellRinger
    ) -> None:
        """Test that a ring whose socket finds its listener gone lists the directory
        again in the same ring, and so reaches a listener that bound meanwhile even with
        the count unchanged."""
        gone = self._listener(directory)
        ringer.ring(1)
        gone.close(last=False)
        listener = self._listener(directory)
        try:
            ringer.ring(1)
            assert self._woken(listener)
        finally:
            listener.close(last=False)

    def test_a_socket_bound_again_under_a_gone_listeners_name_is_reached(
        self, directory: str, ringer: DoorbellRinger
    ) -> None:
        """Test that a ring reaches a socket bound under the name of a listener that left
        (a new process with a reused pid): the ringer drops its socket to the old one
        and connects afresh (regression: it kept the dead connection under that name)."""
        gone = self._listener(directory)
        ringer.ring(1)
        gone.close(last=False)
        successor = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            successor.bind(gone.path)
            ringer.ring(1)
            ringer.ring(1)
            successor.settimeout(WAIT)
            assert successor.recv(16) == b"\0"
            successor.settimeout(0)
            assert successor.recv(16) == b"\0"  # the second ring too
        finally:
            successor.close()
            os.unlink(gone.path)

    def test_a_ring_while_the_ringer_is_busy_still_wakes(
        self, directory: str, ringer: DoorbellRinger
    ) -> None:
        """Test that a ring made while the ringer is in use (another thread, or the frame
        a signal handler interrupted) rings by listing instead of waiting."""
        listener = self._listener(directory)
        try:
            ringer.ring(1)
            listener.drain()
            with ringer._busy:
                ringer.ring(2)
            assert self._woken(listener)
        finally:
            listener.close(last=False)

    def test_a_ringer_rings_from_a_signal_handler_that_cut_a_ring(
        self, directory: str, ringer: DoorbellRinger
    ) -> None:
        """Test that a signal handler ringing while the main thread is inside a ring
        neither blocks nor stops either ring."""
        listener = self._listener(directory)
        rang: list[bool] = []

        def handler(signum: int, frame: object) -> None:
            ringer.ring(1)
            rang.append(True)

        previous = signal.signal(signal.SIGUSR1, handler)
        try:
            real = ringer._send_all

            def send_all_then_get_a_signal(own_hubs: bool) -> bool:
                ok = real(own_hubs)
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
                return ok

            ringer._send_all = send_all_then_get_a_signal  # type: ignore[method-assign]
            ringer.ring(1)
            del ringer._send_all
            assert rang == [True]
            assert self._woken(listener)
        finally:
            signal.signal(signal.SIGUSR1, previous)
            listener.close(last=False)

    def test_a_forked_child_rings_with_sockets_of_its_own(
        self, directory: str, ringer: DoorbellRinger
    ) -> None:
        """Test that a child forked after a ring drops the sockets it inherited and rings
        the parent's listener with its own."""
        listener = self._listener(directory)
        try:
            ringer.ring(1)
            listener.drain()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    code = 0 if ringer._by_name == {} else 2
                    ringer.ring(1)
                finally:
                    os._exit(code)
            assert self._woken(listener)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            listener.close(last=False)

    def test_a_close_during_a_ring_in_another_thread_closes_every_socket(
        self, directory: str, ringer: DoorbellRinger
    ) -> None:
        """Test that close() called while another thread rings leaves no socket open once
        that ring ends, and that a ring after close() makes none."""
        listener = self._listener(directory)
        sending, go_on = threading.Event(), threading.Event()
        real = ringer._send_all

        def send_all_once_closed(own_hubs: bool) -> bool:
            sending.set()
            assert go_on.wait(WAIT)
            return real(own_hubs)

        ringer._send_all = send_all_once_closed  # type: ignore[method-assign]
        thread = threading.Thread(target=ringer.ring, args=(1,))
        try:
            thread.start()
            assert sending.wait(WAIT)
            ringer.close()
            assert ringer._by_name != {}  # the ring in progress still uses them
            go_on.set()
            thread.join(WAIT)
            assert ringer._by_name == {}
            assert self._woken(listener)  # that ring was made
            ringer.ring(1)  # lists the directory, keeps nothing
            assert ringer._by_name == {}
        finally:
            go_on.set()
            thread.join(WAIT)
            listener.close(last=False)

    def test_beyond_max_connected_listeners_it_rings_by_path_and_keeps_no_socket(
        self, directory: str, ringer: DoorbellRinger, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that with more listeners than MAX_CONNECTED the ringer keeps no socket
        (one descriptor each in every ringing process would not scale) and still wakes
        every listener (regression: it connected to all of them)."""
        from cancelflow._platform import _doorbell

        monkeypatch.setattr(_doorbell, "MAX_CONNECTED", 2)
        listeners = [self._listener(directory) for _ in range(3)]
        try:
            ringer.ring(3)
            assert ringer._by_name == {}
            assert all(self._woken(listener) for listener in listeners)
        finally:
            for listener in listeners:
                listener.close(last=False)

    def test_close_closes_every_socket(self, directory: str, ringer: DoorbellRinger) -> None:
        """Test that close() leaves no descriptor of the ringer open."""
        listeners = [self._listener(directory) for _ in range(3)]
        try:
            before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
            ringer.ring(3)
            ringer.close()
            if before:
                assert len(os.listdir("/proc/self/fd")) == before
            assert ringer._by_name == {}
        finally:
            for listener in listeners:
                listener.close(last=False)

    def test_a_ring_can_leave_out_this_process_hubs(
        self, directory: str, ringer: DoorbellRinger
    ) -> None:
        """Test that ring(own_hubs=False) wakes this process's waiters but not its hubs,
        and that a plain ring wakes both."""
        waiter = self._listener(directory)
        hub = DoorbellListener(directory, hub=True)
        try:
            hub.wait(0)
            ringer.ring(2, own_hubs=False)
            assert self._woken(waiter)
            with pytest.raises(BlockingIOError):
                hub.sock.recv(16, socket.MSG_DONTWAIT)
            ringer.ring(2)
            assert self._woken(hub)
            assert self._woken(waiter)
        finally:
            waiter.close(last=False)
            hub.close(last=False)

    def test_other_processes_sockets_come_first(self, directory: str) -> None:
        """Test that the ringer sends to other processes' listeners before this
        process's own (a hub woken here would compete with the ringing thread)."""
        ringer = DoorbellRinger(directory)
        mine = self._listener(directory)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child listens until the parent is done
            os.close(write)
            child = DoorbellListener(directory)
            os.read(read, 1)
            child.close(last=False)
            os._exit(0)
        os.close(read)
        try:
            assert wait_until(lambda: len(os.listdir(directory)) == 2)
            ringer.ring(2)
            names = {sock: name for name, sock in ringer._by_name.items()}
            order = [names[sock] for sock in ringer._socks]
            mark = f"{_mark_of(os.getpid())}."
            assert [name.startswith(mark) for name in order] == [False, True]
        finally:
            os.close(write)
            os.waitpid(pid, 0)
            ringer.close()
            mine.close(last=False)


def _gone_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _socket_file(directory: str, name: str) -> None:
    """Leave a bound socket's file in ``directory``, as a listener that ended with
    ``os._exit`` leaves it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(directory, name))
    sock.close()


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="doorbells need AF_UNIX")
class TestDoorbellSweep:
    """Doorbells (and the other private directories of _platform._scratch) left behind by
    processes that could not clean up are swept."""

    def make(self, base: str) -> str:
        path = tempfile.mkdtemp(prefix="cf-", dir=base)  # mode 0700
        return path

    def test_a_doorbell_whose_listeners_are_all_gone_is_removed(self, tmp_path: Path) -> None:
        """Test that a directory holding only sockets of exited processes is removed."""
        from cancelflow._platform._scratch import sweep

        stale = self.make(str(tmp_path))
        _socket_file(stale, f"{_mark_of(_gone_pid())}.1")
        assert sweep(str(tmp_path)) == 1
        assert not os.path.exists(stale)

    def test_a_doorbell_with_a_live_listener_stays(self, tmp_path: Path) -> None:
        """Test that a directory where a live process listens keeps that socket."""
        from cancelflow._platform._scratch import sweep

        live = self.make(str(tmp_path))
        _socket_file(live, f"{_mark_of(os.getpid())}.1")
        _socket_file(live, f"{_mark_of(_gone_pid())}.2")
        assert sweep(str(tmp_path)) == 0
        assert os.listdir(live) == [f"{_mark_of(os.getpid())}.1"]

    def test_an_entry_of_another_pid_namespace_is_left_alone(self, tmp_path: Path) -> None:
        """Test that an entry whose maker is of another pid namespace (a container
        sharing the temporary directory) is not judged by this namespace's pids."""
        from cancelflow._platform._scratch import sweep

        other = self.make(str(tmp_path))
        name = f"{_gone_pid()}-1.1"  # (its pid is gone here; no namespace has inode 1)
        _socket_file(other, name)
        assert sweep(str(tmp_path)) == 0
        assert os.listdir(other) == [name]

    def test_what_is_not_a_doorbell_is_left_alone(self, tmp_path: Path) -> None:
        """Test that other names, other modes and symbolic links are not touched."""
        from cancelflow._platform._scratch import sweep

        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        loose = tmp_path / "cf-loose"
        loose.mkdir(mode=0o755)
        target = tmp_path / "target"
        target.mkdir(mode=0o700)
        (tmp_path / "cf-link").symlink_to(target)
        assert sweep(str(tmp_path)) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "cf-link",
            "cf-loose",
            "other",
            "target",
        ]


posix_only = pytest.mark.skipif(FLAVOUR != "posix", reason="the 'posix' implementation only")


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code`` to its end; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _talking_child(code: str) -> subprocess.Popen[str]:
    """``python -c code`` with text pipes to its stdin and from its stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


#: A child that leads a process group of its own (contain_descendants), orphans a
#: grandchild inside it (its child exits), and prints the orphan's pid.
_ORPHANING_GROUP_LEADER = f"""
import sys
sys.path.insert(0, {TESTS!r})
from cancelflow._platform import contain_descendants
from contractloads import leave_an_orphan
assert contain_descendants() == "group"
print(leave_an_orphan(), flush=True)
sys.stdin.read()
"""


#: A group leader that orphans a grandchild in its group, then kills its group's members;
#: prints how many it killed and the orphan's pid.
_KILLS_ITS_GROUPS_ORPHAN = f"""
import os, sys
sys.path.insert(0, {TESTS!r})
from cancelflow._platform import contain_descendants, descendants, kill_group_members
from contractloads import leave_an_orphan
assert contain_descendants() == "group"
orphan = leave_an_orphan()
assert orphan not in descendants(os.getpid())
print(kill_group_members(), orphan)
"""


@posix_only
class TestPosixContainment:
    @pytest.fixture
    def leader(self) -> Iterator[tuple[subprocess.Popen[str], int]]:
        """A group leader and the orphan it left in its group: (leader, orphan)."""
        child = _talking_child(_ORPHANING_GROUP_LEADER)
        assert child.stdout is not None
        assert child.stdin is not None
        orphan = int(child.stdout.readline())
        try:
            yield child, orphan
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            child.stdin.close()
            child.stdout.close()
            child.wait(WAIT)

    def test_kill_tree_reaches_an_orphan_through_the_roots_group(
        self, leader: tuple[subprocess.Popen[str], int]
    ) -> None:
        """Test that kill_tree(include_root=True) of a group leader kills a descendant
        that lost its parent (no longer in the tree a walk finds) through the group."""
        child, orphan = leader
        assert os.getpgid(orphan) == child.pid
        assert orphan not in _tree.descendants(child.pid)
        kill_tree(child.pid, include_root=True)
        assert child.wait(WAIT) == -signal.SIGKILL
        assert_not_running(orphan)

    def test_kill_remains_ends_the_group_of_a_dead_leader(
        self, leader: tuple[subprocess.Popen[str], int]
    ) -> None:
        """Test that once the leader is dead and reaped, kill_remains(leader) kills what is
        left of its group, and says so."""
        child, orphan = leader
        child.kill()
        child.wait(WAIT)
        assert _tree.kill_remains(child.pid) is True
        assert_not_running(orphan)

    def test_kill_group_members_kills_the_orphans_of_the_group_it_leads(self) -> None:
        """Test that a group leader's kill_group_members() kills an orphan in its group
        (one the walk of its children cannot find), and not the leader itself."""
        done = _run_python(_KILLS_ITS_GROUPS_ORPHAN)
        killed, orphan = map(int, done.stdout.split())
        assert killed == 1
        assert_not_running(orphan)

    def test_kill_remains_never_signals_this_process_group(self) -> None:
        """Test that kill_remains refuses this process's own group and init's."""
        assert _tree.kill_remains(os.getpgrp()) is False
        assert _tree.kill_remains(1) is False


#: A parent that prepares parent-death signals, forks a child that asks for SIGKILL at
#: its parent's death, prints the child's pid and exits once told to.
_DYING_PARENT = """
import os, sys, time
from cancelflow._platform import prepare_parent_death_signals, set_parent_death_signal
prepare_parent_death_signals()
child = os.fork()
if child == 0:
    ok = set_parent_death_signal(9)
    os.write(1, b"%d %d\\n" % (os.getpid(), ok))
    while True:
        time.sleep(1)
sys.stdin.readline()
os._exit(0)
"""


#: A child that asks for a parent-death signal (its watcher thread runs), blocks SIGTERM
#: in its main thread, sends itself SIGTERM and reports whether it is still pending.
_BLOCKED_SIGNAL_STAYS_PENDING = """
import os, signal, sys, threading, time
from cancelflow._platform import prepare_parent_death_signals, set_parent_death_signal
prepare_parent_death_signals()
child = os.fork()
if child == 0:
    handled = []
    signal.signal(signal.SIGTERM, lambda *_: handled.append(1))
    assert set_parent_death_signal(signal.SIGKILL)  # first, as a worker does
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # then the task
    watcher = [t for t in threading.enumerate() if t.name == "cancelflow-parent-death"]
    assert watcher, threading.enumerate()
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):  # a few bytecodes for a handler to run, were it to
        time.sleep(0.001)
    pending = signal.SIGTERM in signal.sigpending()
    print("pending" if pending else "delivered", "handled" if handled else "not-handled")
    sys.stdout.flush()
    os._exit(0)
_, status = os.waitpid(child, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@posix_only
class TestPosixParentDeathSignal:
    def test_a_child_gets_its_signal_when_its_parent_dies(self) -> None:
        """Test that a child of a process that prepared parent-death signals is sent the
        signal it asked for when that parent exits (event-driven: a pipe's end-of-file)."""
        parent = _talking_child(_DYING_PARENT)
        assert parent.stdout is not None
        assert parent.stdin is not None
        pid, ok = map(int, parent.stdout.readline().split())
        try:
            assert ok == 1
            assert psutil_running(pid)
            parent.stdin.write("exit\n")
            parent.stdin.flush()
            assert parent.wait(WAIT) == 0
            assert_not_running(pid)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            parent.stdin.close()
            parent.stdout.close()

    def test_the_watching_thread_takes_no_signal_meant_for_the_process(self) -> None:
        """Test that a signal the main thread blocks stays pending with the watcher thread
        running, instead of being taken (and its handler run) by that thread: a task that
        blocks SIGTERM must not be terminated."""
        done = _run_python(_BLOCKED_SIGNAL_STAYS_PENDING)
        assert done.stdout.split() == ["pending", "not-handled"], done.stdout

    def test_without_preparation_it_says_no(self) -> None:
        """Test that a process whose parent did not prepare gets False (pytest's parent
        made no pipe for it)."""
        assert set_parent_death_signal(signal.SIGKILL) is False


def psutil_running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
