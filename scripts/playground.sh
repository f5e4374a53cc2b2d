#!/usr/bin/env bash
# The local playground: a 3-node ZooKeeper ensemble and the replicas of
# examples/events.yaml on this machine, with a live status table. Ctrl-C stops everything.
# Flags go to `rtable-e2e playground` (--manifest, --replicas, --base-port, --once, ...).
# --kubernetes runs the same journey on Kubernetes on this machine instead (as root): a
# control plane, the process kubelet rtable-node, helm install, kubectl apply.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
kubernetes=0
for arg in "$@"; do
  [ "$arg" != --kubernetes ] || kubernetes=1
done
if [ "$kubernetes" = 1 ]; then
  # The operator runs as a pod too (its image is the debug binary); rtable-e2e's binaries
  # include the process kubelet rtable-node.
  cargo build --quiet -p rtable-sidecar -p rtable-operator -p rtable-e2e
else
  cargo build --quiet -p rtable-sidecar -p rtable-e2e
fi
exec "${CARGO_TARGET_DIR:-target}/debug/rtable-e2e" playground "$@"
