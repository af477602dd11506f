"""`usr remotes doctor`: one line per check, ok/FAIL/skip, a fix line under each failure."""

from __future__ import annotations

from pathlib import Path

import rig as rigmod
import tomli_w
from helpers import REMOTE, agent_double, local_sides, run_usr
from rig import SshRig

from remote_agent import usrsync_agent as engine
from usrsync import rsync
from usrsync.doctor import filesystem_note

CHECKS = ["local rsync", "local ssh client", "connect + host key", "remote python", "agent", "hash algorithm",
          "remote rsync", "base_dir"]
REMOTE_CHECKS = CHECKS[3:]


def fs_note(base: Path) -> str:
    """What doctor adds about base_dir's filesystem (this machine's: seen by the test itself)."""
    fs_type = engine.filesystem_type(str(base))
    assert fs_type is not None  # Linux: /proc/self/mountinfo names every mount
    return filesystem_note(fs_type)


def test_the_base_dir_line_says_what_its_filesystem_means_for_a_scan() -> None:
    assert filesystem_note("lustre") == (" (lustre, a network filesystem: scans stat and hash files on "
                                         f"{engine.STAT_THREADS_PER_JOB} threads per --jobs)")
    assert filesystem_note("fuse.sshfs").startswith(" (fuse.sshfs, a network filesystem: ")
    assert (filesystem_note("ext4"), filesystem_note(None)) == (" (ext4)", "")


def doctor(cfg: Path, name: str) -> tuple[int, list[str]]:
    proc = run_usr(cfg, "remotes", "doctor", "--remote", name)
    assert proc.stderr == ""
    return proc.returncode, proc.stdout.splitlines()


def check_lines(lines: list[str]) -> dict[str, str]:
    """{check name: its line}, in order, fix lines left out."""
    found = {}
    for line in lines:
        if not line.startswith("     fix: "):
            name = line[5:].partition(":")[0]
            found[name] = line
    assert list(found) == CHECKS, lines
    return found


def rig_config(tmp_path: Path, sshd_rig: SshRig, base: Path) -> Path:
    path = tmp_path / "remotes.toml"
    path.write_text(sshd_rig.remotes_toml(base_dir=base))
    return path


def remote_python_facts(sshd_rig: SshRig) -> tuple[str, bool]:
    """The rig user's python3 version, and whether it has xxhash."""
    code = "import platform, importlib.util as u; print(platform.python_version(), bool(u.find_spec('xxhash')))"
    version, has_xxhash = sshd_rig.run_as_user(["python3", "-c", code], check=True).stdout.split()
    return version, has_xxhash == "True"


def test_doctor_passes_against_the_rig(remotes_config: Path, sshd_rig: SshRig, fresh_remote_base: Path) -> None:
    code, lines = doctor(remotes_config, "rig")
    assert code == 0, lines
    assert all(line.startswith("ok   ") for line in lines), lines
    by_name = check_lines(lines)
    local = rsync.local_rsync_info()
    rsync_version = ".".join(map(str, local.version))
    python, has_xxhash = remote_python_facts(sshd_rig)
    where = f"{sshd_rig.user}@127.0.0.1:{sshd_rig.port}"
    assert by_name["local rsync"] == f"ok   local rsync: rsync {rsync_version} (protocol {local.protocol})"
    assert by_name["local ssh client"].startswith("ok   local ssh client: OpenSSH_")
    assert by_name["connect + host key"] == (
        f"ok   connect + host key: {where}, host key trusted by {sshd_rig.known_hosts}")
    assert by_name["remote python"] == f"ok   remote python: python3 is Python {python}"
    assert by_name["agent"].startswith("ok   agent: version 1 deployed and answering on ")
    assert f" as {sshd_rig.user} (pid " in by_name["agent"]
    expected_algo = ("xxh3_128: xxhash is available on both ends" if has_xxhash
                     else "sha256: no xxhash module on the remote")
    assert by_name["hash algorithm"].startswith(f"ok   hash algorithm: {expected_algo}")
    assert by_name["remote rsync"] == f"ok   remote rsync: rsync is rsync {rsync_version} (protocol {local.protocol})"
    assert by_name["base_dir"] == (f"ok   base_dir: {fresh_remote_base} exists and is writable"
                                   f"{fs_note(fresh_remote_base)}")


def test_doctor_missing_base_dir(tmp_path: Path, sshd_rig: SshRig, fresh_remote_base: Path) -> None:
    missing = fresh_remote_base / "not-there"
    code, lines = doctor(rig_config(tmp_path, sshd_rig, missing), "rig")
    assert code == 2
    assert lines[-2:] == [
        f"FAIL base_dir: {missing} does not exist on {sshd_rig.user}@127.0.0.1:{sshd_rig.port}",
        f"     fix: create it there (mkdir -p {missing}) or fix base_dir of remote 'rig'",
    ]
    assert all(line.startswith("ok   ") for line in lines[:-2]), lines
    check_lines(lines)


def test_doctor_base_dir_not_writable(tmp_path: Path, sshd_rig: SshRig, fresh_remote_base: Path) -> None:
    readonly = fresh_remote_base / "root-owned"
    readonly.mkdir(mode=0o755)  # created as root, not handed to the rig user
    code, lines = doctor(rig_config(tmp_path, sshd_rig, readonly), "rig")
    assert code == 2
    assert lines[-2:] == [
        f"FAIL base_dir: {readonly} exists on {sshd_rig.user}@127.0.0.1:{sshd_rig.port} but is not writable by "
        f"{sshd_rig.user}",
        f"     fix: make it writable (chmod u+w {readonly}) or choose another base_dir",
    ]


def test_doctor_stops_after_a_failed_connection(tmp_path: Path) -> None:
    port = rigmod.free_port()
    (tmp_path / "known_hosts").write_text("")
    cfg = tmp_path / "remotes.toml"
    cfg.write_text(tomli_w.dumps({"remotes": {"far": {
        "host": "127.0.0.1", "port": port, "base_dir": "/srv", "known_hosts": str(tmp_path / "known_hosts")}}}))
    code, lines = doctor(cfg, "far")
    assert code == 3
    assert lines[2].startswith(f"FAIL connect + host key: cannot reach 127.0.0.1:{port}: ")
    assert lines[3] == ("     fix: check host and port in the profile, your network/VPN, and that sshd runs there")
    assert lines[4:] == [f"skip {name}: not run: connect + host key failed" for name in REMOTE_CHECKS]
    check_lines(lines)


def test_doctor_local_remote(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    cfg = tmp_path / "remotes.toml"
    cfg.write_text(tomli_w.dumps({"remotes": {"disk": {"type": "local", "base_dir": str(base)}}}))
    code, lines = doctor(cfg, "disk")
    assert code == 0, lines
    by_name = check_lines(lines)
    assert by_name["connect + host key"] == "ok   connect + host key: local remote: no SSH, agent runs as a subprocess"
    assert by_name["base_dir"] == f"ok   base_dir: {base} exists and is writable{fs_note(base)}"


def test_doctor_local_remote_with_a_missing_python(tmp_path: Path) -> None:
    cfg = tmp_path / "remotes.toml"
    cfg.write_text(tomli_w.dumps({"remotes": {"disk": {
        "type": "local", "base_dir": str(tmp_path), "python": str(tmp_path / "no-python")}}}))
    code, lines = doctor(cfg, "disk")
    assert code == 3
    assert lines[2] == f"FAIL connect + host key: cannot start the agent with '{tmp_path / 'no-python'}': " \
                       "No such file or directory"
    assert lines[3] == "     fix: set `python` of remote 'disk' to a Python 3 interpreter"
    assert [line.split(":")[0] for line in lines[4:]] == [f"skip {name}" for name in REMOTE_CHECKS]


def test_doctor_old_python_and_no_rsync(tmp_path: Path) -> None:
    # The fake agent claims Python 3.5 and finds no rsync: both fail, the rest still runs.
    python = agent_double(tmp_path, Path(__file__).with_name("fake_agent.py"), "old-python")
    sides = local_sides(tmp_path / "w", python=str(python))
    code, lines = doctor(sides.cfg, REMOTE)
    assert code == 3
    assert lines[3:5] == [
        f"FAIL remote python: {python} is Python 3.5.10; the agent needs >= 3.6",
        f"     fix: set python = \"/path/to/python3.6+\" in remote '{REMOTE}'",
    ]
    assert lines[7:9] == [
        "FAIL remote rsync: 'rsync' is not runnable on local",
        f"     fix: install rsync >= 3.0 there, or set rsync_path in remote '{REMOTE}'",
    ]
    assert lines[5].startswith("ok   agent: version 1 deployed and answering on ")
    assert lines[6] == ("ok   hash algorithm: sha256: no xxhash module on the remote "
                        "(just as exact, slower than xxh3_128)")
    assert lines[9] == f"ok   base_dir: {sides.base} exists and is writable"  # the double names no filesystem
    check_lines(lines)
