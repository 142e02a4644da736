"""PipelineExecutor benchmarks.

1. Overhead: a 1,000-node pipeline of trivial coroutine nodes (one wave, and ten waves of
   100) against plain ``asyncio.gather`` of the same coroutines. Goal: at most 2x.
2. Latency: cancel -> ``CancelledException`` for coroutine nodes in interrupt mode, from
   ``token.cancel()`` on the caller's token to the exception reaching the caller (every
   node stopped, cleanup run, pipeline unregistered), p50 and p99.

Run: ``python -m benchmarks.bench_executor`` (``--help`` for the knobs). Library log
output is switched off: this measures the executor, not the log sink.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Awaitable, Callable

from loguru import logger

from cancelflow import (
    CancellationToken,
    CancelledException,
    Node,
    NodeContext,
    PipelineExecutor,
)


async def trivial(ctx: NodeContext) -> int:
    return 1


async def wait_forever(ctx: NodeContext) -> None:
    started: asyncio.Event = ctx.context["started"]
    started.set()
    await asyncio.Event().wait()


def flat(n: int) -> list[Node]:
    return [Node(f"n{i}", trivial) for i in range(n)]


def layered(n: int, waves: int) -> list[Node]:
    width = n // waves
    nodes: list[Node] = []
    for w in range(waves):
        deps = [f"w{w - 1}n{i}" for i in range(width)] if w else []
        nodes += [Node(f"w{w}n{i}", trivial, deps=deps[i : i + 1]) for i in range(width)]
    return nodes


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    gc.collect()
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def overhead(n: int, repeat: int) -> None:
    executor = PipelineExecutor()
    token = CancellationToken()
    ctx = NodeContext(token, {}, {}, "baseline", "n")

    async def baseline() -> None:
        await asyncio.gather(*(trivial(ctx) for _ in range(n)))

    print(f"overhead, {n} trivial coroutine nodes (median of {repeat} interleaved runs)")
    print(f"  {'shape':<22}{'executor':>12}{'gather':>12}{'ratio':>8}")
    for name, nodes in (("1 wave", flat(n)), ("10 waves of 100", layered(n, 10))):

        async def pipeline(nodes: list[Node] = nodes) -> None:
            await executor.execute_pipeline("bench", nodes)

        ran: list[float] = []
        base: list[float] = []
        for i in range(repeat + 3):  # the first 3 are warm-up
            # Alternate which goes first, so drift in the machine's load hits both alike.
            first, second = (pipeline, baseline) if i % 2 else (baseline, pipeline)
            a, b = await timed(first), await timed(second)
            if i >= 3:
                ran.append(a if first is pipeline else b)
                base.append(b if first is pipeline else a)
        r, g = statistics.median(ran), statistics.median(base)
        print(f"  {name:<22}{r * 1e3:>10.2f}ms{g * 1e3:>10.2f}ms{r / g:>7.2f}x")
    await executor.aclose()


async def latency(samples: int, width: int) -> None:
    executor = PipelineExecutor(mode="interrupt")
    results = []
    for i in range(samples):
        started = asyncio.Event()
        token = CancellationToken()
        nodes = [Node(f"n{j}", wait_forever) for j in range(width)]
        task = asyncio.create_task(
            executor.execute_pipeline(f"lat{i}", nodes, {"started": started}, cancel_token=token)
        )
        await started.wait()
        await asyncio.sleep(0)  # let the whole wave start
        start = time.perf_counter()
        token.cancel("bench")
        try:
            await task
        except CancelledException:
            results.append(time.perf_counter() - start)
    results.sort()
    p50 = results[len(results) // 2]
    p99 = results[min(len(results) - 1, int(len(results) * 0.99))]
    print(
        f"  {width:>4} running node(s): p50 {p50 * 1e6:8.1f} us   p99 {p99 * 1e6:8.1f} us"
        f"   ({samples} samples)"
    )
    await executor.aclose()


async def main(args: argparse.Namespace) -> None:
    await overhead(args.nodes, args.repeat)
    print("cancel -> CancelledException latency, coroutine nodes, interrupt mode")
    for width in (1, 100):
        await latency(args.samples, width)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--samples", type=int, default=500)
    logger.remove()
    asyncio.run(main(parser.parse_args()))
