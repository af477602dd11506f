"""rsync's remote shell (`rsync -e "python -m usrsync.rsh SOCKET"`).

rsync runs `<shim> [ssh options] HOST COMMAND...`. Instead of opening a new SSH connection
(and a new MFA prompt), the shim asks the orchestrator, over a private unix socket, to run
COMMAND on an exec channel of the connection it already holds, and relays the bytes.

Wire format on the socket: shim -> orchestrator: 4-byte length + command (UTF-8), then raw
stdin bytes (half-close at EOF). Orchestrator -> shim: records of 1-byte type + 4-byte length
+ payload: b"o" stdout, b"e" stderr, b"x" exit status (4-byte big-endian).
Standard library only: it starts once per rsync run.
"""

import os
import socket
import struct
import sys
import threading

RECORD = struct.Struct(">cI")
BUFSIZE = 256 * 1024
SSH_OPTIONS_WITH_VALUE = set("bcDEeFIiJLlmOopQRSWw")


def split_ssh_args(args):
    """(host, command) from ssh-style arguments: options first, then host, then command."""
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        opt = args[i]
        i += 1
        if len(opt) == 2 and opt[1] in SSH_OPTIONS_WITH_VALUE:
            i += 1  # the option's value is the next word
    if i < len(args) and args[i] == "--":
        i += 1
    if i >= len(args):
        raise SystemExit("usrsync.rsh: no host given")
    # rsync already escaped the words for a remote shell: join them as ssh does.
    return args[i], " ".join(args[i + 1:])


def _pump_stdin(sock):
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    try:
        while True:
            n = os.readv(0, [buf])
            if not n:
                break
            sock.sendall(view[:n])
    except OSError:
        pass
    finally:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _recv_exact(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), BUFSIZE))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def main(argv):
    if len(argv) < 3:
        sys.stderr.write("usage: python -m usrsync.rsh SOCKET HOST COMMAND...\n")
        return 255
    socket_path = argv[0]
    _, command = split_ssh_args(argv[1:])
    # rsync hands us non-blocking pipes; blocking writes are what we want here.
    os.set_blocking(0, True)
    os.set_blocking(1, True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        sys.stderr.write("usrsync.rsh: cannot reach the usrsync session at %s: %s\n" % (socket_path, exc))
        return 255
    encoded = command.encode("utf-8", "surrogateescape")
    sock.sendall(struct.pack(">I", len(encoded)) + encoded)
    threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
    while True:
        header = _recv_exact(sock, RECORD.size)
        if header is None:
            sys.stderr.write("usrsync.rsh: the usrsync session went away\n")
            return 255
        kind, length = RECORD.unpack(header)
        payload = _recv_exact(sock, length) if length else b""
        if payload is None:
            return 255
        if kind == b"o":
            _write_all(1, payload)
        elif kind == b"e":
            _write_all(2, payload)
        elif kind == b"x":
            return struct.unpack(">i", payload)[0]


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
