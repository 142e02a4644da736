"""Tests for ``cancelflow demo --dask`` (``src/cancelflow/_demo.py``): the demo pipeline on
a Dask ``LocalCluster`` that the demo starts on 127.0.0.1 and closes.

The demo runs in a subprocess, as a user runs it, once for the module (about 10 s: the
cluster's start, the pipeline, the cluster's close); each test checks one behaviour of
that run's JSON summary.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from typing import Any

import pytest

from support import wait_until

pytest.importorskip("distributed", reason="cancelflow[dask] is not installed")

DEMO = [sys.executable, "-m", "cancelflow", "demo"]
EARLY_NODES = ("fetch_orders", "fetch_prices", "parse_orders", "parse_prices")
#: On the cluster the first two waves take about 1 s (a little more than locally): a
#: cancel 2 s after the start lands in the process wave, with every process node running.
CANCEL_AFTER = "2"


@functools.cache
def _run_demo() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = subprocess.run(
        [*DEMO, "--dask", "local", "--json", "--mode", "interrupt", "--cancel-after", CANCEL_AFTER],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.stdout.lstrip().startswith("{"), done.stdout + done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    return done, summary


@pytest.fixture(scope="module")
def dask_run() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """One ``cancelflow demo --dask local --json`` run in interrupt mode, shared."""
    return _run_demo()


@pytest.mark.timeout(180)
class TestDemoOnDask:
    def test_exits_0_on_a_local_cluster_it_started(
        self, dask_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
    ) -> None:
        """Test that the demo ran on a LocalCluster of its own and exits 0 without problems."""
        done, summary = dask_run
        assert done.returncode == 0, done.stderr
        assert summary["exit_code"] == 0
        assert summary["problems"] == []
        assert summary["dask"]["local_cluster"] is True
        assert summary["dask"]["address"].startswith("tcp://127.0.0.1:")

    def test_cancelled_pipeline_kills_the_node_that_ignores_its_token(
        self, dask_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
    ) -> None:
        """Test that the run is cancelled in its process wave: the token-checking process
        node stops at its token, the non-cooperative one is killed with its child gone."""
        _, summary = dask_run
        first = summary["runs"][0]
        assert first["outcome"] == "cancelled"
        assert "another thread" in first["reason"]
        assert first["cancelled_during_wave"] == 2
        fates = {node_id: node["fate"] for node_id, node in first["nodes"].items()}
        assert all(fates[node] == "finished" for node in EARLY_NODES), fates
        assert fates["publish_report"] == "not started"
        assert fates["score_orders"] == "cancelled"
        assert fates["simulate_risk"] == "killed"
        assert first["nodes"]["simulate_risk"]["worker_alive_after_run"] is False
        assert fates["render_chart"] == "killed"
        assert first["nodes"]["render_chart"]["helper_alive_after_run"] is False

    def test_partial_results_of_a_killed_process_node_are_kept(
        self, dask_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
    ) -> None:
        """Test that what the killed process node stored on the worker reached the summary."""
        _, summary = dask_run
        partials = summary["runs"][0]["partial_results"]
        stored = partials["simulate_risk.so_far"]
        assert stored["samples"] > 0
        assert 0 < stored["done"] < 1
        assert partials["score_orders.so_far"]["checked"] > 0
        assert isinstance(partials["render_chart.helper_pid"], int)

    def test_cleanup_ran_exactly_once_and_nothing_is_left(
        self, dask_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
    ) -> None:
        """Test that each cleanup handler ran once and that nothing is left: not on the
        workers after the run, and no process of the closed cluster on this machine."""
        _, summary = dask_run
        first = summary["runs"][0]
        assert first["cleanup"]["runs"] == {
            "close the API session": 1,
            "remove the scratch directory": 1,
        }
        assert first["cleanup"]["errors"] == []
        assert first["scratch_dir_left"] is False
        check = summary["final_check"]
        assert summary["nothing_left"] is True
        assert check["processes_left"] == []
        assert check["threads_left"] == []
        assert check["dask_workers_left"] == {}
        # the scheduler's nanny-started workers, their pools' zygotes and children, a helper
        assert check["processes_checked"] >= 3 * 3 + 1


class TestDemoDaskCommandLine:
    def test_without_distributed_it_exits_2_naming_the_extra(self) -> None:
        """Test that ``--dask`` without ``distributed`` installed exits 2 and says what to
        install, before starting anything."""
        code = (
            "import sys; sys.modules['distributed'] = None\n"
            "from cancelflow._cli import main\n"
            "sys.exit(main(['demo', '--dask', 'local', '--json']))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2
        assert done.stdout == ""
        assert "pip install 'cancelflow[dask]'" in done.stderr

    def test_help_documents_the_option(self) -> None:
        """Test that ``cancelflow demo --help`` documents ``--dask``."""
        done = subprocess.run(
            [*DEMO, "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0
        assert "--dask ADDRESS" in done.stdout
        assert "local" in done.stdout


class TestWorkerCensus:
    def test_a_live_process_is_a_leftover_also_where_proc_cannot_be_read(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Test that the census counts a live child as a leftover and a zombie as none,
        also where ``/proc`` cannot be read (macOS; regression: any error reading
        ``/proc`` made a process a multiprocessing helper, so no leftover was ever seen)."""
        from cancelflow._cli.demo import census

        def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
            if str(path).startswith("/proc/"):
                raise FileNotFoundError(path)
            return open(path, *args, **kwargs)

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert not census._is_mp_helper(child.pid)
            monkeypatch.setattr(census, "open", no_proc, raising=False)  # the module's reads
            assert not census._is_mp_helper(child.pid)
            monkeypatch.undo()
            child.kill()
            assert wait_until(lambda: census._is_mp_helper(child.pid))  # a zombie
        finally:
            child.kill()
            child.wait()
