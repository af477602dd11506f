"""Remote profiles (remotes.toml) and local datasets root resolution (DESIGN §3, §4)."""

from __future__ import annotations

import math
import os
import re
import secrets
import typing
from pathlib import Path
from typing import Literal

import msgspec
import platformdirs

from usrsync.errors import ConfigError

APP_NAME = "usrsync"
ENV_REMOTES_PATH = "USR_REMOTES_PATH"
ENV_ROOT = "USR_ROOT"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RemoteProfile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    type: Literal["ssh", "local"] = "ssh"
    host: str | None = None
    user: str | None = None
    port: int | None = None
    base_dir: str
    identity_file: str | None = None
    known_hosts: str | None = None
    python: str = "python3"
    rsync_path: str = "rsync"
    transport: Literal["asyncssh", "openssh"] = "asyncssh"
    lock_timeout: float = 300
    agent_timeout: float = 300  # seconds the remote agent may stay silent before the run gives up


class Remote(msgspec.Struct, frozen=True):
    """A profile together with the name it is configured under."""

    name: str
    profile: RemoteProfile

    @property
    def is_local(self) -> bool:
        return self.profile.type == "local"

    @property
    def display_host(self) -> str:
        """`user@host:port` with the parts that are set, or `local`."""
        p = self.profile
        if self.is_local:
            return "local"
        s = f"{p.user}@{p.host}" if p.user else str(p.host)
        return f"{s}:{p.port}" if p.port is not None else s


class RemotesFile(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    root: str | None = None
    remotes: dict[str, RemoteProfile] = {}


_PROFILE_KEYS = msgspec.structs.fields(RemoteProfile)
_FILE_KEYS = ("root", "remotes")
_ADD_HINT = "usr remotes add {name} --host HOST --base-dir DIR"

# msgspec names TOML/JSON types; users think in TOML terms.
_FRIENDLY = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "object": "a table",
    "array": "an array",
}


def _abspath(s: str) -> Path:
    # abspath, not resolve(): keep the user's symlinked paths as they wrote them.
    return Path(os.path.abspath(os.path.expanduser(s)))


def remotes_path(cli_value: str | None) -> Path:
    """`--remotes-config` > $USR_REMOTES_PATH > <user config dir>/remotes.toml."""
    value = cli_value or os.environ.get(ENV_REMOTES_PATH)
    if value:
        return _abspath(value)
    return Path(platformdirs.user_config_dir(APP_NAME)) / "remotes.toml"


def resolve_root(cli_root: str | None, cfg: RemotesFile) -> Path:
    """`--root` > $USR_ROOT > `root` in the config > <user data dir>/datasets; absolute, may not exist."""
    value = cli_root or os.environ.get(ENV_ROOT) or cfg.root
    if value:
        return _abspath(value)
    return _abspath(os.path.join(platformdirs.user_data_dir(APP_NAME), "datasets"))


def expand_local_path(s: str) -> Path:
    """A local path from a profile (identity_file, known_hosts), `~` expanded."""
    return _abspath(s)


def default_known_hosts() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


# --- loading and validation -------------------------------------------------


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _where(path: Path, name: str | None) -> str:
    return f"remotes config {path}: remote {_q(name)}" if name is not None else f"remotes config {path}"


def _expected(msgspec_type: str, key: str, literals: bool) -> str:
    """`int | null` -> "an integer"; a Literal profile key -> its choices."""
    if literals:
        field = next((f for f in _PROFILE_KEYS if f.name == key), None)
        if field is not None and typing.get_origin(field.type) is Literal:
            return "one of " + ", ".join(_q(c) for c in typing.get_args(field.type))
    parts = [t for t in msgspec_type.split(" | ") if t != "null"]
    return " or ".join(_FRIENDLY.get(t, t) for t in parts)


def _translate(err: msgspec.ValidationError, path: Path, name: str | None) -> ConfigError:
    """Rewrite msgspec's `<what> - at `$.key`` into a message naming file, remote and key."""
    msg = str(err)
    what, _, at = msg.partition(" - at `")
    key = at.rstrip("`").removeprefix("$.") or "?"
    where = _where(path, name)
    section = f"[remotes.{name}] in {path}" if name is not None else str(path)
    if m := re.fullmatch(r"Object contains unknown field `(.*)`", what):
        valid = [f.name for f in _PROFILE_KEYS] if name is not None else _FILE_KEYS
        return ConfigError(f"{where}: unknown key {_q(m[1])}", f"valid keys: {', '.join(valid)}")
    if m := re.fullmatch(r"Object missing required field `(.*)`", what):
        return ConfigError(f"{where}: missing required key {_q(m[1])}", f"add {m[1]} = ... to {section}")
    if m := re.fullmatch(r"Expected `(.*)`, got `(.*)`", what):
        problem = f"key {_q(key)} must be {_expected(m[1], key, literals=name is not None)}, got {m[2]}"
    elif m := re.fullmatch(r"Invalid enum value '(.*)'", what):
        problem = f"key {_q(key)} must be {_expected('', key, literals=True)}, got {_q(m[1])}"
    else:
        problem = msg
    return ConfigError(f"{where}: {problem}", f"fix {key} in {section}")


def _plain_word(s: str) -> bool:
    # A leading "-" would be read as an option by ssh/rsync (openssh transport).
    return bool(s) and not s.startswith("-") and not any(c.isspace() for c in s)


def _check_profile(p: RemoteProfile) -> tuple[str, str] | None:
    """Semantic rules the types cannot express; returns (problem, hint) or None."""
    if not p.base_dir.strip():
        return 'key "base_dir" must not be empty', "set base_dir to the directory holding the datasets"
    if any(c in p.base_dir for c in "\0\n\r"):
        return 'key "base_dir" contains a NUL or newline', "set base_dir to a plain directory path"
    if p.type == "local" and not os.path.isabs(os.path.expanduser(p.base_dir)):
        return (
            f'key "base_dir" must be an absolute path for type "local", got {_q(p.base_dir)}',
            "use an absolute path or one starting with ~",
        )
    if p.type == "ssh":
        if not p.host:
            return (
                'type "ssh" needs key "host"',
                'set host = "login.example.edu" (or a Host alias from ~/.ssh/config), or type = "local"',
            )
        if not _plain_word(p.host):
            return f'key "host" is not a valid host name: {_q(p.host)}', "set host to a hostname or ssh Host alias"
        if p.user is not None and not _plain_word(p.user):
            return f'key "user" is not a valid user name: {_q(p.user)}', "set it to the remote login name, or remove it"
    if p.port is not None and not 1 <= p.port <= 65535:
        return f'key "port" must be between 1 and 65535, got {p.port}', "remove it to use 22 or the ssh config's Port"
    for key in ("lock_timeout", "agent_timeout"):
        value = getattr(p, key)
        if not math.isfinite(value) or value <= 0:
            return f"key {_q(key)} must be a positive number of seconds, got {value}", "remove it to use 300"
    for key in ("identity_file", "known_hosts"):
        value = getattr(p, key)
        # Relative paths would depend on the cwd, which differs under cron.
        if value is not None and not os.path.isabs(os.path.expanduser(value)):
            problem = f"key {_q(key)} must be an absolute path or start with ~, got {_q(value)}"
            return problem, f'e.g. {key} = "~/.ssh/…"'
    for key in ("python", "rsync_path"):
        if not getattr(p, key).strip():
            return f"key {_q(key)} must not be empty", "remove it to use the default"
    return None


def _check_name(name: str, path: Path) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{_where(path, name)}: invalid remote name",
            "names start with a letter or digit and contain only letters, digits, '.', '_' and '-'",
        )


def _validate_remote(path: Path, name: str, profile: RemoteProfile) -> None:
    _check_name(name, path)
    if problem := _check_profile(profile):
        raise ConfigError(f"{_where(path, name)}: {problem[0]}", problem[1])


def load_remotes(path: Path) -> RemotesFile:
    """Read and validate the remotes file; a missing file is an empty configuration."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return RemotesFile()
    except OSError as e:
        raise ConfigError(f"remotes config {path}: cannot read: {e.strerror or e}", "make it a readable file") from e
    try:
        raw = msgspec.toml.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"remotes config {path}: not valid TOML: {e}", f"fix the syntax in {path}") from e

    # Remotes are converted one by one: msgspec reports dict keys as `[...]`,
    # and the remote's name must appear in the message.
    raw_remotes = raw.pop("remotes", {})
    try:
        top = msgspec.convert(raw, RemotesFile)
    except msgspec.ValidationError as e:
        raise _translate(e, path, None) from e
    if top.root is not None and not os.path.isabs(os.path.expanduser(top.root)):
        problem = f'key "root" must be an absolute path or start with ~, got {_q(top.root)}'
        raise ConfigError(f"remotes config {path}: {problem}", f"fix it in {path}")
    if not isinstance(raw_remotes, dict):
        raise ConfigError(f'remotes config {path}: key "remotes" must be a table', "use [remotes.NAME] sections")

    remotes: dict[str, RemoteProfile] = {}
    for name, section in raw_remotes.items():
        _check_name(name, path)
        if not isinstance(section, dict):
            raise ConfigError(f"{_where(path, name)}: must be a table", f"define it as a [remotes.{name}] section")
        try:
            profile = msgspec.convert(section, RemoteProfile)
        except msgspec.ValidationError as e:
            raise _translate(e, path, name) from e
        _validate_remote(path, name, profile)
        remotes[name] = profile
    return RemotesFile(root=top.root, remotes=remotes)


def _unknown(cfg: RemotesFile, name: str, path: Path) -> ConfigError:
    known = ", ".join(sorted(cfg.remotes)) or "none configured"
    message = f"remotes config {path}: no remote named {_q(name)} (known: {known})"
    return ConfigError(message, _ADD_HINT.format(name=name))


def get_remote(cfg: RemotesFile, name: str, path: Path) -> Remote:
    try:
        return Remote(name, cfg.remotes[name])
    except KeyError:
        raise _unknown(cfg, name, path) from None


# --- writing ---------------------------------------------------------------


def _write(path: Path, cfg: RemotesFile) -> None:
    """Atomically replace the file (mode 0600: it names hosts, users and key paths)."""
    # Write through a symlink (dotfile managers) instead of replacing the link.
    target = Path(os.path.realpath(path))
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # the umask may have narrowed it; never widened
            f.write(msgspec.toml.encode(cfg))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        hint = "check the permissions of the file and its directory"
        raise ConfigError(f"remotes config {path}: cannot write: {e.strerror or e}", hint) from e
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something failed


def add_remote(path: Path, name: str, profile: RemoteProfile, *, replace: bool = False) -> None:
    """Add (or with replace=True overwrite) one remote, keeping the rest; comments are not kept."""
    _validate_remote(path, name, profile)
    cfg = load_remotes(path)
    if name in cfg.remotes and not replace:
        hint = f"choose another name, or remove it first: usr remotes remove {name}"
        raise ConfigError(f"remotes config {path}: remote {_q(name)} already exists", hint)
    _write(path, RemotesFile(root=cfg.root, remotes={**cfg.remotes, name: profile}))


def remove_remote(path: Path, name: str) -> None:
    cfg = load_remotes(path)
    if name not in cfg.remotes:
        raise _unknown(cfg, name, path)
    del cfg.remotes[name]
    _write(path, cfg)
