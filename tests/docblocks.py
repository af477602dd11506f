"""The fenced blocks of README.md and docs/*.md that are marked to be run by the tests.

A block is marked by an HTML comment on the line right before its opening fence (invisible on
GitHub):

    <!-- tested -->          bash: run in the document's session (below); toml: decoded by the
                             remotes-config loader; json: validated against `usr schema audit`
    <!-- tested: ssh -->     bash: run on its own against the real sshd rig (tests/test_docs.py)
    <!-- tested: cron -->    bash: the cron recipe, run as a script file with no terminal

A document's session runs its plain `tested` bash blocks in order, in one `bash` with
`set -euo pipefail`, in a throwaway working directory, the way a reader pastes them one after
the other: shell variables and files carry over from block to block.

How the docs' commands reach this checkout (explicitly, nothing else is rewritten):
- `usr` is a wrapper on PATH that runs `<this python> -m usrsync`;
- `uv` is a shim first on PATH that accepts only `uv run CMD ARGS…` and runs `CMD ARGS…`
  (the test environment is the synced checkout already); anything else fails loudly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("session", "ssh", "cron")
BLOCK_MARK = "::docs-block "  # printed on stderr before each session block: names the failing one

_MARKER = re.compile(r"^<!--\s*tested(?::\s*(?P<mode>[\w-]+))?\s*-->\s*$")
_FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")

USR_WRAPPER = """#!/bin/sh
exec {python} -m usrsync "$@"
"""

UV_SHIM = """#!/bin/sh
# Test shim: the docs' `uv run CMD ARGS...` runs CMD ARGS... in this (already synced) checkout.
if [ "$1" != run ]; then
  echo "uv shim (tests/docblocks.py): only 'uv run ...' is supported in tested docs, got: uv $*" >&2
  exit 97
fi
shift
exec "$@"
"""


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # line of the opening fence, 1-based
    lang: str
    mode: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def doc_paths() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def parse_blocks(path: Path) -> list[Block]:
    """The marked blocks of one Markdown file; a marker not followed by a fence is an error."""
    lines = path.read_text().splitlines()
    rel = path.relative_to(REPO).as_posix()
    blocks = []
    for i, line in enumerate(lines):
        marker = _MARKER.match(line)
        if not marker:
            continue
        fence = _FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if fence is None:
            raise ValueError(f"{rel}:{i + 1}: a `tested` marker must be followed directly by a ``` fence")
        body = []
        for j in range(i + 2, len(lines)):
            if lines[j].startswith("```"):
                break
            body.append(lines[j])
        else:
            raise ValueError(f"{rel}:{i + 2}: unterminated fenced block")
        blocks.append(Block(doc=rel, line=i + 2, lang=fence["lang"] or "text", mode=marker["mode"] or "session",
                            text="\n".join(body) + "\n"))
    return blocks


def all_blocks() -> list[Block]:
    return [b for path in doc_paths() for b in parse_blocks(path)]


def shim_bin(directory: Path) -> Path:
    """A directory with the `usr` wrapper and the `uv` shim, to put first on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("usr", USR_WRAPPER.format(python=sys.executable)), ("uv", UV_SHIM)):
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)
    return directory


def docs_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment a docs block runs in: shims first on PATH, a throwaway HOME, no TTY
    niceties, no ssh agent, no usrsync settings inherited from the outer environment."""
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("USR_REMOTES_PATH", "USR_ROOT", "SSH_AUTH_SOCK") and not k.startswith("USRSYNC_")}
    env.update(PATH=f"{shim_bin(tmp / 'shims')}:{os.environ['PATH']}", HOME=str(home), **extra)
    return env


def session_script(blocks: list[Block]) -> str:
    parts = ["set -euo pipefail\n"]
    for block in blocks:
        parts.append(f"echo '{BLOCK_MARK}{block.where}' >&2\n{block.text}")
    return "".join(parts)


def failing_block(stderr: str) -> str:
    """The block a failed session stopped in (the last mark it printed)."""
    marks = [line[len(BLOCK_MARK):] for line in stderr.splitlines() if line.startswith(BLOCK_MARK)]
    return marks[-1] if marks else "(before the first block)"


def run_script(script: Path, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`bash SCRIPT` with no terminal (stdin /dev/null, output captured)."""
    return subprocess.run(["bash", str(script)], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
