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
# RTABLE_LINT=1 (CI) also runs clippy, in its own target directory alongside the build: on
# two cores a build spends long stretches compiling one big crate on one core, and the lint
# fills the other. It must pass before any test runs.
lint_pid=""
if [ "${RTABLE_LINT:-0}" = 1 ]; then
  CARGO_TARGET_DIR="$PWD/target/clippy" cargo clippy --workspace --all-targets -- -D warnings \
    >"$PWD/target/clippy.log" 2>&1 &
  lint_pid=$!
fi
cargo build --workspace --all-targets
if [ -n "$lint_pid" ]; then
  if ! wait "$lint_pid"; then
    cat target/clippy.log
    echo "test.sh: cargo clippy -D warnings failed" >&2
    exit 1
  fi
  tail -n 2 target/clippy.log
fi
# Every step selects the whole workspace so that cargo unifies features the same way each time
# and nothing built above is compiled again. Unit tests run in parallel; the integration tests
# start processes (ZooKeeper ensembles, sidecars) and run one at a time.
cargo test --workspace --no-fail-fast --lib --bins
cargo test --workspace --no-fail-fast --test '*' -- --test-threads=1
if [ -x scripts/check-chart.sh ]; then
  scripts/check-chart.sh
fi
echo "test.sh: all green"
