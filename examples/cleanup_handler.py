"""Seed 000, "Registering Cleanup Handlers": a handler runs exactly once when the pipeline
is cancelled, after its running nodes have stopped.

Run: python examples/cleanup_handler.py
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile

from loguru import logger

from cancelflow import CancellationRegistry, CancelledException, Node, NodeContext, PipelineExecutor

scratch = tempfile.mkdtemp(prefix="cancelflow-example-")


async def cleanup_resource() -> None:
    # Code to clean up a resource
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"cleanup_resource: removed {scratch}")


async def download(ctx: NodeContext) -> str:
    ctx.context["running"].set()
    await asyncio.Event().wait()  # a download that would take a long time
    return "data"


async def main() -> None:
    registry = CancellationRegistry()
    executor = PipelineExecutor(registry, mode="interrupt")
    running = asyncio.Event()
    task = asyncio.create_task(
        executor.execute_pipeline("my_pipeline", [Node("download", download)], {"running": running})
    )
    await running.wait()

    registry.register_cleanup_handler("my_pipeline", cleanup_resource)
    await registry.cancel("my_pipeline", "User requested cancellation")
    print("cancel returned: the handler has run")
    # A second cancel is a no-op: handlers run exactly once.
    print(f"second cancel did something: {await registry.cancel('my_pipeline', 'again')}")
    try:
        await task
    except CancelledException as e:
        print(f"pipeline ended: {e.reason}")
    await executor.aclose()


if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(main())
