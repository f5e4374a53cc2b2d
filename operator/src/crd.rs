//! The `ReplicatedTable` custom resource (`rtable.io/v1alpha1`, short name `rt`).
//!
//! The spec repeats the replication fields of [`rtable_protocol::manifest::TableSpec`]
//! instead of flattening it, so that Kubernetes-only fields (storage, resources, auth...)
//! and the CEL rules can sit next to the fields they guard. [`ReplicatedTableSpec::table_spec`]
//! converts back to the protocol's subset, which is what the sidecar reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ContainerPort, EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use rtable_protocol::manifest::{InsertQuorum, TableSpec, ZooKeeperSpec};
use rtable_protocol::schema::{Column, ColumnType, PartitionKey};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "rtable.io";
pub const VERSION: &str = "v1alpha1";
/// The finalizer that guards removal of the ZooKeeper tree.
pub const FINALIZER: &str = "rtable.io/zookeeper-tree";

/// A ClickHouse-style replicated table: a ZooKeeper tree plus one sidecar pod per replica.
// Every `printcolumn(...)` repeats `type_`/`priority` keys, which clippy mistakes for
// duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "rtable.io",
    version = "v1alpha1",
    kind = "ReplicatedTable",
    namespaced,
    shortname = "rt",
    category = "rtable",
    status = "ReplicatedTableStatus",
    derive = "PartialEq",
    doc = "A table replicated the way ClickHouse's ReplicatedMergeTree does it, coordinated through ZooKeeper and served by one rtable sidecar per replica.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired replicas"
    ),
    printcolumn(
        name = "Active",
        type_ = "integer",
        json_path = ".status.activeReplicas",
        description = "Replicas with a live ZooKeeper session"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Replicas whose pod is ready"
    ),
    printcolumn(
        name = "Max delay",
        type_ = "integer",
        json_path = ".status.maxDelaySeconds",
        description = "Largest replication delay in seconds"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Quorum",
        type_ = "integer",
        json_path = ".status.quorum",
        priority = 1,
        description = "Replicas an insert waits for"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1,
        description = "Reason of the Ready condition"
    ),
    printcolumn(
        name = "Path",
        type_ = "string",
        json_path = ".status.tablePath",
        priority = 1,
        description = "ZooKeeper path of the table"
    )
)]
#[x_kube(validation = Rule::new(
    "has(self.tablePath) == has(oldSelf.tablePath) && (!has(self.tablePath) || self.tablePath == oldSelf.tablePath)"
).message("spec.tablePath is immutable: the replicas' data lives under the old path; create a new ReplicatedTable for a new path"))]
#[x_kube(validation = Rule::new(
    "!has(self.insertQuorum) || string(self.insertQuorum) == 'auto' || int(string(self.insertQuorum)) <= self.replicas"
).message("spec.insertQuorum must be at most spec.replicas: an insert cannot wait for more replicas than exist"))]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedTableSpec {
    /// The ZooKeeper ensemble that coordinates the replicas.
    pub zookeeper: ZooKeeperConfig,

    /// ZooKeeper path of the table; `{shard}`, `{namespace}` and `{name}` are substituted.
    /// Default `/clickhouse/tables/{shard}/{namespace}.{name}`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 512))]
    pub table_path: Option<String>,

    /// Shard name substituted for `{shard}` in the table path. Immutable.
    #[serde(default = "default_shard")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.shard is immutable: it is part of the table's ZooKeeper path"))]
    pub shard: String,

    /// Columns with ClickHouse type names. Columns may only be appended.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new(
        "size(self) >= size(oldSelf) && oldSelf.all(c, self[oldSelf.indexOf(c)] == c)"
    ).message("spec.columns may only be appended to: existing columns cannot be removed, renamed, retyped or reordered"))]
    pub columns: Vec<ColumnDef>,

    /// Sort key: column names, most significant first.
    #[serde(default)]
    #[schemars(length(max = 32), inner(length(max = 128)))]
    pub order_by: Vec<String>,

    /// Partition key: `""` (one partition), a column name, `toYYYYMM(col)` or `toYYYYMMDD(col)`.
    #[serde(default = "default_partition")]
    pub partition_by: PartitionKey,

    /// Number of replicas (pods). Also driven by `kubectl scale` and autoscalers.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: i32,

    /// Replicas that must hold a part before an insert is acknowledged: a number, or `auto` (a majority).
    #[serde(default)]
    #[schemars(schema_with = "insert_quorum_schema")]
    pub insert_quorum: InsertQuorum,

    /// Whether several quorum inserts may be in flight at once.
    #[serde(default = "default_true")]
    pub insert_quorum_parallel: bool,

    /// How many recent block ids are kept for insert deduplication.
    #[serde(default = "default_dedup_window")]
    #[schemars(range(max = 1_000_000))]
    pub deduplication_window: u32,

    /// The volume every replica keeps its parts on.
    #[serde(default)]
    pub storage: StorageSpec,

    /// Resources of the sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Sidecar image; defaults to the image the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// An optional container of yours in every replica pod: it sees the data volume read-only
    /// and reaches the sidecar on `http://127.0.0.1:9009`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_container: Option<UserContainer>,

    /// What happens to the ZooKeeper tree when the resource is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// What happens to the replicas' volumes on scale-down and on deletion.
    #[serde(default)]
    pub persistent_volume_claim_retention_policy: PvcRetentionPolicy,
}

/// One column. Repeats [`Column`] with length bounds: the API server estimates the cost of
/// the append-only CEL rule from them and refuses a CRD whose rules could be too costly.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
pub struct ColumnDef {
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    #[serde(rename = "type")]
    #[schemars(length(max = 32))]
    pub ty: ColumnType,
}

impl From<&ColumnDef> for Column {
    fn from(c: &ColumnDef) -> Column {
        Column {
            name: c.name.clone(),
            ty: c.ty.clone(),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZooKeeperConfig {
    /// Ensemble members as `host:port`.
    #[schemars(length(min = 1, max = 16))]
    pub nodes: Vec<String>,
    /// Optional chroot appended to the connect string (`/rtable`); the table path is below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(/[^/]+)+$"))]
    pub root: Option<String>,
    /// Session timeout; a replica whose session expires goes read-only until it has a new one.
    #[serde(default = "default_session_timeout")]
    #[schemars(range(min = 2, max = 600))]
    pub session_timeout_seconds: u32,
    /// Digest credentials (`user:password`) read from a Secret in the table's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ZooKeeperAuth>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZooKeeperAuth {
    /// Name of the Secret.
    pub secret_name: String,
    /// Key in the Secret whose value is `user:password`.
    #[serde(default = "default_auth_key")]
    pub key: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each replica's volume.
    #[serde(default = "default_storage_size")]
    #[schemars(schema_with = "storage_size_schema")]
    pub size: Quantity,
    /// StorageClass of the volumes; the cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UserContainer {
    /// Container name; must not be `sidecar`.
    #[serde(default = "default_user_container_name")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// `Delete` removes the ZooKeeper tree with the resource; `Retain` keeps it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema, Default)]
pub enum DeletionPolicy {
    Delete,
    #[default]
    Retain,
}

/// `Retain` keeps a volume, `Delete` removes it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
pub enum PvcRetention {
    Retain,
    Delete,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcRetentionPolicy {
    /// Volumes of a deleted table are kept by default: the data may be worth keeping.
    #[serde(default = "retain")]
    pub when_deleted: PvcRetention,
    /// Volumes of scaled-away replicas are deleted by default: the operator drops those
    /// replicas from ZooKeeper, so their parts are orphans and a new replica clones anyway.
    #[serde(default = "delete")]
    pub when_scaled: PvcRetention,
}

impl Default for PvcRetentionPolicy {
    fn default() -> Self {
        PvcRetentionPolicy {
            when_deleted: PvcRetention::Retain,
            when_scaled: PvcRetention::Delete,
        }
    }
}

impl PvcRetention {
    pub fn as_str(self) -> &'static str {
        match self {
            PvcRetention::Retain => "Retain",
            PvcRetention::Delete => "Delete",
        }
    }
}

/// What `kubectl get rt` shows and `kubectl wait` waits on. Kept small on purpose.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedTableStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the StatefulSet (the scale subresource's current count).
    #[serde(default)]
    pub replicas: i32,
    /// Pods that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas whose `is_active` node exists in ZooKeeper.
    #[serde(default)]
    pub active_replicas: i32,
    /// Replicas an insert waits for.
    #[serde(default)]
    pub quorum: i32,
    /// Largest absolute delay of any replica, in seconds.
    #[serde(default)]
    pub max_delay_seconds: i64,
    /// Label selector of the pods, for the scale subresource and autoscalers.
    #[serde(default)]
    pub selector: String,
    /// Resolved ZooKeeper path of the table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_path: Option<String>,
    /// One entry per replica registered in ZooKeeper.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_statuses: Vec<ReplicaStatus>,
    /// `Ready`, `Available`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub name: String,
    pub active: bool,
    pub lost: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_pointer: Option<u64>,
    pub queue_size: u32,
    #[serde(default)]
    pub inserts_in_queue: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absolute_delay_seconds: Option<u64>,
    pub parts: u32,
}

fn insert_quorum_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    // An int-or-string keeps the schema structural; the CEL rule narrows it to a positive
    // number or `auto`. `string(self)` reads both shapes, because `type()` is not available
    // in every CEL evaluator that checks these rules (kube's client-side one lacks it).
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        // kube marks an optional int-or-string nullable; the API server then keeps a null
        // instead of defaulting it, and no quorum can be read from a null.
        "nullable": false,
        "description": "Replicas that must hold a part before an insert is acknowledged: a number, or `auto` (a majority).",
        "x-kubernetes-validations": [{
            "rule": "string(self).matches('^([1-9][0-9]?|auto)$')",
            "message": "spec.insertQuorum must be a positive number of replicas or `auto`"
        }]
    })
}

fn storage_size_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    // A positive quantity a volume can have: the API server refuses `10 gigs`, `-1Gi` and
    // `null` here instead of the StatefulSet refusing it later (or the watch failing on it).
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        // kube marks an optional int-or-string nullable; a null size is no size.
        "nullable": false,
        "description": "Size of each replica's volume (a Kubernetes quantity such as 10Gi).",
        "default": "10Gi",
        "x-kubernetes-validations": [{
            "rule": "string(self).matches('^([0-9]+[.]?[0-9]*|[.][0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$') && !string(self).matches('^[0.]+[A-Za-z]*$')",
            "message": "spec.storage.size must be a Kubernetes quantity such as 10Gi (a positive number with an optional suffix: Ki, Mi, Gi, Ti, k, M, G, T)"
        }]
    })
}

fn default_shard() -> String {
    "01".to_string()
}
fn default_partition() -> PartitionKey {
    PartitionKey::None
}
fn default_replicas() -> i32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_dedup_window() -> u32 {
    1000
}
fn default_session_timeout() -> u32 {
    30
}
fn default_auth_key() -> String {
    "digest".to_string()
}
fn default_storage_size() -> Quantity {
    Quantity("10Gi".to_string())
}
fn default_user_container_name() -> String {
    "app".to_string()
}
fn retain() -> PvcRetention {
    PvcRetention::Retain
}
fn delete() -> PvcRetention {
    PvcRetention::Delete
}

impl ReplicatedTableSpec {
    /// The replication-relevant subset the sidecar reads, as the protocol defines it.
    pub fn table_spec(&self) -> TableSpec {
        TableSpec {
            zookeeper: ZooKeeperSpec {
                nodes: self.zookeeper.nodes.clone(),
                session_timeout_seconds: self.zookeeper.session_timeout_seconds,
            },
            table_path: self.table_path.clone(),
            shard: self.shard.clone(),
            columns: self.columns.iter().map(Column::from).collect(),
            order_by: self.order_by.clone(),
            partition_by: self.partition_by.clone(),
            // The schema bounds replicas to 1..=64; a negative value cannot get here through
            // the API server, and 0 is refused by the protocol's own validation.
            replicas: u32::try_from(self.replicas).unwrap_or(0),
            insert_quorum: self.insert_quorum,
            insert_quorum_parallel: self.insert_quorum_parallel,
            deduplication_window: self.deduplication_window,
        }
    }

    /// The connect string for clients, with the chroot when one is set.
    pub fn connect_string(&self) -> String {
        let mut s = self.zookeeper.nodes.join(",");
        if let Some(root) = &self.zookeeper.root {
            s.push_str(root);
        }
        s
    }

    /// Replicas an insert waits for.
    pub fn quorum(&self) -> u32 {
        self.insert_quorum
            .required(u32::try_from(self.replicas).unwrap_or(0))
    }
}

/// The CRD as YAML, exactly what `rtable-operator crd` prints and `crds/` holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&ReplicatedTable::crd())
}

/// Labels the operator puts on every object of one table.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "rtable-operator".into(),
    );
    l
}

/// The labels that select one table's pods; never changes for the life of a table, because
/// a StatefulSet's selector is immutable.
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "rtable".to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
    ])
}

#[cfg(test)]
mod tests {
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
        assert_eq!(found.len(), 7, "{found:#?}");
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
}
