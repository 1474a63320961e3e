#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the tests and print its SQLAlchemy URL.
#
# - Installs Debian's postgresql server package only when it is missing.
# - One cluster under $RAKSHA_PG_DIR (default /var/tmp/raksha-test-db/postgres),
#   owned by the postgres user (initdb refuses root), listening on a unix
#   socket in that directory only (no TCP port, nothing reachable from outside).
# - Idempotent: a second run finds the server up and only prints the URL.
# - Trust authentication for the local superuser; the database `raksha` exists.
#
# Prints exactly one line on stdout:
#   postgresql+psycopg://postgres@/raksha?host=<dir>
# Stop it with:  runuser -u postgres -- pg_ctl -D <dir>/data stop   (or scripts/start-postgres.sh --stop)
set -euo pipefail
exec </dev/null

DIR="${RAKSHA_PG_DIR:-/var/tmp/raksha-test-db/postgres}"
DATA="$DIR/data"
LOG="$DIR/server.log"
say() { printf 'start-postgres: %s\n' "$*" >&2; }
die() { printf 'start-postgres: ERROR: %s\n' "$*" >&2; exit 1; }

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }

if [[ -z "$(pg_bindir)" || ! -x "$(pg_bindir)/postgres" ]]; then
    (( EUID == 0 )) || die "PostgreSQL is not installed and this is not root"
    say "installing Debian package postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 -q update >/dev/null || die "apt-get update failed"
    apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends postgresql >&2 \
        || die "apt-get install postgresql failed"
fi
BIN="$(pg_bindir)"

# Run as the postgres user when we are root; as ourselves otherwise.
as_owner() {
    if (( EUID == 0 )); then runuser -u postgres -- "$@"; else "$@"; fi
}

if [[ "${1:-}" == "--stop" ]]; then
    [[ -f "$DATA/PG_VERSION" ]] && as_owner "$BIN/pg_ctl" -D "$DATA" -m fast stop >&2 || true
    exit 0
fi

mkdir -p "$DIR"
if (( EUID == 0 )); then
    chown postgres:postgres "$DIR"
fi
chmod 0700 "$DIR"

if [[ ! -f "$DATA/PG_VERSION" ]]; then
    say "initdb in $DATA"
    as_owner "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 \
        || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
fi

# A lock file left by a killed server names a pid that another process may now hold (a new pid
# namespace, a machine handed on): pg_ctl and postgres would take that process for a live server.
if [[ -f "$DATA/postmaster.pid" ]]; then
    pid="$(head -n1 "$DATA/postmaster.pid")"
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != postgres ]]; then
        say "removing the stale lock file of server pid $pid"
        rm -f "$DATA/postmaster.pid"
    fi
fi
if ! as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    say "starting PostgreSQL ($BIN) with its socket in $DIR"
    # fsync off: a throwaway test server; the data need not survive a power cut.
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start \
        -o "-c listen_addresses='' -c unix_socket_directories='$DIR' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" >&2 \
        || { tail -n 30 "$LOG" >&2 || true; die "PostgreSQL did not start"; }
fi

if ! as_owner "$BIN/psql" -h "$DIR" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='raksha'" | grep -q 1; then
    as_owner "$BIN/createdb" -h "$DIR" -U postgres raksha
fi

printf 'postgresql+psycopg://postgres@/raksha?host=%s\n' "$DIR"
