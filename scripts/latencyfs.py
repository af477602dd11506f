"""A read-only FUSE view of a directory that answers every metadata request (a lookup, a stat, a
directory listing) after a fixed delay: a stand-in for a network filesystem, where each of them is
a round trip to a server (Lustre: ~0.4 ms, about 2,500 stats a second per client).

    python scripts/latencyfs.py SOURCE MOUNTPOINT SECONDS

Runs in the foreground until unmounted (`fusermount3 -u MOUNTPOINT`) or stopped. Needs /dev/fuse,
libfuse3 (Debian: fuse3) and mfusepy; as root it mounts with allow_other, so that other users (the
bench's login user) see it. Used by scripts/bench.py, scenario S1n.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from typing import Any

import mfusepy as fuse

STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino")
STATVFS_FIELDS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                  "f_frsize", "f_namemax")


class LatencyFS(fuse.Operations):
    use_ns = True  # times in nanoseconds, as the source has them: hash cache keys stay exact

    def __init__(self, source: str, delay: float):
        self.source = os.path.realpath(source)
        self.delay = delay

    def _path(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip("/"))

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        time.sleep(self.delay)
        try:
            st = os.lstat(self._path(path))
        except OSError as exc:
            raise fuse.FuseOSError(exc.errno) from None
        attrs = {name: getattr(st, name) for name in STAT_FIELDS}
        attrs.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return attrs

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
        time.sleep(self.delay)
        listing = []
        with os.scandir(self._path(path)) as entries:
            for entry in entries:
                # The type and inode go with each name (d_type, as a local filesystem's readdir
                # gives them): an entry of inode 0 would be hidden, one of no type stat'ed again.
                kind = stat.S_IFDIR if entry.is_dir(follow_symlinks=False) else \
                    stat.S_IFLNK if entry.is_symlink() else stat.S_IFREG
                listing.append((entry.name, {"st_mode": kind, "st_ino": entry.inode()}, 0))
        return listing

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def access(self, path: str, amode: int) -> int:
        if amode & os.W_OK:
            raise fuse.FuseOSError(errno.EROFS)
        return 0

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise fuse.FuseOSError(errno.EROFS)
        return os.open(self._path(path), flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._path(path))
        return {name: getattr(st, name) for name in STATVFS_FIELDS}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python scripts/latencyfs.py SOURCE MOUNTPOINT SECONDS", file=sys.stderr)
        return 2
    source, mountpoint, delay = argv[0], argv[1], float(argv[2])
    fuse.FUSE(LatencyFS(source, delay), mountpoint, foreground=True, ro=True, allow_other=os.geteuid() == 0,
              use_ino=True, fsname="latencyfs", subtype="latencyfs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
