#!/usr/bin/env bash
# Start a throwaway OpenStack Keystone for the tests and print its endpoint (http://127.0.0.1:PORT/v3).
#
# - Keystone comes from PyPI into its own venv ($RAKSHA_KEYSTONE_DIR/venv, default
#   /var/lib/raksha-test-keystone/venv), never into the project's .venv; Debian's python3-venv is
#   installed only when missing. pip runs only when the venv lacks keystone or waitress.
# - SQLite database, fernet token and credential keys, config and log under $RAKSHA_KEYSTONE_DIR/state.
# - Served by waitress (keystone.wsgi.api:application) on 127.0.0.1:$RAKSHA_KEYSTONE_PORT (default 35357),
#   in the background; its pid in state/keystone.pid.
# - Idempotent: when it already answers (and was set up by this script) only the endpoint is printed.
#
# Accounts (all in the Default domain, passwords fixed: a loopback-only test server):
#   admin            / raksha-admin-pw    admin of project admin (keystone-manage bootstrap)
#   raksha           / raksha-service-pw  project service, roles service + admin: the API's auth_token user
#   raksha-a-member  / raksha-test-pw     member of project raksha-test-a
#   raksha-a-reader  / raksha-test-pw     reader of project raksha-test-a
#   raksha-b-member  / raksha-test-pw     member of project raksha-test-b
# Keystone's bootstrap makes admin imply member and member imply reader, as in any cloud.
#
# Prints exactly one line on stdout: the identity endpoint. Progress goes to stderr.
# Stop it with:  scripts/start-keystone.sh --stop
set -euo pipefail
exec </dev/null

DIR="${RAKSHA_KEYSTONE_DIR:-/var/lib/raksha-test-keystone}"
PORT="${RAKSHA_KEYSTONE_PORT:-35357}"
VENV="$DIR/venv"
STATE="$DIR/state"
ETC="$STATE/etc"
PIDFILE="$STATE/keystone.pid"
LOG="$STATE/keystone.log"
READY="$STATE/ready"
ENDPOINT="http://127.0.0.1:$PORT/v3"
ADMIN_PW="raksha-admin-pw"
say() { printf 'start-keystone: %s\n' "$*" >&2; }
die() { printf 'start-keystone: ERROR: %s\n' "$*" >&2; exit 1; }

# The pid file may outlive its process (a machine handed on, a new pid namespace): a pid is ours only
# while its command line is our keystone launcher, never whatever process reuses the number.
running() {
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'ident="keystone"'
}
answers() {  # GET /v3 returns 200
    "$VENV/bin/python" - "$ENDPOINT" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
}

if [[ "${1:-}" == "--stop" ]]; then
    if running; then
        kill "$(cat "$PIDFILE")" && say "stopped keystone (pid $(cat "$PIDFILE"))"
    fi
    rm -f "$PIDFILE" "$READY"
    exit 0
fi

# Fast path: up, answering, and its accounts made for this port.
if running && [[ "$(cat "$READY" 2>/dev/null)" == "$ENDPOINT" ]] && answers; then
    printf '%s\n' "$ENDPOINT"
    exit 0
fi

# ---------------------------------------------------------------- install
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
    (( EUID == 0 )) || die "python3-venv is missing and this is not root"
    say "installing Debian package python3-venv"
    apt-get -o DPkg::Lock::Timeout=600 -q update >/dev/null || die "apt-get update failed"
    apt-get -o DPkg::Lock::Timeout=600 -q install -y --no-install-recommends python3-venv >&2 \
        || die "apt-get install python3-venv failed"
fi
mkdir -p "$DIR"
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating the keystone venv at $VENV"
    /usr/bin/python3 -m venv "$VENV" || die "python3 -m venv failed"
fi
if ! "$VENV/bin/python" -c 'import keystone.wsgi.api, waitress' 2>/dev/null \
        && ! "$VENV/bin/python" -c 'import keystone.server.wsgi, waitress' 2>/dev/null; then
    say "installing keystone and waitress from PyPI into $VENV (about a minute)"
    "$VENV/bin/python" -m pip install -q 'keystone>=26' 'waitress>=2.1' >&2 || die "pip install keystone failed"
fi

# ---------------------------------------------------------------- configure
if running; then  # up but not ours for this port, or not answering: start afresh
    say "restarting keystone (pid $(cat "$PIDFILE"))"
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    for _ in $(seq 50); do running || break; sleep 0.1; done
fi
if answers; then
    die "something else answers on $ENDPOINT; set RAKSHA_KEYSTONE_PORT to a free port"
fi
rm -f "$READY" "$PIDFILE"
mkdir -p "$ETC" "$STATE/fernet-keys" "$STATE/credential-keys"
chmod 0700 "$STATE" "$STATE/fernet-keys" "$STATE/credential-keys"
cat >"$ETC/keystone.conf" <<EOF
[DEFAULT]
use_stderr = true
debug = false

[database]
connection = sqlite:///$STATE/keystone.sqlite

[token]
provider = fernet
expiration = 7200

[fernet_tokens]
key_repository = $STATE/fernet-keys

[credential]
key_repository = $STATE/credential-keys

[cache]
enabled = false

[oslo_policy]
enforce_new_defaults = true
enforce_scope = true
EOF

KM=("$VENV/bin/keystone-manage" --config-file "$ETC/keystone.conf")
owner=(--keystone-user "$(id -un)" --keystone-group "$(id -gn)")
say "db_sync, fernet and credential keys, bootstrap (SQLite in $STATE)"
"${KM[@]}" db_sync >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; die "keystone-manage db_sync failed"; }
[[ -n "$(ls -A "$STATE/fernet-keys")" ]] || "${KM[@]}" fernet_setup "${owner[@]}" >>"$LOG" 2>&1 \
    || die "fernet_setup failed"
[[ -n "$(ls -A "$STATE/credential-keys")" ]] || "${KM[@]}" credential_setup "${owner[@]}" >>"$LOG" 2>&1 \
    || die "credential_setup failed"
"${KM[@]}" bootstrap --bootstrap-password "$ADMIN_PW" --bootstrap-region-id RegionOne \
    --bootstrap-admin-url "$ENDPOINT" --bootstrap-internal-url "$ENDPOINT" --bootstrap-public-url "$ENDPOINT" \
    >>"$LOG" 2>&1 || { tail -n 30 "$LOG" >&2; die "keystone-manage bootstrap failed"; }

# ---------------------------------------------------------------- serve
say "serving keystone on $ENDPOINT (log: $LOG)"
# Keystone parses sys.argv as its own options: a tiny launcher hands waitress the app without argv.
OS_KEYSTONE_CONFIG_DIR="$ETC" setsid "$VENV/bin/python" -c '
import sys
port = int(sys.argv[1])
del sys.argv[1:]
import waitress
from keystone.server import wsgi
waitress.serve(wsgi.initialize_public_application(), host="127.0.0.1", port=port, threads=4,
               ident="keystone")
' "$PORT" >>"$LOG" 2>&1 &
echo $! >"$PIDFILE"
for _ in $(seq 120); do
    answers && break
    running || { tail -n 30 "$LOG" >&2; die "keystone exited at start"; }
    sleep 0.5
done
answers || { tail -n 30 "$LOG" >&2; die "keystone does not answer on $ENDPOINT after 60 s"; }

# ---------------------------------------------------------------- accounts (idempotent, over the API)
"$VENV/bin/python" - "$ENDPOINT" "$ADMIN_PW" <<'EOF' >&2 || die "creating the test projects and users failed"
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

endpoint, admin_pw = sys.argv[1], sys.argv[2]
TEST_PW = "raksha-test-pw"
ACCOUNTS = [  # user, password, project, roles
    ("raksha", "raksha-service-pw", "service", ["service", "admin"]),
    ("raksha-a-member", TEST_PW, "raksha-test-a", ["member"]),
    ("raksha-a-reader", TEST_PW, "raksha-test-a", ["reader"]),
    ("raksha-b-member", TEST_PW, "raksha-test-b", ["member"]),
]


def call(method, path, body=None, token=None):
    req = urllib.request.Request(endpoint + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", **({"X-Auth-Token": token} if token else {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
        return r.headers, (json.loads(raw) if raw else None)


headers, _ = call("POST", "/auth/tokens", {"auth": {
    "identity": {"methods": ["password"], "password": {"user": {
        "name": "admin", "domain": {"id": "default"}, "password": admin_pw}}},
    "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}})
token = headers["X-Subject-Token"]


def ensure(kind, name, body, query=""):
    q = urllib.parse.urlencode({"name": name})
    _, found = call("GET", f"/{kind}s?{q}{query}", token=token)
    if found[f"{kind}s"]:
        return found[f"{kind}s"][0]["id"]
    _, made = call("POST", f"/{kind}s", {kind: {"name": name, **body}}, token=token)
    print(f"created {kind} {name}")
    return made[kind]["id"]


roles = {r: ensure("role", r, {}) for r in ("reader", "member", "admin", "service")}
for user, password, project, wanted in ACCOUNTS:
    pid = ensure("project", project, {"domain_id": "default", "description": "raksha tests"}, "&domain_id=default")
    uid = ensure("user", user, {"domain_id": "default", "password": password, "default_project_id": pid},
                 "&domain_id=default")
    call("PATCH", f"/users/{uid}", {"user": {"password": password, "enabled": True}}, token=token)
    for role in wanted:
        call("PUT", f"/projects/{pid}/users/{uid}/roles/{roles[role]}", token=token)
print("accounts ready")
EOF
printf '%s\n' "$ENDPOINT" >"$READY"
printf '%s\n' "$ENDPOINT"
