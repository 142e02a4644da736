"""What a thread node that ignores its token costs a Dask worker after a cancel.

On a ``LocalCluster`` of one worker process with one thread (127.0.0.1), a thread node
sleeps ``SECONDS`` without checking its token. Right after it started it is cancelled
(``grace_period`` 0.1 s: ``run_sync`` raises then); a plain Dask task is submitted at
once. Printed: when ``run_sync`` raised and when the plain task started, both counted
from the cancel. The worker's only thread stays with the abandoned node until it returns,
so the plain task waits for the rest of the node's run.

Run: ``python -m benchmarks.bench_dask_thread_node [samples]``
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

from distributed import Client, LocalCluster

from cancelflow import CancellationToken, CancelledException, DaskRunner, store_partial

SECONDS = 3.0


def sleeper(seconds: float) -> None:
    store_partial("started", time.time())
    time.sleep(seconds)  # never looks at its token


async def sample(runner: DaskRunner, client: Any) -> tuple[float, float]:
    token = CancellationToken()
    started = asyncio.Event()
    call = asyncio.ensure_future(
        runner.run_sync(sleeper, SECONDS, token=token, partial_sink=lambda k, v: started.set())
    )
    await started.wait()
    cancelled_at = time.time()
    token.cancel("bench")
    plain = client.submit(time.time, pure=False)
    try:
        await call
    except CancelledException:
        raised_at = time.time()
    plain_started = await plain
    return raised_at - cancelled_at, plain_started - cancelled_at


async def main(samples: int) -> None:
    async with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            asynchronous=True,
        ) as cluster,
        Client(cluster, asynchronous=True) as client,
        DaskRunner(client, run_in="thread", grace_period=0.1) as runner,
    ):
        raised, waited = [], []
        for _ in range(samples):
            r, w = await sample(runner, client)
            raised.append(r)
            waited.append(w)
        print(
            f"thread node sleeping {SECONDS:g}s, cancelled right after it started, {samples} samples"
        )
        print(f"  cancel -> run_sync raised             median {statistics.median(raised):.3f} s")
        print(f"  cancel -> next plain Dask task starts median {statistics.median(waited):.3f} s")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
