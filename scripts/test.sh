#!/usr/bin/env bash
# The whole test suite: installs what is missing (scripts/setup.sh), then formatting, lints,
# every Rust test of the workspace (real Postgres, MariaDB, broker and S3 started per test),
# the CRD freshness check and the Helm chart checks. Ends with one line: `total: N passed, M failed`.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
"$ROOT/scripts/setup.sh" || exit 1

passed=0
failed=0
failures=()
started=$(date +%s)
check() { # check "<name>" cmd...  (a named check that passes or fails as a whole)
  local name=$1; shift
  local t0; t0=$(date +%s)
  printf '==> %s\n' "$name"
  if "$@"; then
    passed=$((passed + 1)); printf '    ok (%ss)\n' "$(( $(date +%s) - t0 ))"
  else
    failed=$((failed + 1)); failures+=("$name"); printf '    FAILED (%ss)\n' "$(( $(date +%s) - t0 ))"
  fi
}

check "cargo fmt --check" cargo fmt --all -- --check
check "cargo clippy (all targets, -D warnings)" cargo clippy --workspace --all-targets --locked -- -D warnings

# The e2e tests run every binary of the workspace (operator, connector, the example connector);
# nextest builds only the binaries of packages that have integration tests.
check "cargo build --workspace --bins" cargo build --workspace --bins --locked

printf '==> cargo nextest run --workspace\n'
log=$(mktemp)
profile=default; [ -n "${CI:-}" ] && profile=ci
cargo nextest run --workspace --locked --profile "$profile" --no-tests=fail 2>&1 | tee "$log"
rust_rc=${PIPESTATUS[0]}
summary=$(grep -E '^\s*Summary \[' "$log" | tail -n 1)
rust_passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$summary")
rust_failed=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$summary")
rust_timedout=$(sed -nE 's/.* ([0-9]+) timed out.*/\1/p' <<<"$summary")
passed=$((passed + ${rust_passed:-0}))
failed=$((failed + ${rust_failed:-0} + ${rust_timedout:-0}))
if [ "$rust_rc" -ne 0 ] && [ "${rust_failed:-0}" -eq 0 ] && [ "${rust_timedout:-0}" -eq 0 ]; then
  failed=$((failed + 1)); failures+=("cargo nextest (exit $rust_rc, see above: build error?)")
elif [ "${rust_failed:-0}" -gt 0 ] || [ "${rust_timedout:-0}" -gt 0 ]; then
  failures+=("Rust tests: ${rust_failed:-0} failed, ${rust_timedout:-0} timed out")
fi
rm -f "$log"

if [ -f "$ROOT/scripts/check_chart.py" ]; then
  check "Helm chart checks" "$ROOT/.venv/bin/python" "$ROOT/scripts/check_chart.py"
fi

printf '\nTest suite finished in %ss.\n' "$(( $(date +%s) - started ))"
for f in "${failures[@]}"; do printf '  failed: %s\n' "$f"; done
printf 'total: %d passed, %d failed\n' "$passed" "$failed"
[ "$failed" -eq 0 ]
