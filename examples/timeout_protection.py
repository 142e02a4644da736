"""Seed 004, "Timeout Protection Pattern": give up waiting after a while, cancel with a
reason, and still get the partial results.

Two ways: the seed's (``asyncio.wait_for`` on a shielded task, then ``token.cancel``),
and the built-in ``timeout=``.

Run: python examples/timeout_protection.py
"""

from __future__ import annotations

import asyncio
import sys

from loguru import logger

from cancelflow import CancellationToken, Node, NodeContext, PipelineExecutor


async def search(ctx: NodeContext) -> list[str]:
    return ["hotel A", "hotel B"]


async def rank(ctx: NodeContext) -> list[str]:
    await asyncio.sleep(3600)  # a ranking service that hangs
    return sorted(ctx.inputs["search"])


def nodes() -> list[Node]:
    return [Node("search", search), Node("rank", rank, deps=["search"])]


async def main() -> None:
    # Interrupt mode: the hanging node is stopped as soon as the token is cancelled.
    async with PipelineExecutor(mode="interrupt") as executor:
        token = CancellationToken()
        task = asyncio.create_task(executor.run_pipeline("search-1", nodes(), cancel_token=token))
        try:
            result = await asyncio.wait_for(asyncio.shield(task), timeout=0.2)
        except asyncio.TimeoutError:  # noqa: UP041 - spelled as in the seed
            token.cancel("Operation timeout")
            result = await task  # Get partial results
        print(f"seed pattern: cancelled={result.cancelled} reason={result.cancel_reason!r}")
        print(f"seed pattern: partial results {result.results}")

        result = await executor.run_pipeline("search-2", nodes(), timeout=0.2)
        print(f"built-in timeout: timed_out={result.timed_out} reason={result.cancel_reason!r}")
        print(f"built-in timeout: partial results {result.results}")


if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="ERROR")
    asyncio.run(main())
