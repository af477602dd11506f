"""plan_transfer(): copy/link/delete lists, the staged tree, rereads and the safety refusals (pure)."""

from __future__ import annotations

import pytest
from helpers import manifest_of
from hypothesis import given, settings
from hypothesis import strategies as st

from usrsync.compare import EventsState, Policy, compare
from usrsync.dataset import classify
from usrsync.errors import EXIT_REFUSED, EXIT_USAGE, RefusedError, UsrError
from usrsync.manifest import Manifest, entry_path, prefix_bounds
from usrsync.plan import MaxDelete, TransferPlan, entries_of, parse_max_delete, plan_transfer, top_names

ALL = MaxDelete(percent=100.0)

REMOTE = {
    "records.parquet": b"PAR1-new",
    "meta.md": b"# meta\n",
    "_derived/ns/a": b"same",
    "_derived/ns/b": b"remote b",
    "_snapshots/s2": b"snap2",
}
LOCAL = {
    "records.parquet": b"PAR1-old",
    "meta.md": b"# meta\n",
    "_derived/ns/a": b"same",
    "notes.txt": b"local only",
}


def plan(local: Manifest, remote: Manifest, direction: str = "pull", policy: Policy = Policy(),
         max_delete: MaxDelete = ALL, events: EventsState | None = None):
    return plan_transfer(compare(local, remote, policy, events=events), direction, policy, max_delete)


def target(data: bytes) -> tuple[int, str]:
    """What the staged tree must hold at a path: (size, digest)."""
    entry = manifest_of({"x": data}).entries[0]
    return entry.size, entry.digest


def targets(p: TransferPlan) -> dict[str, tuple[int, str]]:
    paths = [e.path for e in p.expected()]
    assert paths == sorted(set(paths)), "the staged tree is path-sorted, each path once"
    return {e.path: (e.size, e.digest) for e in p.expected()}


def test_pull_lists() -> None:
    p = plan(manifest_of(LOCAL), manifest_of(REMOTE), "pull")
    assert p.copy == ["_derived/ns/b", "_snapshots/s2", "records.parquet"]
    assert p.link() == ["_derived/ns/a", "meta.md"]
    assert p.delete == ["notes.txt"]
    assert targets(p) == {path: target(data) for path, data in REMOTE.items()}
    assert p.reread == p.copy
    assert p.bytes == sum(len(REMOTE[path]) for path in p.copy)
    assert (p.direction, p.bootstrap, p.noop) == ("pull", False, False)


def test_push_mirrors_pull() -> None:
    p = plan(manifest_of(LOCAL), manifest_of(REMOTE), "push")
    assert p.copy == ["notes.txt", "records.parquet"]
    assert p.link() == ["_derived/ns/a", "meta.md"]
    assert p.delete == ["_derived/ns/b", "_snapshots/s2"]
    assert targets(p) == {path: target(data) for path, data in LOCAL.items()}
    assert p.bytes == len(LOCAL["notes.txt"]) + len(LOCAL["records.parquet"])


def test_in_sync_is_noop() -> None:
    p = plan(manifest_of(REMOTE), manifest_of(REMOTE), "pull")
    assert (p.noop, p.copy, p.delete, p.reread, p.bytes) == (True, [], [], [], 0)
    assert p.link() == sorted(REMOTE)


def test_reread_without_sidecar_verification_is_the_primary_only() -> None:
    p = plan(manifest_of(LOCAL), manifest_of(REMOTE), "pull", Policy(sidecars=False))
    assert p.copy == ["_derived/ns/b", "_snapshots/s2", "records.parquet"]
    assert p.reread == ["records.parquet"]


def test_reread_skips_files_without_digests() -> None:
    """With content hashes off, _derived files have no digest to check the copy against."""
    policy = Policy(content_hashes=False)
    hashed = policy.hashed_sections()
    local, remote = manifest_of(LOCAL, hash_sections=hashed), manifest_of(REMOTE, hash_sections=hashed)
    p = plan(local, remote, "pull", policy)
    assert p.copy == ["_derived/ns/b", "_snapshots/s2", "records.parquet"]
    assert p.reread == ["_snapshots/s2", "records.parquet"]
    assert targets(p)["_derived/ns/b"] == (len(REMOTE["_derived/ns/b"]), "")


@pytest.mark.parametrize("direction", ["pull", "push"])
def test_out_of_scope_sections_are_kept_from_the_destination(direction: str) -> None:
    policy = Policy(primary_only=True)
    local, remote = manifest_of(LOCAL), manifest_of(REMOTE)
    p = plan(local, remote, direction, policy)
    assert p.copy == ["records.parquet"]
    assert p.delete == []
    dest_files = LOCAL if direction == "pull" else REMOTE
    source_files = REMOTE if direction == "pull" else LOCAL
    assert p.link() == sorted(path for path in dest_files if path != "records.parquet")
    assert targets(p) == {**{path: target(data) for path, data in dest_files.items()},
                          "records.parquet": target(source_files["records.parquet"])}


def test_skip_snapshots_keeps_destination_snapshots() -> None:
    local = manifest_of({**LOCAL, "_snapshots/s1": b"local snap"})
    p = plan(local, manifest_of(REMOTE), "pull", Policy(skip_snapshots=True))
    assert "_snapshots/s2" not in p.copy
    assert "_snapshots/s1" in p.link() and "_snapshots/s1" not in p.delete
    assert set(targets(p)) == (set(REMOTE) - {"_snapshots/s2"}) | {"_snapshots/s1"}


def test_bootstrap_when_the_destination_does_not_exist() -> None:
    p = plan(manifest_of({}, exists=False), manifest_of(REMOTE), "pull")
    assert p.bootstrap is True
    assert p.copy == sorted(REMOTE)
    assert (p.link(), p.delete) == ([], [])
    # Bootstrap may even create a dataset without a primary (nothing to lose on the destination).
    p = plan(manifest_of({}, exists=False), manifest_of({"meta.md": b"m"}), "pull")
    assert (p.bootstrap, p.copy) == (True, ["meta.md"])


@pytest.mark.parametrize(("direction", "missing", "message"), [
    ("pull", "remote", "the remote dataset has no records.parquet; a pull would remove the local primary"),
    ("push", "local", "the local dataset has no records.parquet; a push would remove the remote primary"),
])
def test_missing_source_primary_is_refused(direction: str, missing: str, message: str) -> None:
    without = {k: v for k, v in REMOTE.items() if k != "records.parquet"}
    local, remote = (manifest_of(LOCAL), manifest_of(without)) if missing == "remote" else \
        (manifest_of(without), manifest_of(LOCAL))
    with pytest.raises(RefusedError) as info:
        plan(local, remote, direction)
    assert info.value.message == message
    assert info.value.hint == f"restore records.parquet on the {missing} side first"
    assert info.value.exit_code == EXIT_REFUSED == 6


@pytest.mark.parametrize("direction", ["pull", "push"])
def test_missing_source_dataset_is_a_usage_error(direction: str) -> None:
    local, remote = manifest_of(LOCAL), manifest_of({}, exists=False)
    if direction == "push":
        local, remote = remote, local
    side = "remote" if direction == "pull" else "local"
    with pytest.raises(UsrError) as info:
        plan(local, remote, direction)
    assert info.value.message == f"the dataset does not exist on the {side} side"
    assert info.value.exit_code == EXIT_USAGE


# --- --max-delete ---------------------------------------------------------------------------

TEN = {"records.parquet": b"p", **{f"_derived/f{i}": b"%d" % i for i in range(9)}}


def pull_deleting(n: int, max_delete: MaxDelete, **policy_kw):
    """A pull whose remote lacks n of the 10 local files."""
    remote = {k: v for i, (k, v) in enumerate(TEN.items()) if i == 0 or i > n}
    return plan(manifest_of(TEN), manifest_of(remote), "pull", Policy(**policy_kw), max_delete)


@pytest.mark.parametrize(("n", "limit", "allowed"), [
    (5, "50%", True),   # exactly half: not more than the limit
    (6, "50%", False),
    (1, "10%", True),
    (2, "10%", False),
    (3, "3", True),
    (4, "3", False),
    (1, "0", False),
    (1, "0%", False),
    (9, "100%", True),
    (2, "12.5%", False),
    (1, "12.5%", True),
])
def test_max_delete_limits(n: int, limit: str, allowed: bool) -> None:
    md = parse_max_delete(limit)
    if allowed:
        assert len(pull_deleting(n, md).delete) == n
        return
    with pytest.raises(RefusedError) as info:
        pull_deleting(n, md)
    assert info.value.message == (f"the pull would delete {n} of 10 local files, more than --max-delete "
                                  f"{limit.strip()}")
    assert info.value.hint.startswith("check the source is complete; if the deletions are intended")
    assert info.value.exit_code == 6


def test_max_delete_counts_only_in_scope_destination_files() -> None:
    """With --skip-snapshots, the percentage is of the files that could be deleted at all."""
    local = {**TEN, **{f"_snapshots/s{i}": b"s" for i in range(30)}}
    remote = {k: v for i, (k, v) in enumerate(TEN.items()) if i != 1} | {f"_snapshots/s{i}": b"s" for i in range(30)}
    p = plan(manifest_of(local), manifest_of(remote), "pull", Policy(skip_snapshots=True), parse_max_delete("10%"))
    assert p.delete == ["_derived/f0"]
    with pytest.raises(RefusedError, match=r"delete 2 of 10 local files"):
        pull_deleting(2, parse_max_delete("10%"), skip_snapshots=True)


def test_no_deletions_never_trip_a_zero_limit() -> None:
    p = plan(manifest_of(REMOTE), manifest_of(REMOTE), "pull", max_delete=parse_max_delete("0"))
    assert p.noop


@pytest.mark.parametrize(("text", "parsed", "shown"), [
    ("10", MaxDelete(count=10), "10"),
    ("0", MaxDelete(count=0), "0"),
    (" 7 ", MaxDelete(count=7), "7"),
    ("50%", MaxDelete(percent=50.0), "50%"),
    ("12.5%", MaxDelete(percent=12.5), "12.5%"),
    ("0%", MaxDelete(percent=0.0), "0%"),
    ("100%", MaxDelete(percent=100.0), "100%"),
])
def test_parse_max_delete_good(text: str, parsed: MaxDelete, shown: str) -> None:
    assert parse_max_delete(text) == parsed
    assert str(parsed) == shown


@pytest.mark.parametrize(("text", "message", "hint"), [
    ("", "--max-delete '' is neither a count nor a percentage", "use a number of files (e.g. 10)"),
    ("abc", "--max-delete 'abc' is neither a count nor a percentage", "use a number of files (e.g. 10)"),
    ("-1", "--max-delete '-1' is neither a count nor a percentage", "use a number of files (e.g. 10)"),
    ("1.5", "--max-delete '1.5' is neither a count nor a percentage", "use a number of files (e.g. 10)"),
    ("50%%", "--max-delete '50%%' is neither a count nor a percentage", "use a number of files (e.g. 10)"),
    ("%", "--max-delete '%' is neither a count nor a percentage", "use a number of files (e.g. 10)"),
    ("1e3", "--max-delete '1e3' is neither a count nor a percentage", "use a number of files (e.g. 10)"),
    ("101%", "--max-delete '101%' is over 100%", "use a percentage from 0% to 100%"),
])
def test_parse_max_delete_bad(text: str, message: str, hint: str) -> None:
    with pytest.raises(UsrError) as info:
        parse_max_delete(text)
    assert info.value.message == message
    assert info.value.hint.startswith(hint)
    assert info.value.exit_code == EXIT_USAGE


# --- .events.log refusals ---------------------------------------------------------------------


def events(relation: str, local_lines: int, remote_lines: int, common: int) -> EventsState:
    return EventsState(relation=relation, local_lines=local_lines, remote_lines=remote_lines, common_lines=common,
                       local_past_common=local_lines - common, remote_past_common=remote_lines - common)


LOG_LOCAL = {**REMOTE, ".events.log": b"a\nb\nc\n"}
LOG_REMOTE = {**REMOTE, ".events.log": b"a\nx\ny\nz\n"}


@pytest.mark.parametrize(("direction", "state", "message"), [
    ("pull", events("diverged", 3, 4, 1),
     ".events.log has diverged: local has 2 and remote has 3 lines past the 1 lines they share"),
    ("push", events("diverged", 3, 4, 1),
     ".events.log has diverged: local has 2 and remote has 3 lines past the 1 lines they share"),
    ("pull", events("local_ahead", 5, 2, 2),
     ".events.log on the local side has 3 lines the other side lacks; a pull would drop them"),
    ("push", events("remote_ahead", 2, 6, 2),
     ".events.log on the remote side has 4 lines the other side lacks; a push would drop them"),
])
def test_events_refusals(direction: str, state: EventsState, message: str) -> None:
    with pytest.raises(RefusedError) as info:
        plan(manifest_of(LOG_LOCAL), manifest_of(LOG_REMOTE), direction, events=state)
    assert info.value.message == message
    assert info.value.hint == ("reconcile the two .events.log files by hand (append the missing lines on one "
                               "side), then rerun")
    assert info.value.exit_code == 6


@pytest.mark.parametrize(("direction", "relation"), [
    ("pull", "remote_ahead"), ("pull", "equal"), ("push", "local_ahead"), ("push", "equal"),
])
def test_events_fast_forward_is_allowed(direction: str, relation: str) -> None:
    p = plan(manifest_of(LOG_LOCAL), manifest_of(LOG_REMOTE), direction, events=events(relation, 3, 3, 3))
    assert ".events.log" in p.copy


def test_events_out_of_scope_is_not_checked() -> None:
    p = plan(manifest_of(LOG_LOCAL), manifest_of(LOG_REMOTE), "pull", Policy(primary_only=True),
             events=events("diverged", 3, 4, 1))
    assert p.copy == []
    assert ".events.log" in p.link()


# --- the promotion root -----------------------------------------------------------------------

TREE = {"records.parquet": b"PAR1", "meta.md": b"# m\n",
        **{f"_derived/d{d}/f{i}": b"%d-%d" % (d, i) for d in range(3) for i in range(3)}}
D1 = [f"_derived/d1/f{i}" for i in range(3)]


@pytest.mark.parametrize("direction", ["pull", "push"])
@pytest.mark.parametrize(("changes", "subtree"), [
    pytest.param({"_derived/d1/f0": b"new"}, "_derived/d1", id="one-file-in-one-dir"),
    pytest.param({"_derived/d1/f0": b"new", "_derived/d1/f9": b"added", "_derived/d1/f2": None}, "_derived/d1",
                 id="changed-added-deleted-in-one-dir"),
    pytest.param({"_derived/d0/f0": b"new", "_derived/d2/f1": b"new"}, "_derived", id="two-sibling-dirs"),
    pytest.param({"_derived/d1/f0": b"new", "meta.md": b"# m2\n"}, "", id="and-a-root-file"),
    pytest.param({"notes.txt": b"new"}, "", id="a-new-root-file"),
    pytest.param({"_derived/d1/new/deeper/f": b"x"}, "_derived/d1", id="new-dirs-nearest-existing-ancestor"),
    pytest.param({"_derived/d3/f": b"x"}, "_derived", id="new-sibling-dir"),
    pytest.param({"_snapshots/s": b"x"}, "", id="new-top-level-dir"),
    pytest.param({"_derived/d1/f1": None}, "_derived/d1", id="one-file-of-a-dir-deleted"),
    pytest.param(dict.fromkeys(D1), "_derived", id="whole-dir-deleted-its-parent"),
    pytest.param({**dict.fromkeys(D1), "_derived/d1/g": b"x"}, "_derived/d1", id="dir-emptied-and-refilled"),
    pytest.param({"_derived/d1/f0": None, "_derived/d1/f0/g": b"x"}, "_derived/d1", id="file-becomes-dir"),
])
def test_promotion_root(direction: str, changes: dict[str, bytes | None], subtree: str) -> None:
    edited = {k: v for k, v in (TREE | changes).items() if v is not None}
    local, remote = (TREE, edited) if direction == "pull" else (edited, TREE)
    p = plan(manifest_of(local), manifest_of(remote), direction)
    assert p.subtree == subtree
    prefix = subtree + "/" if subtree else ""
    # Only the promotion root is staged: its unchanged files are linked, the rest stays untouched.
    assert p.copy == sorted(k for k, v in edited.items() if TREE.get(k) != v)
    assert p.delete == sorted(set(TREE) - set(edited))
    assert p.link() == sorted(k for k, v in edited.items() if TREE.get(k) == v and k.startswith(prefix))
    assert targets(p) == {k: target(v) for k, v in edited.items() if k.startswith(prefix)}
    assert p.reread == p.copy
    assert [p.staged(k) for k in p.copy] == [k.removeprefix(prefix) for k in p.copy]


@pytest.mark.parametrize(("name", "subtree"), [
    ("_derived/d1/.usr.lock", "_derived"),  # a runtime name at a dataset's top: a scan of d1 would skip it
    ("_derived/d1/.usrsync-notes/x", "_derived"),
    ("_derived/d1/sub/.usr.lock", "_derived/d1"),  # deeper down it is an ordinary file
])
def test_no_promotion_root_holds_a_runtime_name_at_its_top(name: str, subtree: str) -> None:
    local = TREE | {name: b"kept"}
    p = plan(manifest_of(local), manifest_of(local | {"_derived/d1/f0": b"new"}), "pull")
    assert (p.subtree, p.copy) == (subtree, ["_derived/d1/f0"])
    assert name in p.link()


def test_first_pull_promotes_the_whole_dataset() -> None:
    p = plan(manifest_of({}, exists=False), manifest_of(TREE), "pull")
    assert (p.subtree, p.copy, p.link(), p.staged("_derived/d1/f0")) == ("", sorted(TREE), [], "_derived/d1/f0")


def test_out_of_scope_files_below_the_root_are_linked_from_the_destination() -> None:
    """--skip-snapshots: a snapshot that differs inside the promoted directory keeps its destination bytes."""
    local = TREE | {"_snapshots/a/s1": b"local", "_snapshots/a/s2": b"same"}
    remote = TREE | {"_snapshots/a/s1": b"remote", "_snapshots/a/s2": b"same", "_derived/d1/f0": b"new"}
    p = plan(manifest_of(local), manifest_of(remote), "pull", Policy(skip_snapshots=True))
    assert (p.subtree, p.copy, p.link()) == ("_derived/d1", ["_derived/d1/f0"], D1[1:])
    p = plan(manifest_of(local), manifest_of(remote | {"meta.md": b"# m2\n"}), "pull", Policy(skip_snapshots=True))
    assert p.subtree == ""
    assert targets(p)["_snapshots/a/s1"] == target(b"local")
    assert "_snapshots/a/s1" in p.link()


# --- properties -----------------------------------------------------------------------------

PATHS = ["records.parquet", "meta.md", ".events.log", "_snapshots/s1", "_snapshots/s2", "_derived/a",
         "_derived/b/c", "_derived/b/d/e", "_derived/f/g", "notes.txt", "x/y", "x/z/w"]
content = st.sampled_from([b"", b"a", b"b", b"ab"])
side = st.dictionaries(st.sampled_from(PATHS), content, max_size=len(PATHS))
edits = st.dictionaries(st.sampled_from(PATHS), st.none() | content, max_size=4)  # None: the file goes


def dirs_of(path: str) -> list[str]:
    """The directories above a path, outermost first ("" not included)."""
    parts = path.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def has_dir(files: dict[str, bytes], directory: str) -> bool:
    return any(k.startswith(directory + "/") for k in files)


@settings(max_examples=300, deadline=None)
@given(side, edits, st.sampled_from(["pull", "push"]), st.booleans(), st.booleans(), st.booleans())
def test_plan_stages_exactly_the_mirror(lfiles, changes, direction, primary_only, skip_snapshots, sidecars) -> None:
    """The other side is this one with a few edits: small diffs exercise deep promotion roots."""
    lfiles.setdefault("records.parquet", b"p")
    rfiles = {k: v for k, v in (lfiles | changes).items() if v is not None}
    rfiles.setdefault("records.parquet", b"q")
    policy = Policy(primary_only=primary_only, skip_snapshots=skip_snapshots, sidecars=sidecars)
    p = plan(manifest_of(lfiles), manifest_of(rfiles), direction, policy)
    source, dest = (rfiles, lfiles) if direction == "pull" else (lfiles, rfiles)
    in_scope = {path for path in PATHS if policy.in_scope(classify(path))}
    staged = {k: v for k, v in source.items() if k in in_scope} | {k: v for k, v in dest.items() if k not in in_scope}

    def below(path: str, directory: str = p.subtree) -> bool:
        return not directory or path.startswith(directory + "/")

    # Exchanging live/<subtree> for the staged tree turns the destination into the mirror.
    assert {k: target(v) for k, v in dest.items() if not below(k)} | targets(p) == \
        {k: target(v) for k, v in staged.items()}
    assert all(below(k) for k in targets(p))
    assert set(p.copy).isdisjoint(p.link())
    assert p.linked == len(p.link()) and p.link() == sorted(p.link())
    assert sorted(p.copy + p.link()) == [e.path for e in p.expected()]
    assert p.delete == sorted(k for k in dest if k in in_scope and k not in source)
    assert all(below(k) for k in p.delete)
    assert all(dest.get(k) != v for k, v in staged.items() if k in p.copy)
    assert all(dest[k] == v for k, v in staged.items() if k in p.link())
    assert p.noop == (staged == dest)
    assert set(p.reread) <= set(p.copy)
    # The promotion root is a directory before and after, and no deeper one holding every change is.
    if p.subtree:
        assert has_dir(dest, p.subtree) and has_dir(staged, p.subtree)
    changed = p.copy + p.delete
    if changed:
        deeper = [d for d in dirs_of(changed[0]) if len(d) > len(p.subtree) and all(below(k, d) for k in changed)]
        assert not [d for d in deeper if has_dir(dest, d) and has_dir(staged, d)]


# --- directories rsync may take whole -----------------------------------------------------------


def test_a_first_pull_hands_rsync_every_directory_below_the_top_whole() -> None:
    remote = {**REMOTE, "_derived/ns/deep/c": b"c", "_auxiliary/x/y": b"y"}
    p = plan(Manifest(exists=False, algo="sha256", entries=[]), manifest_of(remote), "pull")
    assert p.whole_dirs == ["_auxiliary/x", "_derived/ns", "_derived/ns/deep", "_snapshots"]


def test_a_directory_with_a_kept_file_or_a_special_is_not_whole() -> None:
    remote = {**REMOTE, "_derived/ns/c": b"new", "_derived/other/d": b"d", "_derived/odd/e": b"e"}
    local = dict(LOCAL)
    link = manifest_of({"_derived/odd/link": b""}, kind="symlink").entries
    local_manifest = manifest_of(local)
    remote_manifest = manifest_of(remote)
    remote_manifest.entries = sorted(remote_manifest.entries + link, key=lambda e: e.path)
    p = plan(local_manifest, remote_manifest, "pull")
    assert "_derived/ns/a" in p.link()  # kept: its directory is not whole, though b and c are copied
    assert p.whole_dirs == ["_derived/other", "_snapshots"]


def test_the_promoted_directory_itself_is_never_whole() -> None:
    base = {"records.parquet": b"P", "_derived/ns/a": b"a", "_derived/ns/sub/b": b"b", "_derived/z": b"z"}
    edited = {**base, "_derived/ns/new": b"n", "_derived/ns/sub/c": b"c"}
    p = plan(manifest_of(base), manifest_of(edited), "pull")
    assert (p.subtree, p.copy) == ("_derived/ns", ["_derived/ns/new", "_derived/ns/sub/c"])
    assert p.whole_dirs == []  # ns keeps a, sub keeps b: both are held; ns is the subtree anyway
    edited["_derived/ns/sub/b"] = b"changed"
    p = plan(manifest_of(base), manifest_of(edited), "pull")
    assert p.whole_dirs == ["_derived/ns/sub"]


# Names that sort around "/" ('.' just before it, '0' just after) and around each other.
tree_names = st.sampled_from(["a", "a.b", "a0", "a-", "b", "ab", "é", ".usr.lock"])


@settings(max_examples=300, deadline=None)
@given(st.sets(st.lists(tree_names, min_size=1, max_size=4).map("/".join), max_size=30),
       st.sampled_from(["", "a/", "a/b/"]))
def test_top_names_are_the_distinct_first_components(paths: set[str], prefix: str) -> None:
    """Bisecting past each directory finds what a step per entry finds."""
    paths = {prefix + p for p in paths if not any(q.startswith(p + "/") for q in paths)}  # a name is a file or a dir
    # Around the prefix, not below it.
    others = {p for p in ("0", "a.b/x", "a/b0", "a/b.c", "b/x", "z") if prefix and not p.startswith(prefix)}
    others = {p for p in others if not any(q.startswith(p + "/") or p.startswith(q + "/") for q in paths)}
    entries = manifest_of({p: b"x" for p in paths | others}).entries
    lo, hi = prefix_bounds(entries, prefix, key=entry_path) if prefix else (0, len(entries))
    names = list(top_names(entries, len(prefix), lo, hi))
    assert names == sorted(set(names), key=names.index)  # each once
    assert set(names) == {p[len(prefix):].partition("/")[0] for p in paths}


@settings(max_examples=200, deadline=None)
@given(st.sets(st.lists(tree_names, min_size=1, max_size=3).map("/".join), min_size=1, max_size=20), st.data())
def test_entries_of_finds_each_path_with_or_without_the_cursor(paths: set[str], data: st.DataObject) -> None:
    entries = manifest_of({p: p.encode() for p in paths}).entries
    wanted = sorted(data.draw(st.sets(st.sampled_from(sorted(paths)))))
    assert [e.path for e in entries_of(wanted, entries)] == wanted
