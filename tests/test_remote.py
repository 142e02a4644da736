"""Specification of RemoteToken: a token handed to processes cancelflow did not start
(a stdlib ProcessPoolExecutor's workers here), with a partial-result sink."""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from cancelflow import CancellationToken, ProcessPool, RemoteToken
from cancelflow._platform import HAVE_PIDFD, make_scratch_directory
from support import WAIT, needs_process_pools, wait_until
from workloads import (
    cancel_remote_token,
    poll_remote_token,
    remote_handle_directory,
    remote_in_fork_child,
    remote_reader_thread_count,
    remote_reader_threads,
)


@pytest.fixture(params=["fork", "forkserver"])
def foreign_pool(
    request: pytest.FixtureRequest, mp_singletons: None
) -> Iterator[concurrent.futures.Executor]:
    """A stdlib process pool, whose workers are already running when a handle is sent
    (forkserver: workers that are not even descendants of this process)."""
    context = multiprocessing.get_context(request.param)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        pool.submit(os.getpid).result(WAIT)  # the worker runs before any handle exists
        yield pool


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A temporary directory short enough to hold a Unix socket's path (pytest's own
    ``tmp_path`` may not be: cancelflow then makes its directories elsewhere)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        yield directory


class Sink:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.arrived = threading.Event()

    def __call__(self, key: str, value: Any) -> None:
        self.values[key] = value
        self.arrived.set()


class TestInAForeignProcess:
    def test_a_cancel_reaches_a_running_worker_and_partials_come_back(
        self, foreign_pool: concurrent.futures.Executor
    ) -> None:
        """Test that a worker of a ProcessPoolExecutor, polling the handle, sees the
        owner's cancel with its reason, and that what it stored reached the sink."""
        token = CancellationToken()
        sink = Sink()
        handle = token.remote(sink)
        try:
            future = foreign_pool.submit(poll_remote_token, handle, WAIT)
            assert sink.arrived.wait(WAIT)
            token.cancel("enough")
            assert future.result(WAIT) == "stopped: enough"
            assert sink.values["started"] != os.getpid()
        finally:
            handle.close()

    def test_the_worker_can_cancel_the_owners_token(
        self, foreign_pool: concurrent.futures.Executor
    ) -> None:
        """Test that handle.cancel() in the worker cancels the owner's token (the first
        reason wins) and comes back to the handle."""
        token = CancellationToken()
        handle = token.remote()
        try:
            assert foreign_pool.submit(cancel_remote_token, handle, "from the worker").result(WAIT)
            assert token.is_cancelled
            assert token.cancel_reason == "from the worker"
        finally:
            handle.close()

    def test_closing_the_handle_stops_the_worker(
        self, foreign_pool: concurrent.futures.Executor
    ) -> None:
        """Test that closing the handle in the owner makes the remote one report itself
        cancelled (its owner no longer serves it), so the work stops."""
        token = CancellationToken()
        sink = Sink()
        handle = token.remote(sink)
        future = foreign_pool.submit(poll_remote_token, handle, WAIT)
        assert sink.arrived.wait(WAIT)
        handle.close()
        assert future.result(WAIT).startswith("stopped: the token's owner")
        assert not token.is_cancelled

    def test_an_already_cancelled_token_arrives_cancelled(
        self, foreign_pool: concurrent.futures.Executor
    ) -> None:
        """Test that a handle of a token cancelled before it was sent is cancelled there."""
        token = CancellationToken()
        token.cancel("before")
        handle = token.remote()
        try:
            assert foreign_pool.submit(poll_remote_token, handle, WAIT).result(WAIT) == (
                "stopped: before"
            )
        finally:
            handle.close()

    def test_a_handle_sent_with_every_task_keeps_one_connection(
        self, foreign_pool: concurrent.futures.Executor
    ) -> None:
        """Test that a worker receiving the same handle with each of many tasks reuses one
        connection (one reader thread), instead of one per task."""
        handle = CancellationToken().remote()
        try:
            counts = {
                foreign_pool.submit(remote_reader_threads, handle).result(WAIT) for _ in range(20)
            }
            assert counts == {1}
        finally:
            handle.close()

    def test_handles_of_tokens_dropped_leave_no_thread_behind(
        self, foreign_pool: concurrent.futures.Executor
    ) -> None:
        """Test that a handle of a new token sent with each of many tasks, each token
        dropped after its task, leaves no reader thread in the worker and no serving
        thread in the owner (regression: one thread in each, and two descriptors in the
        owner, per handle, for good)."""
        for _ in range(30):
            # (each token is dropped as the next one is made: its share ends while the next
            # share is added, the server ending and a new one starting)
            with CancellationToken() as token:
                assert foreign_pool.submit(remote_reader_threads, token.remote()).result(WAIT)
        del token
        gc.collect()
        assert wait_until(lambda: not _threads_named("cancelflow-remote-token"))
        assert wait_until(lambda: foreign_pool.submit(remote_reader_thread_count).result(WAIT) == 0)


def _threads_named(name: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == name]


class TestOwnerAndCleanup:
    def test_a_handle_whose_owner_exited_is_cancelled(self) -> None:
        """Test that unpickling a handle after its owner process exited gives a cancelled
        handle whose reason says the owner is gone (and that the owner removed its socket
        directory on exit)."""
        program = (
            "import pickle, sys; from cancelflow import CancellationToken; "
            "h = CancellationToken().remote(); sys.stdout.buffer.write(pickle.dumps(h))"
        )
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=WAIT)
        assert done.returncode == 0, done.stderr
        handle = pickle.loads(done.stdout)
        assert isinstance(handle, RemoteToken)
        assert handle.is_cancelled
        assert handle.cancel_reason == "the token's owner is gone"
        assert not os.path.exists(os.path.dirname(handle._address))

    @needs_process_pools
    @pytest.mark.skipif(
        not HAVE_PIDFD,
        reason="without pidfd the closing pool does not watch its workers exit: the "
        "zygote ends them, and the next process's sweep removes the directory",
    )
    def test_a_handle_made_by_a_process_pool_task_leaves_no_directory(self) -> None:
        """Test that a handle a task made in a cancelflow worker (and never closed) has
        its server's directory removed when the pool closes: a worker exits with
        ``os._exit``, which runs no ``atexit`` callback, and the pool lets a worker that
        serves exit on its own before the zygote ends what is left."""
        with ProcessPool(1) as pool:
            directory = pool.submit(remote_handle_directory).result(WAIT)
            assert os.path.isdir(directory)
        assert not os.path.exists(directory)

    def test_a_directory_left_by_a_killed_owner_is_swept_by_the_next_server(
        self, short_tmp: str
    ) -> None:
        """Test that the socket directory of an owner that could not remove it (it ended
        with ``os._exit``) is removed by the next process that serves a handle from the
        same temporary directory, and that a live owner's directory stays."""
        env = {**os.environ, "TMPDIR": short_tmp}
        serve = (
            "import os, sys; from cancelflow import CancellationToken; "
            "h = CancellationToken().remote(); print(os.path.dirname(h._address), flush=True); "
        )

        def serve_and_die() -> str:
            """Serve a handle in a new process that ends with os._exit: its directory."""
            died = subprocess.run(
                [sys.executable, "-c", serve + "os._exit(0)"],
                capture_output=True,
                text=True,
                env=env,
                timeout=WAIT,
            )
            assert died.returncode == 0, died.stderr
            return died.stdout.strip()

        left = serve_and_die()
        assert os.path.isdir(left)
        assert os.path.dirname(left) == short_tmp
        live = subprocess.Popen(
            [sys.executable, "-c", serve + "sys.stdin.read()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert live.stdout is not None
            kept = live.stdout.readline().strip()
            assert not os.path.exists(left)
            serve_and_die()  # (its sweep looks at the live owner's directory)
            assert os.path.isdir(kept)  # its owner still runs
        finally:
            live.communicate("", timeout=WAIT)
        assert not os.path.exists(kept)  # its owner exited normally

    def test_a_server_its_last_token_ended_just_before_exit_leaves_no_directory(
        self, short_tmp: str
    ) -> None:
        """Test that a process whose only shared token is dropped just before it exits
        (its server then closes on its own thread) leaves no directory (regression: the
        daemon thread that removes it could die with the process first: 3 of 8 runs)."""
        env = {**os.environ, "TMPDIR": short_tmp}
        serve = (
            "import os; from cancelflow import CancellationToken; "
            "print(os.path.dirname(CancellationToken().remote()._address), flush=True)"
        )
        for _ in range(8):
            done = subprocess.run(
                [sys.executable, "-c", serve], capture_output=True, text=True, env=env, timeout=WAIT
            )
            assert done.returncode == 0, done.stderr
            assert not os.path.exists(done.stdout.strip())

    def test_a_process_of_another_pid_namespace_leaves_a_live_owner_alone(self) -> None:
        """Test that a process of another pid namespace sharing the temporary directory
        (a container), to which this owner's pid means nothing, does not sweep the live
        owner's socket directory when it makes its own."""
        unshare = shutil.which("unshare")
        command = [unshare or "unshare", "--pid", "--fork", "--mount-proc"]
        if unshare is None or subprocess.run([*command, "true"], capture_output=True).returncode:
            pytest.skip("cannot start a process in a new pid namespace here")
        handle = CancellationToken().remote()
        try:
            directory = os.path.dirname(handle._address)
            entries = sorted(os.listdir(directory))
            env = {**os.environ, "TMPDIR": os.path.dirname(directory)}  # (where it sweeps)
            serve = "from cancelflow import CancellationToken; CancellationToken().remote()"
            done = subprocess.run(
                [*command, sys.executable, "-c", serve],
                capture_output=True,
                env=env,
                timeout=WAIT,
            )
            assert done.returncode == 0, done.stderr
            assert sorted(os.listdir(directory)) == entries
        finally:
            handle.close()

    def test_a_server_whose_new_directory_was_swept_makes_another(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that a server whose directory another process's sweep removed while it
        was still empty (before its socket was bound) makes another one."""
        from cancelflow import _remote

        made: list[str] = []
        make = make_scratch_directory

        def swept_first() -> str:
            path = make()
            made.append(path)
            if len(made) == 1:
                os.rmdir(path)  # what a sweep does to an empty directory
            return path

        monkeypatch.setattr(_remote, "make_scratch_directory", swept_first)
        _remote.close_server()  # (the next handle starts a server)
        handle = CancellationToken().remote()
        try:
            assert len(made) == 2
            assert os.path.dirname(handle._address) == made[1]
        finally:
            handle.close()

    @needs_process_pools
    @pytest.mark.skipif(not HAVE_PIDFD, reason="the closing pool watches exits with pidfd")
    def test_a_pool_closing_with_descriptors_past_1024_ends_everything(self) -> None:
        """Test that a pool whose processes' descriptors are numbered past 1024 (where
        ``select()`` refuses them) still ends its zygote and lets its serving worker
        remove its server's directory."""
        import resource  # (POSIX only)

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 1200:
            pytest.skip(f"needs more than 1200 descriptors (RLIMIT_NOFILE {soft})")
        filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        try:
            with ProcessPool(1) as pool:
                directory = pool.submit(remote_handle_directory).result(WAIT)
            assert not os.path.exists(directory)
        finally:
            for fd in filler:
                os.close(fd)

    def test_ending_the_server_hangs_up_connected_handles(self) -> None:
        """Test that ending the server (at exit, or in a worker that ends) does not wait
        for the processes still connected to it: every thread of the server has ended
        when it returns, and a connected handle hears that the owner is gone."""
        from cancelflow import _remote

        handle = CancellationToken().remote()
        server = _remote._server
        assert server is not None

        def serving() -> int:
            return sum(thread.name == "cancelflow-remote-token" for thread in server.threads)

        before = serving()  # (earlier tests' serving threads stay in the list)
        program = (
            "import pickle, sys, time; h = pickle.loads(sys.stdin.buffer.read()); "
            "print('attached', flush=True); deadline = time.monotonic() + 30\n"
            "while not h.is_cancelled and time.monotonic() < deadline: time.sleep(0.01)\n"
            "print(h.cancel_reason, flush=True)"
        )
        with subprocess.Popen(
            [sys.executable, "-c", program], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        ) as child:
            assert child.stdin is not None
            assert child.stdout is not None
            try:
                child.stdin.write(pickle.dumps(handle))
                child.stdin.close()
                assert child.stdout.readline() == b"attached\n"
                assert wait_until(lambda: serving() > before)  # the child's connection
                _remote.close_server()
                assert not [thread.name for thread in server.threads if thread.is_alive()]
                assert child.stdout.readline() == b"the token's owner is gone\n"
            finally:
                child.kill()
                handle.close()

    def test_the_server_ends_with_the_last_handle(self) -> None:
        """Test that closing the last handle removes the server's socket directory (the
        test's leak check also sees that its threads ended)."""
        first = CancellationToken().remote()
        second = CancellationToken().remote()
        directory = os.path.dirname(first._address)
        assert os.path.isdir(directory)
        assert oct(os.stat(directory).st_mode & 0o777) == "0o700"
        first.close()
        assert os.path.isdir(directory)
        second.close()
        assert not os.path.exists(directory)

    def test_a_fork_of_the_owner_serves_its_own_handles(self) -> None:
        """Test that a forked child of a serving owner starts its own server for the
        handles it makes (the parent's copy has no threads in the child)."""
        handle = CancellationToken().remote()
        try:
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                future = pool.submit(remote_in_fork_child, handle._address)
                assert future.result(WAIT) is True
        finally:
            handle.close()

    def test_a_bad_sink_is_refused(self) -> None:
        """Test that a partial_sink that is not callable raises TypeError at once."""
        with pytest.raises(TypeError, match="partial_sink"):
            CancellationToken().remote(3)  # type: ignore[arg-type]
