"""A misbehaving agent (stdlib only): a correct handshake, then a hostile `manifest` answer.

Usage: fake_agent.py VARIANT serve NONCE, where VARIANT is one of
  evil-path  a manifest chunk claiming the path ../evil
  garbage    a frame whose body is not JSON
  bad-zlib   a frame flagged compressed whose body is not zlib data
  oversized  a frame header announcing more than the frame limit
  old-python hello claims Python 3.5 and no rsync (manifest as evil-path)
"""

from __future__ import annotations

import json
import os
import platform
import socket
import struct
import sys

HEADER = struct.Struct(">IB")
FLAG_ZLIB = 1
EVIL_ENTRY = ["../evil", "_auxiliary", 1, 0, "file", "ab"]


def send(out, body: bytes, flags: int = 0) -> None:
    out.write(HEADER.pack(len(body), flags) + body)
    out.flush()


def send_json(out, obj: dict) -> None:
    send(out, json.dumps(obj).encode())


def read_request(stream) -> dict | None:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    size, _ = HEADER.unpack(header)
    return json.loads(stream.read(size))


def answer_manifest(out, variant: str, rid: int, args: dict) -> None:
    if variant in ("evil-path", "old-python"):
        send_json(out, {"id": rid, "type": "chunk", "items": [EVIL_ENTRY]})
        send_json(out, {"id": rid, "type": "result",
                        "result": {"exists": True, "count": 1, "algo": args["algo"], "root": "/x"}})
    elif variant == "garbage":
        send(out, b"\x00\xffnot json at all\x13\x37")
    elif variant == "bad-zlib":
        send(out, b"definitely not deflate", FLAG_ZLIB)
    elif variant == "oversized":
        out.write(HEADER.pack(0xFFFFFFFF, 0))
        out.flush()
    else:
        raise SystemExit(f"unknown variant {variant!r}")


def main(argv: list[str]) -> int:
    variant, command, nonce = argv
    assert command == "serve"
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    out.write(f"USRSYNC-AGENT 1 {nonce}\n".encode())
    out.flush()
    while (request := read_request(inp)) is not None:
        rid, call, args = request["id"], request["call"], request.get("args") or {}
        if call == "hello":
            python = "3.5.10" if variant == "old-python" else platform.python_version()
            result = {"version": "1", "python": python, "platform": sys.platform,
                      "hostname": socket.gethostname(), "user": "fake", "home": os.path.expanduser("~"),
                      "hash_algos": ["sha256"], "rsync": None, "pid": os.getpid()}
        elif call == "check_base":
            result = {"base_dir": args["base_dir"], "exists": True, "writable": True}
        elif call == "manifest":
            answer_manifest(out, variant, rid, args)
            continue
        else:
            result = {}
        send_json(out, {"id": rid, "type": "result", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
