#!/usr/bin/env bash
# Lint (ruff, mypy, import-linter) and then the whole pytest suite, slow tests
# included. Every step runs even if an earlier one fails, so one run reports
# everything; the script exits non-zero if any step failed.
# Extra arguments go to pytest:  scripts/run-tests.sh -k vault -x
# Expects the venv made by scripts/setup.sh (`make test` runs that first).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
BIN="$REPO/.venv/bin"
[[ -x "$BIN/python" ]] || { echo "run-tests: no .venv; run scripts/setup.sh (or make test)" >&2; exit 1; }

failed=()
step() {  # step NAME CMD...
    local name="$1"; shift
    printf '\n== %s: %s\n' "$name" "$*"
    local rc=0
    "$@" || rc=$?
    if (( rc != 0 )); then
        printf '== %s FAILED (exit %d)\n' "$name" "$rc"
        failed+=("$name")
    fi
    return 0
}

# Lint only the top-level directories that exist (bench/ or scripts/ may be empty or absent).
lint_dirs=()
for d in src tests bench scripts; do
    [[ -d "$d" ]] && lint_dirs+=("$d")
done

step ruff "$BIN/ruff" check "${lint_dirs[@]}"
step mypy "$BIN/mypy"
step import-linter "$BIN/lint-imports"

printf '\n== pytest: %s\n' "pytest -q -ra $*"
rc=0
"$BIN/python" -m pytest -q -ra "$@" </dev/null || rc=$?
case "$rc" in
    0) ;;
    5) echo "== pytest FAILED: no tests were collected (exit 5) - treating that as a failure"
       failed+=(pytest) ;;
    *) printf '== pytest FAILED (exit %d)\n' "$rc"
       failed+=(pytest) ;;
esac

echo
if (( ${#failed[@]} )); then
    echo "run-tests: FAILED: ${failed[*]}"
    exit 1
fi
echo "run-tests: all passed (ruff, mypy, import-linter, pytest)"
