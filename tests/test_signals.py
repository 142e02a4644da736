"""Signals delivered to a program during every phase of a pipeline (issue 9, part 3).

Each test runs ``tests/signal_child.py`` with the venv's interpreter: a small application
whose SIGINT/SIGTERM handler cancels its pipelines (``registry.cancel_threadsafe`` or the
caller's ``token.cancel``). The child says ``READY <phase>`` when it is in the phase under
test; the test then sends the signal, and the run must end in a clean cancellation: exit
code 0, the expected ending and reason, and no traceback at all on stderr. A hang is
never waited out: the child's faulthandler dumps its stacks and exits, and the test has
its own watchdog on every read and wait.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support import assert_not_running

CHILD = Path(__file__).with_name("signal_child.py")
#: watchdog on every read of and wait for the child: longer than the child's own (60 s),
#: so that a hang shows the child's stacks
CHILD_WAIT = 90.0
SIGNALS = [signal.SIGINT, signal.SIGTERM]
#: What would show an error escaping the library (or the child) on stderr.
ERROR_MARKERS = (
    "Traceback",
    "Exception in callback",
    "Exception in thread",
    "exception was never retrieved",
    "Task was destroyed",
)


@dataclass
class ChildRun:
    returncode: int
    stdout: list[str]
    stderr: str
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ended(self) -> list[str]:
        """The words of the ``ENDED`` line."""
        lines = [line for line in self.stdout if line.startswith("ENDED ")]
        assert len(lines) == 1, f"expected one ENDED line: {self.stdout}\n{self.stderr}"
        return lines[0].split(" ", 2)[1:]

    def assert_clean(self) -> None:
        """Exit code 0, nothing on stderr that looks like an escaped error, and none of
        the processes the program had started (pool zygote, workers) outlives it."""
        assert self.returncode == 0, f"exit {self.returncode}\n{self.stderr}"
        for marker in ERROR_MARKERS:
            assert marker not in self.stderr, self.stderr
        for pid in self.facts.get("descendants", []):
            assert_not_running(pid)


def run_child(
    tmp_path: Path, phase: str, method: str, signum: int | None, mode: str = "interrupt"
) -> ChildRun:
    """Run the child; send ``signum`` when it says READY; collect what it printed."""
    stderr_path = tmp_path / "stderr.txt"
    lines: queue.Queue[str | None] = queue.Queue()
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), phase, method, mode],
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=CHILD.parent,
        )
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, name="child-stdout")
    reader.start()
    seen: list[str] = []
    try:
        while True:
            try:
                line = lines.get(timeout=CHILD_WAIT)
            except queue.Empty:
                pytest.fail(f"watchdog: the child printed nothing for {CHILD_WAIT}s: {seen}")
            if line is None:
                break
            seen.append(line)
            if line.startswith("READY") and signum is not None:
                proc.send_signal(signum)
        proc.wait(timeout=CHILD_WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join()
        stdout.close()
    facts: dict[str, Any] = {}
    for line in seen:
        if line.startswith("FACTS "):
            facts = json.loads(line[len("FACTS ") :])
    return ChildRun(proc.returncode, seen, stderr_path.read_text(), facts)


class TestSignalWhileWavesRun:
    @pytest.mark.parametrize("method", ["registry", "token"])
    @pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
    def test_signal_cancels_the_running_wave(
        self, tmp_path: Path, signum: int, method: str
    ) -> None:
        """Test that a signal landing while loop, thread and process nodes run ends the
        run cancelled with the signal's reason: every running node stopped, the next wave
        never started, the finished wave's output and the process node's stored pid kept,
        exit code 0 and no traceback."""
        child = run_child(tmp_path, "waves", method, signum)
        child.assert_clean()
        name = signal.Signals(signum).name
        assert child.ended == ["cancelled", f"signal {name}"]
        assert child.facts["signals"] == 1
        assert child.facts["fates"] == {
            "prep": "finished",
            "loop": "cancelled",
            "thread": "cancelled",
            "process": "cancelled",
        }
        assert child.facts["results"] == ["prep", "process.pid"]
        assert child.facts["cleanup_errors"] == []

    def test_signal_in_graceful_mode(self, tmp_path: Path) -> None:
        """Test that in graceful mode a signal lets the wave run until the graceful
        timeout interrupts it, then ends cancelled just as cleanly."""
        child = run_child(tmp_path, "waves", "registry", signal.SIGINT, mode="graceful")
        child.assert_clean()
        assert child.ended == ["cancelled", "signal SIGINT"]
        assert "never" not in child.facts["fates"]
        assert child.facts["fates"]["prep"] == "finished"


class TestDefaultCtrlC:
    @pytest.mark.parametrize("phase", ["waves", "healing"])
    def test_ctrl_c_without_a_handler(self, tmp_path: Path, phase: str) -> None:
        """Test that a program with no signal handler of its own (asyncio.run cancels
        its main task on Ctrl-C, then raises KeyboardInterrupt) stops the running
        pipeline through the awaiting task's cancellation: no traceback from the library,
        no process left behind, and the program's own KeyboardInterrupt at the top."""
        child = run_child(tmp_path, phase, "default", signal.SIGINT)
        child.assert_clean()
        assert child.ended == ["interrupted", "by-KeyboardInterrupt"]


class TestSignalWhileCleanupRuns:
    @pytest.mark.parametrize(
        ("signum", "method"),
        [(signal.SIGINT, "registry"), (signal.SIGTERM, "token")],
        ids=["SIGINT-registry", "SIGTERM-token"],
    )
    def test_signal_during_cleanup_changes_nothing(
        self, tmp_path: Path, signum: int, method: str
    ) -> None:
        """Test that a signal landing while a cleanup handler of an already cancelled run
        is running cancels nothing more: each handler runs once, the first reason stays,
        and the program ends cleanly."""
        child = run_child(tmp_path, "cleanup", method, signum)
        child.assert_clean()
        assert child.ended == ["cancelled", "first"]
        assert child.facts["signal_seen_in_handler"] is True
        assert child.facts["handlers_ran"] == ["sync", "async"]
        assert child.facts["cleanup_errors"] == []

    def test_a_signal_another_thread_takes_during_cleanup_is_handled_at_once(
        self, tmp_path: Path
    ) -> None:
        """Test that a signal taken by a thread other than the main one (here the cleanup
        handler's own, as the kernel may pick any thread for a signal sent to the process)
        is handled while the cleanup handler waits for it, not after the handler's 5 s
        timeout: the program's loop wakes on the signal (regression: the main thread,
        blocked in the loop, ran the handler only when the timeout woke it)."""
        child = run_child(tmp_path, "cleanup-signal-own-thread", "registry", None)
        child.assert_clean()
        assert child.ended == ["cancelled", "first"]
        assert child.facts["signal_seen_in_handler"] is True
        assert child.facts["cleanup_errors"] == []


class TestSignalWhilePoolHeals:
    @pytest.mark.parametrize(
        ("signum", "method"),
        [(signal.SIGINT, "registry"), (signal.SIGTERM, "token")],
        ids=["SIGINT-registry", "SIGTERM-token"],
    )
    def test_signal_while_a_crashed_worker_is_replaced(
        self, tmp_path: Path, signum: int, method: str
    ) -> None:
        """Test that a signal sent as soon as a worker crash is reported (its replacement
        still starting) cancels the next run, which was waiting for that worker, cleanly."""
        child = run_child(tmp_path, "healing", method, signum)
        child.assert_clean()
        assert child.ended == ["cancelled", f"signal {signal.Signals(signum).name}"]
        assert child.facts["crash"] == {"crash": "crashed"}
        assert child.facts["replaced"] == 1


class TestSignalStorm:
    def test_pipelines_under_a_signal_storm(self, tmp_path: Path) -> None:
        """Test that 300 pipelines (loop and thread nodes, both modes) run while SIGUSR1
        lands non-stop and every 7th one cancels the current run through the registry or
        its token: no deadlock, every run ends once, cleanup handlers ran exactly once
        for each run that did not complete and never for one that did."""
        child = run_child(tmp_path, "storm", "token", None)
        child.assert_clean()
        assert child.ended == ["storm", "300"]
        facts = child.facts
        assert facts.get("bad_cleanups", []) == []
        assert facts.get("bad_results", []) == []
        assert sum(facts["outcomes"].values()) == 300
        assert set(facts["outcomes"]) <= {"completed", "cancelled"}
        assert facts["registered_after"] == []
        assert facts["storm_signals"] > 0

    def test_thread_pool_cancel_from_a_signal_handler(self, tmp_path: Path) -> None:
        """Test that a signal handler can cancel a running ThreadPool task's token while
        the main thread is making timeout tokens (the timer's own code) without
        deadlocking."""
        child = run_child(tmp_path, "pool-storm", "token", None)
        child.assert_clean()
        assert child.ended == ["pool-storm", "300"]
