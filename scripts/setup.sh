#!/usr/bin/env bash
# Installs what the tests and the playground need: ZooKeeper (Debian package, jars only),
# Java, and the Python packages the tests use to read parts and validate manifests.
# Idempotent and fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

ZK_JAR=/usr/share/java/zookeeper.jar
if [ ! -f "$ZK_JAR" ]; then
  echo "setup: installing ZooKeeper (apt-get install zookeeper)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends zookeeper
fi
if [ ! -f "$ZK_JAR" ]; then
  echo "setup: $ZK_JAR is still missing after installing the zookeeper package" >&2
  exit 1
fi

if ! java -version >/dev/null 2>&1; then
  echo "setup: installing a Java runtime (default-jre-headless)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends default-jre-headless
fi
if ! java -version >/dev/null 2>&1; then
  echo "setup: java does not run; ZooKeeper needs a Java runtime (17 or newer)" >&2
  exit 1
fi

# The node agent (rtable-node) builds pod networks with iproute2 and formats volumes with e2fsprogs.
if ! command -v ip >/dev/null 2>&1 || ! command -v mkfs.ext4 >/dev/null 2>&1; then
  echo "setup: installing iproute2 and e2fsprogs (rtable-node's pod networks and volumes)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2 e2fsprogs
fi

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "setup: $PYTHON is missing; install Python 3 (the tests read parts with DuckDB and pyarrow)" >&2
  exit 1
fi
if ! "$PYTHON" -c "import duckdb, pyarrow, pytz, kazoo, kubernetes_validate" >/dev/null 2>&1; then
  echo "setup: installing Python packages (duckdb pyarrow pytz kazoo kubernetes-validate)"
  PKGS=(duckdb pyarrow pytz kazoo kubernetes-validate)
  PIP_LOG="$(mktemp)"
  if ! "$PYTHON" -m pip install --quiet "${PKGS[@]}" 2>"$PIP_LOG"; then
    if grep -q "externally-managed-environment" "$PIP_LOG"; then
      "$PYTHON" -m pip install --quiet --break-system-packages "${PKGS[@]}"
    else
      cat "$PIP_LOG" >&2
      rm -f "$PIP_LOG"
      exit 1
    fi
  fi
  rm -f "$PIP_LOG"
  "$PYTHON" -c "import duckdb, pyarrow, pytz, kazoo, kubernetes_validate"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install Rust from https://rustup.rs" >&2
  exit 1
fi
echo "setup: ok (ZooKeeper $ZK_JAR, $(java -version 2>&1 | head -n1), $("$PYTHON" --version))"
