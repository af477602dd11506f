"""Typed manifests: what a dataset holds, path by path, with content digests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec

from remote_agent import usrsync_agent as engine
from usrsync.dataset import SECTIONS, classify, unsafe_path_reason
from usrsync.errors import ProtocolError

KIND_FILE = engine.KIND_FILE


class Entry(msgspec.Struct, array_like=True, frozen=True):
    path: str
    section: str
    size: int
    mtime_ns: int
    kind: str
    digest: str
    lines: int | None = None


class Manifest(msgspec.Struct):
    exists: bool
    algo: str
    entries: list[Entry]

    def by_path(self) -> dict[str, Entry]:
        return {e.path: e for e in self.entries}

    def files(self) -> list[Entry]:
        return [e for e in self.entries if e.kind == KIND_FILE]


def validate_remote_entries(entries: list[Entry]) -> None:
    """Reject a remote manifest that could steer us outside the dataset or lie about sections."""
    previous = None
    for entry in entries:
        reason = unsafe_path_reason(entry.path)
        if reason is not None:
            raise ProtocolError(
                f"the remote agent sent an unsafe path {entry.path!r} ({reason})",
                "the remote is misbehaving or compromised; inspect it before syncing again",
            )
        if entry.section not in SECTIONS or classify(entry.path) != entry.section:
            raise ProtocolError(
                f"the remote agent put {entry.path!r} in section {entry.section!r}",
                "the remote agent is out of date or misbehaving; rerun to redeploy it",
            )
        if entry.size < 0 or (previous is not None and entry.path <= previous):
            raise ProtocolError(
                "the remote agent sent an unsorted or invalid manifest",
                "rerun; if it persists, run `usr remotes doctor`",
            )
        previous = entry.path


def local_manifest(
    root: Path,
    algo: str,
    *,
    jobs: int = 2,
    use_cache: bool = True,
    cache_dir: Path | None = None,
    hash_sections: set[str] | None = None,
    trusted: dict[str, list] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    if not root.is_dir():
        return Manifest(exists=False, algo=algo, entries=[])
    raw = engine.build_manifest(
        str(root), algo, jobs=jobs, cache_dir=str(cache_dir) if cache_dir else None,
        use_cache=use_cache, hash_sections=hash_sections, trusted=trusted, progress=progress,
    )
    return Manifest(exists=True, algo=algo, entries=msgspec.convert(raw, list[Entry]))
