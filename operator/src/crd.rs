//! The `ReplicatedTable` custom resource (`rtable.io/v1alpha1`, short name `rt`).
//!
//! The spec repeats the replication fields of [`rtable_protocol::manifest::TableSpec`]
//! instead of flattening it, so that Kubernetes-only fields (storage, resources, auth...)
//! and the CEL rules can sit next to the fields they guard. [`ReplicatedTableSpec::table_spec`]
//! converts back to the protocol's subset, which is what the sidecar reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ContainerPort, EnvVar, ResourceRequirements, SecurityContext};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use rtable_protocol::manifest::{InsertQuorum, TableSpec, ZooKeeperSpec};
use rtable_protocol::schema::{Column, ColumnType, PartitionKey};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod pod;

pub use pod::{PodSettings, RESERVED_POD_ANNOTATIONS, RESERVED_POD_LABELS};

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

    /// Resources of the sidecar container. When absent the sidecar requests 100m CPU and
    /// 128Mi memory with a 1Gi memory limit (a Burstable pod); `{}` asks for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Sidecar image; defaults to the image the operator was installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Client users, a separate interserver listener and TLS for the replicas' HTTP
    /// (docs/security.md). Without it every client request is allowed and peers talk plain
    /// HTTP on the client port: insecure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<HttpSecurity>,

    /// An optional container of yours in every replica pod: it sees the data volume read-only
    /// and reaches the sidecar on `http://127.0.0.1:9009`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_container: Option<UserContainer>,

    /// Settings of every replica pod: scheduling, image pull secrets, priority, labels,
    /// annotations and the pod security context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodSettings>,

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
    /// The operator and every replica authenticate with them, and every node of the
    /// table's tree gets an ACL giving these credentials all rights and nobody else any; a
    /// tree created without credentials is moved to that ACL when they are added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<ZooKeeperAuth>,
    /// Connect to the ensemble's secure client port over TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ZooKeeperTls>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZooKeeperAuth {
    /// Name of the Secret.
    pub secret_name: String,
    /// Key in the Secret whose value is `user:password`.
    #[serde(default = "default_auth_key")]
    pub key: String,
    /// Also let anyone read (never change) the tree, for debugging with zkCli.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub world_readable: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZooKeeperTls {
    /// Secret in the table's namespace holding `ca.crt` (PEM CA certificates that signed
    /// the ensemble's certificates, which must name the hosts of `nodes`) and, with
    /// `clientCertificate`, `tls.crt` and `tls.key` (a `kubernetes.io/tls` Secret, as
    /// cert-manager writes it).
    pub secret_name: String,
    /// Present `tls.crt`/`tls.key` to the ensemble (for `ssl.clientAuth=need`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_certificate: bool,
}

/// The replicas' HTTP security. Setting it moves the part exchange to its own port
/// (`interserver`, 9010, named in each replica's `host` node); clients stay on 9009. The
/// operator never reads these Secrets: the pods mount them by name.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSecurity {
    /// Secret in the table's namespace whose key `users.yaml` lists the client users (name,
    /// role reader/writer/admin, salted SHA-256 password hash); without it every client
    /// request is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_secret_name: Option<String>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, `ca.crt`, as cert-manager
    /// writes it): both ports serve HTTPS only, peers verify each other against `ca.crt`
    /// and their pod DNS names (`<pod>.<table>-replicas.<namespace>.svc.<domain>`, which
    /// the certificate must name). Rotated in place without restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    /// With `tlsSecretName`: peers must also present their certificate (mutual TLS) on the
    /// interserver port.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interserver_mutual_tls: bool,
    /// A Secret of yours whose key `interserver` is the peers' shared secret, instead of the
    /// one the operator generates for the table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interserver_secret_name: Option<String>,
    /// `/metrics` needs a user with role reader (open otherwise, as Prometheus scrapes are).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics_require_auth: bool,
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
    /// Overrides the container's security context field by field; the defaults satisfy the
    /// `restricted` Pod Security Standard (no privilege escalation, every capability
    /// dropped, non-root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
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
mod tests;
