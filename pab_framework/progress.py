"""What a run shows while it works: rich progress bars on a terminal, plain log lines elsewhere
(CI, pipes, files). The engine writes through a Reporter, never with `print`."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


class Reporter:
    """One per process. `enabled` is False on ranks other than 0."""

    def __init__(self, console: Console | None = None, mode: str = "auto", enabled: bool = True):
        self.console = console or make_console()
        if mode == "auto":
            interactive = self.console.is_terminal and not os.environ.get("CI")
            mode = "rich" if interactive else "plain"
        self.mode = mode if enabled else "none"
        self._progress = None

    def log(self, message: str) -> None:
        if self.mode == "none":
            return
        if self._progress is not None:
            self._progress.console.print(message)
        else:
            self.console.print(message)

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        """A small table (per-layer figures, say); right-aligned after the first column."""
        if self.mode == "none":
            return
        from rich.table import Table  # (rich's tables and bars: only imported when drawn, tens of ms at start-up)

        t = Table(title=title, title_justify="left")
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*r)
        self.log(t)

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "") -> Iterator["Task"]:
        """A unit of long work (epochs, batches, pruning rounds)."""
        if self.mode == "rich":  # (imported here: see `table`)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            owner = self._progress is None
            if owner:
                self._progress = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    console=self.console,
                    transient=False,
                )
                self._progress.start()
            tid = self._progress.add_task(description, total=total, info="")
            try:
                yield Task(self, tid)
            finally:
                if owner:
                    self._progress.stop()
                    self._progress = None
                else:
                    self._progress.remove_task(tid)
        else:
            yield Task(self, None, description, total)


class Task:
    def __init__(self, reporter: Reporter, tid, description: str = "", total: int | None = None):
        self.r = reporter
        self.tid = tid
        self.description = description
        self.total = total
        self.done = 0
        self._last = time.monotonic()

    def advance(self, n: int = 1, info: str | None = None, log: bool = False) -> None:
        """Move on; `info` shows beside the bar, and on a plain display when `log` is set."""
        self.done += n
        if self.r.mode == "rich" and self.r._progress is not None:
            if info is not None:
                self.r._progress.update(self.tid, advance=n, info=info)
            else:
                self.r._progress.update(self.tid, advance=n)
        elif self.r.mode == "plain" and log:
            total = f"/{self.total}" if self.total else ""
            self.r.log(f"{self.description} {self.done}{total}" + (f"  {info}" if info else ""))

    def set_total(self, total: int) -> None:
        self.total = total
        if self.r.mode == "rich" and self.r._progress is not None:
            self.r._progress.update(self.tid, total=total)

    def reset(self, description: str | None = None, total: int | None = None) -> None:
        self.done = 0
        if description:
            self.description = description
        if total is not None:
            self.total = total
        if self.r.mode == "rich" and self.r._progress is not None:
            self.r._progress.reset(self.tid, total=total, description=description or self.description)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
