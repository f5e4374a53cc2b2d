//! `GET /status`: one replica in the shape of ClickHouse's `system.replicas`.
//!
//! The one definition of that answer: the sidecar serializes it, the operator and the test
//! harness read it. Reading is strict: every field must be present (an `Option` too, as
//! `null`), so a renamed or dropped field fails loudly instead of reading as 0 or `None`.
//! Fields a reader does not know are ignored, so a newer sidecar may add fields during a
//! rolling upgrade without breaking an older operator.

use serde::{Deserialize, Deserializer, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub replica_name: String,
    pub table_path: String,
    /// Every replica may assign merges (ClickHouse >= 21.12 "multiple leaders").
    pub is_leader: bool,
    pub is_readonly: bool,
    #[serde(deserialize_with = "required")]
    pub readonly_reason: Option<String>,
    pub is_session_expired: bool,
    /// Why the ZooKeeper half of this answer (log, pointer, replica counts) is missing.
    #[serde(deserialize_with = "required")]
    pub zookeeper_exception: Option<String>,
    pub queue_size: u64,
    pub inserts_in_queue: u64,
    /// `None` while the sidecar has no ZooKeeper answer for it.
    #[serde(deserialize_with = "required")]
    pub log_max_index: Option<u64>,
    /// The next log entry this replica will look at.
    #[serde(deserialize_with = "required")]
    pub log_pointer: Option<u64>,
    /// Unix seconds of the last successful log pull.
    #[serde(deserialize_with = "required")]
    pub last_queue_update: Option<i64>,
    #[serde(deserialize_with = "required")]
    pub last_queue_update_exception: Option<String>,
    /// Seconds this replica is behind the newest data it knows of.
    pub absolute_delay: u64,
    #[serde(deserialize_with = "required")]
    pub total_replicas: Option<u32>,
    #[serde(deserialize_with = "required")]
    pub active_replicas: Option<u32>,
    pub replica_is_active: bool,
    pub lost_part_count: u64,
    pub parts_count: u64,
    /// The active parts' names.
    pub parts: Vec<String>,
    pub rows: u64,
    pub bytes: u64,
    /// Entries in the queue that are merges.
    pub merges_in_queue: u64,
    /// Entries in the queue postponed at least once.
    pub postponed_in_queue: u64,
    /// Queue entries that do not parse: never executed, listed in `/queue` as UNREADABLE.
    pub unreadable_queue_entries: u64,
    /// A change of the table's definition (or ensemble) in the table file that this running
    /// replica only takes when its pod restarts.
    #[serde(deserialize_with = "required")]
    pub pending_definition_change: Option<String>,
    /// Why the table file could not be reloaded (settings stay as they were).
    #[serde(deserialize_with = "required")]
    pub table_file_error: Option<String>,
    pub counters: Counters,
}

/// Totals since the sidecar started (the `/metrics` counters of the same names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub inserts: u64,
    pub deduplicated_inserts: u64,
    pub quorum_inserts: u64,
    pub quorum_failed_inserts: u64,
    pub quorum_wait_ms: u64,
    pub fetches: u64,
    pub failed_fetches: u64,
    pub merges: u64,
    pub merged_part_fetches: u64,
    pub pushed_parts_taken: u64,
    pub handoffs_sent: u64,
    pub handoffs_taken: u64,
    pub broken_parts: u64,
    pub lost_parts: u64,
    pub cleanup_runs: u64,
    pub replicas_marked_lost: u64,
}

/// Reads an `Option` that must be present (as a value or `null`). serde's derive treats a
/// missing `Option` field as `None` unless the field has its own deserializer.
fn required<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReplicaStatus {
        ReplicaStatus {
            replica_name: "events-0".into(),
            table_path: "/clickhouse/tables/01/events".into(),
            is_leader: true,
            log_max_index: Some(12),
            total_replicas: Some(3),
            parts_count: 2,
            parts: vec!["all_1_1_0".into(), "all_2_2_0".into()],
            rows: 1000,
            pending_definition_change: Some("spec.orderBy changed".into()),
            counters: Counters {
                inserts: 7,
                ..Counters::default()
            },
            ..ReplicaStatus::default()
        }
    }

    #[test]
    fn round_trips_through_json() {
        let s = sample();
        let json = serde_json::to_string(&s).expect("serializes");
        assert_eq!(
            serde_json::from_str::<ReplicaStatus>(&json).expect("parses"),
            s
        );
    }

    #[test]
    fn a_missing_field_is_an_error_naming_it() {
        for field in ["parts_count", "log_pointer", "table_file_error", "counters"] {
            let mut v = serde_json::to_value(sample()).expect("serializes");
            v.as_object_mut().expect("an object").remove(field);
            let err = serde_json::from_value::<ReplicaStatus>(v).expect_err(field);
            assert!(
                err.to_string()
                    .contains(&format!("missing field `{field}`")),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn an_unknown_field_from_a_newer_sidecar_is_ignored() {
        let mut v = serde_json::to_value(sample()).expect("serializes");
        v.as_object_mut()
            .expect("an object")
            .insert("added_later".into(), serde_json::json!(1));
        assert_eq!(
            serde_json::from_value::<ReplicaStatus>(v).expect("parses"),
            sample()
        );
    }
}
