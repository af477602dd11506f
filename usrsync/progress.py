"""Terminal interaction during a run: progress bars (TTY only) and the confirmation question."""

from __future__ import annotations

import sys

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from usrsync import audit, render
from usrsync.plan import TransferPlan
from usrsync.sync import Hooks


class Bars:
    """Hashing and transfer bars; the shown percentage never goes backwards."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeRemainingColumn(), console=render.stderr, transient=True,
        )
        self.tasks: dict[str, int] = {}
        self.started = False

    def _task(self, name: str, total: int | None) -> int:
        if not self.started:
            self.progress.start()
            self.started = True
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total)
        return self.tasks[name]

    def hashing(self, side: str, files: int, nbytes: int) -> None:
        task = self._task(f"hashing {side}", None)
        self.progress.update(task, completed=nbytes, description=f"hashing {side} ({files} files)")

    def transfer(self, files: int, nbytes: int, total: int) -> None:
        task = self._task("transfer", total)
        done = max(self.progress.tasks[task].completed, min(nbytes, total))
        self.progress.update(task, completed=done, description=f"transfer ({files} files)")

    def stop(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False


def hooks_for(action: str, *, show_progress: bool, ask: bool) -> Hooks:
    bars = Bars() if show_progress and sys.stderr.isatty() else None

    def confirm(data: audit.AuditData, plan: TransferPlan) -> bool:
        if bars is not None:
            bars.stop()
        render.stdout.print(render.section_table(data))
        question = (f"{action} {plan.bytes and render.human_bytes(plan.bytes) or '0 B'} in {len(plan.copy)} files, "
                    f"delete {len(plan.delete)}?")
        return click.confirm(question, default=False, err=True)

    return Hooks(
        confirm=confirm if ask else None,
        hash_progress=bars.hashing if bars else None,
        transfer_progress=bars.transfer if bars else None,
    )
