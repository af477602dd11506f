"""A hostile remote agent (stdlib only): the real agent, except for one call it answers badly.

Usage: hostile_agent.py VARIANT serve NONCE. It runs remote_agent/usrsync_agent.py's own
server loop, so the handshake and every other call are genuine; VARIANTS says which call it
subverts and how (tests/fake_agent.py has the simpler manifest-only variants).
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

AGENT = Path(__file__).resolve().parents[1] / "remote_agent" / "usrsync_agent.py"
_spec = importlib.util.spec_from_file_location("usrsync_agent", AGENT)
assert _spec is not None and _spec.loader is not None
engine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine)

HEADER = struct.Struct(">IB")
Answer = Callable[[Any, int, dict], None]  # (agent, request id, call args): writes frames itself


def _write(agent: Any, data: bytes) -> None:
    agent.out.write(data)
    agent.out.flush()


def _real_entries(args: dict) -> list[list]:
    """The genuine manifest entries of the dataset, as the real agent would stream them."""
    root = engine.dataset_dir(args["base_dir"], args["dataset"])
    sections = args.get("hash_sections")
    return engine.build_manifest(root, args["algo"], use_cache=False,
                                 hash_sections=set(sections) if sections is not None else None)


def _manifest(entries: list[list], rid: int, args: dict, agent: Any) -> None:
    agent.send({"id": rid, "type": "chunk", "items": entries}, compress=True)
    root = engine.dataset_dir(args["base_dir"], args["dataset"])
    agent.send({"id": rid, "type": "result",
                "result": {"exists": True, "count": len(entries), "algo": args["algo"], "root": root}})


def extra_entry(path: str) -> Answer:
    """The real manifest plus one entry naming `path` (sorted in, so only the path is wrong)."""

    def answer(agent: Any, rid: int, args: dict) -> None:
        entries = _real_entries(args) + [[path, "_auxiliary", 4, 0, "file", "0" * 32]]
        _manifest(sorted(entries, key=lambda e: e[0]), rid, args, agent)

    return answer


def altered(change: Callable[[list], list]) -> Answer:
    """The real manifest with every entry passed through `change` (the same lie every time)."""

    def answer(agent: Any, rid: int, args: dict) -> None:
        _manifest([change(list(e)) for e in _real_entries(args)], rid, args, agent)

    return answer


def _lie_about_derived(entry: list) -> list:
    if entry[1] == "_derived" and entry[5]:
        entry[5] = ("f" * 64)[: len(entry[5])]  # a digest the bytes on disk do not have
    return entry


def _lie_about_size(entry: list) -> list:
    if entry[0] == "meta.md":
        entry[2] += 7
    return entry


def _specials_as_files(entry: list) -> list:
    """Claim symlinks and FIFOs are regular files (with the digest of what they point to)."""
    if entry[4] != "file":
        entry[4] = "file"
        entry[5] = entry[5] or "0" * 32
    return entry


def _wrong_types(entry: list) -> list:
    entry[2] = str(entry[2])  # size as a string
    return entry


def huge_header(agent: Any, rid: int, args: dict) -> None:
    _write(agent, HEADER.pack(2**31, 0))  # announces 2 GiB, sends nothing more


def truncated_then_eof(agent: Any, rid: int, args: dict) -> None:
    """Die in the middle of a frame (dropping our locks first, as the real agent's exit does)."""
    _write(agent, HEADER.pack(1000, 0) + b'{"id": 3, "ty')
    agent.release_all()
    os._exit(0)


def until_eof(agent: Any, rid: int = 0, args: dict | None = None) -> None:
    """Never answer; read and drop requests until the session ends, then leave like the real agent."""
    while sys.stdin.buffer.read(1 << 16):
        pass
    agent.release_all()
    os._exit(0)


def endless_chunks(agent: Any, rid: int, args: dict) -> None:
    """Valid chunk frames, forever: only the end of the session stops us."""
    threading.Thread(target=until_eof, args=(agent,), daemon=True).start()
    items = [[f"_derived/x/{i:06d}", "_derived", 1, 0, "file", "0" * 32] for i in range(5000)]
    body = zlib.compress(json.dumps({"id": rid, "type": "chunk", "items": items}).encode(), 1)
    frame = HEADER.pack(len(body), engine.FLAG_ZLIB) + body
    while True:
        _write(agent, frame)


def short_stats(agent: Any, rid: int, args: dict) -> None:
    """The real verification, its packed stats cut short (a file's worth missing)."""
    result = agent.call_verify(args)
    result["stats"] = result["stats"][:-8]  # base64 text: 6 bytes fewer
    agent.send({"id": rid, "type": "result", "result": result})


VARIANTS: dict[str, tuple[str, Answer]] = {
    "absolute-path": ("manifest", extra_entry("/etc/passwd")),
    "nul-in-path": ("manifest", extra_entry("notes/a\x00b")),
    "newline-in-path": ("manifest", extra_entry("notes/a\nb")),
    "wrong-types": ("manifest", altered(_wrong_types)),
    "lying-digest": ("manifest", altered(_lie_about_derived)),
    "lying-size": ("manifest", altered(_lie_about_size)),
    "specials-as-files": ("manifest", altered(_specials_as_files)),
    "huge-header": ("lock", huge_header),
    "truncated": ("manifest", truncated_then_eof),
    "endless": ("manifest", endless_chunks),
    "silent": ("manifest", until_eof),
    "short-stats": ("verify", short_stats),
}


def main(argv: list[str]) -> int:
    variant, command, nonce = argv
    assert command == "serve"
    if variant == "mute":  # never even prints the sentinel
        while sys.stdin.buffer.read(1 << 16):
            pass
        return 0
    call, answer = VARIANTS[variant]

    class Hostile(engine.Agent):  # type: ignore[name-defined,misc]
        def handle(self, request: Any) -> None:
            if isinstance(request, dict) and request.get("call") == call:
                answer(self, request["id"], request.get("args") or {})
            else:
                super().handle(request)

    engine.Agent = Hostile
    return int(engine.serve(nonce))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
