"""Nothing is ever interpreted by a shell: hostile dataset ids, file names and base dirs are
transferred byte-exact over the real sshd, or refused with a clear error.

Canaries: names contain `$(touch /tmp/PWNED-…)` and `` `touch PWNED-…` ``; a shell that ever
saw one would create the file, locally or on the remote (the same machine here), and every
test checks that none exists.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from helpers import BASE_FILES, REMOTE, Sides, load_audit, run_usr, tree_state, write_tree

TOKEN = secrets.token_hex(4)
CANARY = f"PWNED-{TOKEN}"


def sub(tag: str) -> str:
    return f"$(touch /tmp/{CANARY}-{tag})"


def backticks(tag: str) -> str:
    return f"`touch {CANARY}-{tag}`"


@pytest.fixture(autouse=True)
def no_canary(sshd_rig, tmp_path: Path) -> Iterator[None]:
    yield
    for place in (Path("/tmp"), sshd_rig.home, Path.cwd(), tmp_path):
        assert sorted(p.name for p in place.glob(f"{CANARY}*")) == [], f"a shell ran a name in {place}"


def content(root: Path) -> dict[str, bytes]:
    return {p: b for p, (b, _) in tree_state(root).items()}


def on(sides: Sides, dataset: str) -> tuple[Path, Path]:
    return sides.root.joinpath(*dataset.split("/")), sides.base.joinpath(*dataset.split("/"))


def usr(sides: Sides, action: str, dataset: str, audit: Path) -> dict:
    r = run_usr(sides.cfg, action, dataset, REMOTE, *(["-y"] if action != "diff" else []),
                "--audit-json-out", str(audit))
    assert r.returncode == 0, r.stderr
    data = load_audit(audit)
    assert data["dataset"] == dataset
    return data


def round_trip(sides: Sides, dataset: str, tmp_path: Path, files: dict[str, bytes]) -> tuple[dict, dict]:
    """Push `files` as a new remote dataset, change it there, pull it back; both audits."""
    local, remote = on(sides, dataset)
    write_tree(local, files)
    push = usr(sides, "push", dataset, tmp_path / "push.json")
    assert push["transfer_state"] == "TRANSFERRED"
    assert content(remote) == content(local) == files

    write_tree(remote, {".events.log": files[".events.log"] + b'{"event":"remote"}\n',
                        "_derived/ns/part-remote.parquet": b"PAR1remote"})
    sides.chown_remote()
    pull = usr(sides, "pull", dataset, tmp_path / "pull.json")
    assert pull["transfer_state"] == "TRANSFERRED"
    assert content(local) == content(remote) != files
    assert usr(sides, "diff", dataset, tmp_path / "diff.json")["post"]["in_sync"] is True
    return push, pull


# --- dataset ids ---------------------------------------------------------------------------------------

IDS = [
    "my data set",
    "it's \"quoted\"",
    f"{sub('id')}/x",
    f"{backticks('id')}; echo hi & | > <",
    "données/ünïcødé ✓",
    "~root/*?[x]",
]


@pytest.mark.parametrize("dataset", IDS)
def test_hostile_dataset_ids_are_just_names(sides: Sides, tmp_path: Path, dataset: str) -> None:
    round_trip(sides, dataset, tmp_path, BASE_FILES)
    assert sorted(p.relative_to(sides.base).as_posix() for p in sides.base.rglob("records.parquet")) == \
        [f"{dataset}/records.parquet"]


@pytest.mark.parametrize(("dataset", "message"), [
    ("-rf", "unsafe dataset id '-rf': a component starts with '-'"),
    ("ok/--delete", "unsafe dataset id 'ok/--delete': a component starts with '-'"),
    ("a\nb", r"unsafe dataset id 'a\nb': control character in path"),
])
def test_unsafe_dataset_ids_are_refused(sides: Sides, dataset: str, message: str) -> None:
    r = run_usr(sides.cfg, "pull", "-y", "--", dataset, REMOTE)  # `--`: else click reads -rf as options
    assert r.returncode == 2, r.stderr
    error, hint = r.stderr.strip().splitlines()[-2:]
    assert error == f"error: {message}"
    assert hint.startswith("hint: ")


# --- file names --------------------------------------------------------------------------------------

NAMES = [
    "notes/my file.txt", "notes/it's.txt", 'notes/say "hi".txt', f"notes/{sub('f')}", f"notes/{backticks('f')}.txt",
    "notes/a;b&c|d>e<f.txt", "notes/-rf", "notes/--delete", "_derived/-e/-n.parquet", "notes/données ✓.txt",
    "notes/*?[a]", "notes/back\\slash", "notes/tab\there", "notes/lit\\#012eral", "notes/ leading space",
    "notes/trailing space ", "notes/%2F", "-dash-top.txt",
]


def test_hostile_file_names_round_trip(sides: Sides, tmp_path: Path) -> None:
    files = {**BASE_FILES, **{name: name.encode() + b"\n" for name in NAMES}}
    push, pull = round_trip(sides, "densegen/names", tmp_path, files)
    assert push["transfer"] == {**push["transfer"], "files": len(files), "bytes": sum(map(len, files.values()))}
    aux = sorted(n for n in NAMES if not n.startswith("_derived/"))
    assert push["_auxiliary"]["local_only"] == sorted(["notes/readme.txt", *aux])
    assert push["_derived"]["local_only"] == sorted(["-e/-n.parquet", "ns/part-0001.parquet"])
    assert pull["_derived"]["remote_only"] == ["ns/part-remote.parquet"]


def test_newline_in_a_file_name_is_reported_and_never_transferred(sides: Sides, tmp_path: Path) -> None:
    files = {**BASE_FILES, "notes/new\nline.txt": b"odd\n"}
    local, remote = on(sides, "densegen/newline")
    write_tree(local, files)
    push = usr(sides, "push", "densegen/newline", tmp_path / "push.json")
    assert push["transfer_state"] == "TRANSFERRED"
    assert "1 symlinks or special files are not transferred" in push["warnings"]
    assert content(remote) == BASE_FILES

    (remote / "notes" / "other\nline.txt").write_bytes(b"odd too\n")
    sides.chown_remote()
    pull = usr(sides, "pull", "densegen/newline", tmp_path / "pull.json")
    assert pull["transfer_state"] == "NO-OP"  # the only difference is a name no manifest carries
    assert "2 symlinks or special files are not transferred" in pull["warnings"]
    assert "notes/other\nline.txt" not in content(local)


# --- base dirs and local roots ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["asyncssh", "openssh"])  # openssh: rsync runs through the remote shell
def test_hostile_base_dir_and_root(sides: Sides, tmp_path: Path, transport: str) -> None:
    weird = ["sp ace", "quo'te\"d", sub("base"), f"{backticks('base')};-rf", "ü ✓"]
    base = sides.base.joinpath(*weird)
    root = tmp_path.joinpath("local root", *weird)
    base.mkdir(parents=True)
    root.mkdir(parents=True)
    sides.rig.chown_tree(sides.base)
    profile = sides.rig.remotes_toml(base_dir=base, transport=transport)
    sides.cfg.write_text(tomli_w.dumps({"root": str(root)}) + "\n" + profile)
    weird_sides = Sides(sides.cfg, root, base, sides.rig)

    files = {**BASE_FILES, "notes/my file.txt": b"x\n", f"notes/{sub('bf')}": b"y\n"}
    round_trip(weird_sides, "densegen/my_dataset", tmp_path, files)
    assert (base / "densegen" / "my_dataset" / "notes" / "my file.txt").read_bytes() == b"x\n"
