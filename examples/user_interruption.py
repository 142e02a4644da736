"""Seed 004, "User Interruption Pattern": the user presses Ctrl-C, and the pipeline stops
cleanly with its partial results instead of dying with a traceback.

``CancellationRegistry.cancel_threadsafe`` is safe in a signal handler: it sets the token
at once and schedules the cleanup on the event loop. Here the "user" is simulated by the
script sending itself SIGINT once the long step runs.

Run: python examples/user_interruption.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from loguru import logger

from cancelflow import CancellationRegistry, Node, NodeContext, PipelineExecutor


async def transcribe(ctx: NodeContext) -> str:
    return "transcript"


async def summarize(ctx: NodeContext) -> str:
    ctx.store_partial("paragraphs_done", 3)
    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C now
    await asyncio.Event().wait()  # a long summary
    return "summary"


async def main() -> None:
    registry = CancellationRegistry()
    executor = PipelineExecutor(registry, mode="interrupt")

    def on_ctrl_c(signum: int, frame: Any) -> None:
        registry.cancel_threadsafe("meeting-notes", "User pressed Ctrl-C")

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        nodes = [Node("transcribe", transcribe), Node("summarize", summarize, deps=["transcribe"])]
        result = await executor.run_pipeline("meeting-notes", nodes)
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"interrupted: {result.cancelled} ({result.cancel_reason})")
    print(f"kept: {result.results}")
    await executor.aclose()


if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(main())
