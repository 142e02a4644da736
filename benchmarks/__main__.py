"""``python -m benchmarks``: the full cancelflow benchmark suite (``cancelflow bench``).

Writes ``bench-results.json`` and ``bench-results.png`` in the current directory unless
``--json`` / ``--plot`` say otherwise; every other option is ``cancelflow bench``'s
(``--quick``, ``--samples N``, ``--rounds R``, ``--scenarios ...``, ``--systems ...``,
``--seed``). Each cell's samples are split into ``R`` rounds (3 by default) in which every
system is measured in turn, in an order rotated per round; cells measured while other
processes loaded the machine are marked noisy (``~``).
The suite itself is the bench that ships with cancelflow (``cancelflow._cli.bench``).
"""

from __future__ import annotations

import argparse
import sys

from cancelflow._cli.bench.cli import add_parser


def main_full(argv: list[str] | None = None) -> int:
    """``python -m benchmarks``: the full suite, writing JSON and PNG next to the cwd by default."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="cancelflow's full benchmark suite"
    )
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    if args.json is None:
        args.json = "bench-results.json"
    if args.plot is None:
        args.plot = "bench-results.png"
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main_full())
