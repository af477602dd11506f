"""What the CLI prints: section tables, decision lines, errors. No logic beyond formatting."""

from __future__ import annotations

import os
import sys

import structlog
from rich.console import Console
from rich.table import Table

from usrsync import audit, log

SECTION_ROWS = (
    ("primary", "primary"),
    ("meta", "meta"),
    ("events", ".events.log"),
    ("snapshots", "_snapshots"),
    ("derived", "_derived"),
    ("auxiliary", "_auxiliary"),
)

# Off a terminal (cron logs, pipes) rich assumes 80 columns, which truncates the section table's
# names ("_snapsho…"); use a width that fits it unless COLUMNS says otherwise.
_PIPE_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
stdout = Console(highlight=False, soft_wrap=True, width=_PIPE_WIDTH)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def section_table(data: audit.AuditData) -> Table:
    table = Table(title=f"{data.action} {data.dataset} ↔ {data.remote.name}", title_justify="left")
    for column in ("section", "status", "local", "remote", "local-only", "remote-only", "differing"):
        table.add_column(column, justify="left" if column in ("section", "status") else "right")
    for attr, label in SECTION_ROWS:
        report = getattr(data, attr)
        if report is None:
            continue
        status = "skipped" if report.skipped else ("changed" if report.changed else "same")
        if attr == "primary":
            row = [_size(report.local_size), _size(report.remote_size), "", "", ""]
        elif attr == "meta":
            row = [_present(report.local_hash), _present(report.remote_hash), "", "", ""]
        elif attr == "events":
            row = [f"{report.local} lines", f"{report.remote} lines", str(report.local_past_common or ""),
                   str(report.remote_past_common or ""), report.relation if report.changed else ""]
        else:
            local = report.local_count if attr == "snapshots" else report.local_files
            remote = report.remote_count if attr == "snapshots" else report.remote_files
            row = [str(local), str(remote), str(len(report.local_only)), str(len(report.remote_only)),
                   str(len(report.differing))]
        table.add_row(label, status, *row)
    return table


def _size(n: int | None) -> str:
    return "—" if n is None else human_bytes(n)


def _present(digest: str | None) -> str:
    return "present" if digest else "—"


def decision_line(data: audit.AuditData) -> str:
    state = data.transfer_state
    t = data.transfer
    if state == "DIFF-ONLY":
        changed = [label for attr, label in SECTION_ROWS if getattr(data, attr) and getattr(data, attr).changed]
        return f"DIFF-ONLY: differs in {', '.join(changed)}" if changed else "DIFF-ONLY: up to date"
    if state == "NO-OP":
        return f"{data.action.upper()}: NO-OP, already in sync"
    if state == "DRY-RUN":
        return (f"{data.action.upper()}: DRY-RUN, would move {t.files} files ({human_bytes(t.bytes)}) "
                f"and delete {t.deleted}")
    if state == "TRANSFERRED":
        proof = "verified, in sync" if data.post.in_sync else "NOT in sync"
        # Only `subtree` was staged: `linked` counts its unchanged files, the rest was not touched.
        where = f"in {t.subtree}/" if t.subtree else "in the dataset"
        return (f"{data.action.upper()}: TRANSFERRED {t.files} files ({human_bytes(t.bytes)}), deleted {t.deleted}, "
                f"{t.linked} unchanged linked {where}; {proof} ({t.seconds:.1f} s)")
    return f"{data.action.upper()}: FAILED"


def print_report(data: audit.AuditData) -> None:
    if data.primary is not None:  # a run that failed before comparing has no sections to show
        stdout.print(section_table(data))
    if not log.json_mode():  # with JSON logs the run's `finished` event carries the warnings
        for warning in data.warnings:
            stderr.print(f"warning: {warning}", markup=False)
    if data.error is None:
        stdout.print(decision_line(data), markup=False)


def print_error(message: str, hint: str | None, exit_code: int | None = None) -> None:
    """The `error:` and `hint:` lines (cron mail shows them); with JSON logs an `error` event first."""
    if log.json_mode():
        structlog.get_logger("usrsync").error("error", message=message, hint=hint, exit_code=exit_code)
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
