"""cancelflow on macOS and Windows, simulated here: what is missing there is hidden from a
fresh interpreter before cancelflow is imported (see tests/simulated_platform.py).

Tokens, thread pools and pipelines of loop and thread nodes work everywhere; process
pools work on the simulated macOS (the "posix" implementation) and are refused with a
clear error before anything starts on the simulated Windows. The full suites of the token, the
thread pool and the executor also run on the portable implementations (``.ci/run`` sets
``CANCELFLOW_PLATFORM``); these tests check what only a simulation shows: that the choice
follows what the interpreter has, and that nothing Linux-only is touched on the way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

import simulated_platform
from support import WAIT

pytestmark = pytest.mark.timeout(240)

#: what every simulated platform must do: tokens, thread pools, to_thread, a pipeline
_WITHIN_A_PROCESS = """
import asyncio, concurrent.futures, threading
import cancelflow
from cancelflow import (
    CancellationToken, Node, PipelineExecutor, ThreadPool,
    UnsupportedPlatformError, check_cancelled,
)

token = CancellationToken()
seen = []
token.on_cancel(lambda: seen.append("callback"))
threading.Timer(0.05, token.cancel, ("from a thread",)).start()
assert token.wait_blocking(30), "a cancel from another thread did not wake wait_blocking"
assert seen == ["callback"] and token.cancel_reason == "from a thread"

async def awaits() -> None:
    other = CancellationToken()
    asyncio.get_running_loop().call_later(0.05, threading.Thread(target=other.cancel).start)
    await asyncio.wait_for(other.wait(), 30)
    assert await cancelflow.to_thread.run_sync(lambda: 6 * 7) == 42
asyncio.run(awaits())

def cooperative(started):
    started.set()
    while True:
        check_cancelled()
with ThreadPool(2) as pool:
    started = threading.Event()
    future = pool.submit(cooperative, started)
    assert started.wait(30)
    assert future.cancel()
    try:
        future.result(30)
    except concurrent.futures.CancelledError:
        pass
    else:
        raise AssertionError("the thread task was not cancelled")
    concurrent.futures.wait([future], 30)
    assert pool.submit(pow, 2, 10).result(30) == 1024

async def pipeline() -> None:
    async def fetch(ctx):
        return 20
    def double(ctx):
        return ctx.inputs["fetch"] * 2 + 2
    async with PipelineExecutor() as executor:
        results = await executor.execute_pipeline(
            "portable",
            [Node("fetch", fetch, run_in="loop"), Node("double", double, deps=["fetch"])],
        )
    assert results == {"fetch": 20, "double": 42}, results
asyncio.run(pipeline())

from cancelflow import _platform
assert _platform.pidfd_open(os.getpid()) is None
assert _platform.set_child_subreaper() is False
print("FLAVOUR", _platform.FLAVOUR)
"""

#: what the simulated Windows must refuse, before anything starts
_PROCESS_POOL_REFUSED = """
import asyncio, sys
import cancelflow
from cancelflow import Node, PipelineExecutor, UnsupportedPlatformError

try:
    cancelflow.ProcessPool()
except UnsupportedPlatformError as exc:
    assert "ThreadPool" in str(exc) and exc.platform == sys.platform, str(exc)
else:
    raise AssertionError("ProcessPool was not refused")

ran = []
async def refused() -> None:
    async def first(ctx):
        ran.append("first")
    try:
        async with PipelineExecutor() as executor:
            await executor.execute_pipeline(
                "refused",
                [Node("first", first, run_in="loop"),
                 Node("crunch", abs, deps=["first"], run_in="process")],
            )
    except UnsupportedPlatformError as exc:
        assert "'crunch'" in str(exc), str(exc)
    else:
        raise AssertionError("a pipeline with a process node was not refused")
asyncio.run(refused())
assert ran == [], "a node ran before the process node was refused"
"""


def _run(platform: str, code: str) -> str:
    result = simulated_platform.run(
        platform, "import os, sys\n" + textwrap.dedent(code), timeout=WAIT * 4
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().endswith("OK"), result.stdout[-3000:]
    return result.stdout


class TestSimulatedMacOS:
    def test_picks_the_posix_implementation(self) -> None:
        """Test that an interpreter without memfd, pidfd, pipe2 and SOCK_SEQPACKET runs the
        "posix" implementation."""
        assert "FLAVOUR posix" in _run("darwin", _WITHIN_A_PROCESS + 'print("OK")')

    def test_runs_process_pools_and_process_nodes(self) -> None:
        """Test that a process pool works there: map, a cooperative cancel, a task that
        ignores its token and SIGTERM killed with the grandchild it orphaned, the next
        task on a fresh worker, a process node in a pipeline; and that shutdown leaves
        no process of the pool behind."""
        out = _run(
            "darwin",
            """
            import asyncio, concurrent.futures, signal, time
            import psutil
            import cancelflow
            from cancelflow import Node, PipelineExecutor, ProcessPool, check_cancelled

            def square(x):
                return x * x

            def cooperative():
                cancelflow.store_partial("started", True)
                while True:
                    check_cancelled()

            def stubborn():
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                if os.fork() == 0:  # a child that forks a grandchild and leaves
                    if os.fork() == 0:
                        while True:
                            time.sleep(1)
                    os._exit(0)
                os.wait()
                cancelflow.store_partial("started", True)
                while True:
                    pass

            def crunch(ctx):
                return sum(range(ctx.inputs["n"]))

            def gone(pid):
                try:
                    return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    return True

            if __name__ == "__main__":
                me = psutil.Process()
                with ProcessPool(2, grace_period=0.05, term_grace_period=0.05) as pool:
                    assert list(pool.map(square, range(6))) == [0, 1, 4, 9, 16, 25]
                    for fn, fate in ((cooperative, "cancelled"), (stubborn, "killed")):
                        started = concurrent.futures.Future()
                        future = pool.submit_task(
                            fn, partial_sink=lambda key, value: started.set_result(value)
                        )
                        assert started.result(30)
                        assert pool.wait_ready(30)  # a starting worker is not yet listed
                        before = {p.pid for p in me.children(recursive=True)}
                        future.cancel()
                        try:
                            future.result(30)
                        except concurrent.futures.CancelledError:
                            pass
                        assert future.fate.value == fate, future.fate
                        tree = before - set(pool.statistics().worker_pids) - {
                            pool.statistics().zygote_pid
                        }
                        if fate == "killed":
                            assert tree, "the stubborn task's worker was not seen"
                        deadline = time.monotonic() + 30
                        while not all(gone(pid) for pid in tree):
                            assert time.monotonic() < deadline, [
                                pid for pid in tree if not gone(pid)
                            ]
                            time.sleep(0.01)
                    assert pool.submit(square, 7).result(30) == 49
                    pids = set(pool.statistics().worker_pids) | {pool.statistics().zygote_pid}

                async def pipeline():
                    async with PipelineExecutor() as executor:
                        return await executor.execute_pipeline(
                            "crunch",
                            [Node("n", lambda ctx: 1000, run_in="thread"),
                             Node("crunch", crunch, deps=["n"], run_in="process")],
                        )
                assert asyncio.run(pipeline())["crunch"] == sum(range(1000))
                left = [p.pid for p in me.children(recursive=True) if not gone(p.pid)]
                assert left == [], left
                assert all(gone(pid) for pid in pids)
                print("OK")
            """,
        )
        assert out.rstrip().endswith("OK")

    def test_tokens_cross_processes_both_ways(self) -> None:
        """Test that a token given to a spawned child wakes the parent's callback, waiter
        and coroutine when the child cancels, and the child's when the parent does, with
        nothing left in the temporary directory."""
        out = _run(
            "darwin",
            """
            import asyncio, multiprocessing
            from cancelflow import CancellationToken

            def child(to_child, to_parent):
                assert to_child.wait_blocking(30), "the parent's cancel never arrived"
                to_parent.cancel("child says stop")

            if __name__ == "__main__":
                to_child, to_parent = CancellationToken(), CancellationToken()
                print("DOORBELL", to_child._chunk.doorbell)
                heard = []
                to_parent.on_cancel(lambda: heard.append(to_parent.cancel_reason))
                process = multiprocessing.get_context("spawn").Process(
                    target=child, args=(to_child, to_parent)
                )
                process.start()
                to_child.cancel("parent says go")

                async def main():
                    await asyncio.wait_for(to_parent.wait(), 30)
                asyncio.run(main())
                assert to_parent.wait_blocking(30)
                process.join(30)
                assert process.exitcode == 0
                assert heard == ["child says stop"], heard
                print("OK")
            """,
        )
        doorbell = out.split("DOORBELL ", 1)[1].split()[0]
        assert doorbell.startswith(tempfile.gettempdir())
        assert not os.path.exists(doorbell), "the chunk's doorbell directory was left behind"

    def test_forcing_linux_names_what_is_missing(self) -> None:
        """Test that CANCELFLOW_PLATFORM=linux where Linux's primitives are missing fails
        at import, naming them."""
        result = simulated_platform.run(
            "darwin",
            "import os\nos.environ['CANCELFLOW_PLATFORM'] = 'linux'\nimport cancelflow\n",
        )
        assert result.returncode != 0
        assert "ImportError" in result.stderr
        assert "os.memfd_create" in result.stderr
        assert "Linux" in result.stderr


class TestSimulatedWindows:
    def test_picks_the_windows_implementation(self) -> None:
        """Test that an interpreter without fork, fcntl, resource, AF_UNIX and POSIX
        signals imports cancelflow and runs tokens, thread pools and pipelines."""
        assert "FLAVOUR windows" in _run("win32", _WITHIN_A_PROCESS + 'print("OK")')

    def test_refuses_process_pools_before_anything_starts(self) -> None:
        """Test that a ProcessPool and a pipeline with a process node are refused with
        UnsupportedPlatformError naming what to use instead, and that no node before the
        process node ran."""
        _run("win32", _PROCESS_POOL_REFUSED + 'print("OK")')

    def test_a_token_refuses_to_travel_and_points_to_remote(self) -> None:
        """Test that pickling a token for a process start raises TypeError naming
        token.remote(), before the process starts."""
        _run(
            "win32",
            """
            import multiprocessing
            from cancelflow import CancellationToken

            if __name__ == "__main__":
                process = multiprocessing.get_context("spawn").Process(
                    target=print, args=(CancellationToken(),)
                )
                try:
                    process.start()
                except TypeError as exc:
                    assert "token.remote()" in str(exc), str(exc)
                else:
                    raise AssertionError("the token was sent")
                print("OK")
            """,
        )

    def test_a_remote_token_reaches_a_spawned_process(self) -> None:
        """Test that token.remote() works there: over loopback TCP, a cancel in the parent
        wakes the child, and a partial result comes back."""
        _run(
            "win32",
            """
            import multiprocessing, os, threading
            from cancelflow import CancellationToken

            def child(remote):
                remote.store_partial("progress", "ünïcode ✓")
                assert remote.wait(30), "the cancel never arrived"
                assert remote.cancel_reason == "enough"

            if __name__ == "__main__":
                token = CancellationToken()
                partials, arrived = {}, threading.Event()

                def sink(key, value):
                    partials[key] = value
                    arrived.set()

                remote = token.remote(sink)
                process = multiprocessing.get_context("spawn").Process(
                    target=child, args=(remote,)
                )
                process.start()
                token.cancel("enough")
                process.join(30)
                assert process.exitcode == 0
                assert arrived.wait(30), "the partial result never arrived"
                assert partials == {"progress": "ünïcode ✓"}, partials
                print("OK")
            """,
        )


class TestChoice:
    def test_an_unknown_name_is_refused_at_import(self) -> None:
        """Test that CANCELFLOW_PLATFORM with an unknown value fails at import, listing the
        valid ones."""
        result = subprocess.run(
            [sys.executable, "-c", "import cancelflow"],
            env={**os.environ, "CANCELFLOW_PLATFORM": "plan9"},
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert result.returncode != 0
        assert "'plan9'" in result.stderr
        assert "linux, posix, windows" in result.stderr

    @pytest.mark.parametrize("flavour", ["posix", "windows"])
    def test_a_portable_implementation_can_be_forced_on_linux(self, flavour: str) -> None:
        """Test that CANCELFLOW_PLATFORM selects a portable implementation here."""
        result = subprocess.run(
            [sys.executable, "-c", "from cancelflow import _platform; print(_platform.FLAVOUR)"],
            env={**os.environ, "CANCELFLOW_PLATFORM": flavour},
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        assert result.stdout.strip() == flavour, result.stderr
