//! The ConfigMap holding the table manifest the sidecar reads (`/etc/rtable/table.yaml`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use rtable_protocol::manifest::ReplicatedTableManifest;

use super::{Names, owned_meta};
use crate::crd::ReplicatedTable;

pub const TABLE_KEY: &str = "table.yaml";

/// Renders the protocol's manifest, the single source of truth the sidecar validates again.
pub fn config_map(
    rt: &ReplicatedTable,
    manifest: &ReplicatedTableManifest,
) -> Result<ConfigMap, serde_yaml::Error> {
    let yaml = serde_yaml::to_string(manifest)?;
    Ok(ConfigMap {
        metadata: owned_meta(rt, &Names::of(rt).config_map),
        data: Some(BTreeMap::from([(TABLE_KEY.to_string(), yaml)])),
        ..ConfigMap::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;
    use crate::validate::manifest;

    #[test]
    fn config_map_matches_fixture_and_the_sidecar_accepts_it() {
        let rt = fixtures::table("table.yaml");
        let cm = config_map(&rt, &manifest(&rt).expect("manifest")).expect("renders");
        fixtures::assert_golden("configmap.yaml", &cm);
        let text = &cm.data.as_ref().expect("data")[TABLE_KEY];
        let table = ReplicatedTableManifest::from_yaml(text)
            .expect("the sidecar's parser accepts the rendered manifest");
        assert_eq!(table.table_path, "/clickhouse/tables/01/analytics.events");
        assert_eq!(table.manifest.spec.replicas, 3);
        assert_eq!(table.schema.columns.len(), 3);
    }
}
