#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine (python3 >= 3.10 only) to run usrsync from this checkout.
#   scripts/bootstrap.sh          uv (installed if missing) + `uv sync --frozen`
#   scripts/bootstrap.sh --test   also the system tools the tests need (rsync, sshd, ssh, jq, ...)
#   scripts/bootstrap.sh --bench  also what `make bench` needs besides (libfuse3, the bench group)
# Idempotent; silent when everything is already there. Exit 2: something must be installed by root.
set -euo pipefail

want_test=0
want_bench=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    --bench) want_bench=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "bootstrap: unknown argument: $arg" >&2; exit 64 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
is_root=0; [ "$(id -u)" -eq 0 ] && is_root=1
say() { echo "bootstrap: $*" >&2; }

apt_updated=0
apt_install() {  # apt_install PKG...: as root install them, else print the command and exit 2
  if [ "$is_root" -eq 1 ] && command -v apt-get >/dev/null; then
    say "installing: $*"
    if [ "$apt_updated" -eq 0 ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    say "missing system packages: $*"
    say "install them with:  sudo apt-get install -y $*"
    exit 2
  fi
}

# A tool counts as present if it is on PATH or in an sbin dir (not on a normal user's PATH).
have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

# --- system tools for the tests ---------------------------------------------------------
if [ "$want_test" -eq 1 ]; then
  missing=()
  have rsync      || missing+=(rsync)
  [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
  { have ssh && have ssh-keygen; } || missing+=(openssh-client)
  have jq         || missing+=(jq)
  have xxhsum     || missing+=(xxhash)
  have runuser    || missing+=(util-linux)
  { have useradd && have usermod && have userdel; } || missing+=(passwd)
  have ip         || missing+=(iproute2)   # network-namespace tests
  if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
  if [ "$is_root" -eq 1 ]; then
    mkdir -p -m 0755 /run/sshd   # sshd's privilege-separation dir; no systemd unit creates it here
  fi
fi
if [ "$want_bench" -eq 1 ] && ! have fusermount3; then
  apt_install fuse3   # S1n's FUSE filesystem (scripts/latencyfs.py)
fi

# --- uv ---------------------------------------------------------------------------------
export PATH="$HOME/.local/bin:$PATH"

if ! command -v uv >/dev/null 2>&1; then
  say "installing uv"
  command -v python3 >/dev/null || { say "python3 (>= 3.10) is required"; exit 2; }
  # pip into python3 (works for pyenv/venv Pythons), else --user; Debian's system Python
  # refuses both (PEP 668) or has no pip, so fall back to a private venv holding only uv.
  if ! { python3 -m pip install -q uv 2>/dev/null || python3 -m pip install -q --user uv 2>/dev/null; }; then
    venv="${XDG_DATA_HOME:-$HOME/.local/share}/usrsync/uv-venv"
    if ! python3 -c 'import ensurepip' 2>/dev/null; then apt_install python3-venv; fi
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q uv
  fi
  # Wherever pip put the binary, make it reachable as ~/.local/bin/uv (the Makefile adds that dir).
  if ! command -v uv >/dev/null 2>&1; then
    uv_bin=""
    for py in "${venv:-}/bin/python" python3; do
      uv_bin="$("$py" -c 'import uv; print(uv.find_uv_bin())' 2>/dev/null)" && break
    done
    [ -n "$uv_bin" ] || { say "installed uv but cannot find its binary"; exit 1; }
    mkdir -p "$HOME/.local/bin"
    ln -sf "$uv_bin" "$HOME/.local/bin/uv"
  fi
  command -v uv >/dev/null || { say "uv is still not on PATH"; exit 1; }
fi

cd "$repo"
# Bytecode now, not at first import: where PYTHONDONTWRITEBYTECODE is set (CI images often set
# it), every `usr` process would otherwise compile asyncssh, rich, click... from source again.
groups=()
[ "$want_bench" -eq 1 ] && groups+=(--group bench)
uv sync --frozen --quiet --compile-bytecode ${groups[@]+"${groups[@]}"}
uv run --frozen --quiet python -m compileall -q usrsync remote_agent
