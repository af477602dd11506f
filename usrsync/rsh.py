"""rsync's remote shell (`rsync -e "python -m usrsync.rsh SOCKET"`).

rsync runs `<shim> [ssh options] HOST COMMAND...`. Instead of opening a new SSH connection
(and a new MFA prompt), the shim asks the orchestrator, over a private unix socket, to run
COMMAND on an exec channel of the connection it already holds, and relays the bytes.

Wire format on the socket: shim -> orchestrator: 4-byte length + command (UTF-8), then raw
stdin bytes (half-close at EOF). Orchestrator -> shim: records of 1-byte type + 4-byte length
+ payload: b"o" stdout, b"e" stderr, b"x" exit status (4-byte big-endian).
Standard library only: it starts once per rsync run.
"""

import errno
import fcntl
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


def _recv_exact(sock, buf):
    """Fill buf from the socket; False at EOF."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = sock.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


def _stdout_pipe():
    """A pipe to splice stdout payloads through (socket -> pipe -> fd 1): the kernel moves the
    pages, where recv and write would copy every byte twice. None where there is no splice."""
    if not hasattr(os, "splice"):
        return None
    pipe = os.pipe()
    try:
        fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, BUFSIZE)
    except (OSError, AttributeError):
        pass  # the default size works, in smaller steps
    return pipe


def _splice_out(sock, pipe, length):
    """Move `length` payload bytes to fd 1 through `pipe`: (bytes left for the copying loop, the
    pipe, or None once fd 1 refuses splice, as a file opened for appending does)."""
    r, w = pipe
    while length:
        n = os.splice(sock.fileno(), w, min(length, BUFSIZE))
        if not n:
            return length, pipe  # EOF: the copying loop reports it
        length -= n
        try:
            while n:
                n -= os.splice(r, 1, n)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            while n:  # what the pipe holds goes the ordinary way
                data = os.read(r, n)
                _write_all(1, data)
                n -= len(data)
            return length, None
    return 0, pipe


def _pump_records(sock):
    """Copy record payloads to fds 1 and 2 through one reused buffer; return the exit status."""
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    header = bytearray(RECORD.size)
    pipe = _stdout_pipe()
    while True:
        if not _recv_exact(sock, header):
            sys.stderr.write("usrsync.rsh: the usrsync session went away\n")
            return 255
        kind, length = RECORD.unpack(header)
        if kind == b"x":
            status = bytearray(4)
            return struct.unpack(">i", status)[0] if _recv_exact(sock, status) else 255
        fd = {b"o": 1, b"e": 2}.get(kind)
        if fd == 1 and pipe is not None:
            length, pipe = _splice_out(sock, pipe, length)
        while length:
            n = sock.recv_into(view, min(length, BUFSIZE))
            if not n:
                return 255
            if fd is not None:
                _write_all(fd, view[:n])
            length -= n


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
    return _pump_records(sock)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
