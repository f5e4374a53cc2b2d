#!/usr/bin/env bash
# Coverage-guided fuzzing of every decoder that reads bytes from clients, peers or ZooKeeper
# (the targets are plain functions in fuzz-targets/; fuzz/ holds one libFuzzer binary each).
#
#   scripts/fuzz.sh list                       the targets
#   scripts/fuzz.sh seed                       (re)write the seed corpus fuzz/corpus/<target>/seed-*
#   scripts/fuzz.sh <target|all> <seconds> [--runs N] [--minimize] [--no-build]
#       runs each target, one after the other (never two fuzz processes at once: the machine
#       is shared), for <seconds> or N executions (default 10,000,000), whichever ends
#       first, at nice 19, and prints a line per target: time, executions, crashes. New
#       inputs go to fuzz/work/<target>; --minimize merges those that add coverage into the
#       committed fuzz/corpus/<target> (libFuzzer -merge=1). A crash stops that target; its
#       input is in fuzz/artifacts/<target>/: copy it into fuzz/corpus/<target>/ once fixed,
#       where `cargo test -p rtable-fuzz-targets` (part of scripts/test.sh) replays it.
#
# Stable Rust: `cargo fuzz build -s none` asks for no sanitizer, so no `-Z` flag reaches
# rustc; coverage instrumentation (`-Cpasses=sancov-module`, `-Cllvm-args=...`) and libFuzzer
# (built by libfuzzer-sys with the C++ compiler) work on stable. Panics, overflow checks
# (`-a`) and libFuzzer's own OOM (-rss_limit_mb) and hang (-timeout) detection find the bugs;
# there is no AddressSanitizer, which the Rust code without `unsafe` does not need.
# fuzz/ has its own target directory (fuzz/target), so it never waits on the workspace's lock.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

usage() {
  sed -n '4,13p' "$0" >&2
  exit 2
}

targets() {
  sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^rtable-fuzz$'
}

[ $# -ge 1 ] || usage
case "$1" in
  list)
    targets
    exit 0
    ;;
  seed)
    cargo run -q -p rtable-fuzz-targets --bin rtable-fuzz-seeds -- "$root/fuzz/corpus"
    exit 0
    ;;
esac
[ $# -ge 2 ] || usage
which="$1"
seconds="$2"
shift 2
runs=10000000
minimize=0
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="$2"; shift 2 ;;
    --minimize) minimize=1; shift ;;
    --no-build) build=0; shift ;;
    *) usage ;;
  esac
done
if [ "$which" = all ]; then
  mapfile -t chosen < <(targets)
else
  targets | grep -qx "$which" || { echo "fuzz.sh: no target \`$which\`; scripts/fuzz.sh list names them" >&2; exit 2; }
  chosen=("$which")
fi

command -v cargo-fuzz >/dev/null || {
  echo "fuzz.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
  exit 1
}
# -O: optimized (executions per second); -a: overflow checks and debug assertions on;
# 16 codegen units: a build of a few minutes instead of a quarter hour on two cores.
# --no-build runs the binaries built last (the tree may be mid-edit by others).
if [ "$build" = 1 ]; then
  (cd fuzz && nice -n 19 cargo fuzz build -s none -O -a --codegen-units 16)
fi
bin_dir="$root/fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"

failed=0
printf '%-22s %8s %12s %8s %8s\n' target seconds executions exec/s crashes
for t in "${chosen[@]}"; do
  work="fuzz/work/$t"
  artifacts="fuzz/artifacts/$t"
  mkdir -p "$work" "$artifacts" "fuzz/corpus/$t"
  log="fuzz/work/$t.log"
  started=$SECONDS
  # New inputs go to the first directory ($work), the committed corpus is read only.
  set +e
  nice -n 19 "$bin_dir/$t" -max_total_time="$seconds" -runs="$runs" -timeout=10 \
    -rss_limit_mb=2048 -malloc_limit_mb=1024 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" "$work" "fuzz/corpus/$t" >"$log" 2>&1
  status=$?
  set -e
  took=$((SECONDS - started))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
  crashes=$(find "$artifacts" -type f | wc -l)
  printf '%-22s %8s %12s %8s %8s\n' "$t" "$took" "${execs:-?}" "${speed:-?}" "$crashes"
  if [ "$status" != 0 ] || [ "$crashes" != 0 ]; then
    failed=1
    echo "fuzz.sh: $t stopped with status $status; log $log, inputs in $artifacts:" >&2
    grep -m 20 -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" >&2 || tail -n 20 "$log" >&2
  fi
  if [ "$minimize" = 1 ]; then
    before=$(find "fuzz/corpus/$t" -type f | wc -l)
    nice -n 19 "$bin_dir/$t" -merge=1 -timeout=10 -rss_limit_mb=2048 \
      "fuzz/corpus/$t" "$work" >"fuzz/work/$t.merge.log" 2>&1
    after=$(find "fuzz/corpus/$t" -type f | wc -l)
    echo "fuzz.sh: $t: merged $((after - before)) inputs that add coverage into fuzz/corpus/$t"
  fi
done
exit "$failed"
