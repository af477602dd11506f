"""Pure transfer planning: what to copy, link, delete and verify, and the safety refusals."""

from __future__ import annotations

import bisect
import itertools
import operator
import re
from collections.abc import Iterable, Iterator
from typing import Literal

import msgspec

from usrsync.compare import Comparison, Policy
from usrsync.dataset import EVENTS, PRIMARY, classify
from usrsync.errors import RefusedError, UsrError
from usrsync.manifest import Entry, ExpectedTree, entries_below, entry_path, prefix_bounds

Direction = Literal["pull", "push"]
_size = operator.attrgetter("size")
_digest = operator.attrgetter("digest")


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


class TransferPlan(msgspec.Struct, kw_only=True):
    """What a pull or push does. Every path is dataset-relative, `subtree` included.

    Only the promotion root `subtree` is staged and exchanged: staging mirrors `live/<subtree>`,
    so `link()`, `expected()` and `reread` cover the files below it (a staged path is a path here
    minus the `subtree/` prefix: see `staged`). Files outside it are not touched at all.

    The destination's files now and after the transfer are held as the path-sorted lists the
    manifests already have (with every section in scope, `after` is the source's own list), and
    what is staged or kept is read from them below the subtree: at a million files, no second
    list of either (8 MB each) is held through the transfer and its verification.
    """

    direction: Direction
    subtree: str           # the promotion root ("" = the whole dataset): see promotion_root()
    copy: list[str]        # source paths whose bytes must move (all below subtree)
    delete: list[str]      # destination paths that the source no longer has (all below subtree)
    before: list[Entry]    # the destination's files now, path-sorted
    after: list[Entry]     # and once promoted: the source's in the sections in scope, its own in the others
    replaced: set[str]     # destination paths that copies rewrite, and `delete` (all below subtree)
    linked: int            # how many files link() gives
    reread: list[str]      # copied paths whose staged bytes are reread and hashed
    bytes: int
    bootstrap: bool
    whole_dirs: list[str] = []  # directories below subtree whose every entry is copied (see whole_dirs)

    @property
    def noop(self) -> bool:
        return not self.copy and not self.delete

    @property
    def prefix(self) -> str:
        """What every path below the subtree starts with ("" for the whole dataset)."""
        return self.subtree + "/" if self.subtree else ""

    def expected(self) -> Iterator[Entry]:
        """The staged tree, exactly (live/<subtree> after promotion), in path order."""
        return entries_below(self.after, self.prefix)

    def kept_entries(self) -> Iterator[Entry]:
        """The destination's files below the subtree that stay as they are (every one of a section
        out of scope), in path order: hard-linked into staging."""
        return (e for e in entries_below(self.before, self.prefix) if e.path not in self.replaced)

    def kept(self) -> Iterator[str]:
        """The paths of kept_entries()."""
        below = entries_below(self.before, self.prefix)
        return itertools.filterfalse(self.replaced.__contains__, map(entry_path, below))

    def link(self) -> list[str]:
        return list(self.kept())

    def expected_tree(self) -> ExpectedTree:
        """`expected()` as verify_tree checks it: three columns, no object per file."""
        return ExpectedTree(paths=list(map(entry_path, self.expected())), sizes=list(map(_size, self.expected())),
                            digests=list(map(_digest, self.expected())))

    def staged(self, path: str) -> str:
        """A path of this plan relative to the staged subtree (as rsync's file list wants it)."""
        return path[len(self.prefix):]


def plan_transfer(cmp: Comparison, direction: Direction, policy: Policy, max_delete: MaxDelete) -> TransferPlan:
    pull = direction == "pull"
    source_name, dest_name = ("remote", "local") if pull else ("local", "remote")
    source_exists = cmp.remote_exists if pull else cmp.local_exists
    dest_exists = cmp.local_exists if pull else cmp.remote_exists

    if not source_exists:
        raise UsrError(f"the dataset does not exist on the {source_name} side",
                       "check the dataset id and the remote's base_dir (`usr remotes show NAME`)")
    if dest_exists and cmp.find(source_name, "records.parquet") is None:
        raise RefusedError(
            f"the {source_name} dataset has no records.parquet; a {direction} would remove the "
            f"{dest_name} primary",
            f"restore records.parquet on the {source_name} side first",
        )
    _check_events(cmp, direction, policy)

    copy: list[str] = []
    delete: list[str] = []
    rewritten: list[str] = []  # the destination files that copies replace
    in_scope_dest = 0
    for delta in cmp.sections.values():
        if not delta.in_scope:
            continue  # the destination's files of it are kept as they are
        in_scope_dest += delta.local_files if pull else delta.remote_files
        copy += (delta.remote_only if pull else delta.local_only) + delta.differing
        delete += delta.local_only if pull else delta.remote_only
        rewritten += delta.differing

    if delete and max_delete.exceeded(len(delete), in_scope_dest):
        raise RefusedError(
            f"the {direction} would delete {len(delete)} of {in_scope_dest} {dest_name} files, "
            f"more than --max-delete {max_delete}",
            "check the source is complete; if the deletions are intended, raise --max-delete "
            "(e.g. --max-delete 100%)",
        )
    copy.sort()
    delete.sort()
    source_files, dest_files = (cmp.remote_files, cmp.local_files) if pull else (cmp.local_files, cmp.remote_files)
    after = files_after(source_files, dest_files, {section: delta.in_scope for section, delta in cmp.sections.items()})
    subtree = promotion_root(copy, delete, dest_files, after) if dest_exists else ""
    # The staged tree is scanned like a dataset of its own, and a scan skips runtime names
    # (`.usr.lock`, `.usrsync*`) at the top: a directory holding one there cannot be the root.
    while subtree:
        lo, hi = prefix_bounds(after, subtree + "/", key=entry_path)
        if all(map(classify, top_names(after, len(subtree) + 1, lo, hi))):
            break
        subtree = subtree.rpartition("/")[0]
    lo, hi = prefix_bounds(dest_files, subtree + "/" if subtree else "", key=entry_path)
    replaced = set(rewritten).union(delete)
    copied = entries_of(copy, after)
    reread = [e.path for e in copied if e.digest and (policy.sidecars or e.section == PRIMARY)]
    plan = TransferPlan(
        direction=direction, subtree=subtree, copy=copy, delete=delete, before=dest_files, after=after,
        replaced=replaced, linked=hi - lo - len(replaced),  # every replaced path is a destination file below it
        reread=reread, bytes=sum(e.size for e in copied), bootstrap=not dest_exists,
    )
    plan.whole_dirs = whole_dirs(copy, plan.kept(), cmp.specials, subtree)
    return plan


def files_after(source_files: list[Entry], dest_files: list[Entry], in_scope: dict[str, bool]) -> list[Entry]:
    """The destination's files once a transfer is promoted, path-sorted: the source's of the
    sections in scope (kept, changed or new) and its own of the others (kept). With every section
    in scope, that is the source's list itself."""
    if all(in_scope.values()):
        return source_files
    # A path's section follows from the path, so the two parts never share one. Two sorted runs:
    # the sort merges them at C speed.
    return sorted([e for e in source_files if in_scope[e.section]] + [e for e in dest_files if not in_scope[e.section]],
                  key=entry_path)


def top_names(entries: list[Entry], cut: int, lo: int = 0, hi: int | None = None) -> Iterator[str]:
    """The distinct first components of the path-sorted entries' paths (those of entries[lo:hi])
    past their first `cut` characters (a prefix they share): one step per file there and one
    bisection per directory, not a step per entry (a million files in a thousand directories:
    a thousand steps)."""
    hi = len(entries) if hi is None else hi
    i = lo
    while i < hi:
        path = entries[i].path
        name, slash, _ = path[cut:].partition("/")
        yield name
        # The paths below "name/" are the run before "name0" ('0' follows '/').
        i = bisect.bisect_left(entries, path[:cut] + name + "0", lo=i + 1, hi=hi, key=entry_path) if slash else i + 1


def entries_of(paths: list[str], entries: list[Entry]) -> list[Entry]:
    """The entries of `paths` (sorted, each among the path-sorted `entries`), with a cursor: the
    next path is usually the next entry (a first transfer copies them all), else a bisection."""
    found = []
    i = 0
    for path in paths:
        if i >= len(entries) or entries[i].path != path:
            i = bisect.bisect_left(entries, path, lo=i, key=entry_path)
        found.append(entries[i])
        i += 1
    return found


def whole_dirs(copy: list[str], link: Iterable[str], specials: list[str], subtree: str) -> list[str]:
    """The directories strictly below `subtree` whose every entry on the source is copied: no
    file of theirs is linked (kept), and none is a symlink, device or bad name (on either side).
    rsync is handed such a directory instead of its files (see rsync.list_entries). The
    subtree itself never is: at the dataset's top, runtime files (`.usr.lock`) live beside it."""
    held = {p.rpartition("/")[0] for p in link}
    held.update(p.rpartition("/")[0] for p in specials)
    inside = subtree + "/" if subtree else ""
    return sorted(d for d in {p.rpartition("/")[0] for p in copy}
                  if d.startswith(inside) and len(d) > len(inside) and d not in held)


def promotion_root(copy: list[str], delete: list[str], before: list[Entry], after: list[Entry]) -> str:
    """The directory that one atomic exchange must replace to apply every change ("" = the dataset).

    `copy` and `delete` are sorted; `before` and `after` are the destination's files now and after
    the transfer, sorted by path. The answer is the deepest directory with every changed file
    below it that exists as a directory both before (the exchange needs it) and after (a directory
    that vanishes, or appears, is itself a change, so its parent must be exchanged).
    """
    changed = [paths for paths in (copy, delete) if paths]
    if not changed:
        return ""
    # Everything between the smallest and the largest path shares their common directory.
    first = min(paths[0] for paths in changed).split("/")[:-1]
    last = max(paths[-1] for paths in changed).split("/")[:-1]
    depth = 0
    while depth < min(len(first), len(last)) and first[depth] == last[depth]:
        depth += 1
    directory = "/".join(first[:depth])
    while directory and not (_holds_a_file(before, directory) and _holds_a_file(after, directory)):
        directory = directory.rpartition("/")[0]
    return directory


def _holds_a_file(files: list[Entry], directory: str) -> bool:
    """Whether some file of the path-sorted `files` is below `directory` (one bisection: the paths
    with one prefix are contiguous)."""
    lo, hi = prefix_bounds(files, directory + "/", key=entry_path)
    return hi > lo


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
