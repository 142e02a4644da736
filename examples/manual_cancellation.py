"""Seed 000, "Manual Cancellation": ``await registry.cancel(pipeline_id, reason)``.

In the default graceful mode the running wave finishes and no new wave starts; in
interrupt mode the running nodes are stopped at once.

Run: python examples/manual_cancellation.py
"""

from __future__ import annotations

import asyncio
import sys

from loguru import logger

from cancelflow import (
    CancellationRegistry,
    CancelledException,
    Node,
    NodeContext,
    PipelineExecutor,
)


async def load_orders(ctx: NodeContext) -> int:
    return 128


async def build_report(ctx: NodeContext) -> str:
    ctx.context["running"].set()  # tell main() that the long step has started
    for _ in range(5):  # a few short steps of real work
        await asyncio.sleep(0.01)
    return f"report over {ctx.inputs['orders']} orders"


async def email_report(ctx: NodeContext) -> str:
    return "sent"


async def run_and_cancel(
    executor: PipelineExecutor, registry: CancellationRegistry, mode: str
) -> None:
    running = asyncio.Event()
    nodes = [
        Node("orders", load_orders),
        Node("report", build_report, deps=["orders"]),
        Node("email", email_report, deps=["report"]),
    ]
    task = asyncio.create_task(
        executor.execute_pipeline("my_pipeline", nodes, {"running": running}, mode=mode)  # type: ignore[arg-type]
    )
    await running.wait()
    await registry.cancel("my_pipeline", "User requested cancellation")
    try:
        await task
    except CancelledException as e:
        print(f"[{mode}] cancelled: {e.reason}")
        print(f"[{mode}] partial results: {e.partial_results}")
        print(f"[{mode}] first wave not completed: {e.wave_num}")


async def main() -> None:
    registry = CancellationRegistry()
    async with PipelineExecutor(registry) as executor:
        await run_and_cancel(executor, registry, "graceful")
        await run_and_cancel(executor, registry, "interrupt")


if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(main())
