//! The `ReplicatedTable` manifest as a user writes it for `kubectl apply`.
//!
//! The sidecar reads the very same YAML (the operator hands it over in a ConfigMap), so
//! the fields here are the replication-relevant subset of the CRD spec. Fields the
//! sidecar does not need (storage, resources, ...) are ignored here, not refused.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema::{Column, PartitionKey, SchemaError, TableSchema};

pub const API_VERSION: &str = "rtable.io/v1alpha1";
pub const KIND: &str = "ReplicatedTable";
/// ClickHouse's conventional layout, with the namespace keeping tables of different
/// namespaces apart on a shared ensemble.
pub const DEFAULT_TABLE_PATH: &str = "/clickhouse/tables/{shard}/{namespace}.{name}";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read table file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("table manifest is not valid YAML for a ReplicatedTable: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("apiVersion is `{0}`: a ReplicatedTable manifest needs `apiVersion: {API_VERSION}`")]
    ApiVersion(String),
    #[error("kind is `{0}`: the manifest must be `kind: {KIND}`")]
    Kind(String),
    #[error("metadata.name is empty: give the table a name")]
    NoName,
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("spec.zookeeper.nodes is empty: list the ensemble as host:port entries")]
    NoZooKeeper,
    #[error("spec.zookeeper.nodes entry `{0}` is not host:port")]
    BadZooKeeperNode(String),
    #[error("spec.replicas is 0: a table needs at least one replica")]
    NoReplicas,
    #[error(
        "spec.insertQuorum is {quorum} but spec.replicas is {replicas}: the quorum can be at most the replica count"
    )]
    QuorumTooLarge { quorum: u32, replicas: u32 },
    #[error(
        "spec.tablePath `{0}` must be an absolute ZooKeeper path without a trailing `/`, `//` or `.`/`..` segments"
    )]
    BadTablePath(String),
    #[error("spec.shard `{0}` may only contain letters, digits, `-` and `_`")]
    BadShard(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A whole manifest file: `apiVersion`, `kind`, `metadata`, `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedTableManifest {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: TableSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZooKeeperSpec {
    /// Ensemble members as `host:port`.
    pub nodes: Vec<String>,
    /// Session timeout; a replica whose session expires goes read-only until it has a new one.
    #[serde(default = "default_session_timeout")]
    pub session_timeout_seconds: u32,
}

fn default_session_timeout() -> u32 {
    30
}

/// `insertQuorum`: a number of replicas, or `auto` (a majority). The CRD declares it an
/// int-or-string, so a number written as a string (`"2"`) is read as that number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum InsertQuorum {
    Replicas(u32),
    Auto(AutoQuorum),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AutoQuorum {
    #[serde(rename = "auto")]
    Auto,
}

impl<'de> Deserialize<'de> for InsertQuorum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(InsertQuorum::Replicas(n)),
            Raw::Text(t) if t == "auto" => Ok(InsertQuorum::Auto(AutoQuorum::Auto)),
            Raw::Text(t) => t.trim().parse().map(InsertQuorum::Replicas).map_err(|_| {
                serde::de::Error::custom(format!(
                    "insertQuorum `{t}` is neither a number of replicas nor `auto`"
                ))
            }),
        }
    }
}

impl Default for InsertQuorum {
    fn default() -> Self {
        InsertQuorum::Replicas(1)
    }
}

impl InsertQuorum {
    /// The number of replicas that must hold a part before its insert is acknowledged.
    pub fn required(self, replicas: u32) -> u32 {
        match self {
            InsertQuorum::Replicas(n) => n.max(1),
            InsertQuorum::Auto(_) => replicas / 2 + 1,
        }
    }
}

/// The replication-relevant part of a `ReplicatedTable` spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableSpec {
    pub zookeeper: ZooKeeperSpec,
    /// ZooKeeper path of the table; `{shard}`, `{namespace}`, `{name}` are substituted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_path: Option<String>,
    #[serde(default = "default_shard")]
    pub shard: String,
    pub columns: Vec<Column>,
    #[serde(default)]
    pub order_by: Vec<String>,
    #[serde(default = "default_partition")]
    pub partition_by: PartitionKey,
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    #[serde(default)]
    pub insert_quorum: InsertQuorum,
    /// Whether several quorum inserts may be in flight at once (`quorum/parallel`).
    #[serde(default = "default_true")]
    pub insert_quorum_parallel: bool,
    /// How many recent block ids are kept for deduplication (ClickHouse's default 1000).
    #[serde(default = "default_dedup_window")]
    pub deduplication_window: u32,
}

fn default_shard() -> String {
    "01".to_string()
}
fn default_partition() -> PartitionKey {
    PartitionKey::None
}
fn default_replicas() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_dedup_window() -> u32 {
    1000
}

impl TableSpec {
    /// Validates the spec and returns its table schema.
    pub fn validate(&self) -> Result<TableSchema, ManifestError> {
        if self.zookeeper.nodes.is_empty() {
            return Err(ManifestError::NoZooKeeper);
        }
        for node in &self.zookeeper.nodes {
            let ok = node
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(ManifestError::BadZooKeeperNode(node.clone()));
            }
        }
        if self.replicas == 0 {
            return Err(ManifestError::NoReplicas);
        }
        let quorum = self.insert_quorum.required(self.replicas);
        if quorum > self.replicas {
            return Err(ManifestError::QuorumTooLarge {
                quorum,
                replicas: self.replicas,
            });
        }
        if self.shard.is_empty()
            || !self
                .shard
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ManifestError::BadShard(self.shard.clone()));
        }
        if let Some(p) = &self.table_path {
            validate_zk_path(p)?;
        }
        Ok(TableSchema::new(
            self.columns.clone(),
            self.order_by.clone(),
            self.partition_by.clone(),
        )?)
    }

    /// The table's ZooKeeper path with its macros substituted.
    pub fn resolved_table_path(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<String, ManifestError> {
        let template = self.table_path.as_deref().unwrap_or(DEFAULT_TABLE_PATH);
        let path = template
            .replace("{shard}", &self.shard)
            .replace("{namespace}", namespace)
            .replace("{name}", name)
            .replace("{table}", name);
        validate_zk_path(&path)?;
        Ok(path)
    }

    /// The ensemble as a ZooKeeper connect string.
    pub fn connect_string(&self) -> String {
        self.zookeeper.nodes.join(",")
    }
}

fn validate_zk_path(p: &str) -> Result<(), ManifestError> {
    let bad = !p.starts_with('/')
        || p.len() < 2
        || p.ends_with('/')
        || p.contains("//")
        || p.split('/').any(|s| s == "." || s == "..");
    if bad {
        Err(ManifestError::BadTablePath(p.to_string()))
    } else {
        Ok(())
    }
}

/// A manifest that passed validation, with its derived values.
#[derive(Debug, Clone)]
pub struct ValidatedTable {
    pub manifest: ReplicatedTableManifest,
    pub schema: TableSchema,
    pub table_path: String,
}

impl ValidatedTable {
    /// Parses and validates a manifest (the YAML a user applies).
    pub fn from_yaml(text: &str) -> Result<ValidatedTable, ManifestError> {
        ReplicatedTableManifest::from_yaml(text)
    }

    pub fn from_file(path: &std::path::Path) -> Result<ValidatedTable, ManifestError> {
        ReplicatedTableManifest::from_file(path)
    }
}

impl ReplicatedTableManifest {
    pub fn from_yaml(text: &str) -> Result<ValidatedTable, ManifestError> {
        let manifest: ReplicatedTableManifest = serde_yaml::from_str(text)?;
        manifest.validate()
    }

    pub fn from_file(path: &std::path::Path) -> Result<ValidatedTable, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    pub fn validate(self) -> Result<ValidatedTable, ManifestError> {
        if self.api_version != API_VERSION {
            return Err(ManifestError::ApiVersion(self.api_version));
        }
        if self.kind != KIND {
            return Err(ManifestError::Kind(self.kind));
        }
        if self.metadata.name.is_empty() {
            return Err(ManifestError::NoName);
        }
        let schema = self.spec.validate()?;
        let namespace = self.metadata.namespace.as_deref().unwrap_or("default");
        let table_path = self
            .spec
            .resolved_table_path(namespace, &self.metadata.name)?;
        Ok(ValidatedTable {
            manifest: self,
            schema,
            table_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_quorum_reads_a_number_auto_and_a_number_as_text() {
        let read = |v: serde_json::Value| serde_json::from_value::<InsertQuorum>(v);
        assert_eq!(
            read(serde_json::json!(2)).expect("number"),
            InsertQuorum::Replicas(2)
        );
        assert_eq!(
            read(serde_json::json!("2")).expect("text"),
            InsertQuorum::Replicas(2)
        );
        assert_eq!(
            read(serde_json::json!("auto")).expect("auto"),
            InsertQuorum::Auto(AutoQuorum::Auto)
        );
        let err = read(serde_json::json!("most")).expect_err("refused");
        assert!(err.to_string().contains("insertQuorum `most`"), "{err}");
        assert_eq!(
            serde_json::to_value(InsertQuorum::Replicas(2)).expect("json"),
            serde_json::json!(2)
        );
    }

    const EXAMPLE: &str = r#"
apiVersion: rtable.io/v1alpha1
kind: ReplicatedTable
metadata:
  name: events
  namespace: default
spec:
  zookeeper:
    nodes: ["127.0.0.1:2181", "127.0.0.1:2182"]
    sessionTimeoutSeconds: 10
  shard: "01"
  columns:
    - {name: ts, type: DateTime}
    - {name: user_id, type: UInt64}
    - {name: kind, type: String}
    - {name: value, type: "Nullable(Float64)"}
  orderBy: [kind, ts]
  partitionBy: "toYYYYMM(ts)"
  replicas: 3
  insertQuorum: auto
  storage: {size: 1Gi}
"#;

    #[test]
    fn the_example_manifest_parses_with_defaults() {
        let t = ReplicatedTableManifest::from_yaml(EXAMPLE).expect("valid");
        assert_eq!(t.table_path, "/clickhouse/tables/01/default.events");
        assert_eq!(t.schema.order_by, vec!["kind", "ts"]);
        assert_eq!(t.schema.partition_by, PartitionKey::ToYyyyMm("ts".into()));
        assert_eq!(t.manifest.spec.insert_quorum.required(3), 2);
        assert_eq!(
            t.manifest.spec.connect_string(),
            "127.0.0.1:2181,127.0.0.1:2182"
        );
        assert!(t.manifest.spec.insert_quorum_parallel);
        assert_eq!(t.manifest.spec.deduplication_window, 1000);
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let cases = [
            (
                "apiVersion: rtable.io/v1alpha1",
                "apiVersion: v1",
                "apiVersion",
            ),
            ("insertQuorum: auto", "insertQuorum: 4", "insertQuorum is 4"),
            ("type: DateTime}", "type: Timestamp}", "Timestamp"),
            ("orderBy: [kind, ts]", "orderBy: [kind, tz]", "`tz`"),
            (
                "\"127.0.0.1:2182\"",
                "\"zk-without-port\"",
                "zk-without-port",
            ),
            ("replicas: 3", "replicas: 0", "spec.replicas is 0"),
            ("shard: \"01\"", "shard: \"a/b\"", "spec.shard"),
        ];
        for (from, to, needle) in cases {
            let text = EXAMPLE.replace(from, to);
            let err = ReplicatedTableManifest::from_yaml(&text)
                .expect_err(to)
                .to_string();
            assert!(err.contains(needle), "error for `{to}` was `{err}`");
        }
    }

    #[test]
    fn table_path_macros_and_safety() {
        let mut t = ReplicatedTableManifest::from_yaml(EXAMPLE)
            .unwrap()
            .manifest;
        t.spec.table_path = Some("/rt/{shard}/{table}".into());
        assert_eq!(t.spec.resolved_table_path("ns", "x").unwrap(), "/rt/01/x");
        t.spec.table_path = Some("/rt/../etc".into());
        assert!(t.clone().validate().is_err());
        t.spec.table_path = Some("relative".into());
        assert!(t.validate().is_err());
    }
}
