#!/usr/bin/env bash
# Set up everything Raksha needs on a Debian 12 host (run as root):
#   - Debian packages (apt-get runs only when something is missing),
#   - a venv at <repo>/.venv built on Debian's /usr/bin/python3,
#   - the project installed editable with its test extras (pip runs only when
#     pyproject.toml changed since the last successful install),
#   - Debian's libnbd Python binding made importable inside the venv.
# Idempotent: a second run does no apt and no pip work.
#
# Usage: scripts/setup.sh [--bench]
#   --bench   also install restic, borgbackup and nbdkit (for `make bench`)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY=/usr/bin/python3
STAMP="$VENV/.raksha-install-stamp"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

bench=0
for arg in "$@"; do
    case "$arg" in
        --bench) bench=1 ;;
        -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (usage: scripts/setup.sh [--bench])" ;;
    esac
done

# Never wait on a terminal, whatever the caller's stdin is.
exec </dev/null
export DEBIAN_FRONTEND=noninteractive
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# ---------------------------------------------------------------- Debian packages
packages=(python3 python3-venv python3-dev python3-libnbd libnbd-bin qemu-utils zstd time
          libvirt-daemon-system libvirt-clients libvirt-dev pkg-config qemu-system-x86
          openssl)  # openssl: the tests' TLS front makes its certificate with it
if (( bench )); then
    packages+=(restic borgbackup nbdkit)
fi

missing=()
for pkg in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if (( ${#missing[@]} )); then
    command -v apt-get >/dev/null || die "apt-get not found; this script targets Debian 12"
    sudo=()
    if (( EUID != 0 )); then
        command -v sudo >/dev/null || die "missing packages (${missing[*]}) and not root; run as root"
        sudo=(sudo -n)
    fi
    say "installing Debian packages: ${missing[*]}"
    apt_opts=(-o DPkg::Lock::Timeout=600 -q)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" update >/dev/null \
        || die "apt-get update failed"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
else
    say "Debian packages present"
fi

[[ -x "$PY" ]] || die "$PY not found after installing python3"

# ---------------------------------------------------------------- venv
# Reuse the venv only if it runs and is built on Debian's python (not pyenv's).
venv_ok() {
    [[ -x "$VENV/bin/python" && -f "$VENV/pyvenv.cfg" ]] || return 1
    grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" || return 1
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null
}

if ! venv_ok; then
    if [[ -e "$VENV" ]]; then
        say "existing .venv is unusable or not built on $PY; recreating it"
        rm -rf "$VENV"
    fi
    say "creating venv at .venv with $PY"
    "$PY" -m venv "$VENV" || die "python3 -m venv failed (is python3-venv installed?)"
    "$VENV/bin/python" -m pip install -q --upgrade pip || die "upgrading pip in the venv failed"
fi

# site-packages of the venv (python3.11 on Debian 12, but do not hard-code it).
site_packages=("$VENV"/lib/python3.*/site-packages)
[[ ${#site_packages[@]} -eq 1 && -d "${site_packages[0]}" ]] \
    || die "cannot find exactly one site-packages directory in $VENV/lib"
site_packages="${site_packages[0]}"

# ---------------------------------------------------------------- project install
want_hash="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
have_hash="$(cat "$STAMP" 2>/dev/null || true)"
# Reinstall also if the package somehow vanished from the venv (e.g. a pip uninstall).
installed=0
if [[ "$want_hash" == "$have_hash" ]] && [[ -x "$VENV/bin/raksha" ]] \
    && "$VENV/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("raksha") is None)' \
        2>/dev/null; then
    installed=1
fi

if (( installed )); then
    say "python dependencies up to date (pyproject.toml unchanged)"
else
    say "installing raksha (editable) with test and osc extras into .venv"
    rm -f "$STAMP"
    (cd "$REPO" && "$VENV/bin/python" -m pip install -q -e '.[test,osc]') \
        || die "pip install -e '.[test,osc]' failed"
    printf '%s\n' "$want_hash" >"$STAMP"
fi

# ---------------------------------------------------------------- libnbd binding
# python3-libnbd exists only as a Debian package. Expose just its two files to the
# venv (no --system-site-packages, which would leak every Debian python package).
DIST=/usr/lib/python3/dist-packages
NBD_DIR="$VENV/debian-nbd"
nbd_so=("$DIST"/libnbdmod.cpython-*.so)
[[ -f "$DIST/nbd.py" && -f "${nbd_so[0]}" ]] \
    || die "python3-libnbd files not found in $DIST (nbd.py, libnbdmod.cpython-*.so)"
mkdir -p "$NBD_DIR"
# Drop stale links (e.g. after a Debian python upgrade changed the .so name).
find "$NBD_DIR" -maxdepth 1 -type l ! -exec test -e {} \; -delete
ln -sfn "$DIST/nbd.py" "$NBD_DIR/nbd.py"
for so in "${nbd_so[@]}"; do
    ln -sfn "$so" "$NBD_DIR/$(basename "$so")"
done
pth="$site_packages/debian-nbd.pth"
if [[ "$(cat "$pth" 2>/dev/null || true)" != "$NBD_DIR" ]]; then
    printf '%s\n' "$NBD_DIR" >"$pth"
fi

# ---------------------------------------------------------------- bytecode
# An editable install leaves src/ uncompiled. Where PYTHONDONTWRITEBYTECODE is set (as on this
# development machine) every command would compile Raksha's modules again, ~60 ms per start.
# compileall skips what is already up to date.
"$VENV/bin/python" -m compileall -q "$REPO/src" >/dev/null || die "compiling $REPO/src failed"

# ---------------------------------------------------------------- check
"$VENV/bin/python" -c 'import nbd' \
    || die "'import nbd' fails in the venv (check python3-libnbd and $pth)"
say "venv ready ($("$VENV/bin/python" -c 'import sys; print("python %d.%d.%d" % sys.version_info[:3])'), libnbd binding importable)"
