//! Pure builders: a `ReplicatedTable` in, Kubernetes objects out. No client, no clock, no
//! randomness (the Secret's value is an input), so every builder is tested from fixtures.

mod configmap;
mod pdb;
pub(crate) mod pod;
mod secret;
mod service;
mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

pub use configmap::{TABLE_KEY, config_map};
pub use pdb::{max_unavailable, pod_disruption_budget};
pub use secret::{INTERSERVER_KEY, interserver_secret, new_interserver_secret};
pub use service::{client_service, headless_service};
pub use statefulset::{SidecarCommand, SidecarCommandError, sidecar_command, stateful_set};

use crate::crd::{ReplicatedTable, labels};

/// Name of the sidecar container in every replica pod.
pub const SIDECAR_CONTAINER: &str = "sidecar";
/// The sidecar's one port: replication fetches, inserts, selects, probes and metrics.
pub const SIDECAR_PORT: i32 = 9009;
pub const SIDECAR_PORT_NAME: &str = "http";
/// Where the sidecar keeps its parts.
pub const DATA_DIR: &str = "/var/lib/rtable";
/// Where the table manifest and the interserver secret are mounted.
pub const CONFIG_DIR: &str = "/etc/rtable";

/// Operator-wide settings the builders need besides the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildConfig {
    /// Sidecar image used when `spec.image` is absent.
    pub default_image: String,
    /// DNS suffix of the cluster, for the replicas' advertised addresses.
    pub cluster_domain: String,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            default_image: "ghcr.io/rtable/rtable-sidecar:0.1.0".to_string(),
            cluster_domain: "cluster.local".to_string(),
        }
    }
}

/// Object names derived from the table's name; one place so reconcile and tests agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub statefulset: String,
    pub headless_service: String,
    pub client_service: String,
    pub config_map: String,
    pub secret: String,
    pub pdb: String,
}

impl Names {
    pub fn of(rt: &ReplicatedTable) -> Names {
        let name = rt.name_any();
        Names {
            statefulset: name.clone(),
            headless_service: format!("{name}-replicas"),
            client_service: name.clone(),
            config_map: format!("{name}-table"),
            secret: format!("{name}-interserver"),
            pdb: name,
        }
    }

    /// Pod (and replica) name of an ordinal.
    pub fn pod(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.statefulset)
    }

    /// The ordinal of a pod or replica name of this table, `None` for foreign names.
    pub fn ordinal_of(&self, replica: &str) -> Option<u32> {
        let rest = replica.strip_prefix(&self.statefulset)?.strip_prefix('-')?;
        if rest.is_empty() || (rest.len() > 1 && rest.starts_with('0')) {
            return None;
        }
        rest.parse().ok()
    }
}

/// Metadata of an owned object: same namespace, the table's labels and a controller owner
/// reference, so garbage collection and the owned-object watches both work.
pub(crate) fn owned_meta(rt: &ReplicatedTable, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: rt.namespace(),
        labels: Some(labels(&rt.name_any())),
        owner_references: rt.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

pub(crate) fn string_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Golden files: `fixtures/*.yaml`. Run with `UPDATE_FIXTURES=1` to rewrite them after
    //! an intended change, then review the diff.

    use std::path::PathBuf;

    use serde::Serialize;
    use serde_json::Value;

    use crate::crd::ReplicatedTable;

    pub fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
    }

    pub fn table(file: &str) -> ReplicatedTable {
        let path = dir().join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
    }

    /// Asserts that `object` equals the fixture exactly (as data, not as text).
    pub fn assert_golden<T: Serialize>(file: &str, object: &T) {
        let path = dir().join(file);
        let actual: Value = serde_json::to_value(object).expect("serializes");
        if std::env::var_os("UPDATE_FIXTURES").is_some() {
            let text = serde_yaml::to_string(&actual).expect("yaml");
            std::fs::write(&path, text).expect("write fixture");
            return;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "read {}: {e} (UPDATE_FIXTURES=1 creates it)",
                path.display()
            )
        });
        let expected: Value = serde_yaml::from_str(&text).expect("fixture parses");
        if actual != expected {
            panic!(
                "{file} differs from the built object.\n--- built ---\n{}",
                serde_yaml::to_string(&actual).unwrap_or_default()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ordinals() {
        let rt = fixtures::table("table.yaml");
        let n = Names::of(&rt);
        assert_eq!(n.headless_service, "events-replicas");
        assert_eq!(n.pod(2), "events-2");
        assert_eq!(n.ordinal_of("events-2"), Some(2));
        assert_eq!(n.ordinal_of("events-12"), Some(12));
        for foreign in [
            "events",
            "events-",
            "events-02",
            "events-x",
            "other-1",
            "events-1-1",
        ] {
            assert_eq!(n.ordinal_of(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn owned_objects_point_at_the_table() {
        let rt = fixtures::table("table.yaml");
        let meta = owned_meta(&rt, "x");
        let owner = &meta.owner_references.expect("owner")[0];
        assert_eq!(owner.kind, "ReplicatedTable");
        assert_eq!(owner.uid, "6c1f6f7e-0000-4000-8000-000000000001");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("analytics"));
    }
}
