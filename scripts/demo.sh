#!/usr/bin/env bash
# The local demo: installs what is missing, builds the operator, the connector and the local control
# plane, then starts Postgres (sample table), the broker, the control plane and the operator, applies
# examples/postgres.yaml with kubectl and shows the rows arriving and `kubectl get connectors`.
# Ctrl-C stops everything. Extra arguments go to obsrv-demo (e.g. --rows 100000, --no-wait).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
"$ROOT/scripts/setup.sh"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
echo "==> cargo build (operator, connector, local control plane)"
cargo build --locked -p obsrv-operator -p obsrv-connector -p obsrv-e2e --bins
exec "$TARGET/debug/obsrv-demo" --bin-dir "$TARGET/debug" "$@"
