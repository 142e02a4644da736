"""``cancelflow bench``: the command's options, and the measuring process it starts."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .harness import Settings, progress
from .plot import write_plot
from .report import format_report, goals, headline
from .run import run_bench
from .scenarios import SCENARIOS, SYSTEMS


def add_parser(sub: Any) -> None:
    """Register ``cancelflow bench`` on the CLI's subparsers."""
    parser = sub.add_parser(
        "bench",
        help="measure cancellation latency and overhead against the peers",
        description=(
            "Measure cancelflow and its peers (pebble, loky, concurrent.futures, "
            "multiprocessing, anyio, trio-parallel, asyncio, a raw fork+SIGKILL floor) on "
            "the same work in one run; print p50/p90/p99/max per cell and cancelflow/peer ratios."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="a handful of samples per cell (well under a minute)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        metavar="N",
        help="samples per cell (default 30, quick 3)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        metavar="R",
        help=(
            "split each cell's samples into R rounds; in each round every system is measured "
            "in turn, in an order rotated per round (default 3, quick 1)"
        ),
    )
    parser.add_argument(
        "--json", metavar="PATH", help="write every raw sample and the leak report as JSON"
    )
    parser.add_argument(
        "--plot", metavar="PATH", help="write the latency distributions as PNG (needs matplotlib)"
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=[s.key for s in SCENARIOS],
        metavar="N",
        help="only these scenarios (1-7)",
    )
    parser.add_argument(
        "--systems", nargs="+", choices=list(SYSTEMS), metavar="NAME", help="only these systems"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random pauses (default 1)")
    parser.set_defaults(run=run)


def settings_from(args: argparse.Namespace) -> Settings:
    quick = bool(args.quick)
    samples = args.samples if args.samples is not None else (3 if quick else 30)
    if samples < 1:
        raise SystemExit("--samples must be >= 1")
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    if rounds < 1:
        raise SystemExit("--rounds must be >= 1")
    return Settings(
        quick=quick,
        samples=samples,
        scenarios=tuple(args.scenarios) if args.scenarios else tuple(s.key for s in SCENARIOS),
        systems=tuple(args.systems) if args.systems else SYSTEMS,
        seed=args.seed,
        tasks=400 if quick else 2000,
        check_calls=20_000 if quick else 200_000,
        rounds=rounds,
    )


# The measuring process is started as ``python -c``: its ``__main__`` then has no file, so
# the workers of spawn-based peers (loky, anyio, trio-parallel), which re-import the
# parent's main module, do not import a script that imports cancelflow (~250 ms each).
_CHILD = "import sys; from cancelflow._cli.bench.cli import child_main; sys.exit(child_main(sys.argv[1:]))"


def _argv(args: argparse.Namespace) -> list[str]:
    argv: list[str] = []
    if args.quick:
        argv.append("--quick")
    if args.samples is not None:
        argv += ["--samples", str(args.samples)]
    if args.rounds is not None:
        argv += ["--rounds", str(args.rounds)]
    if args.json:
        argv += ["--json", os.path.abspath(args.json)]
    if args.plot:
        argv += ["--plot", os.path.abspath(args.plot)]
    if args.scenarios:
        argv += ["--scenarios", *args.scenarios]
    if args.systems:
        argv += ["--systems", *args.systems]
    argv += ["--seed", str(args.seed)]
    return argv


def run(args: argparse.Namespace) -> int:
    """Run ``cancelflow bench`` (in a fresh ``python -c`` process, see ``_CHILD``)."""
    import subprocess

    settings_from(args)  # reject bad options here
    try:
        return subprocess.call([sys.executable, "-c", _CHILD, *_argv(args)])
    except KeyboardInterrupt:
        return 130


def child_main(argv: list[str]) -> int:
    """The measuring process: parse the options again and run the suite here."""
    parser = argparse.ArgumentParser(prog="cancelflow bench")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    return measure(parser.parse_args(["bench", *argv]))


def measure(args: argparse.Namespace) -> int:
    """Run the suite in this process; exit code 1 if a cell failed (a "cannot" is a result)."""
    settings = settings_from(args)
    progress(
        f"cancelflow bench: {'quick' if settings.quick else 'full'} run, {settings.samples} "
        f"samples per cell in {settings.rounds} round(s)"
    )
    data = run_bench(settings)
    data["headline"] = headline(data)
    data["goals"] = goals(data)
    print(format_report(data))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(data, file, indent=1)
        print(f"\nraw samples written to {args.json}")
    if args.plot:
        print(write_plot(data, args.plot))
    failed = [r for r in data["rows"] if r["status"] == "error"]
    if failed:
        print(
            f"{len(failed)} cells failed: "
            + ", ".join(f"{r['scenario']}/{r['variant']} {r['system']}" for r in failed)
        )
    return 1 if failed else 0
