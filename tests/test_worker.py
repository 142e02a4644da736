"""Specification of a process pool's worker side (the zygote and its workers).

Most promises are checked through :class:`cancelflow.ProcessPool`: what a task changes in
its worker is put back (or the worker is replaced), and how a worker treats the signals
that reach it. The module's helpers (killing a process tree, the zygote's channel, the
traceback text) are tested directly.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import resource
import signal
from concurrent.futures.process import _ExceptionWithTraceback
from pathlib import Path

import pytest

import contractloads
import faultloads
import workloads
from cancelflow import CancellationToken, CancelledException, ProcessPool, WorkerCrashedError
from cancelflow._process import _worker
from support import WAIT, Announcements, run_script, wait_until


def signal_pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` is waiting to be delivered to process ``pid``."""
    with open(f"/proc/{pid}/status") as status:
        masks = [
            int(line.split()[1], 16) for line in status if line.startswith(("SigPnd", "ShdPnd"))
        ]
    return any(mask >> (signum - 1) & 1 for mask in masks)


_BINDS_SETRLIMIT = """
import os
from resource import RLIMIT_NOFILE, getrlimit, setrlimit


def lower():
    soft, hard = getrlimit(RLIMIT_NOFILE)
    setrlimit(RLIMIT_NOFILE, (min(soft, 64), hard))
    return os.getpid(), list(getrlimit(RLIMIT_NOFILE))
"""

_LOWERS_THROUGH_A_BOUND_NAME = """
import json, os, resource, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import binds_setrlimit
from cancelflow import ProcessPool


def read():
    return os.getpid(), list(resource.getrlimit(resource.RLIMIT_NOFILE))


if __name__ == "__main__":
    with ProcessPool(1) as pool:
        lowered = pool.submit(binds_setrlimit.lower).result(30)
        after = pool.submit(read).result(30)
    print(json.dumps([lowered, after, list(resource.getrlimit(resource.RLIMIT_NOFILE))]))
"""


class TestStateRestoredBetweenTasks:
    """Regression (issue 9): a task's changes to its worker's process reached every later
    task of that worker. A lowered RLIMIT_AS made them all fail with MemoryError, and a
    blocked SIGTERM turned the ladder's SIGTERM step into a SIGKILL."""

    def test_lowered_hard_memory_limit_retires_the_worker(self) -> None:
        """Test that after a task lowers its worker's hard RLIMIT_AS (which cannot be
        raised again) and fails with MemoryError, the next task runs in a fresh worker
        with the full limit and can allocate."""
        with ProcessPool(1, name="rlimit") as pool:
            first = pool.submit(faultloads.exhaust_memory)
            with pytest.raises(MemoryError):
                first.result(WAIT)
            assert pool.submit(faultloads.rlimit_as).result(WAIT) == resource.getrlimit(
                resource.RLIMIT_AS
            )
            assert pool.submit(faultloads.allocate, 256).result(WAIT) == 256 * 1024 * 1024
            assert first.pid not in pool.statistics().worker_pids
            assert pool.statistics().replaced_total == 1

    def test_lowered_soft_memory_limit_is_restored(self) -> None:
        """Test that a soft RLIMIT_AS lowered by a task is put back after it, in the same
        worker (no replacement needed)."""
        with ProcessPool(1, name="rlimit") as pool:
            pid = pool.submit(faultloads.lower_soft_memory_limit).result(WAIT)
            assert pool.submit(faultloads.rlimit_as).result(WAIT) == resource.getrlimit(
                resource.RLIMIT_AS
            )
            assert pool.submit(workloads.whoami).result(WAIT) == pid
            assert pool.statistics().replaced_total == 0

    def test_a_limit_lowered_through_prlimit_is_restored(self) -> None:
        """Test that a soft limit lowered with ``resource.prlimit`` (the other way to set
        one, imported by name in the task) is put back after the task, in the same
        worker."""
        with ProcessPool(1, name="prlimit") as pool:
            pid = pool.submit(faultloads.lower_soft_nofile_limit_with_prlimit).result(WAIT)
            assert pool.submit(faultloads.rlimit_nofile).result(WAIT) == resource.getrlimit(
                resource.RLIMIT_NOFILE
            )
            assert pool.submit(workloads.whoami).result(WAIT) == pid
            assert pool.statistics().replaced_total == 0

    def test_a_limit_lowered_through_a_name_bound_by_the_main_programs_imports_is_restored(
        self, tmp_path: Path
    ) -> None:
        """Test that a limit lowered by a task through ``setrlimit`` as bound by a module
        that the program's ``__main__`` imports (``from resource import setrlimit``,
        run in the zygote before any worker exists) is put back after the task
        (regression: the name kept the unwatched function, and every later task of the
        worker ran with the lowered limit)."""
        (tmp_path / "binds_setrlimit.py").write_text(_BINDS_SETRLIMIT)
        result = run_script(_LOWERS_THROUGH_A_BOUND_NAME, path=tmp_path / "main.py")
        assert result.returncode == 0, result.stderr
        lowered, after, expected = json.loads(result.stdout)
        assert lowered[0] == after[0]  # the same worker
        assert lowered[1] != expected
        assert after[1] == expected

    def test_blocked_sigterm_is_unblocked_after_the_task(self) -> None:
        """Test that a task that blocks SIGTERM and returns does not leave it blocked: the
        next task on that worker is still stopped by SIGTERM (fate terminated, the worker
        survives), not by SIGKILL."""
        with ProcessPool(1, grace_period=0.05, term_grace_period=WAIT, name="sigmask") as pool:
            pid = pool.submit(faultloads.block_sigterm_and_return).result(WAIT)
            sink = Announcements()
            spinning = pool.submit_task(workloads.announce_and_spin, partial_sink=sink)
            assert sink.wait("pid") == pid
            spinning.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                spinning.result(WAIT)
            assert spinning.fate == "terminated"
            assert pool.submit(workloads.whoami).result(WAIT) == pid

    def test_a_signal_the_task_left_pending_goes_to_the_workers_own_handler(self) -> None:
        """Test that a SIGTERM a task blocked and left pending, with its own handler
        installed, reaches the worker's handler once the task is over (dispositions are
        put back before the mask): the worker lives on for the next task."""
        with ProcessPool(1, name="pending") as pool:
            pid = pool.submit(faultloads.leave_sigterm_pending_to_own_handler).result(WAIT)
            assert pool.submit(workloads.whoami).result(WAIT) == pid
            assert pool.statistics().replaced_total == 0

    def test_a_signal_while_the_result_is_sent_goes_to_the_workers_own_handler(self) -> None:
        """Test that a SIGTERM arriving while the worker pickles and sends a task's result
        (the ladder's, sent before the pool read the result) is not handled by the
        SIGTERM handler the task installed: the caller gets the value."""
        with ProcessPool(1, name="late-sigterm") as pool:
            future = pool.submit(faultloads.return_while_own_sigterm_handler_exits)
            assert isinstance(future.result(WAIT), faultloads.SignalsWhilePickled)
            assert future.fate == "finished"

    @pytest.mark.parametrize("disposition", ["SIG_IGN", "SIG_DFL"])
    def test_a_task_changing_sigterm_does_not_poison_the_next_task(self, disposition: str) -> None:
        """Test that a SIGTERM disposition set by one task is gone for the next one on the
        same worker: its stop is a true "terminated" whose finally ran."""
        with ProcessPool(1, grace_period=0, term_grace_period=WAIT) as p:
            first = p.submit(contractloads.set_sigterm, disposition).result(WAIT)
            announce = Announcements()
            future = p.submit_task(workloads.announce_and_finish_in_finally, partial_sink=announce)
            assert announce.wait("pid") == first  # the same worker
            future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert future.fate == "terminated"
            assert future.partial_results["finally"] == "ran"

    def test_a_task_that_dies_of_its_own_sigterm_disposition_is_killed_not_terminated(
        self,
    ) -> None:
        """Test that a task which set SIGTERM to SIG_DFL and is stopped is reported
        "killed" (its finally did not run), never "terminated"."""
        with ProcessPool(1, grace_period=0, term_grace_period=WAIT) as p:
            announce = Announcements()
            future = p.submit_task(
                contractloads.set_sigterm_then_spin, ("SIG_DFL",), partial_sink=announce
            )
            announce.wait("pid")
            future.cancel()
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(WAIT)
            assert future.fate == "killed"
            assert "finally" not in future.partial_results
            assert p.submit(contractloads.sigterm_disposition).result(WAIT) == "_on_sigterm"

    def test_cwd_and_environment_are_restored(self, tmp_path: Path) -> None:
        """Test that a task's chdir and environment change do not reach the next task."""
        with ProcessPool(1) as p:
            before = p.submit(contractloads.cwd_and_env).result(WAIT)
            p.submit(contractloads.change_cwd_and_env, str(tmp_path)).result(WAIT)
            assert p.submit(contractloads.cwd_and_env).result(WAIT) == before

    def test_a_worker_whose_task_left_a_thread_is_replaced(self) -> None:
        """Test that a task leaving a thread running gets a fresh worker for the next task."""
        with ProcessPool(1) as p:
            first = p.submit(contractloads.leave_a_thread).result(WAIT)
            assert p.submit(contractloads.whoami).result(WAIT) != first

    def test_a_working_directory_that_is_gone_retires_the_worker(self, tmp_path: Path) -> None:
        """Test that a task that leaves its worker in a directory that no longer exists
        gets a fresh worker for the next task."""
        with ProcessPool(1) as p:
            first = p.submit(workloads.chdir_into_removed_directory, str(tmp_path / "gone"))
            pid = first.result(WAIT)
            assert p.submit(workloads.whoami).result(WAIT) != pid
            assert p.statistics().replaced_total == 1


class TestWhatAWorkerCarries:
    """A worker is a fork of its zygote and carries what the zygote imported: the less,
    the sooner a killed worker is gone (the kernel tears down what it maps)."""

    def test_a_workers_imports_leave_out_the_parent_side_and_logging(self) -> None:
        """Test that in a program that imports only cancelflow, a worker has not imported
        asyncio, loguru or the pool's and the executor's parent side."""
        done = run_script(
            """
            import json
            import workloads
            from cancelflow import ProcessPool

            with ProcessPool(1) as pool:
                print(json.dumps(pool.submit(workloads.imported_modules).result()))
            """
        )
        assert done.returncode == 0, done.stderr
        modules = set(json.loads(done.stdout))
        assert "cancelflow._process._worker" in modules  # the list is the worker's
        heavy = {
            "asyncio",
            "loguru",
            "cancelflow._process._supervisor",
            "cancelflow._process._pool",
            "cancelflow._executor",
        }
        assert heavy & modules == set()

    def test_a_program_module_named_like_the_standard_library_does_not_stand_in(
        self, tmp_path: Path
    ) -> None:
        """Test that a program that puts its own directory, holding a ``secrets.py``,
        first on ``sys.path`` after importing cancelflow still gets the standard
        library's ``secrets`` where cancelflow imports it late, in a worker (found where
        the owner found it; regression: the program's file, AttributeError)."""
        (tmp_path / "secrets.py").write_text("API_KEY = 'xyz'\n")
        done = run_script(
            f"""
            import sys
            import workloads
            from cancelflow import ProcessPool

            sys.path.insert(0, {str(tmp_path)!r})
            with ProcessPool(1) as pool:
                print(pool.submit(workloads.remote_token_kind).result())
            """
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "RemoteToken\n"

    def test_a_task_sees_the_package_docstring(self) -> None:
        """Test that ``cancelflow.__doc__`` in a task is the package's (what ``help()``
        shows; regression: None in a worker)."""
        import cancelflow

        with ProcessPool(1) as pool:
            assert pool.submit(workloads.package_docstring).result(WAIT) == cancelflow.__doc__

    def test_a_task_reaches_every_public_name(self) -> None:
        """Test that a task sees the whole of ``cancelflow`` (the worker imports each
        name's module when a task first asks for it)."""
        with ProcessPool(1) as pool:
            assert pool.submit(workloads.missing_public_names).result(timeout=WAIT) == []

    def test_a_public_class_says_it_lives_in_cancelflow_before_a_task_asks(self) -> None:
        """Test that a worker's own ``CancelledException`` (what its tracebacks name) says
        ``cancelflow``, as in the parent, though no task asked ``cancelflow`` for it."""
        done = run_script(
            """
            import workloads
            from cancelflow import ProcessPool

            with ProcessPool(1) as pool:
                print(pool.submit(workloads.module_of_cancelled_exception).result())
            """
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "cancelflow\n"

    def test_a_star_import_in_a_task_gives_the_public_classes(self) -> None:
        """Test that ``from cancelflow import *`` in a task binds the public classes,
        each saying it lives in ``cancelflow``."""
        with ProcessPool(1) as pool:
            future = pool.submit(workloads.public_modules_of_public_names)
            assert future.result(timeout=WAIT) == ["cancelflow"]


class TestSignals:
    def test_an_idle_worker_survives_a_stray_sigterm(self) -> None:
        """Test that a SIGTERM reaching a worker between tasks is ignored: the worker
        stays and runs the next task."""
        with ProcessPool(1) as p:
            assert p.wait_ready(WAIT)
            (worker,) = p.statistics().worker_pids
            os.kill(worker, signal.SIGTERM)
            assert wait_until(lambda: not signal_pending(worker, signal.SIGTERM))
            assert p.submit(workloads.whoami).result(WAIT) == worker
            assert p.statistics().replaced_total == 0

    def test_a_sigint_does_not_stop_a_running_task(self) -> None:
        """Test that a SIGINT reaching a busy worker (a terminal's Ctrl-C reaches the whole
        process group) neither stops its task nor the worker: the owner decides."""
        with ProcessPool(1, grace_period=WAIT) as p:
            token = CancellationToken()
            announce = Announcements()
            future = p.submit_task(
                workloads.announce_and_wait_cooperatively, token=token, partial_sink=announce
            )
            worker = announce.wait("pid")
            os.kill(worker, signal.SIGINT)
            assert wait_until(lambda: not signal_pending(worker, signal.SIGINT))
            assert not future.done()
            token.cancel("done waiting")
            with pytest.raises(CancelledException, match="done waiting"):
                future.result(WAIT)
            assert future.fate == "cancelled"
            assert p.submit(workloads.whoami).result(WAIT) == worker

    def test_a_sigterm_inside_a_critical_section_waits_for_its_end(self) -> None:
        """Test that a SIGTERM arriving inside critical_section lets the block finish, then
        stops the task as it leaves the block (the worker stays). The pool did not send
        it, so the task ends as one stopped from outside: WorkerCrashedError."""
        with ProcessPool(1) as p:
            future = p.submit(workloads.sigterm_self_in_critical_section)
            with pytest.raises(WorkerCrashedError) as caught:
                future.result(WAIT)
            assert caught.value.signal == signal.SIGTERM
            assert future.fate == "crashed"
            assert future.partial_results == {"inside": "after the signal"}
            assert p.submit(workloads.whoami).result(WAIT) == future.pid


class TestHelpers:
    def test_remote_traceback_text_is_what_process_pool_executor_shows(self) -> None:
        """Test that a task's error text is formatted exactly as ProcessPoolExecutor
        formats a worker's traceback."""
        try:
            raise ValueError("boom")
        except ValueError as exc:
            error = exc
        text = _worker.remote_traceback_text(error)
        assert error.__traceback__ is not None
        assert "ValueError: boom" in text
        # typeshed types ``.tb`` as a traceback; CPython stores the formatted text there.
        expected: object = _ExceptionWithTraceback(error, error.__traceback__).tb
        assert text == expected

    def test_run_chunk_calls_fn_for_each_argument_tuple_in_order(self) -> None:
        """Test that one chunk of map()'s arguments gives fn's results in order."""
        assert _worker.run_chunk(pow, [(2, 3), (3, 2), (10, 0)]) == [8, 9, 1]


_NO_CHILD_NO_SCAN = """
    from cancelflow._process import _worker

    def scan(pid):
        raise AssertionError(f"kill_tree({pid}) called without any child")

    _worker.kill_tree = scan
    _worker.kill_and_reap_tree()
    print("ok")
"""

_EVERY_CHILD_REAPED = """
    import os, signal
    from cancelflow._process import _worker
    from support import wait_until

    def is_zombie(pid):
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] == "Z"

    exited = os.fork()
    if exited == 0:
        os._exit(0)
    live = os.fork()
    if live == 0:
        signal.pause()
        os._exit(0)
    assert wait_until(lambda: is_zombie(exited))
    _worker.kill_and_reap_tree()
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        print("ok")
"""


class TestTreeCleanup:
    """What a worker does with the processes a stopped task leaves (run in a fresh
    interpreter standing in for the worker: it kills every child of its process)."""

    def test_without_children_nothing_is_scanned(self) -> None:
        """Test that a worker with no child does not scan for a tree to kill."""
        result = run_script(_NO_CHILD_NO_SCAN)
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr

    def test_live_and_exited_children_are_all_reaped(self) -> None:
        """Test that every child is killed and reaped, the exited ones too."""
        result = run_script(_EVERY_CHILD_REAPED)
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
