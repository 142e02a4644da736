"""What ``cancelflow bench`` measures: the systems, the scenarios, their variants and metrics.

Each scenario is measured by a module of this package (``stop``: 1 and 2, ``coop``: 3,
``coroutine``: 4, ``pipeline``: 5, ``crash``: 6, ``overhead``: 7; ``pool_group`` runs
1, 2, 3 in a process and 6 on one long-lived pool per system).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Every system the suite reports on, in table order.
SYSTEMS: tuple[str, ...] = (
    "cancelflow",
    "raw",
    "pebble",
    "loky",
    "concurrent.futures",
    "multiprocessing.Pool",
    "anyio",
    "trio-parallel",
    "asyncio",
)

SYSTEM_TITLES = {
    "cancelflow": "cancelflow",
    "raw": "raw multiprocessing.Process + SIGKILL (the floor)",
    "pebble": "pebble",
    "loky": "loky",
    "concurrent.futures": "concurrent.futures",
    "multiprocessing.Pool": "multiprocessing.Pool",
    "anyio": "anyio",
    "trio-parallel": "trio-parallel",
    "asyncio": "asyncio run_in_executor",
}


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str  # "ms", "tasks/s", "ns", "results"
    higher_is_better: bool = False


@dataclass(frozen=True)
class Variant:
    key: str
    title: str
    metrics: tuple[Metric, ...]


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    variants: tuple[Variant, ...]


_CALLER = Metric("caller_unblocked", "cancel -> caller unblocked", "ms")
_GONE = Metric("worker_gone", "cancel -> worker process gone", "ms")
_NEXT = Metric("next_task", "cancel -> next task ran", "ms")
_GRAND = Metric("grandchild_gone", "cancel -> grandchild gone", "ms")
_RAISES = Metric("caller_raises", "cancel -> caller raises", "ms")
_STOPPED = Metric("task_stopped", "cancel -> task's finally ran", "ms")
_EXC = Metric("exception", "cancel -> exception", "ms")
_KEPT = Metric("partial_kept", "partial results kept", "results", higher_is_better=True)
_ERROR = Metric("caller_error", "crash -> caller gets the error", "ms")
_AGAIN = Metric("pool_runs_again", "crash -> pool ran the next task", "ms")
_TPUT = Metric(
    "throughput", "trivial tasks per second, 2 workers", "tasks/s", higher_is_better=True
)
_TPUT8 = Metric(
    "throughput", "trivial tasks per second, 8 workers", "tasks/s", higher_is_better=True
)
_CHECK = Metric("check_cost", "one check, net of the loop", "ns")

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "1",
        "Non-cooperative CPU task in a process (1 worker)",
        (
            Variant("loop", "pure-Python `while True` loop", (_CALLER, _GONE, _NEXT)),
            Variant(
                "c_call",
                "one long C call (hashlib.pbkdf2_hmac): no signal handler runs",
                (_CALLER, _GONE, _NEXT),
            ),
        ),
    ),
    Scenario(
        "2",
        "Task that started a grandchild process (`sleep 300`), then loops",
        (Variant("grandchild", "grandchild gone afterwards?", (_CALLER, _GONE, _GRAND)),),
    ),
    Scenario(
        "3",
        "Cooperative task checking its token (or stop flag) in a loop",
        (
            Variant("process", "in a process (peers poll a shared-memory byte)", (_RAISES,)),
            Variant("thread", "in a thread (peers poll a threading.Event)", (_RAISES, _STOPPED)),
        ),
    ),
    Scenario(
        "4",
        "Coroutine on the event loop, interrupt mode",
        (
            Variant(
                "coroutine",
                "cancel -> CancelledException (asyncio/anyio: their Cancelled)",
                (_RAISES,),
            ),
        ),
    ),
    Scenario(
        "5",
        "3-wave pipeline (loop + thread + process nodes) cancelled mid-wave 1",
        (
            Variant("graceful", "graceful: the running wave finishes", (_EXC, _KEPT)),
            Variant("interrupt", "interrupt: running nodes are stopped", (_EXC, _KEPT)),
        ),
    ),
    Scenario(
        "6",
        "Worker crash (1 worker)",
        (
            Variant("exit", "the task calls os._exit(3)", (_ERROR, _AGAIN)),
            Variant("segfault", "the task segfaults (NULL read)", (_ERROR, _AGAIN)),
        ),
    ),
    Scenario(
        "7",
        "Throughput and token-check cost",
        (
            Variant(
                "processes",
                "batches of 2,000 trivial tasks (400 with --quick), 2 worker processes",
                (_TPUT,),
            ),
            Variant(
                "processes_main",
                "the same, the function defined in the program's __main__ (a script's or "
                "a REPL's; sent by value where the pool cannot name it)",
                (_TPUT,),
            ),
            Variant(
                "threads",
                "batches of 2,000 trivial tasks (400 with --quick), 2 worker threads",
                (_TPUT,),
            ),
            Variant(
                "threads8",
                "batches of 2,000 trivial tasks (400 with --quick), 8 worker threads",
                (_TPUT8,),
            ),
            Variant("token_check", "cost of one cancellation check", (_CHECK,)),
        ),
    ),
)
