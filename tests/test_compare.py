"""compare(): per-section deltas by content, policy variants, and the .events.log relation (pure)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import pytest
from helpers import OLD_MTIME_NS, manifest_entry, manifest_of
from hypothesis import given, settings
from hypothesis import strategies as st

from remote_agent import usrsync_agent as engine
from usrsync.compare import EventsLines, EventsState, Policy, compare, events_relation
from usrsync.dataset import AUXILIARY, DERIVED, EVENTS, META, PRIMARY, SECTIONS, SNAPSHOTS, classify
from usrsync.manifest import Entry, Manifest

BUCKETS = ("local_only", "remote_only", "differing", "same")

# One path per section, and a few that only look like sections.
SECTION_OF = {
    "records.parquet": PRIMARY,
    "meta.md": META,
    ".events.log": EVENTS,
    "_snapshots/records-1.parquet": SNAPSHOTS,
    "_derived/ns/part-1.parquet": DERIVED,
    "_derived/x": DERIVED,
    "notes/readme.txt": AUXILIARY,
    "_snapshots": AUXILIARY,  # a plain file named like the dir is not a snapshot
    "sub/records.parquet": AUXILIARY,  # only the top-level name is the primary
    "sub/meta.md": AUXILIARY,
    "x/_derived/y": AUXILIARY,
}


def same_paths(cmp, section: str) -> list[str]:
    """The section's paths on both sides that do not differ: compare only counts them."""
    delta = cmp.sections[section]
    local = {e.path for e in cmp.local_files if e.section == section}
    remote = {e.path for e in cmp.remote_files if e.section == section}
    same = sorted((local & remote) - set(delta.differing))
    assert delta.same == len(same)
    return same


def buckets(cmp, section: str) -> dict[str, list[str]]:
    delta = cmp.sections[section]
    return {b: same_paths(cmp, section) if b == "same" else getattr(delta, b) for b in BUCKETS}


def test_every_section_classifies_its_paths() -> None:
    files = {p: p.encode() for p in SECTION_OF}
    cmp = compare(manifest_of(files), manifest_of(files), Policy())
    for path, section in SECTION_OF.items():
        assert path in same_paths(cmp, section), path
    assert {s: cmp.sections[s].local_files for s in SECTIONS} == {
        PRIMARY: 1, META: 1, EVENTS: 1, SNAPSHOTS: 1, DERIVED: 2, AUXILIARY: 5,
    }
    assert not cmp.changed
    assert cmp.changed_sections() == []


def test_buckets_sorted_and_counted() -> None:
    local = manifest_of({"records.parquet": b"p", "_derived/b": b"1", "_derived/a": b"2", "_derived/c": b"same"})
    remote = manifest_of({"records.parquet": b"p", "_derived/d": b"3", "_derived/a": b"22", "_derived/c": b"same"})
    cmp = compare(local, remote, Policy())
    assert buckets(cmp, DERIVED) == {
        "local_only": ["_derived/b"], "remote_only": ["_derived/d"], "differing": ["_derived/a"],
        "same": ["_derived/c"],
    }
    d = cmp.sections[DERIVED]
    assert (d.local_files, d.remote_files, d.changed) == (3, 3, True)
    assert cmp.changed_sections() == [DERIVED]


def test_same_size_different_digest_is_differing() -> None:
    """A file rewritten in place with the same length is a change: content, not size or name."""
    local = manifest_of({"records.parquet": b"AAAA", "meta.md": b"x", "notes.txt": b"abc"})
    remote = manifest_of({"records.parquet": b"BBBB", "meta.md": b"x", "notes.txt": b"abd"})
    cmp = compare(local, remote, Policy())
    assert cmp.sections[PRIMARY].differing == ["records.parquet"]
    assert cmp.sections[AUXILIARY].differing == ["notes.txt"]
    assert same_paths(cmp, META) == ["meta.md"]


def test_mtime_alone_is_not_a_change_under_hashes() -> None:
    local = manifest_of({"_derived/a": b"x"}, mtime_ns=OLD_MTIME_NS)
    remote = manifest_of({"_derived/a": b"x"}, mtime_ns=OLD_MTIME_NS + 10**9)
    assert same_paths(compare(local, remote, Policy()), DERIVED) == ["_derived/a"]


def test_content_hashes_off_compares_derived_and_auxiliary_by_size_and_mtime() -> None:
    policy = Policy(content_hashes=False)
    assert policy.hashed_sections() == {PRIMARY, META, EVENTS, SNAPSHOTS}
    local = Manifest(exists=True, algo="sha256", entries=[
        manifest_entry("_derived/same", b"aaaa", hashed=False),
        manifest_entry("_derived/touched", b"aaaa", hashed=False),
        manifest_entry("notes.txt", b"aaaa", hashed=False),
        manifest_entry("records.parquet", b"AAAA"),
    ])
    remote = Manifest(exists=True, algo="sha256", entries=[
        manifest_entry("_derived/same", b"bbbb", hashed=False),  # same size+mtime: not looked at
        manifest_entry("_derived/touched", b"aaaa", hashed=False, mtime_ns=OLD_MTIME_NS + 1),
        manifest_entry("notes.txt", b"aaaaa", hashed=False),
        manifest_entry("records.parquet", b"BBBB"),  # the primary is still compared by content
    ])
    cmp = compare(local, remote, policy)
    assert same_paths(cmp, DERIVED) == ["_derived/same"]
    assert cmp.sections[DERIVED].differing == ["_derived/touched"]
    assert cmp.sections[AUXILIARY].differing == ["notes.txt"]
    assert cmp.sections[PRIMARY].differing == ["records.parquet"]


def test_content_hashes_off_keeps_digests_for_other_sections() -> None:
    """Sidecars outside _derived/_auxiliary keep content comparison even with hashes off."""
    cmp = compare(manifest_of({"meta.md": b"AB"}), manifest_of({"meta.md": b"BA"}), Policy(content_hashes=False))
    assert cmp.sections[META].differing == ["meta.md"]


def test_verify_size_compares_the_primary_by_size_only() -> None:
    policy = Policy(verify="size")
    assert PRIMARY not in policy.hashed_sections()
    same = compare(manifest_of({"records.parquet": b"AAAA"}), manifest_of({"records.parquet": b"BBBB"}), policy)
    assert same_paths(same, PRIMARY) == ["records.parquet"]
    grown = compare(manifest_of({"records.parquet": b"AAAA"}), manifest_of({"records.parquet": b"AAAAA"}), policy)
    assert grown.sections[PRIMARY].differing == ["records.parquet"]
    # Sidecars keep their content comparison under --verify size.
    meta = compare(manifest_of({"meta.md": b"AB"}), manifest_of({"meta.md": b"BA"}), policy)
    assert meta.sections[META].differing == ["meta.md"]


def test_verify_parquet_compares_shapes_when_known() -> None:
    local, remote = manifest_of({"records.parquet": b"AAAA"}), manifest_of({"records.parquet": b"BBBB"})
    policy = Policy(verify="parquet")
    assert same_paths(compare(local, remote, policy, primary_shapes=([10, 3], [10, 3])), PRIMARY) == [
        "records.parquet"]
    assert compare(local, remote, policy, primary_shapes=([10, 3], [11, 3])).sections[PRIMARY].differing == [
        "records.parquet"]
    # Without shapes it falls back to content.
    assert compare(local, remote, policy).sections[PRIMARY].differing == ["records.parquet"]


def test_primary_only_scope() -> None:
    policy = Policy(primary_only=True)
    assert [s for s in SECTIONS if policy.in_scope(s)] == [PRIMARY]
    local = manifest_of({"records.parquet": b"p", "meta.md": b"1", "_derived/a": b"x"})
    remote = manifest_of({"records.parquet": b"p", "meta.md": b"2"})
    cmp = compare(local, remote, policy)
    # Out-of-scope sections are still compared (the audit shows them) but change nothing.
    assert cmp.sections[META].differing == ["meta.md"]
    assert cmp.sections[DERIVED].local_only == ["_derived/a"]
    assert not cmp.sections[META].in_scope
    assert not cmp.changed
    assert cmp.changed_sections() == []
    remote2 = manifest_of({"records.parquet": b"q"})
    assert compare(local, remote2, policy).changed_sections() == [PRIMARY]


def test_skip_snapshots_scope() -> None:
    policy = Policy(skip_snapshots=True)
    assert [s for s in SECTIONS if not policy.in_scope(s)] == [SNAPSHOTS]
    local = manifest_of({"records.parquet": b"p", "_snapshots/s1": b"1"})
    remote = manifest_of({"records.parquet": b"p", "_snapshots/s2": b"2"})
    cmp = compare(local, remote, policy)
    assert not cmp.changed
    assert compare(local, remote, Policy()).changed_sections() == [SNAPSHOTS]


def test_specials_are_reported_and_never_bucketed() -> None:
    local = Manifest(exists=True, algo="sha256", entries=[
        manifest_entry("_derived/link", b"", kind="symlink"),
        manifest_entry("records.parquet", b"p"),
    ])
    remote = Manifest(exists=True, algo="sha256", entries=[
        manifest_entry("fifo", b"", kind="special"),
        manifest_entry("records.parquet", b"p"),
    ])
    cmp = compare(local, remote, Policy())
    assert cmp.specials == ["_derived/link", "fifo"]
    assert cmp.sections[DERIVED].local_files == 0
    assert cmp.sections[AUXILIARY].remote_files == 0
    assert not cmp.changed


def test_exists_flags_and_missing_side() -> None:
    cmp = compare(manifest_of({}, exists=False), manifest_of({"records.parquet": b"p"}), Policy())
    assert (cmp.local_exists, cmp.remote_exists) == (False, True)
    assert cmp.sections[PRIMARY].remote_only == ["records.parquet"]


# --- .events.log relation ---------------------------------------------------------------------


def lines_of(data: bytes) -> EventsLines:
    """What the agent's line_digests() reports for a log holding `data` (b"" = missing file)."""
    complete, _, tail = data.rpartition(b"\n")
    parts = [line + b"\n" for line in complete.split(b"\n")] if complete or data.startswith(b"\n") else []
    return EventsLines(digests=[hashlib.blake2b(p, digest_size=8).hexdigest() for p in parts], partial=bool(tail))


def state(relation: str, nl: int, nr: int, common: int, lp: int, rp: int) -> EventsState:
    return EventsState(relation=relation, local_lines=nl, remote_lines=nr, common_lines=common,
                       local_past_common=lp, remote_past_common=rp)


@pytest.mark.parametrize(("local", "remote", "expected"), [
    (b"a\nb\n", b"a\nb\n", state("equal", 2, 2, 2, 0, 0)),
    (b"a\n", b"a\nb\nc\n", state("remote_ahead", 1, 3, 1, 0, 2)),
    (b"a\nb\nc\n", b"a\n", state("local_ahead", 3, 1, 1, 2, 0)),
    (b"a\nx\n", b"a\ny\nz\n", state("diverged", 2, 3, 1, 1, 2)),
    (b"x\n", b"y\n", state("diverged", 1, 1, 0, 1, 1)),
    # missing file (no lines) on one side or both
    (b"", b"a\nb\n", state("remote_ahead", 0, 2, 0, 0, 2)),
    (b"a\n", b"", state("local_ahead", 1, 0, 0, 1, 0)),
    (b"", b"", state("equal", 0, 0, 0, 0, 0)),
    # a partial trailing line is past the common prefix, and never a complete-line prefix
    (b"a\n", b"a\nhalf", state("remote_ahead", 1, 1, 1, 0, 1)),
    (b"a\nhalf", b"a\n", state("local_ahead", 1, 1, 1, 1, 0)),
    (b"a\nhalf", b"a\nhalf and more\n", state("diverged", 1, 2, 1, 1, 1)),
    (b"a\nx", b"a\ny", state("diverged", 1, 1, 1, 1, 1)),
])
def test_events_relation_cases(local: bytes, remote: bytes, expected: EventsState) -> None:
    assert events_relation(lines_of(local), lines_of(remote)) == expected


def test_lines_of_matches_the_agent(tmp_path: Path) -> None:
    """The test's model of line_digests() is the agent's own behaviour."""
    for data in (b"", b"a\n", b"a\nb", b"\n\nx\n", b"half"):
        path = tmp_path / "events.log"
        path.write_bytes(data)
        digests, partial = engine.line_digests(str(path))
        assert EventsLines(digests=digests, partial=partial) == lines_of(data), data
    assert engine.line_digests(str(tmp_path / "missing")) == ([], False)


# --- properties -----------------------------------------------------------------------------

PATHS = sorted(SECTION_OF) + ["_snapshots/records-2.parquet", "_derived/ns/part-2.parquet", "aux.txt"]
CONTENTS = st.sampled_from([b"", b"a", b"b", b"ab", b"ba", b"abc"])  # same sizes, different bytes
MTIMES = st.sampled_from([OLD_MTIME_NS, OLD_MTIME_NS + 1])

side_files = st.dictionaries(st.sampled_from(PATHS), st.tuples(CONTENTS, MTIMES), max_size=len(PATHS))
policies = st.builds(Policy, verify=st.sampled_from(["hash", "size"]), sidecars=st.booleans(),
                     content_hashes=st.booleans(), primary_only=st.booleans(), skip_snapshots=st.booleans())


def build(files: dict[str, tuple[bytes, int]], policy: Policy) -> Manifest:
    """A manifest as the engine builds it under `policy` (unhashed sections get digest '')."""
    hashed = policy.hashed_sections()
    entries = [manifest_entry(p, data, mtime_ns=m, hashed=classify(p) in hashed)
               for p, (data, m) in sorted(files.items())]
    return Manifest(exists=True, algo="sha256", entries=entries)


def oracle_key(entry: Entry, policy: Policy) -> tuple:
    """What must be equal for a file to count as the same under `policy`."""
    if entry.section == PRIMARY and policy.verify == "size":
        return (entry.size,)
    if entry.section in (DERIVED, AUXILIARY) and not policy.content_hashes:
        return (entry.size, entry.mtime_ns)
    return (entry.size, entry.digest)


@settings(max_examples=200, deadline=None)
@given(side_files, side_files, policies)
def test_every_path_in_exactly_one_bucket(lfiles, rfiles, policy) -> None:
    cmp = compare(build(lfiles, policy), build(rfiles, policy), policy)
    placed: dict[str, str] = {}
    for section, delta in cmp.sections.items():
        for bucket, paths in buckets(cmp, section).items():
            assert paths == sorted(paths)
            for path in paths:
                assert path not in placed, f"{path} in {placed[path]} and {bucket}"
                assert classify(path) == section
                placed[path] = bucket
        assert delta.local_files == len(delta.local_only) + len(delta.differing) + delta.same
        assert delta.remote_files == len(delta.remote_only) + len(delta.differing) + delta.same
    assert set(placed) == set(lfiles) | set(rfiles)
    for path, bucket in placed.items():
        if path not in rfiles:
            assert bucket == "local_only"
        elif path not in lfiles:
            assert bucket == "remote_only"
        else:
            assert bucket in ("differing", "same")


@settings(max_examples=200, deadline=None)
@given(side_files, side_files, policies)
def test_swapping_sides_swaps_local_and_remote(lfiles, rfiles, policy) -> None:
    forward = compare(build(lfiles, policy), build(rfiles, policy), policy)
    backward = compare(build(rfiles, policy), build(lfiles, policy), policy)
    for section in SECTIONS:
        f, b = forward.sections[section], backward.sections[section]
        assert same_paths(forward, section) == same_paths(backward, section)
        assert (f.local_only, f.remote_only) == (b.remote_only, b.local_only)
        assert (f.differing, f.same) == (b.differing, b.same)
        assert (f.local_files, f.remote_files) == (b.remote_files, b.local_files)
    assert forward.changed == backward.changed


@settings(max_examples=200, deadline=None)
@given(side_files, side_files, policies)
def test_no_change_iff_in_scope_files_equal(lfiles, rfiles, policy) -> None:
    local, remote = build(lfiles, policy), build(rfiles, policy)
    cmp = compare(local, remote, policy)

    def in_scope(m: Manifest) -> dict[str, tuple]:
        return {e.path: oracle_key(e, policy) for e in m.entries if policy.in_scope(e.section)}

    assert (not cmp.changed) == (in_scope(local) == in_scope(remote))
    assert compare(local, local, policy).changed is False


log_lines = st.lists(st.sampled_from([b"a\n", b"b\n", b"c\n"]), max_size=6)
tails = st.sampled_from([b"", b"t", b"u"])


@settings(max_examples=200, deadline=None)
@given(log_lines, log_lines, tails, tails)
def test_events_relation_is_the_complete_line_prefix_order(lines_a, lines_b, tail_a, tail_b) -> None:
    a, b = b"".join(lines_a) + tail_a, b"".join(lines_b) + tail_b
    la, lb = lines_of(a), lines_of(b)
    forward, backward = events_relation(la, lb), events_relation(lb, la)
    # The relation mirrors when the sides swap.
    mirror = {"equal": "equal", "diverged": "diverged", "local_ahead": "remote_ahead", "remote_ahead": "local_ahead"}
    assert backward.relation == mirror[forward.relation]
    assert (backward.local_past_common, backward.remote_past_common) == (
        forward.remote_past_common, forward.local_past_common)
    # a ⊑ b as complete-line byte prefixes: a has no partial line and b starts with a's bytes.
    a_prefix = not tail_a and b.startswith(a)
    b_prefix = not tail_b and a.startswith(b)
    expected = ("equal" if a_prefix and b_prefix else "remote_ahead" if a_prefix
                else "local_ahead" if b_prefix else "diverged")
    assert forward.relation == expected
    # The common prefix counts the complete lines both share; the rest is past it.
    common = 0
    while common < min(len(lines_a), len(lines_b)) and lines_a[common] == lines_b[common]:
        common += 1
    assert forward.common_lines == common
    assert forward.local_past_common == len(lines_a) - common + bool(tail_a)
    assert forward.remote_past_common == len(lines_b) - common + bool(tail_b)


def test_events_state_round_trips_through_msgspec() -> None:
    s = events_relation(lines_of(b"a\n"), lines_of(b"a\nb\n"))
    assert msgspec.json.decode(msgspec.json.encode(s), type=EventsState) == s

