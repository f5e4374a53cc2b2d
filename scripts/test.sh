#!/usr/bin/env bash
# The whole test suite: unit tests, and the integration tests that start a real ZooKeeper
# ensemble and sidecar processes on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# The e2e harness keeps cluster directories of failed tests; a private TMPDIR keeps them
# away from system tmp cleaners and from other users of /tmp.
export TMPDIR="$PWD/target/e2e-tmp"
mkdir -p "$TMPDIR"
cargo build --workspace --all-targets
# Every step selects the whole workspace so that cargo unifies features the same way each time
# and nothing built above is compiled again. Unit tests run in parallel; the integration tests
# start processes (ZooKeeper ensembles, sidecars) and run one at a time.
cargo test --workspace --no-fail-fast --lib --bins
cargo test --workspace --no-fail-fast --test '*' -- --test-threads=1
if [ -x scripts/check-chart.sh ]; then
  scripts/check-chart.sh
fi
echo "test.sh: all green"
