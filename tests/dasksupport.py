"""What the Dask test modules share: clusters (in processes of their own, warm or made
of separate ``dask scheduler``/``dask worker`` processes), checking that nothing of a test
is left on them, and a partial-result sink a test can await.

The functions run on the scheduler travel by value (cloudpickle), so a scheduler that
cannot import this test module still runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import cloudpickle
import dask
import distributed
import psutil

from cancelflow import DaskRunner
from cancelflow._cli.demo.census import worker_census
from support import WAIT, assert_gone

#: Dask settings of the tests' clusters
DASK_CONFIG = {
    "distributed.worker.profile.enabled": False,  # no profiler thread per worker
    "distributed.scheduler.allowed-failures": 0,  # a worker's death fails its task at once
    "distributed.admin.system-monitor.gil.enabled": False,
}

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def warm_process_cluster(n_workers: int, threads_per_worker: int) -> Any:
    """A ``processes=True`` ``LocalCluster`` on 127.0.0.1 only (dashboards too: with
    ``dashboard_address=None`` HTTP is served on 0.0.0.0:8787 all the same), warmed up
    (every worker joined, the runner's plugin and its process pool started) so that no
    test pays for, or sees, its start. The caller closes it."""
    with dask.config.set(DASK_CONFIG):
        cluster = distributed.LocalCluster(  # type: ignore[no-untyped-call]
            processes=True,
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )

    async def warm() -> None:
        async with DaskRunner(cluster.scheduler_address) as runner:
            await runner.client.wait_for_workers(n_workers, timeout=WAIT)
            assert await runner.run_sync(int, "2") == 2
            # Every worker's pool has its zygote and children up (they start in the
            # pool's own thread): nothing of the warm-up starts after the tests' snapshots.
            ready = await runner.client.run(pool_ready)
            assert all(ready.values()), ready

    try:
        asyncio.run(asyncio.wait_for(warm(), WAIT * 2))
    except BaseException:
        cluster.close()
        raise
    return cluster


def pool_ready(dask_worker: Any) -> bool:
    """Run on a worker: wait until its cancelflow pool has started every process."""
    pool = dask_worker.plugins["cancelflow"].pool
    return pool is not None and bool(pool.wait_ready(WAIT))


async def assert_workers_clean(client: Any) -> None:
    """Nothing of cancelflow is left on any worker or on the scheduler."""
    # A task the scheduler cancelled on its own (another client's cancel) leaves the
    # worker's books once its Dask thread has returned, which may be after the caller
    # heard; and a process pool's worker whose task stopped cooperatively counts as busy
    # until the pool's thread has read its result, which may be after the caller's
    # thread settled the future (as documented): wait for both, with a deadline.
    deadline = time.monotonic() + WAIT
    while True:
        census = await client.run(worker_census)
        if all(
            not state["tasks"]
            and not state["runs"]
            and (state["pool"] is None or state["pool"]["busy"] == 0)
            for state in census.values()
        ):
            break
        if time.monotonic() > deadline:
            break  # the asserts below say what is left
        await asyncio.sleep(0.01)  # re-check soon; not a wait for something to happen
    for address, state in census.items():
        assert state["tasks"] == [], f"{address} still runs {state['tasks']}"
        assert state["runs"] == [], f"{address} still watches runs {state['runs']}"
        assert state["extra_processes"] == [], f"{address} left {state['extra_processes']}"
        if state["pool"] is not None:
            assert state["pool"]["busy"] == 0, f"{address}: {state['pool']}"
    # A call's key is released (and its run's Event cleared) by messages the scheduler
    # handles after the call returned: wait for that, with a deadline.
    clean: dict[str, Any] = {"keys": [], "events": [], "reasons": {}}
    deadline = time.monotonic() + WAIT
    while (leftovers := await client.run_on_scheduler(cancelflow_state_on_scheduler)) != clean:
        assert time.monotonic() < deadline, f"left on the scheduler: {leftovers}"
        await asyncio.sleep(0.01)  # re-check soon; not a wait for something to happen


def cancelflow_state_on_scheduler(dask_scheduler: Any) -> dict[str, Any]:
    keys = [k for k in dask_scheduler.tasks if str(k).startswith("cancelflow-")]
    events = [
        n for n in dask_scheduler.extensions["events"]._events if str(n).startswith("cancelflow")
    ]
    reasons = dask_scheduler.task_metadata.get("cancelflow-run-reason", {})
    return {"keys": keys, "events": events, "reasons": reasons}


class Reports:
    """A partial_sink that lets the test await the node's reports (any thread)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self._loop = asyncio.get_running_loop()
        self._events: dict[str, asyncio.Event] = {}

    def _event(self, key: str) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    def __call__(self, key: str, value: Any) -> None:
        self.values[key] = value
        self._loop.call_soon_threadsafe(lambda: self._event(key).set())

    async def wait(self, key: str) -> Any:
        await asyncio.wait_for(self._event(key).wait(), WAIT)
        return self.values[key]


# -- a cluster of separate processes ---------------------------------------------------------
def dask_cli(
    module: str,
    *arguments: str,
    environment: dict[str, str] | None = None,
    log: str | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m distributed.cli.<module> ARGUMENTS`` (no profiler thread); what it
    prints goes to the file ``log`` (appended), else nowhere."""
    env = dict(os.environ, DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED="False")
    env.update(environment or {})
    with open(log or os.devnull, "ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", f"distributed.cli.{module}", *arguments],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
        )


class SeparateCluster:
    """A ``dask scheduler`` and one ``dask worker`` (no nanny, 1 thread), each its own
    process, on 127.0.0.1 only (dashboards included); killed and reaped, with everything
    under them, when the test ends.

    The scheduler picks its own port and tells it in a scheduler file, which the workers
    read: a port chosen here and handed over could be taken by another process before the
    scheduler binds it (then it exits, and every connection times out). What the scheduler
    prints is kept in a log that a failed :meth:`start` quotes.

    ``scheduler_environment``: extra environment of the scheduler (Dask settings as
    ``DASK_...`` variables); ``first_worker``: start the first worker (else the test
    starts its own with :meth:`start_worker`).
    """

    def __init__(
        self,
        *,
        scheduler_environment: dict[str, str] | None = None,
        first_worker: bool = True,
    ) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="cancelflow-cluster-")
        self.scheduler_file = os.path.join(self._directory.name, "scheduler.json")
        self.log = os.path.join(self._directory.name, "scheduler.log")
        self.scheduler = dask_cli(
            "dask_scheduler",
            "--host=127.0.0.1",
            "--port=0",
            "--dashboard-address=127.0.0.1:0",
            f"--scheduler-file={self.scheduler_file}",
            environment=scheduler_environment,
            log=self.log,
        )
        self.workers: list[subprocess.Popen[bytes]] = []
        if first_worker:
            self.start_worker()

    @property
    def address(self) -> str:
        """The scheduler's address, once it listens (after :meth:`start`)."""
        with open(self.scheduler_file) as file:
            return str(json.load(file)["address"])

    def start_worker(
        self,
        *,
        without_cancelflow: bool = False,
        name: str = "worker",
        nanny: bool = False,
        memory_limit: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a ``dask worker`` named ``name`` for this scheduler, with one thread (one
        that cannot import cancelflow, as on a machine where it is not installed, if
        asked); it is stopped with the cluster."""
        arguments = [
            f"--scheduler-file={self.scheduler_file}",
            "--host=127.0.0.1",
            "--dashboard-address=127.0.0.1:0",
            "--nanny" if nanny else "--no-nanny",
            "--nthreads=1",
            f"--name={name}",
        ]
        if memory_limit is not None:
            arguments.append(f"--memory-limit={memory_limit}")
        if not without_cancelflow:
            proc = dask_cli("dask_worker", *arguments)
        else:
            script = (
                "import sys; sys.modules['cancelflow'] = None; "  # import cancelflow fails
                "from distributed.cli.dask_worker import main; "
                f"sys.argv = ['dask-worker', *{arguments!r}]; main()"
            )
            environment = dict(os.environ, DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED="False")
            proc = subprocess.Popen(
                [sys.executable, "-c", script],
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.workers.append(proc)
        return proc

    async def start(self, workers: int = 1) -> None:
        """Return once the scheduler answers and ``workers`` workers have joined it."""
        try:
            # (Dask's client waits for a scheduler file without a deadline.)
            deadline = time.monotonic() + WAIT
            while not self.written():
                if self.scheduler.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the scheduler wrote no scheduler file")
                await asyncio.sleep(0.01)  # re-check soon: no event tells of a new file
            # The client retries until the scheduler listens (or WAIT).
            client: Any = distributed.Client(  # type: ignore[no-untyped-call]
                scheduler_file=self.scheduler_file, asynchronous=True, timeout=WAIT
            )
            async with client:
                await client.wait_for_workers(workers, timeout=WAIT)
        except Exception as error:
            raise RuntimeError(
                f"the test cluster did not start (scheduler exit status "
                f"{self.scheduler.poll()}); the scheduler printed:\n{self.printed()}"
            ) from error

    def written(self) -> bool:
        """Whether the scheduler wrote its scheduler file (it listens then)."""
        return os.path.exists(self.scheduler_file)

    def printed(self) -> str:
        """The end of what the scheduler printed."""
        with open(self.log, errors="replace") as log:
            return log.read()[-4000:]

    def processes(self) -> list[int]:
        roots = [self.scheduler, *self.workers]
        pids = [proc.pid for proc in roots]
        for pid in list(pids):
            with contextlib.suppress(psutil.Error):
                pids += [child.pid for child in psutil.Process(pid).children(recursive=True)]
        return pids

    def stop(self) -> None:
        try:
            pids = self.processes()
            for proc in (*self.workers, self.scheduler):
                proc.kill()
                proc.wait(WAIT)
            for pid in pids:  # what a nanny started, or a worker left, goes too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in pids:
                assert_gone(pid)
        finally:
            self._directory.cleanup()

    def __enter__(self) -> SeparateCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
