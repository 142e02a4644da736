"""Tests for ``cancelflow demo`` (``src/cancelflow/_demo.py``): its JSON summary in each
mode, Ctrl-C in a terminal, and the command line's help.

The demo runs in a subprocess, as a user runs it. Each JSON run is shared by the tests
of one module-scoped fixture (one demo run per mode), so every test checks one
behaviour of that run without paying for another one.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import pytest

from cancelflow import __version__

DEMO = [sys.executable, "-m", "cancelflow", "demo"]
CPU_NODES = ("score_orders", "simulate_risk", "render_chart", "archive_orders")
EARLY_NODES = ("fetch_orders", "fetch_prices", "parse_orders", "parse_prices")

# The pipeline starts its process wave about 1 s after it starts (two waves of 0.5 s of
# simulated I/O): a cancel 2 s after the start lands in the middle of the process wave,
# while render_chart's helper (1.8 s) is still running.
CANCEL_AFTER = "2"

#: How each run is started; graceful gets a generous --grace so that render_chart
#: finishes inside it even on a loaded machine.
RUNS: dict[str, list[str]] = {
    "interrupt": ["--mode", "interrupt", "--cancel-after", CANCEL_AFTER],
    "graceful": ["--mode", "graceful", "--grace", "3", "--cancel-after", CANCEL_AFTER],
    "supersede": ["--supersede", "--grace", "3", "--cancel-after", CANCEL_AFTER],
}


class DemoRun:
    def __init__(self, name: str, done: subprocess.CompletedProcess[str]) -> None:
        self.name = name
        self.returncode = done.returncode
        self.stdout = done.stdout
        self.stderr = done.stderr
        self.summary: dict[str, Any] = json.loads(done.stdout)

    @property
    def first(self) -> dict[str, Any]:
        run: dict[str, Any] = self.summary["runs"][0]
        return run

    def fates(self, run: int = 0) -> dict[str, str]:
        return {n: v["fate"] for n, v in self.summary["runs"][run]["nodes"].items()}


@functools.cache
def _run_demo(name: str) -> DemoRun:
    """Run the demo once per mode for the whole session; later calls reuse the run."""
    done = subprocess.run(
        [*DEMO, "--json", *RUNS[name]],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.stdout.lstrip().startswith("{"), done.stdout + done.stderr
    return DemoRun(name, done)


@pytest.fixture(scope="module", params=sorted(RUNS))
def demo_run(request: pytest.FixtureRequest) -> DemoRun:
    """One ``cancelflow demo --json`` run per mode, shared by this module's tests."""
    name: str = request.param
    return _run_demo(name)


@pytest.fixture(scope="module")
def interrupt_run() -> DemoRun:
    return _run_demo("interrupt")


@pytest.fixture(scope="module")
def graceful_run() -> DemoRun:
    return _run_demo("graceful")


@pytest.fixture(scope="module")
def supersede_run() -> DemoRun:
    return _run_demo("supersede")


@pytest.mark.timeout(120)
class TestDemoSummary:
    """What every run of the demo promises, whatever the mode."""

    def test_exits_0_with_the_summary_alone_on_stdout(self, demo_run: DemoRun) -> None:
        """Test that the demo exits 0 and that stdout holds the JSON summary and nothing else."""
        assert demo_run.returncode == 0, demo_run.stderr
        assert demo_run.summary["exit_code"] == 0
        assert demo_run.summary["problems"] == []
        assert json.loads(demo_run.stdout) == demo_run.summary  # no stray line around it

    def test_cancelled_during_the_process_wave(self, demo_run: DemoRun) -> None:
        """Test that the first request is cancelled while its process wave runs, with the reason."""
        first = demo_run.first
        assert first["outcome"] == "cancelled"
        assert first["cancelled_during_wave"] == 2
        expected = "superseded" if demo_run.name == "supersede" else "another thread"
        assert expected in first["reason"]
        assert demo_run.summary["trigger"] == (
            "supersede" if demo_run.name == "supersede" else "timer"
        )

    def test_earlier_waves_finished_and_the_last_never_started(self, demo_run: DemoRun) -> None:
        """Test that the loop and thread waves finished and the wave after the cancel never started."""
        fates = demo_run.fates()
        assert all(fates[node] == "finished" for node in EARLY_NODES), fates
        assert fates["publish_report"] == "not started"
        for node in EARLY_NODES:
            assert node in demo_run.first["partial_results"]

    def test_each_step_of_the_stop_ladder_stops_one_process_node(self, demo_run: DemoRun) -> None:
        """Test that the process wave shows the pool's three stop steps, one node each: the
        token-checking node is cancelled at its token; the pure-Python loop that ignores
        its token is terminated by SIGTERM, and its finally block ran (what it stored
        there is kept); the node that ignores SIGTERM too is killed, its worker and helper
        process gone, and its finally block never ran."""
        fates = demo_run.fates()
        nodes = demo_run.first["nodes"]
        partials = demo_run.first["partial_results"]
        assert fates["score_orders"] == "cancelled", fates
        assert fates["simulate_risk"] == "terminated", fates
        assert fates["archive_orders"] == "killed", fates
        assert nodes["simulate_risk"]["finally_ran"] is True
        in_finally = partials["simulate_risk.finally"]
        assert in_finally["samples"] >= partials["simulate_risk.so_far"]["samples"] > 0
        assert nodes["archive_orders"]["finally_ran"] is False
        assert "archive_orders.finally" not in partials
        assert nodes["archive_orders"]["worker_alive_after_run"] is False
        assert nodes["archive_orders"]["helper_alive_after_run"] is False

    def test_the_stops_come_in_the_ladders_order(self, demo_run: DemoRun) -> None:
        """Test that the three stopped process nodes ended in the ladder's order: token,
        then SIGTERM (0.3 s later), then SIGKILL (0.5 s after that)."""
        nodes = demo_run.first["nodes"]
        token, term, kill = (
            nodes[node]["stopped_ms_after_cancel"]
            for node in ("score_orders", "simulate_risk", "archive_orders")
        )
        assert token < term < kill, (token, term, kill)
        # SIGKILL comes no sooner than both grace periods after the token.
        assert kill - token >= 0.8e3 - 100, (token, kill)

    def test_partial_results_keep_what_stopped_process_nodes_stored(
        self, demo_run: DemoRun
    ) -> None:
        """Test that the partial results hold the values the terminated and the killed
        process nodes stored before they were stopped."""
        partials = demo_run.first["partial_results"]
        stored = partials["simulate_risk.so_far"]
        assert stored["samples"] > 0
        assert 0 < stored["done"] < 1
        killed = partials["archive_orders.so_far"]
        assert 0 < killed["done"] < 1
        assert isinstance(partials["archive_orders.helper_pid"], int)
        assert partials["score_orders.so_far"]["checked"] > 0
        assert isinstance(partials["render_chart.helper_pid"], int)

    def test_cleanup_handlers_ran_exactly_once(self, demo_run: DemoRun) -> None:
        """Test that each cleanup handler of the cancelled request ran exactly once."""
        cleanup = demo_run.first["cleanup"]
        assert cleanup["runs"] == {"close the API session": 1, "remove the scratch directory": 1}
        assert cleanup["errors"] == []
        assert demo_run.first["scratch_dir_left"] is False

    def test_nothing_is_left(self, demo_run: DemoRun) -> None:
        """Test that the demo's final check found no process or thread of its own left."""
        check = demo_run.summary["final_check"]
        assert demo_run.summary["nothing_left"] is True
        assert check["processes_left"] == []
        assert check["threads_left"] == []
        assert check["processes_checked"] >= 5  # zygote, three workers, the helper
        assert demo_run.first["nodes"]["render_chart"]["helper_alive_after_run"] is False

    def test_latency_is_measured(self, demo_run: DemoRun) -> None:
        """Test that the summary reports the cancel-to-end latency it measured."""
        latency = demo_run.summary["latency_ms"]
        assert latency["cancel_to_pipeline_end"] >= latency["cancel_to_last_node_stopped"] > 0


@pytest.mark.timeout(120)
class TestDemoSummaryLayout:
    def test_every_line_fits_80_columns_and_no_number_is_cut(self, demo_run: DemoRun) -> None:
        """Test that the summary laid out for an 80-column terminal has no line over 80
        columns, and that every pid it names appears whole on one line."""
        from cancelflow._cli.demo.render import render

        text = render(demo_run.summary, width=80)
        assert max(len(line) for line in text.splitlines()) <= 80
        nodes = demo_run.first["nodes"].values()
        pids = [str(node["helper_pid"]) for node in nodes if "helper_pid" in node]
        pids += [
            str(node["worker_pid"])
            for node in nodes
            if "worker_pid" in node and node["fate"] in ("killed", "terminated")
        ]
        assert pids  # every mode starts render_chart's helper
        words = set(text.replace(";", " ").split())
        for pid in pids:
            assert pid in words, f"pid {pid} is not printed whole"


class TestDemoModes:
    """What distinguishes the modes."""

    def test_interrupt_stops_the_nodes_with_a_helper_and_their_helpers(
        self, interrupt_run: DemoRun
    ) -> None:
        """Test that in interrupt mode render_chart is stopped too: SIGTERM ends it (its
        worker then kills the helper it started); archive_orders is killed with its helper."""
        nodes = interrupt_run.first["nodes"]
        assert nodes["render_chart"]["fate"] == "terminated"
        assert nodes["render_chart"]["helper_alive_after_run"] is False
        assert nodes["archive_orders"]["fate"] == "killed"
        assert nodes["archive_orders"]["helper_alive_after_run"] is False
        assert interrupt_run.first["first_incomplete_wave"] == 2

    def test_graceful_lets_the_running_wave_finish_within_the_grace(
        self, graceful_run: DemoRun
    ) -> None:
        """Test that in graceful mode render_chart finishes, then the rest is interrupted."""
        fates = graceful_run.fates()
        assert fates["render_chart"] == "finished"
        assert "render_chart" in graceful_run.first["partial_results"]
        assert graceful_run.first["nodes"]["score_orders"]["stopped_ms_after_cancel"] > 0

    def test_supersede_runs_the_newer_request_to_completion(self, supersede_run: DemoRun) -> None:
        """Test that the newer request starts after the superseded one ended and completes."""
        runs = supersede_run.summary["runs"]
        assert [run["outcome"] for run in runs] == ["cancelled", "completed"]
        assert set(supersede_run.fates(1).values()) == {"finished"}
        latency = supersede_run.summary["latency_ms"]
        assert latency["cancel_to_newer_request_started"] >= latency["cancel_to_last_node_stopped"]

    def test_supersede_drops_the_completed_requests_cleanup(self, supersede_run: DemoRun) -> None:
        """Test that the completed newer request's cleanup handlers did not run."""
        newer = supersede_run.summary["runs"][1]
        assert newer["cleanup"]["runs"] == {
            "close the API session": 0,
            "remove the scratch directory": 0,
        }


# == Ctrl-C in a terminal ===========================================================================
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\r")


class _Terminal:
    """The demo running in a pseudo-terminal; its output is read as it comes."""

    def __init__(self, *options: str) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen(
            [*DEMO, *options],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.raw = b""

    @property
    def text(self) -> str:
        return _ANSI.sub(b"", self.raw).decode("utf-8", "replace")

    def read_until(self, marker: str, timeout: float = 60.0) -> bool:
        """Read until ``marker`` appears (``True``), EOF or ``timeout`` s (``False``)."""
        deadline = time.monotonic() + timeout
        while marker not in self.text:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read_some(remaining):
                return marker in self.text
        return True

    def read_until_match(self, pattern: str, timeout: float = 60.0) -> bool:
        """Read until the regular expression ``pattern`` matches what was read."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read_some(remaining):
                return re.search(pattern, self.text) is not None
        return True

    def read_to_end(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0 and self._read_some(remaining):
            pass

    def _read_some(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            return False
        self.raw += data
        return bool(data)

    def ctrl_c(self) -> None:
        """Do what the terminal does on Ctrl-C: SIGINT to the foreground process group
        (the demo leads its own group, which holds its pool's processes too)."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        os.close(self.master)


@pytest.mark.timeout(120)
class TestDemoInTerminal:
    def test_ctrl_c_cancels_gracefully_and_a_second_ctrl_c_interrupts(self) -> None:
        """Test that Ctrl-C once cancels gracefully, twice interrupts, and the exit code is 130."""
        term = _Terminal("--cancel-after", "60", "--grace", "30")
        try:
            assert term.read_until("wave 3/4 'crunch' started"), term.text
            # simulate_risk runs in its worker (it reported progress): the interrupt then
            # finds it running (on a loaded machine its worker may not have claimed it yet
            # a few milliseconds after the wave started, and it would end never started)
            assert term.read_until_match(r"simulate_risk +process +\S+ +[1-9]\d*%"), term.text
            term.ctrl_c()
            assert term.read_until("press Ctrl-C again to interrupt now"), term.text
            assert term.proc.poll() is None  # graceful: the running wave goes on
            term.ctrl_c()
            assert term.read_until("Ctrl-C again: interrupting now"), term.text
            term.read_to_end()
            assert term.proc.wait(30) == 130, term.text
        finally:
            term.close()
        summary = term.text.split("== report-1:", 1)[1]
        assert "cancelled by Ctrl-C, then interrupted by a second Ctrl-C" in summary
        lines = {m[1]: m[0] for m in re.finditer(r"^\s+\d/4 (\S+).*$", summary, re.MULTILINE)}
        assert " terminated " in lines["simulate_risk"]
        assert " cancelled " in lines["score_orders"]
        assert "reason         : cancelled by the user (Ctrl-C)" in summary
        assert "Final check: no process left" in summary
        assert "exit code 130" in summary


# == the command line ===============================================================================
def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cancelflow", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestDemoCommandLine:
    def test_demo_help_lists_every_option_and_exit_code(self) -> None:
        """Test that ``cancelflow demo --help`` documents each option and each exit code."""
        done = _cli("demo", "--help")
        assert done.returncode == 0
        for option in ("--cancel-after", "--mode", "--grace", "--supersede", "--json", "--plain"):
            assert option in done.stdout
        for code in ("  0 ", "  1 ", "  2 ", "  130 "):
            assert code in done.stdout

    def test_top_level_help_lists_the_demo(self) -> None:
        """Test that ``cancelflow --help`` lists the demo command."""
        done = _cli("--help")
        assert done.returncode == 0
        assert "demo" in done.stdout

    def test_version(self) -> None:
        """Test that ``cancelflow --version`` prints the package version."""
        done = _cli("--version")
        assert done.returncode == 0
        assert done.stdout.strip() == f"cancelflow {__version__}"

    def test_a_platform_without_process_pools_gets_a_usage_error(self) -> None:
        """Test that the demo on the ``windows`` implementation (no process pool) exits 2
        with one message naming what is missing and what works, no traceback, and nothing
        on stdout (regression: it died with a traceback)."""
        done = subprocess.run(
            [sys.executable, "-m", "cancelflow", "demo", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "CANCELFLOW_PLATFORM": "windows"},
        )
        assert done.returncode == 2, done.stderr
        assert "process pool" in done.stderr
        assert "ThreadPool" in done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout == ""

    def test_bad_cancel_after_is_a_usage_error(self) -> None:
        """Test that a non-positive ``--cancel-after`` exits 2 without running anything."""
        done = _cli("demo", "--cancel-after", "-1")
        assert done.returncode == 2
        assert "--cancel-after" in done.stderr
