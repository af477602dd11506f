"""Pure transfer planning: what to copy, link, delete and verify, and the safety refusals."""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from usrsync.compare import Comparison, Policy
from usrsync.dataset import EVENTS, PRIMARY
from usrsync.errors import RefusedError, UsrError

Direction = Literal["pull", "push"]


class MaxDelete(msgspec.Struct, frozen=True):
    count: int | None = None
    percent: float | None = None

    def exceeded(self, deletions: int, dest_files: int) -> bool:
        if self.count is not None:
            return deletions > self.count
        assert self.percent is not None
        return deletions * 100 > self.percent * dest_files

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


def parse_max_delete(text: str) -> MaxDelete:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    if not match or (not match.group(2) and "." in match.group(1)):
        raise UsrError(f"--max-delete {text!r} is neither a count nor a percentage",
                       "use a number of files (e.g. 10) or a percentage (e.g. 50%)")
    if match.group(2):
        percent = float(match.group(1))
        if percent > 100:
            raise UsrError(f"--max-delete {text!r} is over 100%", "use a percentage from 0% to 100%")
        return MaxDelete(percent=percent)
    return MaxDelete(count=int(match.group(1)))


class FileTarget(msgspec.Struct, array_like=True, frozen=True, gc=False):  # one per file: no GC tracking
    size: int
    digest: str


class TransferPlan(msgspec.Struct, kw_only=True):
    direction: Direction
    copy: list[str]        # source paths whose bytes must move
    link: list[str]        # destination live paths hard-linked into staging unchanged
    delete: list[str]      # destination paths that the source no longer has
    expected: dict[str, FileTarget]  # the staged tree, exactly
    reread: list[str]      # staged paths whose bytes are reread and hashed
    bytes: int
    bootstrap: bool

    @property
    def noop(self) -> bool:
        return not self.copy and not self.delete


def plan_transfer(cmp: Comparison, direction: Direction, policy: Policy, max_delete: MaxDelete) -> TransferPlan:
    pull = direction == "pull"
    source, dest = (cmp.remote, cmp.local) if pull else (cmp.local, cmp.remote)
    source_name, dest_name = ("remote", "local") if pull else ("local", "remote")
    source_exists = cmp.remote_exists if pull else cmp.local_exists
    dest_exists = cmp.local_exists if pull else cmp.remote_exists

    if not source_exists:
        raise UsrError(f"the dataset does not exist on the {source_name} side",
                       "check the dataset id and the remote's base_dir (`usr remotes show NAME`)")
    if dest_exists and "records.parquet" not in source:
        raise RefusedError(
            f"the {source_name} dataset has no records.parquet; a {direction} would remove the "
            f"{dest_name} primary",
            f"restore records.parquet on the {source_name} side first",
        )
    _check_events(cmp, direction, policy)

    copy: list[str] = []
    link: list[str] = []
    delete: list[str] = []
    expected: dict[str, FileTarget] = {}
    in_scope_dest = 0
    for delta in cmp.sections.values():
        source_only = delta.remote_only if pull else delta.local_only
        dest_only = delta.local_only if pull else delta.remote_only
        if not delta.in_scope:
            kept = sorted(set(delta.same) | set(delta.differing) | set(dest_only))
            link += kept
            expected.update({p: FileTarget(dest[p].size, dest[p].digest) for p in kept})
            continue
        in_scope_dest += delta.local_files if pull else delta.remote_files
        copy += source_only + delta.differing
        link += delta.same
        delete += dest_only
        for path in source_only + delta.differing + delta.same:
            expected[path] = FileTarget(source[path].size, source[path].digest)

    if delete and max_delete.exceeded(len(delete), in_scope_dest):
        raise RefusedError(
            f"the {direction} would delete {len(delete)} of {in_scope_dest} {dest_name} files, "
            f"more than --max-delete {max_delete}",
            "check the source is complete; if the deletions are intended, raise --max-delete "
            "(e.g. --max-delete 100%)",
        )
    copy.sort()
    link.sort()
    delete.sort()
    reread = [p for p in copy if expected[p].digest and (policy.sidecars or source[p].section == PRIMARY)]
    return TransferPlan(
        direction=direction, copy=copy, link=link, delete=delete, expected=expected,
        reread=reread, bytes=sum(source[p].size for p in copy), bootstrap=not dest_exists,
    )


def _check_events(cmp: Comparison, direction: Direction, policy: Policy) -> None:
    state = cmp.events
    if state is None or not policy.in_scope(EVENTS):
        return
    ok = ("equal", "remote_ahead") if direction == "pull" else ("equal", "local_ahead")
    if state.relation in ok:
        return
    if state.relation == "diverged":
        what = (f".events.log has diverged: local has {state.local_past_common} and remote has "
                f"{state.remote_past_common} lines past the {state.common_lines} lines they share")
    else:
        ahead, count = (("local", state.local_past_common) if direction == "pull"
                        else ("remote", state.remote_past_common))
        what = (f".events.log on the {ahead} side has {count} lines the other side lacks; a {direction} "
                f"would drop them")
    raise RefusedError(
        what,
        "reconcile the two .events.log files by hand (append the missing lines on one side), then rerun",
    )
