"""Seed 000, "Storing and Retrieving Partial Results": a pipeline that runs past its
timeout is stopped, and the outputs of the nodes that finished are kept.

Run: python examples/orchestrator_timeout.py
"""

from __future__ import annotations

import asyncio
import sys

from loguru import logger

from cancelflow import Node, NodeContext, PipelineExecutor, PipelineTimeoutException


async def fetch_rooms(ctx: NodeContext) -> list[str]:
    return ["101", "102", "205"]


async def fetch_prices(ctx: NodeContext) -> dict[str, int]:
    return {room: 90 + 10 * i for i, room in enumerate(ctx.inputs["rooms"])}


async def ask_partner_api(ctx: NodeContext) -> str:
    await asyncio.sleep(3600)  # the partner never answers in time
    return "never"


async def main() -> None:
    executor = PipelineExecutor()
    pipeline_id = "availability-request-42"
    nodes = [
        Node("rooms", fetch_rooms),
        Node("prices", fetch_prices, deps=["rooms"]),
        Node("partner", ask_partner_api, deps=["prices"]),
    ]
    try:
        await executor.execute_pipeline(pipeline_id, nodes, {}, timeout=0.2)
    except PipelineTimeoutException as e:
        print(f"Pipeline timed out. Partial results: {e.partial_results}")
        print(f"Stopped at wave {e.wave_num}: {e.reason}")
    await executor.aclose()


if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(main())
