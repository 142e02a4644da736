"""The nodes of ``cancelflow demo``'s pipeline.

They live at module level, in a module of the package, so that the process pool's workers
can import them. Every node reports how far it got with ``ctx.store_partial("so_far",
{..., "done": fraction})``: the demo draws its progress bars from those partial results,
and they are what survives when a node is cancelled or killed.

The pipeline builds a small report::

    wave 0  event loop   fetch_orders, fetch_prices       simulated I/O (asyncio.sleep)
    wave 1  threads      parse_orders, parse_prices       blocking work; they check their token
    wave 2  processes    score_orders                     CPU work; checks its token
                         simulate_risk                    pure-Python loop; never checks it
                                                          (a finally block stores its estimate)
                         render_chart                     starts a child process, waits for it
                         archive_orders                   starts a child process; ignores its
                                                          token and SIGTERM
    wave 3  event loop   publish_report

Cancelled, the three process nodes that do not finish within the grace show the pool's
stop ladder, one step each: ``score_orders`` stops at its token (*cancelled*);
``simulate_risk`` does not, but the SIGTERM that follows becomes an exception in its loop
and its ``finally`` runs (*terminated*); ``archive_orders`` ignores SIGTERM too, so only
SIGKILL of its worker and its process tree ends it (*killed*), and its ``finally`` never
runs. Both store ``"finally"`` in their ``finally`` block (``pipeline.WITH_FINALLY``): the
demo reads that partial result as the proof that the block ran.

How long each one works comes from the pipeline's context (``io_seconds``,
``cpu_seconds``, ``render_seconds``, ``archive_seconds``), so the demo can run a
full-size and a quick request. With ``report_pid`` in the context (``--dask``), each
process node first stores the pid of the process it runs in, so that the demo can check
whether that process outlived it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cancelflow._context import check_cancelled
from cancelflow._node import NodeContext

__all__ = (
    "archive_orders",
    "fetch_orders",
    "fetch_prices",
    "parse_orders",
    "parse_prices",
    "publish_report",
    "render_chart",
    "score_orders",
    "simulate_risk",
)

_PAGES = 5
_REPORT_EVERY = 0.1  # seconds between two progress reports of a CPU node


def _seconds(ctx: NodeContext, key: str) -> float:
    return float(ctx.context[key])


def _report_pid(ctx: NodeContext) -> None:
    """On Dask the client cannot see which process ran a node: the node says so."""
    if ctx.context.get("report_pid"):
        ctx.store_partial("pid", os.getpid())


async def _fetch(ctx: NodeContext, per_page: int) -> int:
    """Fetch ``_PAGES`` pages from a (simulated) remote API, one await per page."""
    pause = _seconds(ctx, "io_seconds") / _PAGES
    items = 0
    for page in range(1, _PAGES + 1):
        await asyncio.sleep(pause)  # the network round trip
        items += per_page
        ctx.store_partial("so_far", {"pages": page, "items": items, "done": page / _PAGES})
    return items


async def fetch_orders(ctx: NodeContext) -> dict[str, int]:
    """Wave 0, on the event loop: page through the orders API."""
    return {"orders": await _fetch(ctx, per_page=48)}


async def fetch_prices(ctx: NodeContext) -> dict[str, int]:
    """Wave 0, on the event loop: page through the price list."""
    return {"prices": await _fetch(ctx, per_page=20)}


def _parse(ctx: NodeContext, source: str, name: str) -> dict[str, Any]:
    """Blocking work in a thread, in steps; checks its token between steps."""
    count = int(ctx.inputs[source][name])
    steps = 5
    pause = _seconds(ctx, "io_seconds") / steps
    for step in range(1, steps + 1):
        time.sleep(pause)  # blocking parsing / disk I/O
        check_cancelled()  # a cancelled token raises CancelledException here
        ctx.store_partial("so_far", {"rows": count * step // steps, "done": step / steps})
    path = Path(ctx.context["scratch"]) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)  # on a Dask worker of another machine
    path.write_text(json.dumps(list(range(count))))
    return {"rows": count, "file": path.name}


def parse_orders(ctx: NodeContext) -> dict[str, Any]:
    """Wave 1, in a thread: parse the orders into a scratch file."""
    return _parse(ctx, "fetch_orders", "orders")


def parse_prices(ctx: NodeContext) -> dict[str, Any]:
    """Wave 1, in a thread: parse the prices into a scratch file."""
    return _parse(ctx, "fetch_prices", "prices")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    divisor = 3
    while divisor * divisor <= n:
        if n % divisor == 0:
            return False
        divisor += 2
    return True


def score_orders(ctx: NodeContext) -> dict[str, int]:
    """Wave 2, in a process: CPU-bound scoring that checks its token between chunks.

    Cancelled, it stops at its next check (within one chunk, a few milliseconds) by
    raising ``CancelledException``: the pool reports it as *cancelled*, not killed.
    """
    _report_pid(ctx)
    seconds = _seconds(ctx, "cpu_seconds")
    start = time.monotonic()
    next_report = start + _REPORT_EVERY
    number, scored = 1, 0
    while True:
        ctx.token.raise_if_cancelled()  # one read of shared memory: cheap in a hot loop
        for candidate in range(number, number + 500):
            scored += _is_prime(candidate)
        number += 500
        now = time.monotonic()
        done = min(1.0, (now - start) / seconds)
        if now >= next_report or done >= 1.0:
            next_report = now + _REPORT_EVERY
            ctx.store_partial(
                "so_far", {"checked": number - 1, "scored": scored, "done": round(done, 3)}
            )
        if done >= 1.0:
            return {"checked": number - 1, "scored": scored}


def simulate_risk(ctx: NodeContext) -> dict[str, Any]:
    """Wave 2, in a process: a Monte-Carlo loop in pure Python that never checks its token.

    Cancelled, it keeps running until the pool's stop ladder reaches SIGTERM (after the
    grace period), which the worker turns into an exception (``Terminated``) in this
    loop: its ``finally`` block runs and stores the estimate so far (``"finally"``), and
    the pool reports it as *terminated*. What it stored before is kept as well.
    """
    _report_pid(ctx)
    seconds = _seconds(ctx, "cpu_seconds")
    rng = random.Random(7)
    start = time.monotonic()
    next_report = start + _REPORT_EVERY
    samples = hits = 0
    try:
        while True:
            for _ in range(5_000):
                x, y = rng.random(), rng.random()
                hits += x * x + y * y <= 1.0
            samples += 5_000
            now = time.monotonic()
            done = min(1.0, (now - start) / seconds)
            if now >= next_report or done >= 1.0:
                next_report = now + _REPORT_EVERY
                estimate = round(4 * hits / samples, 5)
                ctx.store_partial(
                    "so_far", {"samples": samples, "pi": estimate, "done": round(done, 3)}
                )
            if done >= 1.0:
                return {"samples": samples, "pi": round(4 * hits / samples, 5)}
    finally:
        # Runs when the loop returns and when SIGTERM raised in it; never after SIGKILL.
        pi = round(4 * hits / samples, 5) if samples else None
        ctx.store_partial("finally", {"samples": samples, "pi": pi})


# The helper process: sleeps a while (the work), then writes its output file.
_CHILD = (
    "import sys, time\ntime.sleep(float(sys.argv[1]))\nopen(sys.argv[2], 'w').write(sys.argv[3])\n"
)


def _run_helper(ctx: NodeContext, seconds: float, path: Path, content: str) -> None:
    """Start a helper process that writes ``content`` to ``path`` after ``seconds``, and
    wait for it, reporting progress; its pid is stored as ``helper_pid``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    helper = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _CHILD, str(seconds), str(path), content],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ctx.store_partial("helper_pid", helper.pid)
    start = time.monotonic()
    while True:
        try:
            code = helper.wait(timeout=_REPORT_EVERY)
        except subprocess.TimeoutExpired:
            waited = time.monotonic() - start
            done = round(min(0.99, waited / seconds), 3)
            ctx.store_partial("so_far", {"waited_s": round(waited, 2), "done": done})
            continue
        if code != 0:
            raise RuntimeError(f"the helper process exited with code {code}")
        ctx.store_partial("so_far", {"waited_s": round(time.monotonic() - start, 2), "done": 1.0})
        return


def render_chart(ctx: NodeContext) -> dict[str, Any]:
    """Wave 2, in a process: start a helper process of its own and wait for it.

    It never checks its token. If its worker is stopped, the pool kills the helper too
    (the whole process tree of the task), and the demo checks that the helper is gone.
    """
    _report_pid(ctx)
    path = Path(ctx.context["scratch"]) / "chart.svg"
    svg = '<svg xmlns="http://www.w3.org/2000/svg"/>'
    _run_helper(ctx, _seconds(ctx, "render_seconds"), path, svg)
    return {"chart": path.name, "bytes": path.stat().st_size}


def archive_orders(ctx: NodeContext) -> dict[str, Any]:
    """Wave 2, in a process: archive the orders with a helper process, ignoring SIGTERM.

    Like a library or tool that ignores SIGTERM while it works (``SIG_IGN``, set here on
    purpose), it never checks its token and the ladder's SIGTERM does nothing: only the
    last step, SIGKILL of its worker and of its process tree (the helper included), ends
    it. Its ``finally`` block (which would store ``"finally"``) does not run then. The
    pool puts the worker's SIGTERM handler back after each task.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # first: before any SIGTERM can come
    _report_pid(ctx)
    path = Path(ctx.context["scratch"]) / "orders.archive"
    try:
        _run_helper(ctx, _seconds(ctx, "archive_seconds"), path, "archived orders\n")
        return {"archive": path.name, "bytes": path.stat().st_size}
    finally:
        # Runs when the node returns or raises; never after SIGKILL.
        ctx.store_partial("finally", {"archive_exists": path.exists()})


async def publish_report(ctx: NodeContext) -> dict[str, Any]:
    """Wave 3, on the event loop: publish the report (simulated upload)."""
    steps = 4
    for step in range(1, steps + 1):
        await asyncio.sleep(_seconds(ctx, "io_seconds") / 2 / steps)
        ctx.store_partial("so_far", {"done": step / steps})
    return {
        "orders": ctx.inputs["score_orders"]["checked"],
        "risk_pi": ctx.inputs["simulate_risk"]["pi"],
        "chart": ctx.inputs["render_chart"]["chart"],
        "archive": ctx.inputs["archive_orders"]["archive"],
    }
