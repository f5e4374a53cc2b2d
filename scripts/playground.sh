#!/usr/bin/env bash
# The local playground: a 3-node ZooKeeper ensemble and the replicas of
# examples/events.yaml on this machine, with a live status table. Ctrl-C stops everything.
# Flags go to `rtable-e2e playground` (--manifest, --replicas, --base-port, --once, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
cargo build --quiet -p rtable-sidecar -p rtable-e2e
exec "${CARGO_TARGET_DIR:-target}/debug/rtable-e2e" playground "$@"
