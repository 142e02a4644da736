"""Seed 004, "WhatsApp Message Queue Pattern": a new message cancels the reply being
prepared for the previous one, waits for it to end gracefully, then is answered.

Shown twice: the seed's code as written (on a small ``Orchestrator`` around
``PipelineExecutor.run_pipeline``), then the built-in ``run_superseding``.

Run: python examples/message_queue.py
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from loguru import logger

from cancelflow import CancellationToken, Node, NodeContext, PipelineExecutor, PipelineResult


async def understand(ctx: NodeContext) -> str:
    ctx.context["started"].set()
    await asyncio.sleep(0.05)  # a model call
    return f"intent of {ctx.context['message']!r}"


async def check_availability(ctx: NodeContext) -> str:
    await asyncio.sleep(0.05)  # a PMS call
    return "2 rooms free"


async def reply(ctx: NodeContext) -> str:
    return f"reply to {ctx.context['message']!r}: {ctx.inputs['availability']}"


def tools() -> list[Node]:
    return [
        Node("intent", understand),
        Node("availability", check_availability, deps=["intent"]),
        Node("reply", reply, deps=["availability"]),
    ]


class Orchestrator:
    def __init__(self, executor: PipelineExecutor) -> None:
        self.executor = executor
        self.count = 0

    async def process_message(
        self, message: str, cancel_token: CancellationToken | None = None, **context: Any
    ) -> PipelineResult:
        self.count += 1
        context = {"message": message, **context}
        return await self.executor.run_pipeline(
            f"message-{self.count}", tools(), context, cancel_token=cancel_token
        )


def show(result: PipelineResult) -> None:
    if result.get("cancelled"):
        print(f"Cancelled: {result['cancel_reason']}")
        print(f"Partial results: {len(result['results'])} tools completed")
    else:
        print(result["results"]["reply"])


async def seed_pattern(orchestrator: Orchestrator) -> None:
    # Track current operation
    current_task: asyncio.Task[PipelineResult] | None = None
    current_token: CancellationToken | None = None

    async def handle_new_message(message: str, started: asyncio.Event) -> PipelineResult:
        nonlocal current_task, current_token

        # Cancel previous operation if still running
        if current_task and not current_task.done():
            assert current_token is not None
            current_token.cancel("New message received")
            show(await current_task)  # Wait for graceful cancellation

        # Start new operation with new token
        current_token = CancellationToken()
        current_task = asyncio.create_task(
            orchestrator.process_message(
                message=message, cancel_token=current_token, started=started
            )
        )
        return await current_task

    first_started = asyncio.Event()
    first = asyncio.create_task(handle_new_message("Do you have a room tomorrow?", first_started))
    await first_started.wait()
    show(await handle_new_message("Actually, for two nights", asyncio.Event()))
    await first


async def built_in(executor: PipelineExecutor) -> None:
    started = asyncio.Event()
    # mode="graceful": the seed's behaviour, the superseded reply finishes its running
    # wave. run_superseding interrupts by default, so that the newer message is answered
    # at once.
    first = asyncio.create_task(
        executor.run_superseding(
            "whatsapp:+15550100", tools(), {"message": "Hi", "started": started}, mode="graceful"
        )
    )
    await started.wait()
    second = asyncio.create_task(
        executor.run_superseding(
            "whatsapp:+15550100",
            tools(),
            {"message": "Room for tonight?", "started": asyncio.Event()},
            reason="New message received",
        )
    )
    for result in await asyncio.gather(first, second):
        show(result)


async def main() -> None:
    async with PipelineExecutor() as executor:
        print("-- seed pattern --")
        await seed_pattern(Orchestrator(executor))
        print("-- run_superseding --")
        await built_in(executor)


if __name__ == "__main__":
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(main())
