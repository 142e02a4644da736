"""The ``cancelflow`` command: ``demo`` and ``bench``; the tools beside the library.

:func:`main` is the console script ``cancelflow`` (and ``python -m cancelflow``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from cancelflow._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cancelflow",
        description=(
            "Run pipelines across asyncio, threads and processes, and stop them cleanly "
            "from anywhere."
        ),
        epilog=(
            "Run 'cancelflow COMMAND --help' for a command's options and exit codes. "
            "Start with 'cancelflow demo'."
        ),
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"cancelflow {__version__}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    from .bench import cli as bench
    from .demo import cli as demo

    demo.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cancelflow`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code
