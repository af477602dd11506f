"""What a person at a terminal and a cron job see: progress bars (terminal only), -q, --json,
JSON logs, `usr history`, `usr schema audit`, `usr remotes ls`, shell completion."""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import subprocess
from pathlib import Path

import jsonschema
import pexpect
import pytest
import tomli_w
from docblocks import shim_bin
from helpers import (
    BASE_FILES,
    DATASET,
    REMOTE,
    Sides,
    load_audit,
    local_sides,
    run_usr,
    set_mtimes,
    usr_argv,
    usr_env,
    write_tree,
)

from usrsync import config
from usrsync.manifest import local_manifest
from usrsync.progress import Bars
from usrsync.session import RemoteSession

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
BAR_LINE = re.compile(r"^(hashing \w+|checking \w+|transfer)\b.*?(\d+)%")
MiB = 1 << 20


@functools.cache
def big_files() -> dict[str, bytes]:
    """A few MiB in many files: enough for the bars to have something to show (read-only)."""
    files = {f"_derived/ns/part-{i:04d}.parquet": os.urandom(MiB // 4) for i in range(16)}
    return {**BASE_FILES, **files, "records.parquet": os.urandom(2 * MiB)}


def on_a_terminal(cfg: Path, *args: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    """Run the CLI on a pseudo-terminal (stdin, stdout and stderr); its whole output and exit code."""
    argv = usr_argv(cfg, *args)
    child = pexpect.spawn(argv[0], argv[1:], env=usr_env(env), encoding="utf-8", timeout=120,
                          dimensions=(40, 160))
    try:
        output = child.read()  # to EOF: bounded by the timeout
    finally:
        child.close(force=True)  # already gone after EOF; stopped by its pid after a timeout
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return output, child.exitstatus


def bar_percentages(output: str) -> dict[str, list[int]]:
    """Every rendered frame of every bar: its percentages in the order they were drawn."""
    seen: dict[str, list[int]] = {}
    for segment in re.split(r"[\r\n]", ANSI.sub("", output)):
        m = BAR_LINE.match(segment.strip())
        if m:
            seen.setdefault(m[1], []).append(int(m[2]))
    return seen


@pytest.fixture
def big(tmp_path: Path) -> Sides:
    sides = local_sides(tmp_path / "w")
    sides.seed_remote(big_files())
    set_mtimes(sides.remote, 1_700_000_000)
    return sides


# --- progress ---------------------------------------------------------------------------------


def test_progress_bars_on_a_terminal(big: Sides) -> None:
    # Held 1.5 s at the first transferred file, so the bars are drawn mid-run as well.
    output, code = on_a_terminal(big.cfg, "pull", DATASET, REMOTE, "-y",
                                 env={"USRSYNC_PAUSE_AT": "mid-rsync", "USRSYNC_PAUSE_SECONDS": "1.5"})
    assert code == 0, output
    total = sum(len(d) for d in big_files().values())
    plain = ANSI.sub("", output)
    frames = bar_percentages(output)
    assert frames["hashing remote"][-1] == 100 and frames["transfer"][-1] == 100, frames
    for bar, percentages in frames.items():
        assert percentages == sorted(percentages), f"{bar} went backwards: {percentages}"
    # Bytes of the known totals, rate and ETA on the final transfer frame.
    done = f"{total / MiB:.1f}/{total / MiB:.1f} MiB"
    final = [s for s in re.split(r"[\r\n]", plain) if s.startswith(f"transfer ({len(big_files())} files)")]
    assert final and done in final[-1] and re.search(r"B/s", final[-1]) and re.search(r"\d:\d\d:\d\d", final[-1])
    assert any(s.startswith(f"hashing remote ({len(big_files())}/{len(big_files())} files)") and done in s
               for s in re.split(r"[\r\n]", plain)), plain
    # The bars are gone before the report, and the cursor is back.
    assert output.rindex(SHOW_CURSOR) > output.rindex(HIDE_CURSOR)
    assert output.rindex(SHOW_CURSOR) < output.index("PULL: TRANSFERRED")
    big.assert_in_sync()


@pytest.mark.parametrize(("global_flags", "pull_flags"), [([], ["--no-progress"]), (["--log-format", "json"], []),
                                                        (["-q"], [])], ids=["no-progress", "json-logs", "quiet"])
def test_no_bars_on_a_terminal_when_turned_off(big: Sides, global_flags: list[str], pull_flags: list[str]) -> None:
    output, code = on_a_terminal(big.cfg, *global_flags, "pull", DATASET, REMOTE, "-y", *pull_flags)
    assert code == 0, output
    assert bar_percentages(output) == {} and HIDE_CURSOR not in output
    if "-q" in global_flags:
        assert output == ""
    else:
        assert "PULL: TRANSFERRED" in output
    big.assert_in_sync()


def test_no_progress_without_a_terminal(big: Sides) -> None:
    proc = big.run("pull")  # stdin /dev/null, stdout and stderr pipes
    assert proc.returncode == 0
    assert proc.stderr == ""  # not a bar, not an escape sequence, nothing
    assert "\x1b" not in proc.stdout and "%" not in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("PULL: TRANSFERRED")


def test_bars_never_go_backwards() -> None:
    bars = Bars()
    try:
        bars.transfer(1, 300, 1000)
        bars.transfer(2, 200, 1000)  # rsync reported files out of order: the bar holds
        bars.transfer(3, 5000, 1000)  # more than planned (a file grew): capped at 100 %
        bars.hashing("local", 0, 0, 2, 100)
        bars.hashing("local", 2, 100, 2, 100)
        bars.hashing("local", 0, 0, 1, 10)  # the re-check after the copy: a new bar
        tasks = {t.description: (t.completed, t.total) for t in bars.progress.tasks}
    finally:
        bars.stop()
    assert tasks == {"transfer (3 files)": (1000, 1000), "checking local (0/1 files)": (0, 10)}


def test_local_hashing_reports_known_totals(tmp_path: Path) -> None:
    files = {f"_derived/f{i}": os.urandom(1000 + i) for i in range(20)} | {"records.parquet": b"PAR1"}
    write_tree(tmp_path / "ds", files)
    calls: list[tuple[int, int, int, int]] = []
    local_manifest(tmp_path / "ds", "sha256", jobs=2, use_cache=False, progress=lambda *c: calls.append(c))
    total = (len(files), sum(len(d) for d in files.values()))
    assert calls[0] == (0, 0, *total) and calls[-1] == (*total, *total)
    assert [c[:2] for c in calls] == sorted(c[:2] for c in calls) and len(calls) == len(files) + 1


async def test_remote_hashing_reports_known_totals(tmp_path: Path) -> None:
    sides = local_sides(tmp_path)
    sides.seed_remote(big_files())
    path = sides.cfg
    remote = config.get_remote(config.load_remotes(path), REMOTE, path)
    calls: list[tuple[int, int, int, int]] = []
    session = await RemoteSession.open(remote)
    try:
        manifest = await session.manifest(DATASET, "sha256", jobs=2, use_cache=False,
                                          progress=lambda *c: calls.append(c))
    finally:
        await session.close()
    total = (len(big_files()), sum(len(d) for d in big_files().values()))
    assert len(manifest.files()) == total[0]
    # The agent sends the start and the last file always, at most 5 frames a second in between.
    assert calls[0] == (0, 0, *total) and calls[-1] == (*total, *total)
    assert calls == sorted(calls)


# --- -q and --json ------------------------------------------------------------------------------


def test_quiet_prints_nothing_on_success_and_only_the_error_on_failure(tmp_path: Path) -> None:
    sides = local_sides(tmp_path)
    sides.seed_remote()
    ok = run_usr(sides.cfg, "-q", "pull", DATASET, REMOTE, "-y")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    sides.assert_in_sync()
    again = run_usr(sides.cfg, "-q", "pull", DATASET, REMOTE, "-y")  # NO-OP
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    missing = run_usr(sides.cfg, "-q", "pull", "densegen/other", REMOTE, "-y")
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr.splitlines() == [
        "error: the dataset does not exist on the remote side",
        "hint: check the dataset id and the remote's base_dir (`usr remotes show NAME`)",
    ]


@pytest.mark.parametrize("action", ["diff", "pull"])
def test_json_prints_only_the_audit_document(tmp_path: Path, action: str) -> None:
    sides = local_sides(tmp_path)
    sides.seed_remote()
    out = tmp_path / "audit.json"
    proc = sides.run(action, "--json", "--audit-json-out", str(out))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == out.read_text()  # the same bytes, one document and a newline
    doc = json.loads(proc.stdout)
    assert doc["data"]["transfer_state"] == {"diff": "DIFF-ONLY", "pull": "TRANSFERRED"}[action]


# --- JSON logs ------------------------------------------------------------------------------------


def json_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines()]


def test_json_logs_of_a_pull_over_ssh(sides: Sides, tmp_path: Path) -> None:
    sides.seed_remote()
    out = tmp_path / "audit.json"
    proc = run_usr(sides.cfg, "--log-format", "json", "pull", DATASET, REMOTE, "-y", "--audit-json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    events = json_lines(proc.stderr)  # every stderr line is one JSON object
    names = [e["event"] for e in events]
    assert names == ["connecting", "manifests", "compared", "rsync", "promoted", "finished"], names
    for event in events:
        assert (event["action"], event["dataset"], event["remote"], event["level"]) == \
            ("pull", DATASET, REMOTE, "info")
        assert event["txid"] == events[0]["txid"] and event["timestamp"].endswith("Z")
    by = {e["event"]: e for e in events}
    total = sum(len(d) for d in BASE_FILES.values())
    assert (by["manifests"]["local_files"], by["manifests"]["remote_files"]) == (0, len(BASE_FILES))
    assert by["manifests"]["seconds"] >= 0
    assert (by["rsync"]["files"], by["rsync"]["bytes"]) == (len(BASE_FILES), total)
    finished = by["finished"]
    assert (finished["transfer_state"], finished["exit_code"], finished["files"], finished["bytes"],
            finished["deleted"], finished["in_sync"], finished["warnings"]) == \
        ("TRANSFERRED", 0, len(BASE_FILES), total, 0, True, load_audit(out)["warnings"])
    assert finished["seconds"] >= finished["transfer_seconds"] > 0
    assert sorted(by["compared"]["changed"]) == sorted(["primary", "meta", ".events.log", "_snapshots", "_derived",
                                                        "_auxiliary"])


def test_json_logs_of_a_failure_keep_the_error_lines(tmp_path: Path) -> None:
    sides = local_sides(tmp_path)
    sides.seed_remote()
    proc = run_usr(sides.cfg, "--log-format", "json", "pull", "densegen/other", REMOTE, "-y")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    # All JSON, except the last two: the error and hint lines cron mail readers look for.
    assert lines[-2:] == ["error: the dataset does not exist on the remote side",
                          "hint: check the dataset id and the remote's base_dir (`usr remotes show NAME`)"]
    events = json_lines("\n".join(lines[:-2]))
    assert [e["event"] for e in events] == ["connecting", "manifests", "compared", "failed", "finished", "error"]
    failed, finished, error = events[-3:]
    assert (failed["kind"], failed["exit_code"], failed["dataset"]) == ("usage", 2, "densegen/other")
    assert (finished["transfer_state"], finished["exit_code"]) == ("FAILED", 2)
    assert (error["level"], error["message"], error["exit_code"]) == \
        ("error", "the dataset does not exist on the remote side", 2)
    assert error["hint"].startswith("check the dataset id")


def test_json_logs_of_an_error_before_any_run(tmp_path: Path) -> None:
    cfg = tmp_path / "remotes.toml"
    cfg.write_text("")
    proc = run_usr(cfg, "--log-format", "json", "pull", DATASET, "nowhere", "-y")
    assert proc.returncode == 2
    event, error_line, hint_line = proc.stderr.splitlines()
    message = f'remotes config {cfg}: no remote named "nowhere" (known: none configured)'
    hint = "usr remotes add nowhere --host HOST --base-dir DIR"
    assert json.loads(event) | {"timestamp": ""} == {
        "event": "error", "level": "error", "timestamp": "", "exit_code": 2, "message": message, "hint": hint}
    assert (error_line, hint_line) == (f"error: {message}", f"hint: {hint}")


# --- history and schema -----------------------------------------------------------------------------


def two_remotes(tmp_path: Path, dataset: str) -> Path:
    """Remotes `a` and `b` (local type), both holding `dataset`; an empty local root."""
    remotes = {}
    for name in ("a", "b"):
        base = tmp_path / f"base-{name}"
        write_tree(base / dataset, BASE_FILES)
        remotes[name] = {"type": "local", "base_dir": str(base)}
    (tmp_path / "local").mkdir()
    cfg = tmp_path / "remotes.toml"
    cfg.write_text(tomli_w.dumps({"root": str(tmp_path / "local"), "remotes": remotes}))
    return cfg


def test_history_newest_first_with_remote_filter_and_limit(tmp_path: Path) -> None:
    dataset = f"ux/history-{secrets.token_hex(4)}"  # the archive is shared by all tests
    cfg = two_remotes(tmp_path, dataset)
    runs = [("a", "diff"), ("a", "pull"), ("b", "diff"), ("b", "push"), ("a", "pull")]
    txids = []
    for remote, action in runs:  # quick runs: several start within the same second
        proc = run_usr(cfg, action, dataset, remote, "-y", "--json") if action != "diff" \
            else run_usr(cfg, action, dataset, remote, "--json")
        assert proc.returncode == 0, proc.stderr
        txids.append(json.loads(proc.stdout)["data"]["txid"])

    def history(*args: str) -> list[dict]:
        proc = run_usr(cfg, "history", dataset, *args, "--json")
        assert proc.returncode == 0, proc.stderr
        return [d["data"] for d in json.loads(proc.stdout)]

    newest_first = list(reversed(txids))
    assert [d["txid"] for d in history()] == newest_first
    assert [d["txid"] for d in history("--remote", "a")] == [t for (r, _), t in reversed(list(zip(runs, txids)))
                                                              if r == "a"]
    assert [d["txid"] for d in history("--limit", "2")] == newest_first[:2]
    assert [d["txid"] for d in history("--remote", "b", "--limit", "1")] == [txids[3]]
    assert history("--remote", "nowhere") == []
    text = run_usr(cfg, "history", dataset, "--limit", "3")
    rows = [line.split("\t") for line in text.stdout.splitlines()]
    assert [tuple(r[1:4]) for r in rows] == [("pull", "NO-OP", "a"), ("push", "NO-OP", "b"),
                                             ("diff", "DIFF-ONLY", "b")]


def test_schema_validates_real_audits_of_every_state(tmp_path: Path) -> None:
    printed = run_usr(tmp_path / "none.toml", "schema", "audit")
    assert printed.returncode == 0
    schema = json.loads(printed.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    sides = local_sides(tmp_path)
    sides.seed_remote()
    out = tmp_path / "audits"
    docs = {}

    def run(label: str, action: str, *args: str, code: int = 0) -> None:
        proc = sides.run(action, *args, "--audit-json-out", str(out / f"{label}.json"))
        assert proc.returncode == code, proc.stderr
        docs[label] = json.loads((out / f"{label}.json").read_text())

    run("diff", "diff")
    run("pull", "pull")
    run("noop", "pull")
    write_tree(sides.local, {"_derived/ns/part-0002.parquet": b"PAR1new"})
    run("dry-run", "push", "--dry-run")
    run("push", "push")
    write_tree(sides.local, {".events.log": BASE_FILES[".events.log"] + b'{"event":"local"}\n'})
    write_tree(sides.remote, {".events.log": BASE_FILES[".events.log"] + b'{"event":"remote"}\n'})
    run("failed", "pull", code=6)
    states = {label: (d["data"]["action"], d["data"]["transfer_state"]) for label, d in docs.items()}
    assert states == {"diff": ("diff", "DIFF-ONLY"), "pull": ("pull", "TRANSFERRED"), "noop": ("pull", "NO-OP"),
                      "dry-run": ("push", "DRY-RUN"), "push": ("push", "TRANSFERRED"), "failed": ("pull", "FAILED")}
    validator = jsonschema.Draft202012Validator(schema)
    for label, doc in docs.items():
        errors = [e.message for e in validator.iter_errors(doc)]
        assert errors == [], f"{label}: {errors}"
    # The schema is not vacuous: a retyped or renamed key is caught.
    bad = json.loads(json.dumps(docs["push"]))
    bad["data"]["transfer_state"] = "DONE"
    bad["data"]["transfer"]["files"] = "3"
    del bad["data"]["action"]
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert len(messages) == 3, messages
    assert any("'action' is a required property" in m for m in messages)


# --- remotes ls over ssh ---------------------------------------------------------------------------


def test_remotes_ls_over_ssh(sides: Sides) -> None:
    base = sides.base
    solo = {"records.parquet": b"PAR1solo", "meta.md": b"# solo\n"}
    write_tree(base / DATASET, BASE_FILES)
    write_tree(base / "solo", solo)
    write_tree(base / "notes" / "todo", {"readme.txt": b"not a dataset\n"})  # no records.parquet
    (base / DATASET / "link").symlink_to("records.parquet")  # never transferred, so not counted
    set_mtimes(base / DATASET, 1_700_000_000)
    set_mtimes(base / "solo", 1_700_000_500)
    os.utime(base / DATASET / "_derived" / "ns" / "part-0001.parquet", (1_700_000_900, 1_700_000_900))
    sides.chown_remote()

    proc = run_usr(sides.cfg, "remotes", "ls", REMOTE, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        {"dataset": DATASET, "files": len(BASE_FILES), "bytes": sum(len(d) for d in BASE_FILES.values()),
         "last_change_ns": 1_700_000_900 * 10**9},
        {"dataset": "solo", "files": 2, "bytes": sum(len(d) for d in solo.values()),
         "last_change_ns": 1_700_000_500 * 10**9},
    ]
    text = run_usr(sides.cfg, "remotes", "ls", REMOTE)
    assert text.returncode == 0, text.stderr
    assert [line.split("\t") for line in text.stdout.splitlines()] == [
        [DATASET, "1.1 KiB", f"{len(BASE_FILES)} files", "2023-11-14T22:28:20Z"],
        ["solo", "15 B", "2 files", "2023-11-14T22:21:40Z"],
    ]


# --- shell completion ---------------------------------------------------------------------------------


def test_completion_script_and_remote_names(tmp_path: Path) -> None:
    cfg = tmp_path / "remotes.toml"
    cfg.write_text(tomli_w.dumps({"remotes": {n: {"type": "local", "base_dir": "/srv"} for n in ("alpha", "beta")}}))
    env = {**os.environ, "PATH": f"{shim_bin(tmp_path / 'bin')}:{os.environ['PATH']}", "USR_REMOTES_PATH": str(cfg)}
    source = subprocess.run(["usr"], env={**env, "_USR_COMPLETE": "bash_source"}, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    assert source.returncode == 0 and "complete -o nosort -F _usr_completion usr" in source.stdout
    # The script, loaded into a real bash, completes commands and the configured remote names.
    script = ('eval "$(_USR_COMPLETE=bash_source usr)"\n'
              'complete_words() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=(); _usr_completion usr; '
              'echo "${COMPREPLY[*]}"; }\n'
              'complete_words usr rem\n'
              'complete_words usr pull densegen/my_dataset ""\n'
              'complete_words usr remotes doctor --remote b\n')
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["remotes", "alpha beta", "beta"]
