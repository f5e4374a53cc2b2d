#!/usr/bin/env bash
# The whole test suite: unit tests, the integration tests that start a real ZooKeeper
# ensemble and sidecar processes on loopback, and the Kubernetes suite on a real control
# plane (kube-apiserver, etcd, kube-controller-manager, kube-scheduler built from their Go
# module sources once per machine by scripts/kube-binaries.sh). Each stage prints its time.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
stage_start=$SECONDS
stage() {
  local now=$SECONDS
  if [ -n "${stage_name:-}" ]; then
    echo "test.sh: stage '$stage_name' took $((now - stage_start))s"
  fi
  stage_name="$1"
  stage_start=$now
  [ -z "$1" ] || echo "test.sh: stage '$1' (at $((now - started))s)"
}

stage setup
scripts/setup.sh
# No import cycle between the modules of a crate (beyond the known ones the baseline lists).
python3 scripts/check-module-cycles.py --self-test
python3 scripts/check-module-cycles.py

# Built before anything else competes for the two cores; a second run finds them cached.
stage "kubernetes binaries"
kube_bin="$(scripts/kube-binaries.sh | tail -n 1)"
export RTABLE_KUBE_BIN="$kube_bin"

# The e2e harness keeps cluster directories of failed tests; a private TMPDIR keeps them
# away from system tmp cleaners and from other users of /tmp.
export TMPDIR="$PWD/target/e2e-tmp"
mkdir -p "$TMPDIR"
# Every step selects the whole workspace so that cargo unifies features the same way each time
# and nothing built here is compiled again. Unit tests run in parallel; the integration tests
# start processes (ZooKeeper servers, sidecars) and run one at a time.
stage build
cargo build --workspace --all-targets
stage "unit tests"
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
# Every integration test target but the fault scenarios and the Kubernetes suites, found by
# file so none is missed. The Kubernetes suites are the files named kube*.rs.
others=()
kube=()
for file in e2e/tests/*.rs sidecar/tests/*.rs operator/tests/*.rs; do
  [ -f "$file" ] || continue
  name="$(basename "$file" .rs)"
  case "$name" in
    faults) ;;
    kube*) kube+=(--test "$name") ;;
    *) others+=(--test "$name") ;;
  esac
done
failed=0
stage "integration tests"
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
stage "fault scenarios"
cargo test --workspace --no-fail-fast --test faults -- --test-threads=1 || failed=1
if [ "${#kube[@]}" -gt 0 ]; then
  stage "kubernetes suite"
  cargo test --workspace --no-fail-fast "${kube[@]}" -- --test-threads=1 || failed=1
fi
if [ -x scripts/check-chart.sh ]; then
  stage "chart"
  scripts/check-chart.sh || failed=1
fi
stage ""
echo "test.sh: total $((SECONDS - started))s"
if [ "$failed" != 0 ]; then
  echo "test.sh: FAILED (see above)" >&2
  exit 1
fi
echo "test.sh: all green"
