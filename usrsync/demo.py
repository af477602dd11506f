"""`usr demo`: the runbook's audit loop, run with the real CLI against a throwaway local remote.

Everything lives in one temp dir: a datasets root, a `type = "local"` remote base dir (no SSH
server needed), a remotes.toml and the audit JSON files. Each step runs `usr` as a subprocess,
exactly as a user would, then prints the runbook's jq decision lines computed from its audit.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from usrsync.dataset import classify, local_dataset_dir

DATASET = "densegen/demo_dataset"
REMOTE = "demo"
STEP_TIMEOUT = 300  # seconds; the demo moves a few KiB, so this only bounds a hang

_DIFF_BEFORE = "diff-before-transfer.json"


# --- output: rich on a terminal, plain text otherwise ---------------------------------------


class Output:
    def __init__(self) -> None:
        self.console = None
        if sys.stdout.isatty():
            from rich.console import Console

            self.console = Console(highlight=False, soft_wrap=True)

    def _print(self, text: str, style: str | None = None) -> None:
        if self.console is not None:
            self.console.print(text, style=style, markup=False)
        else:
            print(text)
        sys.stdout.flush()  # the next subprocess writes to the same stdout

    def heading(self, text: str) -> None:
        if self.console is not None:
            self.console.print()
            self.console.rule(text, align="left", style="cyan")
        else:
            print(f"\n== {text} " + "=" * max(3, 76 - len(text)))
        sys.stdout.flush()

    def command(self, text: str) -> None:
        self._print(f"$ {text}", "bold")

    def line(self, text: str = "") -> None:
        self._print(text)

    def detail(self, text: str) -> None:
        self._print(text, "dim")

    def good(self, text: str) -> None:
        self._print(text, "green")

    def bad(self, text: str) -> None:
        self._print(text, "bold red")


# --- the runbook's jq lines, computed in Python ------------------------------------------------


def _get(obj: Any, *keys: str) -> Any:
    """jq's `.a.b`: null when any step is missing."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _tsv(values: list[Any]) -> str:
    """jq's `@tsv`: booleans as true/false, null as an empty field."""
    return "\t".join("" if v is None else str(v).lower() if isinstance(v, bool) else str(v) for v in values)


def decision_lines(doc: dict[str, Any]) -> list[str]:
    """What the three jq lines of the runbook print for this audit document."""
    d = doc.get("data", {})
    state = _tsv([d.get("action"), d.get("transfer_state"), _get(d, "primary", "changed"),
                  _get(d, "_derived", "changed"), _get(d, "_auxiliary", "changed")])
    profile = _tsv([doc.get("usr_output_version"), _get(d, "verify", "primary"), _get(d, "verify", "sidecars"),
                    _get(d, "verify", "content_hashes")])
    deltas = {
        "derived_local_only": _get(d, "_derived", "local_only"),
        "derived_remote_only": _get(d, "_derived", "remote_only"),
        "aux_local_only": _get(d, "_auxiliary", "local_only"),
        "aux_remote_only": _get(d, "_auxiliary", "remote_only"),
    }
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in deltas.items())
    return [state, profile, "{\n" + body + "\n}"]


def changed_sections(doc: dict[str, Any]) -> list[str]:
    d = doc.get("data", {})
    return [s for s in ("primary", "meta", ".events.log", "_snapshots", "_derived", "_auxiliary")
            if _get(d, s, "changed")]


def meaning(doc: dict[str, Any]) -> str:
    """One sentence: what this audit means, in the runbook's terms."""
    d = doc.get("data", {})
    state, changed = d.get("transfer_state"), changed_sections(doc)
    in_sync = _get(d, "post", "in_sync")
    if state == "DIFF-ONLY":
        if not changed:
            return "nothing differs (post.in_sync=true): repeated pull/push calls would be NO-OPs"
        return f"read-only preview; these sections differ: {', '.join(changed)}"
    if state == "NO-OP":
        return "NO-OP with no changed sections: repeating the sync is safe"
    if state == "TRANSFERRED":
        moved = ", ".join(changed) or "nothing"
        proof = "post.in_sync=true: the destination was re-read and equals the source" if in_sync \
            else "post.in_sync=false: NOT proven in sync"
        return f"moved {moved}; {proof}"
    error = _get(d, "error", "message")
    return f"{state}: {error}" if error else str(state)


# --- the demo dataset --------------------------------------------------------------------------


def _fake_parquet(rng: random.Random, size: int) -> bytes:
    """Opaque bytes framed like a parquet file; usrsync compares content, not structure."""
    return b"PAR1" + rng.randbytes(size - 8) + b"PAR1"


def _event(ts: str, action: str, **fields: Any) -> str:
    return json.dumps({"ts": ts, "action": action, **fields}, separators=(",", ":")) + "\n"


def write_remote_dataset(dataset_dir: Path) -> None:
    """A small but realistic USR dataset, as a batch job on the cluster would leave it."""
    rng = random.Random(20260101)
    files: dict[str, bytes] = {
        "records.parquet": _fake_parquet(rng, 48 * 1024),
        "meta.md": b"# demo_dataset\n\nDense-array generation run used by `usr demo`.\n\n"
                   b"- producer: densegen\n- rows: 1200\n",
        ".events.log": (
            _event("2026-01-01T00:00:00Z", "init", rows=1000)
            + _event("2026-01-01T00:00:00Z", "snapshot", file="records-20260101T000000.parquet")
            + _event("2026-01-02T09:30:00Z", "append", rows=200)
        ).encode(),
        "_snapshots/records-20260101T000000.parquet": _fake_parquet(rng, 40 * 1024),
        "_derived/densegen/part-20260102T093000Z-4f2a9c1e.parquet": _fake_parquet(rng, 8 * 1024),
        "_registry/registry.abc.yaml": b"namespace: densegen\ncolumns:\n  - name: score\n    dtype: float64\n",
    }
    for rel, data in files.items():
        path = dataset_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def local_update(dataset_dir: Path) -> list[str]:
    """What a notebook or an infer write-back does locally; returns what was done, for display."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    part = f"_derived/densegen/part-{stamp}-{secrets.token_hex(4)}.parquet"
    with open(dataset_dir / ".events.log", "a", encoding="utf-8") as log:
        log.write(_event(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "attach", overlay=part))
    (dataset_dir / part).write_bytes(_fake_parquet(random.Random(), 6 * 1024))
    notes = dataset_dir / "_artifacts" / "notes.txt"
    notes.parent.mkdir(parents=True, exist_ok=True)
    notes.write_text("Scored with the local model; overlay attached by the notebook.\n", encoding="utf-8")
    return [
        "appended one JSON line to .events.log (an overlay attach)",
        f"wrote a new _derived part: {part.split('/', 1)[1]}",
        "wrote _artifacts/notes.txt",
    ]


def tree_bytes(dataset_dir: Path) -> dict[str, bytes]:
    """Every dataset file (runtime files excluded) with its bytes."""
    out: dict[str, bytes] = {}
    for path in sorted(dataset_dir.rglob("*")):
        rel = path.relative_to(dataset_dir).as_posix()
        if path.is_file() and not path.is_symlink() and classify(rel) is not None:
            out[rel] = path.read_bytes()
    return out


# --- the loop ----------------------------------------------------------------------------------


class Workspace:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "local"
        self.remote_base = base / "remote"
        self.config = base / "remotes.toml"
        self.audit_dir = base / ".usr-sync-audit"
        for d in (self.root, self.remote_base, self.audit_dir):
            d.mkdir(parents=True)
        self.config.write_text(
            "# written by `usr demo`: a remote that is just a directory on this machine\n"
            f"[remotes.{REMOTE}]\ntype = \"local\"\nbase_dir = {json.dumps(str(self.remote_base))}\n",
            encoding="utf-8",
        )
        self.local_dir = local_dataset_dir(self.root, DATASET)
        self.remote_dir = local_dataset_dir(self.remote_base, DATASET)

    def env(self) -> dict[str, str]:
        # Keep the demo's audit archive and hash cache out of the user's own state and cache dirs.
        return {**os.environ, "XDG_STATE_HOME": str(self.base / "state"), "XDG_CACHE_HOME": str(self.base / "cache")}


class Demo:
    def __init__(self, ws: Workspace, out: Output) -> None:
        self.ws = ws
        self.out = out

    def usr(self, args: list[str], audit_name: str) -> tuple[int, dict[str, Any] | None]:
        """Run the real CLI as a subprocess, showing it as the user would type it; returns its audit."""
        audit_path = self.ws.audit_dir / audit_name
        real = [sys.executable, "-m", "usrsync", "--remotes-config", str(self.ws.config), "--root", str(self.ws.root),
                *args, "--audit-json-out", str(audit_path)]
        self.out.command(shlex.join(["usr", *args]) + f' --audit-json-out "$AUDIT_DIR/{audit_name}"')
        try:
            code = subprocess.run(real, stdin=subprocess.DEVNULL, env=self.ws.env(), timeout=STEP_TIMEOUT,
                                  check=False).returncode
        except subprocess.TimeoutExpired:
            self.out.bad(f"the command did not finish within {STEP_TIMEOUT} s")
            return 124, None
        doc = json.loads(audit_path.read_bytes()) if audit_path.is_file() else None
        return code, doc

    def show_decisions(self, doc: dict[str, Any] | None, audit_name: str) -> None:
        if doc is None:
            self.out.bad(f"no audit was written to $AUDIT_DIR/{audit_name}")
            return
        self.out.line()
        self.out.detail(f"decision checks from $AUDIT_DIR/{audit_name} (the runbook's jq lines):")
        state, profile, deltas = decision_lines(doc)
        self.out.detail("  action, transfer_state, primary/_derived/_auxiliary changed:")
        self.out.line(f"    {state}")
        self.out.detail("  usr_output_version, verify.primary/sidecars/content_hashes:")
        self.out.line(f"    {profile}")
        self.out.detail("  file deltas for sidecar decisions:")
        for line in deltas.splitlines():
            self.out.line(f"    {line}")
        self.out.good(f"  -> {meaning(doc)}")

    def sync_step(self, title: str, args: list[str], audit_name: str,
                  check: Callable[[dict[str, Any]], str | None]) -> bool:
        self.out.heading(title)
        code, doc = self.usr(args, audit_name)
        self.show_decisions(doc, audit_name)
        problem = f"exited {code}" if code != 0 else ("wrote no audit" if doc is None else check(doc))
        if problem:
            self.out.bad(f"step failed: {problem}")
            return False
        return True

    def run(self) -> int:
        ws, out = self.ws, self.out
        write_remote_dataset(ws.remote_dir)
        out.heading("usrsync demo: the audit loop on a throwaway local remote")
        out.line(f"workspace      {ws.base}")
        out.line(f"remote         {REMOTE}: type = \"local\", base_dir = {ws.remote_base}")
        out.line(f"local root     {ws.root}")
        remote_files = tree_bytes(ws.remote_dir)
        size = sum(len(b) for b in remote_files.values())
        out.line(f"dataset        {DATASET}: {len(remote_files)} files, {size // 1024} KiB on the remote; "
                 "nothing here yet")
        out.line(f"AUDIT_DIR      {ws.audit_dir}")
        out.detail(f"(below, `usr` runs as `usr --remotes-config {ws.config} --root {ws.root}`)")

        ds = [DATASET, REMOTE]
        steps: list[Callable[[], bool]] = [
            lambda: self.sync_step("1) preview before transfer", ["diff", *ds], _DIFF_BEFORE,
                                   _expect("DIFF-ONLY", in_sync=False)),
            lambda: self.sync_step("2) pull remote -> local", ["pull", *ds, "-y"], "pull.json",
                                   _expect("TRANSFERRED", in_sync=True)),
            self.change_step,
            lambda: self.sync_step("4) push local -> remote", ["push", *ds, "-y"], "push.json",
                                   _expect("TRANSFERRED", in_sync=True)),
            lambda: self.sync_step("5) pull again: nothing to do", ["pull", *ds, "-y"], "pull-again.json",
                                   _expect("NO-OP", in_sync=True)),
            lambda: self.sync_step("6) final diff (--exit-code: 0 means identical)", ["diff", *ds, "--exit-code"],
                                   "diff-after.json", _expect("DIFF-ONLY", in_sync=True)),
        ]
        for step in steps:
            if not step():
                return 1
        return self.proof()

    def change_step(self) -> bool:
        self.out.heading("3) local updates (notebook, infer write-back, overlay attach)")
        for what in local_update(self.ws.local_dir):
            self.out.line(f"  + {what}")
        return True

    def proof(self) -> int:
        self.out.heading("result")
        local, remote = tree_bytes(self.ws.local_dir), tree_bytes(self.ws.remote_dir)
        if local != remote:
            differing = sorted(p for p in local.keys() | remote.keys() if local.get(p) != remote.get(p))
            self.out.bad(f"local and remote trees differ: {', '.join(differing)}")
            return 1
        size = sum(len(b) for b in local.values())
        self.out.good(f"local and remote {DATASET} are byte-identical: {len(local)} files, {size} bytes")
        self.out.good("demo OK: every step exited 0 and the final diff found nothing to move")
        return 0


def _expect(state: str, *, in_sync: bool) -> Callable[[dict[str, Any]], str | None]:
    def check(doc: dict[str, Any]) -> str | None:
        data = doc.get("data", {})
        if data.get("transfer_state") != state:
            return f"transfer_state is {data.get('transfer_state')}, expected {state}"
        if bool(_get(data, "post", "in_sync")) != in_sync:
            return f"post.in_sync is {_get(data, 'post', 'in_sync')}, expected {str(in_sync).lower()}"
        return None

    return check


def run_demo(keep: bool = False) -> int:
    """Run the demo; 0 only if every step exited 0 and both trees end byte-identical."""
    out = Output()
    base = Path(tempfile.mkdtemp(prefix="usrsync-demo-"))
    try:
        code = Demo(Workspace(base), out).run()
        if code != 0:
            out.bad("demo FAILED" + ("" if keep else "; rerun with `usr demo --keep` to inspect the workspace"))
        return code
    finally:
        if keep:
            out.line(f"workspace kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
