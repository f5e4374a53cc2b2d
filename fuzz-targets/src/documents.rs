//! Targets for the JSON and YAML documents that cross process boundaries: a replica's
//! `/status` (read by the operator and by peers' tooling) and the table file a sidecar
//! reloads (a ReplicatedTable manifest from a ConfigMap).

use rtable_protocol::ValidatedTable;
use rtable_protocol::status::ReplicaStatus;

/// Parsed, serialized and parsed again: the same status.
pub fn replica_status(data: &[u8]) {
    let Ok(status) = serde_json::from_slice::<ReplicaStatus>(data) else {
        return;
    };
    let json = serde_json::to_vec(&status).expect("a status serializes");
    let again: ReplicaStatus = serde_json::from_slice(&json).expect("a serialized status parses");
    assert_eq!(again, status);
}

/// A manifest that validates renders `metadata` and `columns` that parse back.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = ValidatedTable::from_yaml(text) else {
        return;
    };
    let metadata = rtable_protocol::metadata::TableMetadata::from_schema(&table.schema);
    let rendered = metadata.render();
    assert_eq!(
        rtable_protocol::metadata::TableMetadata::parse(&rendered).as_ref(),
        Ok(&metadata),
        "{rendered:?}"
    );
    let columns = rtable_protocol::columns::render(&table.schema.columns);
    assert_eq!(
        rtable_protocol::columns::parse(&columns).as_ref(),
        Ok(&table.schema.columns),
        "{columns:?}"
    );
}
