"""Scenario 4: a coroutine on the event loop, cancelled in interrupt mode."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .. import tasks
from ..harness import Bench, anyio_run
from ..results import Row


async def _wait_for_ever(started: asyncio.Event) -> None:
    started.set()
    await asyncio.sleep(tasks.SAFETY_SECONDS)


async def _node_wait(ctx: Any) -> None:
    await _wait_for_ever(ctx.context["started"])


def coroutine_cell(bench: Bench, system: str, row: Row) -> None:
    async def cell() -> None:
        executor: Any = None
        if system == "cancelflow":
            from cancelflow._executor import PipelineExecutor

            executor = PipelineExecutor()
        try:
            for _ in range(bench.samples):
                seq = bench.seq()
                started = asyncio.Event()
                t0 = 0.0
                if system == "cancelflow":
                    from cancelflow._exceptions import CancelledException
                    from cancelflow._node import Node
                    from cancelflow._token import CancellationToken

                    token = CancellationToken(name=f"bench-{seq}")
                    task = asyncio.ensure_future(
                        executor.execute_pipeline(
                            f"bench-{seq}",
                            [Node("wait", _node_wait, run_in="loop")],
                            {"started": started},
                            mode="interrupt",
                            cancel_token=token,
                        )
                    )
                    await started.wait()
                    await asyncio.sleep(bench.pause())
                    t0 = time.perf_counter()
                    token.cancel("bench")
                    try:
                        await task
                        row.error("the pipeline completed")
                    except CancelledException as exc:
                        row.extra.setdefault("raised", type(exc).__name__)
                elif system == "asyncio":
                    task = asyncio.ensure_future(_wait_for_ever(started))
                    await started.wait()
                    await asyncio.sleep(bench.pause())
                    t0 = time.perf_counter()
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        row.extra.setdefault("raised", "CancelledError")
                else:  # anyio
                    import anyio

                    scope = anyio.CancelScope()

                    async def victim(
                        scope: anyio.CancelScope = scope, started: asyncio.Event = started
                    ) -> None:
                        with scope:
                            await _wait_for_ever(started)

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(victim)
                        await started.wait()
                        await anyio.sleep(bench.pause())
                        t0 = time.perf_counter()
                        scope.cancel()
                    row.extra.setdefault("raised", "Cancelled (caught by its scope)")
                row.add("caller_raises", (time.perf_counter() - t0) * 1e3)
        finally:
            if executor is not None:
                await asyncio.wait_for(executor.aclose(), 60)

    anyio_run(cell, "asyncio")
