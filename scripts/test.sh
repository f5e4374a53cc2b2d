#!/usr/bin/env bash
# The whole test suite: unit tests, and the integration tests that start a real ZooKeeper
# ensemble and sidecar processes on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# No import cycle between the modules of a crate (beyond the known ones the baseline lists).
python3 scripts/check-module-cycles.py --self-test
python3 scripts/check-module-cycles.py
# The e2e harness keeps cluster directories of failed tests; a private TMPDIR keeps them
# away from system tmp cleaners and from other users of /tmp.
export TMPDIR="$PWD/target/e2e-tmp"
mkdir -p "$TMPDIR"
# Every step selects the whole workspace so that cargo unifies features the same way each time
# and nothing built here is compiled again. Unit tests run in parallel; the integration tests
# start processes (ZooKeeper servers, sidecars) and run one at a time.
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast --lib --bins

# RTABLE_LINT=1 (CI) also runs clippy, in its own target directory, while the protocol
# suites run: they spend most of their time waiting on processes, while a lint next to the
# build would only halve the build's two cores. The fault scenarios run after it, alone.
lint_pid=""
if [ "${RTABLE_LINT:-0}" = 1 ]; then
  CARGO_TARGET_DIR="$PWD/target/clippy" cargo clippy --workspace --all-targets -- -D warnings \
    >"$PWD/target/clippy.log" 2>&1 &
  lint_pid=$!
fi
# Every integration test target but the fault scenarios, found by file so none is missed.
others=()
for file in e2e/tests/*.rs sidecar/tests/*.rs operator/tests/*.rs; do
  [ -f "$file" ] || continue
  name="$(basename "$file" .rs)"
  [ "$name" = faults ] || others+=(--test "$name")
done
failed=0
cargo test --workspace --no-fail-fast "${others[@]}" -- --test-threads=1 || failed=1
if [ -n "$lint_pid" ]; then
  if wait "$lint_pid"; then
    tail -n 2 target/clippy.log
  else
    cat target/clippy.log
    echo "test.sh: cargo clippy -D warnings failed" >&2
    failed=1
  fi
fi
cargo test --workspace --no-fail-fast --test faults -- --test-threads=1 || failed=1
if [ -x scripts/check-chart.sh ]; then
  scripts/check-chart.sh || failed=1
fi
if [ "$failed" != 0 ]; then
  echo "test.sh: FAILED (see above)" >&2
  exit 1
fi
echo "test.sh: all green"
