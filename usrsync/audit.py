"""The audit document (usr_output_version 1): structs, builder, atomic writer, archive.

Keys are a fixed contract that scripts gate on: add keys, never rename or retype.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import msgspec
import platformdirs

from usrsync import __version__
from usrsync.compare import Comparison, EventsState, Policy
from usrsync.dataset import AUXILIARY, DERIVED, EVENTS, META, PRIMARY, SNAPSHOTS, section_relative
from usrsync.manifest import Entry, entry_path, prefix_bounds

OUTPUT_VERSION = 1
Action = Literal["diff", "pull", "push"]
TransferState = Literal["DIFF-ONLY", "DRY-RUN", "NO-OP", "TRANSFERRED", "FAILED"]


class RemoteInfo(msgspec.Struct, kw_only=True):
    name: str
    host: str
    base_dir: str
    type: str = "ssh"
    transport: str = "asyncssh"


class VerifyInfo(msgspec.Struct, kw_only=True):
    primary: str
    sidecars: Literal["strict", "off"]
    content_hashes: Literal["on", "off"]
    hash_algo: str
    notes: list[str] = []


class PrimaryReport(msgspec.Struct, kw_only=True):
    changed: bool
    local_hash: str | None = None
    remote_hash: str | None = None
    local_size: int | None = None
    remote_size: int | None = None
    local_shape: list[int] | None = None
    remote_shape: list[int] | None = None
    skipped: bool = False


class MetaReport(msgspec.Struct, kw_only=True):
    changed: bool
    local_hash: str | None = None
    remote_hash: str | None = None
    skipped: bool = False


class EventsReport(msgspec.Struct, kw_only=True):
    changed: bool
    local: int
    remote: int
    relation: str = "equal"
    common: int = 0
    local_past_common: int = 0
    remote_past_common: int = 0
    skipped: bool = False


class SnapshotsReport(msgspec.Struct, kw_only=True):
    changed: bool
    remote_count: int
    local_count: int
    newer_than_local: int
    local_only: list[str]
    remote_only: list[str]
    differing: list[str]
    skipped: bool = False


class FilesReport(msgspec.Struct, kw_only=True):
    changed: bool
    local_files: int
    remote_files: int
    local_only: list[str]
    remote_only: list[str]
    differing: list[str]
    skipped: bool = False


class TransferReport(msgspec.Struct, kw_only=True):
    files: int = 0
    bytes: int = 0
    deleted: int = 0
    linked: int = 0  # unchanged files hard-linked into the staged `subtree`
    rsync_exit: int | None = None
    seconds: float = 0.0
    promote: str | None = None
    subtree: str | None = None  # the directory staged and promoted ("" = the whole dataset); None: none


class PostReport(msgspec.Struct, kw_only=True):
    verified: bool = False
    in_sync: bool = False
    checked_files: int = 0
    checked_bytes: int = 0
    problems: list[str] = []


class AgentInfo(msgspec.Struct, kw_only=True):
    version: str
    python: str
    hash_algo: str
    hostname: str | None = None
    rsync: str | None = None


class ToolInfo(msgspec.Struct, kw_only=True):
    name: str = "usrsync"
    version: str = __version__


class LockReport(msgspec.Struct, kw_only=True):
    broken_stale: list[dict[str, Any]] = []
    waited_seconds: float = 0.0


class ErrorReport(msgspec.Struct, kw_only=True):
    kind: str
    message: str
    hint: str | None
    exit_code: int


class AuditData(msgspec.Struct, kw_only=True):
    action: Action
    transfer_state: TransferState
    dataset: str
    remote: RemoteInfo
    verify: VerifyInfo
    primary: PrimaryReport | None = None
    meta: MetaReport | None = None
    events: EventsReport | None = msgspec.field(default=None, name=".events.log")
    snapshots: SnapshotsReport | None = msgspec.field(default=None, name="_snapshots")
    derived: FilesReport | None = msgspec.field(default=None, name="_derived")
    auxiliary: FilesReport | None = msgspec.field(default=None, name="_auxiliary")
    transfer: TransferReport = msgspec.field(default_factory=TransferReport)
    post: PostReport = msgspec.field(default_factory=PostReport)
    agent: AgentInfo | None = None
    tool: ToolInfo = msgspec.field(default_factory=ToolInfo)
    txid: str | None = None
    lock: LockReport = msgspec.field(default_factory=LockReport)
    special_files: list[str] = []
    warnings: list[str] = []
    started_at: str
    finished_at: str | None = None
    error: ErrorReport | None = None


class AuditDocument(msgspec.Struct):
    usr_output_version: int
    data: AuditData


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_info(policy: Policy, algo: str, notes: list[str] | None = None) -> VerifyInfo:
    return VerifyInfo(
        primary=policy.verify,
        sidecars="strict" if policy.sidecars else "off",
        content_hashes="on" if policy.content_hashes else "off",
        hash_algo=algo,
        notes=notes or [],
    )


def _entry_attr(entry: Entry | None, attr: str):
    return getattr(entry, attr) if entry is not None else None


def fill_sections(data: AuditData, cmp: Comparison, primary_shapes: tuple | None = None) -> None:
    """Per-section reports from a comparison: `changed` is the state before the action."""

    def rel(paths: list[str], section: str) -> list[str]:
        return sorted(section_relative(p, section) for p in paths)

    s = cmp.sections
    lp, rp = cmp.find("local", "records.parquet"), cmp.find("remote", "records.parquet")
    data.primary = PrimaryReport(
        changed=s[PRIMARY].changed and s[PRIMARY].in_scope,
        local_hash=_entry_attr(lp, "digest") or None, remote_hash=_entry_attr(rp, "digest") or None,
        local_size=_entry_attr(lp, "size"), remote_size=_entry_attr(rp, "size"),
        local_shape=list(primary_shapes[0]) if primary_shapes and primary_shapes[0] else None,
        remote_shape=list(primary_shapes[1]) if primary_shapes and primary_shapes[1] else None,
    )
    lm, rm = cmp.find("local", "meta.md"), cmp.find("remote", "meta.md")
    data.meta = MetaReport(
        changed=s[META].changed and s[META].in_scope, skipped=not s[META].in_scope,
        local_hash=_entry_attr(lm, "digest") or None, remote_hash=_entry_attr(rm, "digest") or None,
    )
    data.events = _events_report(cmp, cmp.events, not s[EVENTS].in_scope)

    snap = s[SNAPSHOTS]
    lo, hi = prefix_bounds(cmp.local_files, SNAPSHOTS + "/", key=entry_path)
    newest_local = max((e.path for e in cmp.local_files[lo:hi] if e.section == SNAPSHOTS), default="")
    data.snapshots = SnapshotsReport(
        changed=snap.changed and snap.in_scope, skipped=not snap.in_scope,
        remote_count=snap.remote_files, local_count=snap.local_files,
        newer_than_local=sum(1 for p in snap.remote_only if p > newest_local),
        local_only=rel(snap.local_only, SNAPSHOTS), remote_only=rel(snap.remote_only, SNAPSHOTS),
        differing=rel(snap.differing, SNAPSHOTS),
    )
    for attr, section in (("derived", DERIVED), ("auxiliary", AUXILIARY)):
        d = s[section]
        setattr(data, attr, FilesReport(
            changed=d.changed and d.in_scope, skipped=not d.in_scope,
            local_files=d.local_files, remote_files=d.remote_files,
            local_only=rel(d.local_only, section), remote_only=rel(d.remote_only, section),
            differing=rel(d.differing, section),
        ))
    data.special_files = cmp.specials


def _events_report(cmp: Comparison, state: EventsState | None, skipped: bool) -> EventsReport:
    delta = cmp.sections[EVENTS]
    if state is None:  # no .events.log on either side
        return EventsReport(changed=False, local=0, remote=0, common=0, skipped=skipped, relation="equal")
    return EventsReport(
        changed=delta.changed and not skipped, local=state.local_lines, remote=state.remote_lines,
        relation=state.relation, common=state.common_lines, local_past_common=state.local_past_common,
        remote_past_common=state.remote_past_common, skipped=skipped,
    )


def encode(doc: AuditDocument) -> bytes:
    return msgspec.json.encode(doc) + b"\n"


def decode(raw: bytes) -> AuditDocument:
    return msgspec.json.decode(raw, type=AuditDocument)


def write_atomic(path: Path, doc: AuditDocument) -> None:
    """Temp file in the same dir, fsync, rename: a reader sees the old file or the new one."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(encode(doc))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def archive_dir(dataset: str) -> Path:
    return Path(platformdirs.user_state_dir("usrsync")) / "audit" / dataset


def archive(doc: AuditDocument) -> Path:
    """Keep every run's audit under the state dir, named so names sort by time: the start second,
    then (runs started within the same second) the archiving time in ns."""
    data = doc.data
    stamp = data.started_at.replace(":", "").replace("-", "")
    name = f"{stamp}-{time.time_ns():020d}-{data.action}-{data.remote.name}-{data.txid or 'none'}.json"
    path = archive_dir(data.dataset) / name
    write_atomic(path, doc)
    return path


def load_history(dataset: str, remote: str | None = None, limit: int | None = None) -> list[AuditDocument]:
    """Archived audits of a dataset, newest first; unreadable files are skipped."""
    docs = []
    directory = archive_dir(dataset)
    for path in sorted(directory.glob("*.json"), reverse=True) if directory.is_dir() else []:
        try:
            doc = decode(path.read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        if remote is None or doc.data.remote.name == remote:
            docs.append(doc)
        if limit is not None and len(docs) >= limit:
            break
    return docs


def json_schema() -> dict[str, Any]:
    return msgspec.json.schema(AuditDocument)
