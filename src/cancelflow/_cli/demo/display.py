"""Live progress while the demo runs: one bar per node with rich, plain lines otherwise."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

from .render import fit_line, terminal_width


class Display:
    """Live progress: one line per event, progress at each quarter (plain text)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._labels: dict[str, str] = {}
        self._quarters: dict[str, int] = {}
        #: lines are wrapped to this width, as the summary is
        self.width = terminal_width()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except BrokenPipeError:  # e.g. piped into head: the demo goes on, silently
                silence(self.stream)

    def note(self, text: str) -> None:
        """An event line (cancel, wave started, cleanup ran...)."""
        self._write(self._stamped(text))

    def _stamped(self, text: str) -> str:
        """``text`` after the time stamp, wrapped to the width under its first word."""
        indent = 9 + len(text) - len(text.lstrip(" ")) + 2
        line = f"{time.perf_counter() - self.t0:6.2f}s  {text}"
        return "\n".join(fit_line(line, self.width, indent))

    def add_node(self, key: str, label: str) -> None:
        self._labels[key] = label
        self._quarters[key] = 0

    def progress(self, key: str, done: float) -> None:
        quarter = int(min(done, 0.99) * 4)
        if quarter > self._quarters.get(key, 0):
            self._quarters[key] = quarter
            self.note(f"  {self._labels[key]}  {quarter * 25}%")

    def status(self, key: str, status: str, detail: str = "") -> None:
        self.note(f"  {self._labels[key]}  {status}" + (f" ({detail})" if detail else ""))

    def block(self, text: str) -> None:
        """The final summary."""
        self._write(text)


class _RichDisplay(Display):
    """Live progress bars drawn with ``rich`` (only when it is importable and on a terminal)."""

    _STYLES: Mapping[str, str] = {
        "waiting": "dim",
        "running": "cyan",
        "finished": "green",
        "cancelled": "yellow",
        "killed": "bold red",
        "terminated": "red",
        "failed": "bold red",
        "crashed": "bold red",
        "abandoned": "red",
        "timed_out": "red",
        "not started": "dim",
    }

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        from rich.console import Console  # type: ignore[import-not-found,unused-ignore]
        from rich.progress import (  # type: ignore[import-not-found,unused-ignore]
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
        )
        from rich.table import Column  # type: ignore[import-not-found,unused-ignore]

        self.console: Any = Console(file=stream, highlight=False)
        # The node's name and the percentage never shrink; the bar takes what is left
        # after a status of ~24 columns, and a long status is cut with an ellipsis
        # rather than squeezing the other columns (80 columns read well).
        width = self.console.width
        self.width = width
        self.bars: Any = Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=max(8, min(28, width - 58))),
            TaskProgressColumn(table_column=Column(no_wrap=True, width=5)),
            TextColumn(
                "{task.fields[status]}",
                table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
            ),
            console=self.console,
            refresh_per_second=10,
            expand=True,
        )
        self._tasks: dict[str, Any] = {}

    def start(self) -> None:
        self.bars.start()

    def stop(self) -> None:
        self.bars.stop()

    def note(self, text: str) -> None:
        self.console.print(self._stamped(text), markup=False, highlight=False, soft_wrap=True)

    def add_node(self, key: str, label: str) -> None:
        super().add_node(key, label)
        self._tasks[key] = self.bars.add_task(label, total=1.0, status="[dim]waiting[/]")

    def progress(self, key: str, done: float) -> None:
        self.bars.update(self._tasks[key], completed=min(done, 1.0))

    def status(self, key: str, status: str, detail: str = "") -> None:
        style = self._STYLES.get(status, "")
        text = f"[{style}]{status}[/]" if style else status
        if detail:
            text += f" [dim]{_escape(detail)}[/]"
        update: dict[str, Any] = {"status": text}
        if status == "finished":
            update["completed"] = 1.0
        self.bars.update(self._tasks[key], **update)

    def block(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def silence(stream: TextIO) -> None:
    """Point ``stream`` at /dev/null so that writing (and flushing at exit) stops failing."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def make_display(stream: TextIO, plain: bool) -> Display:
    if not plain and stream.isatty() and os.environ.get("TERM") != "dumb":
        try:
            return _RichDisplay(stream)
        except ImportError:  # rich is optional: pip install 'cancelflow[demo]'
            pass
    return Display(stream)
