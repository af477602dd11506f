"""Every block of README.md and docs/*.md marked `<!-- tested -->` is run (see tests/docblocks.py).

- session blocks: each document's blocks in order in one bash, against a `type = "local"` remote
  named `bu-scc` (the docs' name) holding `densegen/my_dataset`;
- ssh blocks: on their own, against the real sshd rig, under the documented host name;
- the cron recipe: as a script with no terminal: a clean night, a locked night, a failed night,
  a night whose run cannot start;
- toml blocks: through the real remotes-config loader; json blocks: against `usr schema audit`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import tomli_w
from docblocks import (
    MODES,
    Block,
    all_blocks,
    doc_paths,
    docs_env,
    failing_block,
    parse_blocks,
    run_script,
    session_script,
)
from helpers import (
    BASE_FILES,
    DATASET,
    load_audit,
    pause_env,
    paused_pid,
    set_mtimes,
    start_usr,
    tree_state,
    write_tree,
)
from rig import SshRig

from usrsync import audit, config

DOC_REMOTE = "bu-scc"  # the remote name used throughout the docs
DOC_HOST = "scc1.bu.edu"
BLOCKS = all_blocks()


def blocks_of(mode: str, lang: str = "bash") -> list[Block]:
    return [b for b in BLOCKS if b.mode == mode and b.lang == lang]


def ids(blocks: list[Block]) -> list[str]:
    return [b.where for b in blocks]


def local_remote_setup(tmp: Path, remote_files: dict[str, bytes] = BASE_FILES,
                       local_files: dict[str, bytes] | None = None) -> tuple[Path, Path, Path]:
    """A remotes config with the docs' `bu-scc` as a `type = "local"` remote whose base dir holds
    DATASET; returns (config, local root, remote base)."""
    root, base = tmp / "local", tmp / "remote-base"
    write_tree(base / DATASET, remote_files)
    set_mtimes(base, 1_700_000_000)
    root.mkdir()
    if local_files is not None:
        write_tree(root / DATASET, local_files)
        set_mtimes(root, 1_700_000_000)
    cfg = tmp / "remotes.toml"
    remotes = {DOC_REMOTE: {"type": "local", "base_dir": str(base)}}
    cfg.write_text(tomli_w.dumps({"root": str(root), "remotes": remotes}))
    return cfg, root, base


# --- the markers themselves ------------------------------------------------------------------


def test_every_marker_is_well_formed_and_the_required_blocks_are_marked() -> None:
    for path in doc_paths():
        parse_blocks(path)  # raises on a marker without a fence or an unterminated block
    assert {b.mode for b in BLOCKS} <= set(MODES), [b.where for b in BLOCKS if b.mode not in MODES]
    for block in BLOCKS:
        assert (block.mode, block.lang) in {("session", "bash"), ("session", "toml"), ("session", "json"),
                                            ("ssh", "bash"), ("cron", "bash")}, block.where
    readme = [b for b in BLOCKS if b.doc == "README.md"]
    texts = {b.mode: [x.text for x in readme if x.mode == b.mode] for b in readme}
    # The quickstart (remote -> doctor -> pull), the seed's quick loop, the cron recipe and completion.
    assert any("usr remotes doctor" in t and "usr pull" in t for t in texts["ssh"])
    assert any('usr diff "$DATASET_ID" "$REMOTE"' in t and 'usr push "$DATASET_ID"' in t for t in texts["session"])
    assert any("_USR_COMPLETE=bash_source usr" in t for t in texts["session"])
    assert len(texts["cron"]) == 1
    runbook = "".join(b.text for b in BLOCKS if b.doc == "docs/audit-loop.md" and b.mode == "session")
    for check in (".data | [.action, .transfer_state, .primary.changed, ._derived.changed, ._auxiliary.changed]",
                  "[.usr_output_version, .data.verify.primary, .data.verify.sidecars, .data.verify.content_hashes]",
                  "derived_local_only: ._derived.local_only"):
        assert check in runbook, check


# --- sessions ---------------------------------------------------------------------------------

SESSION_DOCS = sorted({b.doc for b in blocks_of("session")})


@pytest.mark.parametrize("doc", SESSION_DOCS)
def test_session_blocks_run(doc: str, tmp_path: Path) -> None:
    blocks = [b for b in blocks_of("session") if b.doc == doc]
    cfg, root, base = local_remote_setup(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "session.sh"
    script.write_text(session_script(blocks))
    proc = run_script(script, work, docs_env(tmp_path, USR_REMOTES_PATH=str(cfg)))
    assert proc.returncode == 0, f"{failing_block(proc.stderr)} failed ({proc.returncode}):\n{proc.stderr}"

    audits = work / ".usr-sync-audit"
    if doc in ("README.md", "docs/audit-loop.md"):  # the seed's loop: diff, pull, push
        assert load_audit(audits / "diff-before-transfer.json")["transfer_state"] == "DIFF-ONLY"
        assert load_audit(audits / "push.json")["transfer_state"] == "NO-OP"  # nothing changed locally
        assert tree_state(root / DATASET) == tree_state(base / DATASET)
        # The decision line of the runbook, for the pull that brought every section over.
        assert "pull\tTRANSFERRED\ttrue\ttrue\ttrue" in proc.stdout.splitlines()
    if doc == "README.md":
        assert load_audit(audits / "pull.json")["transfer_state"] == "TRANSFERRED"
        assert "complete -o nosort -F _usr_completion usr" not in proc.stdout  # eval'ed, not printed
    if doc == "docs/audit-loop.md":
        lines = proc.stdout.splitlines()
        assert "1\thash\tstrict\ton" in lines
        deltas = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.index("}") + 1])
        assert deltas == {"derived_local_only": [], "derived_remote_only": ["ns/part-0001.parquet"],
                          "aux_local_only": [], "aux_remote_only": ["notes/readme.txt"]}
        # The gating block pulled again: nothing new arrived, so nothing was rebuilt.
        assert load_audit(audits / "pull.json")["transfer_state"] == "NO-OP"
        assert load_audit(audits / "diff.json")["post"]["in_sync"] is True


# --- ssh: the first pull, as a new user types it ------------------------------------------------

def site_values(rig: SshRig, base: Path) -> dict[str, str]:
    """The documented site values that cannot exist here, each with the rig's replacement (nothing
    else in the block is touched). The host name stays: it is a ~/.ssh/config Host alias in the
    block's HOME, pointing at the rig."""
    return {"/project/alice/usr/datasets": str(base), "--user alice": f"--user {rig.user}"}


@pytest.mark.parametrize("block", blocks_of("ssh"), ids=ids(blocks_of("ssh")))
def test_ssh_blocks_run_against_the_rig(block: Block, sshd_rig: SshRig, fresh_remote_base: Path,
                                        tmp_path: Path) -> None:
    write_tree(fresh_remote_base / DATASET, BASE_FILES)
    sshd_rig.chown_tree(fresh_remote_base)
    text = block.text
    for placeholder, value in site_values(sshd_rig, fresh_remote_base).items():
        assert placeholder in text, f"{block.where}: expected the documented {placeholder!r}"
        text = text.replace(placeholder, value)
    assert DOC_HOST in text
    env = docs_env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"))
    ssh_dir = Path(env["HOME"]) / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "config").write_text(f"Host {DOC_HOST}\n  HostName {sshd_rig.host}\n  Port {sshd_rig.port}\n"
                                    f"  IdentityFile {sshd_rig.key}\n")
    shutil.copy(sshd_rig.known_hosts, ssh_dir / "known_hosts")
    work = tmp_path / "checkout"
    work.mkdir()
    script = tmp_path / "block.sh"
    script.write_text("set -euo pipefail\n" + text)
    proc = run_script(script, work, env)
    assert proc.returncode == 0, f"{block.where} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"

    if "usr remotes doctor" in text:
        checks = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL", "skip"))]
        assert checks and all(line.startswith("ok") for line in checks), proc.stdout
    if "usr pull" in text:
        data = load_audit(work / "pull.json")
        assert (data["transfer_state"], data["post"]["in_sync"]) == ("TRANSFERRED", True)
        assert (data["remote"]["name"], data["remote"]["host"], data["remote"]["type"]) == (DOC_REMOTE, DOC_HOST, "ssh")
        pulled = tmp_path / "data" / "usrsync" / "datasets" / DATASET  # the default root
        assert tree_state(pulled) == tree_state(fresh_remote_base / DATASET)
        assert any(line.startswith("PULL: TRANSFERRED ") and line.endswith("s)") and "verified, in sync" in line
                   for line in proc.stdout.splitlines()), proc.stdout


# --- the cron recipe ---------------------------------------------------------------------------


def cron_script(home: Path) -> Path:
    """The README's recipe, installed where it says (`~/bin/usr-nightly-pull`, executable)."""
    (recipe,) = blocks_of("cron")
    path = home / "bin" / "usr-nightly-pull"
    path.parent.mkdir(parents=True)
    path.write_text(recipe.text)
    path.chmod(0o755)
    return path


def run_cron(tmp: Path, cfg: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One night: the script run the way cron runs it (no terminal, the crontab's PATH)."""
    env = docs_env(tmp, USR_REMOTES_PATH=str(cfg))
    env["PATH"] = f"{tmp / 'shims'}:/usr/local/bin:/usr/bin:/bin"  # the crontab's PATH; shims = ~/.local/bin
    home = Path(env["HOME"])
    script = cron_script(home)
    proc = subprocess.run([str(script)], cwd=home, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=180)
    return proc, home / "usr-sync-audit"


def the_audit(audit_dir: Path) -> dict:
    (path,) = audit_dir.glob("pull-*.json")  # one per night, named by the date
    return load_audit(path)


def test_cron_recipe_clean_night_is_silent_and_keeps_the_audit(tmp_path: Path) -> None:
    cfg, root, base = local_remote_setup(tmp_path)
    proc, audits = run_cron(tmp_path, cfg)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    data = the_audit(audits)
    assert (data["transfer_state"], data["post"]["in_sync"]) == ("TRANSFERRED", True)
    assert tree_state(root / DATASET) == tree_state(base / DATASET)


def test_cron_recipe_skips_a_locked_night_quietly(tmp_path: Path) -> None:
    cfg, root, base = local_remote_setup(tmp_path)
    marker = tmp_path / "paused"
    holder = start_usr(cfg, "pull", DATASET, DOC_REMOTE, "-y", "--no-progress",
                       env=pause_env("after-lock", marker))  # last night's run, still going
    try:
        paused_pid(marker, holder)
        proc, audits = run_cron(tmp_path, cfg)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
        error = the_audit(audits)["error"]
        assert (error["kind"], error["exit_code"]) == ("locked", 4)
        assert not (root / DATASET).exists()  # the skipped night changed nothing
    finally:
        marker.unlink(missing_ok=True)
        _, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err


def test_cron_recipe_reports_a_failed_night(tmp_path: Path) -> None:
    # Both sides appended events: the pull is refused (exit 6), which needs a human.
    cfg, root, base = local_remote_setup(
        tmp_path, remote_files={**BASE_FILES, ".events.log": BASE_FILES[".events.log"] + b'{"event":"remote"}\n'},
        local_files={**BASE_FILES, ".events.log": BASE_FILES[".events.log"] + b'{"event":"local"}\n'})
    before = tree_state(root / DATASET)
    proc, audits = run_cron(tmp_path, cfg)
    audit_path = next(audits.glob("pull-*.json"))
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    assert lines[0] == f"usr pull {DATASET} from {DOC_REMOTE}: FAILED (exit 6), audit: {audit_path}"
    assert lines[1].startswith("error: .events.log has diverged: local has 1 and remote has 1 lines past the 2")
    assert lines[2].startswith("hint: ") and len(lines) == 3
    data = the_audit(audits)
    assert (data["transfer_state"], data["error"]["exit_code"]) == ("FAILED", 6)
    assert tree_state(root / DATASET) == before


def test_cron_recipe_reports_a_run_that_cannot_start(tmp_path: Path) -> None:
    cfg = tmp_path / "remotes.toml"
    cfg.write_text(tomli_w.dumps({"remotes": {"elsewhere": {"type": "local", "base_dir": str(tmp_path)}}}))
    proc, audits = run_cron(tmp_path, cfg)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    assert re.fullmatch(rf"usr pull {DATASET} from {DOC_REMOTE}: no audit \(exit 2\), "
                        rf"audit: {re.escape(str(audits))}/pull-\d{{4}}-\d\d-\d\d\.json", lines[0]), lines[0]
    assert lines[1] == f'error: remotes config {cfg}: no remote named "{DOC_REMOTE}" (known: elsewhere)'
    assert lines[2].startswith("hint: ") and len(lines) == 3
    assert not list(audits.glob("pull-*.json"))


# --- toml and json blocks -------------------------------------------------------------------


@pytest.mark.parametrize("block", blocks_of("session", "toml"), ids=ids(blocks_of("session", "toml")))
def test_toml_blocks_load(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "remotes.toml"
    path.write_text(block.text)
    cfg = config.load_remotes(path)
    assert cfg.remotes, f"{block.where}: no remotes"
    if block.doc == "README.md":
        assert cfg.root == "/home/alice/usr/datasets"
        bu = cfg.remotes["bu-scc"]
        assert (bu.type, bu.host, bu.user, bu.port, bu.transport, bu.lock_timeout) == \
            ("ssh", "scc1.bu.edu", "alice", 22, "asyncssh", 300)
        assert (cfg.remotes["scratch"].type, cfg.remotes["scratch"].base_dir) == \
            ("local", "/scratch/alice/usr/datasets")


@pytest.mark.parametrize("block", blocks_of("session", "json"), ids=ids(blocks_of("session", "json")))
def test_json_blocks_are_valid_audit_documents(block: Block) -> None:
    doc = json.loads(block.text)
    jsonschema.validate(doc, audit.json_schema())
    audit.decode(block.text.encode())  # and our own decoder reads it back
