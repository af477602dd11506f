"""Remote profiles and root resolution (DESIGN §3, §4): pure, no server."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from usrsync.config import (
    Remote,
    RemoteProfile,
    RemotesFile,
    add_remote,
    default_known_hosts,
    expand_local_path,
    get_remote,
    load_remotes,
    remotes_path,
    remove_remote,
    resolve_root,
)
from usrsync.errors import ConfigError


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME and XDG dirs, so platformdirs and ~ never touch the real user."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.delenv("USR_REMOTES_PATH", raising=False)
    monkeypatch.delenv("USR_ROOT", raising=False)
    return home


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    return tmp_path / "conf" / "remotes.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_remotes(path)
    return info.value


# --- precedence ---------------------------------------------------------------


def test_remotes_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    assert remotes_path(None) == tmp_path / "xdg-config" / "usrsync" / "remotes.toml"

    monkeypatch.setenv("USR_REMOTES_PATH", str(tmp_path / "env.toml"))
    assert remotes_path(None) == tmp_path / "env.toml"

    assert remotes_path(str(tmp_path / "cli.toml")) == tmp_path / "cli.toml"
    assert remotes_path("~/r.toml") == isolated_env / "r.toml"


def test_remotes_path_empty_env_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USR_REMOTES_PATH", "")
    assert remotes_path(None) == tmp_path / "xdg-config" / "usrsync" / "remotes.toml"


def test_resolve_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_env: Path) -> None:
    assert resolve_root(None, RemotesFile()) == tmp_path / "xdg-data" / "usrsync" / "datasets"

    cfg = RemotesFile(root="~/from-config")
    assert resolve_root(None, cfg) == isolated_env / "from-config"

    monkeypatch.setenv("USR_ROOT", str(tmp_path / "from-env"))
    assert resolve_root(None, cfg) == tmp_path / "from-env"

    assert resolve_root(str(tmp_path / "from-cli"), cfg) == tmp_path / "from-cli"


def test_resolve_root_relative_cli_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = resolve_root("data/../datasets", RemotesFile())
    assert root.is_absolute()
    assert root == tmp_path / "datasets"
    assert not root.exists()  # not required to exist


def test_local_path_helpers(isolated_env: Path) -> None:
    assert expand_local_path("~/.ssh/id_ed25519") == isolated_env / ".ssh" / "id_ed25519"
    assert expand_local_path("/etc/ssh/known") == Path("/etc/ssh/known")
    assert default_known_hosts() == isolated_env / ".ssh" / "known_hosts"


# --- loading ------------------------------------------------------------------


FULL = """\
root = "/home/alice/usr/datasets"

[remotes.bu-scc]
host = "scc1.bu.edu"
user = "alice"
port = 2222
base_dir = "/project/alice/usr/datasets"
identity_file = "~/.ssh/id_ed25519"
known_hosts = "~/.ssh/known_hosts"
python = "/usr/bin/python3.6"
rsync_path = "/opt/bin/rsync"
transport = "openssh"
lock_timeout = 60

[remotes.scratch]
type = "local"
base_dir = "/scratch/alice/usr/datasets"
"""


def test_load_full_example(cfg_path: Path) -> None:
    cfg = load_remotes(write(cfg_path, FULL))
    assert cfg.root == "/home/alice/usr/datasets"
    assert list(cfg.remotes) == ["bu-scc", "scratch"]
    assert cfg.remotes["bu-scc"] == RemoteProfile(
        host="scc1.bu.edu",
        user="alice",
        port=2222,
        base_dir="/project/alice/usr/datasets",
        identity_file="~/.ssh/id_ed25519",
        known_hosts="~/.ssh/known_hosts",
        python="/usr/bin/python3.6",
        rsync_path="/opt/bin/rsync",
        transport="openssh",
        lock_timeout=60.0,
    )
    ssh = get_remote(cfg, "bu-scc", cfg_path)
    assert ssh.name == "bu-scc"
    assert not ssh.is_local
    assert ssh.display_host == "alice@scc1.bu.edu:2222"


def test_local_remote_without_host_is_valid(cfg_path: Path) -> None:
    cfg = load_remotes(write(cfg_path, FULL))
    scratch = get_remote(cfg, "scratch", cfg_path)
    assert scratch == Remote("scratch", RemoteProfile(type="local", base_dir="/scratch/alice/usr/datasets"))
    assert scratch.is_local
    assert scratch.profile.host is None
    assert scratch.display_host == "local"
    # the defaults a profile gets when keys are omitted
    assert (scratch.profile.python, scratch.profile.rsync_path) == ("python3", "rsync")
    assert (scratch.profile.transport, scratch.profile.lock_timeout) == ("asyncssh", 300)


def test_display_host_without_user_or_port() -> None:
    assert Remote("h", RemoteProfile(host="login", base_dir="d")).display_host == "login"
    assert Remote("h", RemoteProfile(host="login", port=22, base_dir="d")).display_host == "login:22"


def test_missing_file_is_empty_config(tmp_path: Path) -> None:
    cfg = load_remotes(tmp_path / "nope.toml")
    assert cfg == RemotesFile()
    assert cfg.remotes == {} and cfg.root is None


def test_unreadable_file(tmp_path: Path) -> None:
    err = config_error(tmp_path)  # a directory cannot be read as a file
    assert str(tmp_path) in err.message
    assert "cannot read" in err.message
    assert err.hint
    assert err.exit_code == 2


def test_malformed_toml_names_file_and_line(cfg_path: Path) -> None:
    write(cfg_path, '[remotes.bu-scc]\nhost = "a"\nbase_dir = /x\n')
    err = config_error(cfg_path)
    assert err.message.startswith(f"remotes config {cfg_path}: not valid TOML: ")
    assert "line 3" in err.message
    assert "\n" not in err.message
    assert err.hint


def test_non_utf8_is_not_valid_toml(cfg_path: Path) -> None:
    cfg_path.parent.mkdir(parents=True)
    cfg_path.write_bytes(b'root = "\xff"\n')
    assert "not valid TOML" in config_error(cfg_path).message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            'host = "h"\nbase_dir = "/d"\nhots = "x"\n',
            'remote "bu-scc": unknown key "hots"',
            id="unknown-key",
        ),
        pytest.param(
            'host = "h"\nbase_dir = "/d"\nport = "22"\n',
            'remote "bu-scc": key "port" must be an integer, got str',
            id="wrong-type",
        ),
        pytest.param(
            'host = "h"\nbase_dir = "/d"\nport = true\n',
            'remote "bu-scc": key "port" must be an integer, got bool',
            id="bool-is-not-int",
        ),
        pytest.param(
            'host = "h"\nbase_dir = "/d"\nlock_timeout = "5m"\n',
            'remote "bu-scc": key "lock_timeout" must be a number, got str',
            id="wrong-type-float",
        ),
        pytest.param(
            'host = "h"\n',
            'remote "bu-scc": missing required key "base_dir"',
            id="missing-base_dir",
        ),
        pytest.param(
            'base_dir = "/d"\n',
            'remote "bu-scc": type "ssh" needs key "host"',
            id="ssh-without-host",
        ),
        pytest.param(
            'host = "h"\nbase_dir = "/d"\ntransport = "paramiko"\n',
            'remote "bu-scc": key "transport" must be one of "asyncssh", "openssh", got "paramiko"',
            id="bad-literal",
        ),
        pytest.param(
            'type = 1\nbase_dir = "/d"\n',
            'remote "bu-scc": key "type" must be one of "ssh", "local", got int',
            id="literal-wrong-type",
        ),
        pytest.param(
            'host = "h"\nbase_dir = "/d"\nport = 0\n',
            'remote "bu-scc": key "port" must be between 1 and 65535, got 0',
            id="port-zero",
        ),
        pytest.param(
            'host = "h"\nbase_dir = "/d"\nport = 65536\n',
            'remote "bu-scc": key "port" must be between 1 and 65535, got 65536',
            id="port-too-big",
        ),
        pytest.param(
            'host = "h"\nbase_dir = "/d"\nlock_timeout = 0\n',
            'remote "bu-scc": key "lock_timeout" must be a positive number of seconds, got 0',
            id="lock_timeout-zero",
        ),
        pytest.param(
            'host = "h"\nbase_dir = "/d"\nlock_timeout = nan\n',
            'remote "bu-scc": key "lock_timeout" must be a positive number of seconds, got nan',
            id="lock_timeout-nan",
        ),
        pytest.param(
            'host = "h"\nbase_dir = ""\n',
            'remote "bu-scc": key "base_dir" must not be empty',
            id="base_dir-empty",
        ),
        pytest.param(
            'type = "local"\nbase_dir = "relative/dir"\n',
            'remote "bu-scc": key "base_dir" must be an absolute path for type "local"',
            id="local-relative-base_dir",
        ),
        pytest.param(
            'host = "-oProxyCommand=evil"\nbase_dir = "/d"\n',
            'remote "bu-scc": key "host" is not a valid host name',
            id="host-looks-like-option",
        ),
        pytest.param(
            'host = "h"\nbase_dir = "/d"\nidentity_file = "keys/id"\n',
            'remote "bu-scc": key "identity_file" must be an absolute path or start with ~',
            id="relative-identity_file",
        ),
    ],
)
def test_invalid_remote_names_file_remote_and_key(cfg_path: Path, body: str, expected: str) -> None:
    write(cfg_path, "[remotes.bu-scc]\n" + body)
    err = config_error(cfg_path)
    assert err.message.startswith(f"remotes config {cfg_path}: ")
    assert expected in err.message
    assert "\n" not in err.message
    assert err.hint and "\n" not in err.hint


def test_ssh_relative_base_dir_is_valid(cfg_path: Path) -> None:
    # relative / ~ base_dir on ssh means relative to the remote home
    write(cfg_path, '[remotes.a]\nhost = "h"\nbase_dir = "usr/datasets"\n[remotes.b]\nhost = "h"\nbase_dir = "~/x"\n')
    cfg = load_remotes(cfg_path)
    assert cfg.remotes["a"].base_dir == "usr/datasets"
    assert cfg.remotes["b"].base_dir == "~/x"


def test_unknown_top_level_key(cfg_path: Path) -> None:
    err = config_error(write(cfg_path, 'rot = "/x"\n'))
    assert err.message == f'remotes config {cfg_path}: unknown key "rot"'
    assert err.hint == "valid keys: root, remotes"


def test_root_wrong_type_and_relative(cfg_path: Path) -> None:
    err = config_error(write(cfg_path, "root = 3\n"))
    assert err.message == f'remotes config {cfg_path}: key "root" must be a string, got int'
    err = config_error(write(cfg_path, 'root = "data"\n'))
    assert 'key "root" must be an absolute path' in err.message


def test_remote_section_must_be_a_table(cfg_path: Path) -> None:
    err = config_error(write(cfg_path, '[remotes]\nbu-scc = "scc1.bu.edu"\n'))
    assert err.message == f'remotes config {cfg_path}: remote "bu-scc": must be a table'
    assert err.hint == "define it as a [remotes.bu-scc] section"


def test_invalid_remote_name(cfg_path: Path) -> None:
    err = config_error(write(cfg_path, '[remotes."-bad"]\nhost = "h"\nbase_dir = "/d"\n'))
    assert err.message == f'remotes config {cfg_path}: remote "-bad": invalid remote name'


def test_unknown_remote_lists_known_names(cfg_path: Path) -> None:
    cfg = load_remotes(write(cfg_path, FULL))
    with pytest.raises(ConfigError) as info:
        get_remote(cfg, "bu-sc", cfg_path)
    assert info.value.message == f'remotes config {cfg_path}: no remote named "bu-sc" (known: bu-scc, scratch)'
    assert info.value.hint == "usr remotes add bu-sc --host HOST --base-dir DIR"


def test_unknown_remote_with_no_remotes(cfg_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no remote named \"x\" \(known: none configured\)"):
        get_remote(load_remotes(cfg_path), "x", cfg_path)


# --- writing ------------------------------------------------------------------


def test_add_load_remove_round_trip(cfg_path: Path) -> None:
    write(cfg_path, 'root = "/data/usr"\n')
    scc = RemoteProfile(host="scc1.bu.edu", user="alice", port=22, base_dir="/project/alice/usr")
    scratch = RemoteProfile(type="local", base_dir="/scratch/usr", lock_timeout=30.5)

    add_remote(cfg_path, "bu-scc", scc)
    add_remote(cfg_path, "scratch", scratch)
    cfg = load_remotes(cfg_path)
    assert cfg == RemotesFile(root="/data/usr", remotes={"bu-scc": scc, "scratch": scratch})

    # defaults are omitted from the written file
    text = cfg_path.read_text()
    assert 'host = "scc1.bu.edu"' in text
    assert "python" not in text and "transport" not in text and 'type = "ssh"' not in text
    assert 'type = "local"' in text

    remove_remote(cfg_path, "bu-scc")
    assert load_remotes(cfg_path) == RemotesFile(root="/data/usr", remotes={"scratch": scratch})

    with pytest.raises(ConfigError) as info:
        remove_remote(cfg_path, "bu-scc")
    assert info.value.message == f'remotes config {cfg_path}: no remote named "bu-scc" (known: scratch)'


def test_add_creates_parent_dirs_and_file_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "remotes.toml"
    old_umask = os.umask(0)  # the mode must not depend on a permissive umask
    try:
        add_remote(path, "scratch", RemoteProfile(type="local", base_dir="/s"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_remotes(path).remotes == {"scratch": RemoteProfile(type="local", base_dir="/s")}
    assert sorted(p.name for p in path.parent.iterdir()) == ["remotes.toml"]  # no temp file left


def test_add_tightens_existing_world_readable_file(cfg_path: Path) -> None:
    write(cfg_path, "").chmod(0o644)
    add_remote(cfg_path, "s", RemoteProfile(type="local", base_dir="/s"))
    assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o600


def test_add_existing_name_needs_replace(cfg_path: Path) -> None:
    add_remote(cfg_path, "s", RemoteProfile(type="local", base_dir="/old"))
    with pytest.raises(ConfigError) as info:
        add_remote(cfg_path, "s", RemoteProfile(type="local", base_dir="/new"))
    assert info.value.message == f'remotes config {cfg_path}: remote "s" already exists'
    assert load_remotes(cfg_path).remotes["s"].base_dir == "/old"

    add_remote(cfg_path, "s", RemoteProfile(type="local", base_dir="/new"), replace=True)
    assert load_remotes(cfg_path).remotes["s"].base_dir == "/new"


def test_add_validates_profile_and_name(cfg_path: Path) -> None:
    with pytest.raises(ConfigError, match='remote "x": type "ssh" needs key "host"'):
        add_remote(cfg_path, "x", RemoteProfile(base_dir="/d"))
    with pytest.raises(ConfigError, match='remote "a b": invalid remote name'):
        add_remote(cfg_path, "a b", RemoteProfile(type="local", base_dir="/d"))
    assert not cfg_path.exists()


def test_add_refuses_to_overwrite_a_broken_file(cfg_path: Path) -> None:
    write(cfg_path, "this is = = not toml\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        add_remote(cfg_path, "s", RemoteProfile(type="local", base_dir="/s"))
    assert cfg_path.read_text() == "this is = = not toml\n"


def test_add_writes_through_a_symlink(tmp_path: Path) -> None:
    real = write(tmp_path / "dotfiles" / "remotes.toml", "")
    link = tmp_path / "conf" / "remotes.toml"
    link.parent.mkdir()
    link.symlink_to(real)
    add_remote(link, "s", RemoteProfile(type="local", base_dir="/s"))
    assert link.is_symlink()
    assert load_remotes(real).remotes == {"s": RemoteProfile(type="local", base_dir="/s")}


def test_type_error_hint_points_at_the_section(cfg_path: Path) -> None:
    err = config_error(write(cfg_path, '[remotes.bu-scc]\nhost = "h"\nbase_dir = "/d"\nport = "22"\n'))
    assert err.hint == f"fix port in [remotes.bu-scc] in {cfg_path}"
    err = config_error(write(cfg_path, '[remotes.bu-scc]\nhost = "h"\n'))
    assert err.hint == f"add base_dir = ... to [remotes.bu-scc] in {cfg_path}"


def test_write_failure_is_a_config_error_and_leaves_no_temp(
    cfg_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # root runs the tests, so permissions cannot make the write fail: fail the rename instead.
    write(cfg_path, 'root = "/keep"\n')

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ConfigError) as info:
        add_remote(cfg_path, "s", RemoteProfile(type="local", base_dir="/s"))
    assert info.value.message == f"remotes config {cfg_path}: cannot write: No space left on device"
    assert info.value.hint
    assert sorted(p.name for p in cfg_path.parent.iterdir()) == ["remotes.toml"]
    assert cfg_path.read_text() == 'root = "/keep"\n'
