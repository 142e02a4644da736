"""Scenario 5: a 3-wave pipeline (loop, thread and process nodes) cancelled mid-wave 1."""

from __future__ import annotations

import asyncio
import time

from .. import tasks
from ..harness import BEACON_TIMEOUT, Bench, anyio_run
from ..results import Row


def pipeline_cell(bench: Bench, mode: str, row: Row) -> None:
    from cancelflow._exceptions import CancelledException
    from cancelflow._executor import PipelineExecutor
    from cancelflow._node import Node
    from cancelflow._token import CancellationToken

    duration = 0.1 if bench.settings.quick else 0.2
    nodes = [
        Node("first", tasks.node_first, run_in="thread"),
        Node("loop", tasks.node_wave_loop, deps=["first"], run_in="loop"),
        Node("thread", tasks.node_wave_thread, deps=["first"], run_in="thread"),
        Node("process", tasks.node_wave_process, deps=["first"], run_in="process"),
        Node("last", tasks.node_last, deps=["loop", "thread", "process"], run_in="thread"),
    ]
    row.extra["duration_s"] = duration

    async def cell() -> None:
        executor = PipelineExecutor()
        try:
            for _ in range(bench.samples):
                seq = bench.seq()
                token = CancellationToken(name=f"bench-{seq}")
                context = {"beacon": bench.beacon.path, "seq": seq, "duration": duration}
                task = asyncio.ensure_future(
                    executor.execute_pipeline(
                        f"bench-{seq}",
                        nodes,
                        context,
                        mode="interrupt" if mode == "interrupt" else "graceful",
                        cancel_token=token,
                    )
                )
                signalled = asyncio.ensure_future(
                    bench.beacon.wait_async(seq, BEACON_TIMEOUT, count=3)
                )
                await asyncio.wait({signalled, task}, return_when=asyncio.FIRST_COMPLETED)
                if not signalled.done():
                    signalled.cancel()
                    try:
                        await task
                        row.error("the pipeline completed before its nodes signalled")
                    except Exception as exc:  # noqa: BLE001 - reported as the row's error
                        row.error(f"the pipeline ended before wave 1 ran: {exc!r}"[:300])
                    continue
                await asyncio.sleep(
                    bench.rng.uniform(0.0, min(bench.settings.max_pause, duration / 2))
                )
                t0 = time.perf_counter()
                token.cancel("bench")
                try:
                    await asyncio.wait_for(task, 30)
                    row.error("the pipeline completed")
                    continue
                except CancelledException as exc:
                    t1 = time.perf_counter()
                    kept = sorted(exc.partial_results)
                    row.add("exception", (t1 - t0) * 1e3)
                    row.add("partial_kept", float(len(kept)))
                    row.extra["partial_results_last"] = kept
                    row.extra["wave_num_last"] = exc.wave_num
        finally:
            await asyncio.wait_for(executor.aclose(), 60)

    anyio_run(cell, "asyncio")
