"""Terminal interaction during a run: progress bars (TTY only) and the confirmation question."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from usrsync import audit, render
from usrsync.plan import TransferPlan
from usrsync.sync import Hooks


class Bars:
    """Hashing and transfer bars; the shown percentage never goes backwards."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=render.stderr, transient=True,
        )
        self.tasks: dict[str, int] = {}
        self.shown: dict[str, int] = {}  # bytes shown per bar: it only ever grows
        self.labels: dict[str, str] = {}
        self.started = False

    def hashing(self, side: str, files: int, nbytes: int, total_files: int, total_bytes: int) -> None:
        name = f"hashing {side}"
        if files == 0 and name in self.tasks:
            # A later scan of that side (the checks after the copy): a bar of its own, so that no
            # bar ever goes back to 0 %.
            self.progress.remove_task(self.tasks.pop(name))
            del self.shown[name]
            self.labels[name] = f"checking {side}"
        label = self.labels.get(name, name)
        self._advance(name, nbytes, total_bytes, f"{label} ({files}/{total_files} files)")

    def transfer(self, files: int, nbytes: int, total: int) -> None:
        self._advance("transfer", nbytes, total, f"transfer ({files} files)")

    def _advance(self, name: str, done: int, total: int, description: str) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if name not in self.tasks:  # created with its description: a refresh may come before update()
            self.tasks[name] = self.progress.add_task(description, total=total)
        self.shown[name] = max(self.shown.get(name, 0), min(done, total))
        self.progress.update(self.tasks[name], completed=self.shown[name], description=description)

    def stop(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False


@contextlib.contextmanager
def terminal_hooks(action: str, *, show_progress: bool, ask: bool) -> Iterator[Hooks]:
    """The run's hooks; on leaving, the bars are gone and the terminal's cursor is back."""
    bars = Bars() if show_progress and sys.stderr.isatty() else None

    def confirm(data: audit.AuditData, plan: TransferPlan) -> bool:
        if bars is not None:
            bars.stop()
        render.stdout.print(render.section_table(data))
        question = (f"{action} {plan.bytes and render.human_bytes(plan.bytes) or '0 B'} in {len(plan.copy)} files, "
                    f"delete {len(plan.delete)}?")
        return click.confirm(question, default=False, err=True)

    try:
        yield Hooks(
            confirm=confirm if ask else None,
            hash_progress=bars.hashing if bars else None,
            transfer_progress=bars.transfer if bars else None,
        )
    finally:
        if bars is not None:
            bars.stop()
