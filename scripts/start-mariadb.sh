#!/usr/bin/env bash
# Start a throwaway MariaDB server for the tests and print its SQLAlchemy URL.
#
# - Installs Debian's mariadb-server package only when it is missing (the
#   package's own service is not used; Debian's policy-rc.d may stop it starting).
# - One server under $RAKSHA_MARIADB_DIR (default /var/tmp/raksha-test-db/mariadb),
#   run as the mysql user, with networking off: a unix socket in that directory only.
# - Idempotent: a second run finds the server up and only prints the URL.
# - root has an empty password over the socket; the database `raksha` exists.
#
# Prints exactly one line on stdout:
#   mysql+pymysql://root@localhost/raksha?unix_socket=<dir>/mysqld.sock&charset=utf8mb4
# Stop it with:  scripts/start-mariadb.sh --stop
set -euo pipefail
exec </dev/null

DIR="${RAKSHA_MARIADB_DIR:-/var/tmp/raksha-test-db/mariadb}"
DATA="$DIR/data"
SOCK="$DIR/mysqld.sock"
PID="$DIR/mysqld.pid"
LOG="$DIR/server.log"
say() { printf 'start-mariadb: %s\n' "$*" >&2; }
die() { printf 'start-mariadb: ERROR: %s\n' "$*" >&2; exit 1; }

if ! command -v mariadbd >/dev/null && [[ ! -x /usr/sbin/mariadbd ]]; then
    (( EUID == 0 )) || die "MariaDB is not installed and this is not root"
    say "installing Debian package mariadb-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 -q update >/dev/null || die "apt-get update failed"
    apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends mariadb-server mariadb-client >&2 \
        || die "apt-get install mariadb-server failed"
fi
MARIADBD="$(command -v mariadbd || echo /usr/sbin/mariadbd)"
CLIENT="$(command -v mariadb || command -v mysql)"
USER_NAME=mysql
id "$USER_NAME" >/dev/null 2>&1 || USER_NAME="$(id -un)"

alive() { [[ -S "$SOCK" ]] && "$CLIENT" --no-defaults -S "$SOCK" -uroot -e 'SELECT 1' >/dev/null 2>&1; }

if [[ "${1:-}" == "--stop" ]]; then
    # Only a pid that is still mariadbd: a stale pid file may name another process by now.
    if [[ -f "$PID" && "$(cat "/proc/$(cat "$PID")/comm" 2>/dev/null)" == mariadbd ]]; then
        kill "$(cat "$PID")" 2>/dev/null || true
        for _ in $(seq 1 100); do [[ -f "$PID" ]] || break; sleep 0.1; done
    fi
    exit 0
fi

mkdir -p "$DIR"
(( EUID == 0 )) && chown "$USER_NAME": "$DIR"
chmod 0750 "$DIR"

if [[ ! -d "$DATA/mysql" ]]; then
    say "mariadb-install-db in $DATA"
    INSTALL_DB="$(command -v mariadb-install-db || command -v mysql_install_db)"
    "$INSTALL_DB" --no-defaults --datadir="$DATA" --user="$USER_NAME" \
        --auth-root-authentication-method=normal --skip-test-db >"$DIR/install.log" 2>&1 \
        || { cat "$DIR/install.log" >&2; die "mariadb-install-db failed"; }
fi

if ! alive; then
    say "starting MariaDB with its socket at $SOCK"
    rm -f "$SOCK"
    # --no-defaults: /etc/mysql settings (port 3306, the system socket) are not used.
    setsid "$MARIADBD" --no-defaults --datadir="$DATA" --socket="$SOCK" --pid-file="$PID" \
        --skip-networking --user="$USER_NAME" --log-error="$LOG" \
        --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
        --innodb-flush-log-at-trx-commit=0 --sync-binlog=0 --innodb-buffer-pool-size=64M \
        --max-connections=200 >/dev/null 2>&1 &
    for _ in $(seq 1 300); do
        alive && break
        sleep 0.1
    done
    alive || { tail -n 30 "$LOG" >&2 || true; die "MariaDB did not start"; }
fi

"$CLIENT" --no-defaults -S "$SOCK" -uroot -e \
    'CREATE DATABASE IF NOT EXISTS raksha CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci'

printf 'mysql+pymysql://root@localhost/raksha?unix_socket=%s&charset=utf8mb4\n' "$SOCK"
