"""Specification: a pipeline reports how each process node was stopped."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import workloads
from cancelflow import (
    CancellationToken,
    CancelledException,
    Node,
    PipelineExecutor,
    ProcessPool,
)
from support import WAIT


async def _run_and_cancel(tmp_path: Path, fn: object, pool: ProcessPool) -> CancelledException:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    token = CancellationToken()
    nodes = [Node("work", fn, run_in="process")]  # type: ignore[arg-type]
    async with PipelineExecutor(process_pool=pool) as executor:
        run = asyncio.create_task(
            executor.execute_pipeline(
                "fates", nodes, {"fifo": str(fifo)}, cancel_token=token, mode="interrupt"
            )
        )
        reported = await asyncio.wait_for(asyncio.to_thread(fifo.read_text), WAIT)
        assert int(reported)
        token.cancel("stop the node")
        with pytest.raises(CancelledException) as info:
            await asyncio.wait_for(run, WAIT)
    return info.value


class TestNodeFates:
    def test_sigterm_honoured_is_reported_terminated(self, tmp_path: Path) -> None:
        """Test that a process node stopped by SIGTERM is reported as terminated."""
        with ProcessPool(1, grace_period=0, term_grace_period=WAIT) as pool:
            error = asyncio.run(_run_and_cancel(tmp_path, workloads.node_report_then_spin, pool))
        assert error.node_fates == {"work": "terminated"}
        assert "work.pid" in error.partial_results

    def test_sigkill_is_reported_killed(self, tmp_path: Path) -> None:
        """Test that a process node that blocks SIGTERM is killed and reported so."""
        with ProcessPool(1, grace_period=0, term_grace_period=0.1) as pool:
            error = asyncio.run(
                _run_and_cancel(tmp_path, workloads.node_report_then_block_sigterm, pool)
            )
        assert error.node_fates == {"work": "killed"}
        assert "work.pid" in error.partial_results
