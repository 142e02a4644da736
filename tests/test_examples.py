"""Tests for ``examples/``: every seed example runs as a script and shows its outcome."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED: dict[str, list[str]] = {
    "orchestrator_timeout.py": [
        "Pipeline timed out. Partial results: {'rooms': ['101', '102', '205'], "
        "'prices': {'101': 90, '102': 100, '205': 110}}",
        "Stopped at wave 2: pipeline 'availability-request-42' timed out after 0.2s",
    ],
    "manual_cancellation.py": [
        "[graceful] cancelled: User requested cancellation",
        "[graceful] partial results: {'orders': 128, 'report': 'report over 128 orders'}",
        "[graceful] first wave not completed: 2",
        "[interrupt] cancelled: User requested cancellation",
        "[interrupt] partial results: {'orders': 128}",
        "[interrupt] first wave not completed: 1",
    ],
    "cleanup_handler.py": [
        "cleanup_resource: removed ",
        "cancel returned: the handler has run",
        "second cancel did something: False",
        "pipeline ended: User requested cancellation",
    ],
    "message_queue.py": [
        "-- seed pattern --",
        "Cancelled: New message received",
        "Partial results: 1 tools completed",
        "reply to 'Actually, for two nights': 2 rooms free",
        "-- run_superseding --",
        "Cancelled: New message received",
        "Partial results: 1 tools completed",
        "reply to 'Room for tonight?': 2 rooms free",
    ],
    "timeout_protection.py": [
        "seed pattern: cancelled=True reason='Operation timeout'",
        "seed pattern: partial results {'search': ['hotel A', 'hotel B']}",
        "built-in timeout: timed_out=True reason=\"pipeline 'search-2' timed out after 0.2s\"",
        "built-in timeout: partial results {'search': ['hotel A', 'hotel B']}",
    ],
    "user_interruption.py": [
        "interrupted: True (User pressed Ctrl-C)",
        "kept: {'transcribe': 'transcript', 'summarize.paragraphs_done': 3}",
    ],
}


class TestExamples:
    def test_every_example_is_checked(self) -> None:
        """Test that each script in examples/ has expected output here, and vice versa."""
        assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)

    @pytest.mark.parametrize("script", sorted(EXPECTED))
    def test_example_runs_and_prints_its_outcome(self, script: str) -> None:
        """Test that the example exits 0 and prints its outcome lines, in order."""
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / script)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        expected = EXPECTED[script]
        assert len(lines) == len(expected), done.stdout
        for line, start in zip(lines, expected, strict=True):
            assert line.startswith(start), f"{line!r} does not start with {start!r}"
