//! The CRD's schema and CEL rules, checked with kube's client-side evaluator.

use super::*;
use serde_json::{Value, json};

fn schema() -> Value {
    let crd = ReplicatedTable::crd();
    let v = serde_json::to_value(&crd).expect("crd serializes");
    v["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn table(spec: Value) -> Value {
    json!({"apiVersion": "rtable.io/v1alpha1", "kind": "ReplicatedTable",
           "metadata": {"name": "events", "namespace": "default"}, "spec": spec})
}

fn base_spec() -> Value {
    json!({
        "zookeeper": {"nodes": ["zk-0.zk:2181"]},
        "shard": "01",
        "columns": [{"name": "ts", "type": "DateTime"}, {"name": "kind", "type": "String"}],
        "orderBy": ["kind", "ts"],
        "replicas": 3,
        "insertQuorum": 2
    })
}

/// Runs the CRD's CEL rules the way the API server does, with `old` for updates.
fn cel(new: &Value, old: Option<&Value>) -> Vec<String> {
    let validator = kube::core::cel::Validator::new();
    match validator.validate(&schema(), new, old) {
        Ok(()) => vec![],
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| e.to_string())
            .collect(),
    }
}

#[test]
fn crd_has_names_subresources_and_columns() {
    let crd = ReplicatedTable::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("replicatedtables.rtable.io")
    );
    assert_eq!(crd.spec.names.short_names, Some(vec!["rt".to_string()]));
    let v = &crd.spec.versions[0];
    let sub = v.subresources.as_ref().expect("subresources");
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let cols: Vec<_> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), c.priority.unwrap_or(0)))
        .collect();
    assert_eq!(
        cols,
        vec![
            ("Replicas", 0),
            ("Active", 0),
            ("Ready", 0),
            ("Max delay", 0),
            ("Age", 0),
            ("Quorum", 1),
            ("Status", 1),
            ("Path", 1)
        ]
    );
}

#[test]
fn insert_quorum_is_int_or_string_in_the_schema() {
    let s = schema();
    let q = &s["properties"]["spec"]["properties"]["insertQuorum"];
    assert_eq!(q["x-kubernetes-int-or-string"], json!(true));
    // A structural schema must not carry anyOf/oneOf for it.
    assert!(q.get("anyOf").is_none() && q.get("oneOf").is_none(), "{q}");
}

#[test]
fn cel_accepts_a_valid_create_and_a_compatible_update() {
    let t = table(base_spec());
    assert_eq!(cel(&t, None), Vec::<String>::new());
    let mut newer = base_spec();
    newer["columns"]
        .as_array_mut()
        .expect("array")
        .push(json!({"name": "value", "type": "Float64"}));
    newer["replicas"] = json!(5);
    newer["insertQuorum"] = json!("auto");
    assert_eq!(cel(&table(newer), Some(&t)), Vec::<String>::new());
}

#[test]
fn cel_rejects_quorum_above_replicas_and_bad_strings() {
    let mut s = base_spec();
    s["insertQuorum"] = json!(4);
    let errs = cel(&table(s), None);
    assert!(
        errs.iter().any(|e| e.contains("at most spec.replicas")),
        "{errs:?}"
    );
    let mut s = base_spec();
    s["insertQuorum"] = json!("most");
    let errs = cel(&table(s), None);
    assert!(
        errs.iter()
            .any(|e| e.contains("positive number of replicas or `auto`")),
        "{errs:?}"
    );
}

#[test]
fn cel_refuses_partition_keys_the_operator_cannot_parse() {
    for ok in ["", "ts", "toYYYYMM(ts)", "toYYYYMMDD( ts )", "tuple()"] {
        let mut s = base_spec();
        s["partitionBy"] = json!(ok);
        assert_eq!(cel(&table(s), None), Vec::<String>::new(), "{ok}");
        assert!(ok.parse::<PartitionKey>().is_ok(), "{ok}");
    }
    for bad in ["toDate(ts)", "toYYYYMM(ts", "a b", "toYYYYMM(a+b)"] {
        let mut s = base_spec();
        s["partitionBy"] = json!(bad);
        let errs = cel(&table(s), None);
        assert!(
            errs.iter()
                .any(|e| e.contains("spec.partitionBy must be empty")),
            "{bad}: {errs:?}"
        );
    }
}

#[test]
fn cel_refuses_storage_sizes_that_are_not_positive_quantities() {
    for ok in [
        json!("10Gi"),
        json!("1.5Gi"),
        json!("500M"),
        json!(1073741824),
    ] {
        let mut s = base_spec();
        s["storage"] = json!({ "size": ok });
        assert_eq!(cel(&table(s), None), Vec::<String>::new(), "{ok}");
    }
    for bad in ["10 gigs", "-1Gi", "0", "0Gi", "10GB"] {
        let mut s = base_spec();
        s["storage"] = json!({ "size": bad });
        let errs = cel(&table(s), None);
        assert!(
            errs.iter()
                .any(|e| e.contains("spec.storage.size must be a Kubernetes quantity")),
            "{bad}: {errs:?}"
        );
    }
    let s = schema();
    let size = &s["properties"]["spec"]["properties"]["storage"]["properties"]["size"];
    assert_eq!(size["nullable"], json!(false), "{size}");
}

#[test]
fn cel_makes_table_path_and_shard_immutable() {
    let old = table(base_spec());
    let mut s = base_spec();
    s["tablePath"] = json!("/elsewhere/{name}");
    let errs = cel(&table(s), Some(&old));
    assert!(
        errs.iter()
            .any(|e| e.contains("spec.tablePath is immutable")),
        "{errs:?}"
    );
    let mut s = base_spec();
    s["shard"] = json!("02");
    let errs = cel(&table(s), Some(&old));
    assert!(
        errs.iter().any(|e| e.contains("spec.shard is immutable")),
        "{errs:?}"
    );
}

#[test]
fn cel_only_lets_columns_be_appended() {
    let old = table(base_spec());
    for (what, columns) in [
        ("removed", json!([{"name": "ts", "type": "DateTime"}])),
        (
            "retyped",
            json!([{"name": "ts", "type": "Date"}, {"name": "kind", "type": "String"}]),
        ),
        (
            "reordered",
            json!([{"name": "kind", "type": "String"}, {"name": "ts", "type": "DateTime"}]),
        ),
        (
            "inserted",
            json!([{"name": "ts", "type": "DateTime"}, {"name": "x", "type": "UInt8"}, {"name": "kind", "type": "String"}]),
        ),
    ] {
        let mut s = base_spec();
        s["columns"] = columns;
        let errs = cel(&table(s), Some(&old));
        assert!(
            errs.iter().any(|e| e.contains("may only be appended")),
            "{what}: {errs:?}"
        );
    }
}

#[test]
fn cel_rechecks_the_quorum_when_replicas_shrink() {
    // `kubectl scale rt/events --replicas=1` below insertQuorum 2 is refused on update.
    let old = table(base_spec());
    let mut s = base_spec();
    s["replicas"] = json!(1);
    let errs = cel(&table(s), Some(&old));
    assert!(
        errs.iter().any(|e| e.contains("at most spec.replicas")),
        "{errs:?}"
    );
    // With `auto` the quorum follows the replica count, so any count is fine.
    let mut s = base_spec();
    s["replicas"] = json!(1);
    s["insertQuorum"] = json!("auto");
    assert_eq!(cel(&table(s), Some(&old)), Vec::<String>::new());
    // A quorum of 0 is not a quorum.
    let mut s = base_spec();
    s["insertQuorum"] = json!(0);
    assert!(!cel(&table(s), None).is_empty());
}

#[test]
fn cel_refuses_removing_a_set_table_path() {
    let mut with_path = base_spec();
    with_path["tablePath"] = json!("/tables/{name}");
    let old = table(with_path.clone());
    assert_eq!(cel(&table(with_path), Some(&old)), Vec::<String>::new());
    let errs = cel(&table(base_spec()), Some(&old));
    assert!(
        errs.iter()
            .any(|e| e.contains("spec.tablePath is immutable")),
        "{errs:?}"
    );
}

/// What a newcomer applies first, and the builder fixtures, pass the same rules.
#[test]
fn cel_accepts_the_example_and_the_fixtures() {
    let dir = env!("CARGO_MANIFEST_DIR");
    for path in [
        format!("{dir}/../examples/events.yaml"),
        format!("{dir}/fixtures/table.yaml"),
        format!("{dir}/fixtures/table-full.yaml"),
    ] {
        let text = std::fs::read_to_string(&path).expect("readable");
        let object: Value = serde_yaml::from_str(&text).expect("YAML");
        assert_eq!(cel(&object, None), Vec::<String>::new(), "{path}");
        assert_eq!(cel(&object, Some(&object)), Vec::<String>::new(), "{path}");
    }
}

/// Every printer column (and the scale subresource) points at a field the schema has,
/// so `kubectl get rt` and `-o wide` never show an always-empty column.
#[test]
fn printer_columns_point_at_schema_fields() {
    let s = schema();
    let field = |path: &str| {
        let mut node = &s;
        for part in path.trim_start_matches('.').split('.') {
            node = &node["properties"][part];
        }
        node.clone()
    };
    let crd = ReplicatedTable::crd();
    let v = &crd.spec.versions[0];
    for c in v.additional_printer_columns.iter().flatten() {
        let path = c.json_path.split('[').next().unwrap_or_default();
        if path == ".metadata.creationTimestamp" {
            continue;
        }
        let node = field(path);
        assert!(
            node.is_object(),
            "{} -> {path} is not in the schema",
            c.name
        );
        if !c.json_path.contains('[') {
            assert_eq!(node["type"], json!(c.type_), "{}", c.name);
        }
    }
    assert_eq!(field(".status.replicas")["type"], "integer");
    assert_eq!(field(".status.selector")["type"], "string");
    assert_eq!(field(".status.conditions")["type"], "array");
}

/// Every rule must stay within the API server's cost budget, or the CRD is refused at
/// install time; this walks the schema and runs kube-cel's static estimate on each rule.
#[test]
fn every_cel_rule_compiles_and_is_cheap_enough() {
    use kube::core::cel::{WarningKind, compile_schema, estimate_rule_cost};
    fn walk(node: &Value, path: &str, found: &mut Vec<String>, problems: &mut Vec<String>) {
        if let Some(rules) = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            let compiled = compile_schema(node);
            for r in rules {
                let rule = r["rule"].as_str().unwrap_or_default();
                found.push(format!("{path}: {rule}"));
                // Only the cost analysis: kube-cel's scope check does not know
                // comprehension variables (`c` in `all(c, ...)`) and flags them.
                for w in estimate_rule_cost(rule, &compiled) {
                    assert!(matches!(
                        w.kind,
                        WarningKind::CostExceeded | WarningKind::MissingBounds
                    ));
                    problems.push(format!("{path}: {rule}: {}", w.message));
                }
            }
            if compiled.has_errors() {
                problems.push(format!("{path}: {:?}", compiled.compilation_errors()));
            }
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), found, problems);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"), found, problems);
        }
    }
    let (mut found, mut problems) = (vec![], vec![]);
    walk(&schema(), "", &mut found, &mut problems);
    assert_eq!(found.len(), 8, "{found:#?}");
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The same drift check CI runs with `diff`, so `cargo test` catches a stale file too.
#[test]
fn committed_crd_matches_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/replicatedtable.yaml");
    let committed = std::fs::read_to_string(path).expect("crds/replicatedtable.yaml exists");
    assert!(
        committed == crd_yaml().expect("renders"),
        "crds/replicatedtable.yaml is stale: run `rtable-operator crd > crds/replicatedtable.yaml`"
    );
}

#[test]
fn table_spec_round_trips_through_the_protocol_manifest() {
    let spec: ReplicatedTableSpec = serde_json::from_value(base_spec()).expect("spec parses");
    assert_eq!(spec.deletion_policy, DeletionPolicy::Retain);
    assert_eq!(spec.storage.size, Quantity("10Gi".into()));
    let ts = spec.table_spec();
    assert_eq!(ts.replicas, 3);
    assert_eq!(ts.insert_quorum, InsertQuorum::Replicas(2));
    assert_eq!(ts.zookeeper.session_timeout_seconds, 30);
    assert_eq!(spec.quorum(), 2);
}
