//! Live table settings: the sidecar re-reads its table file (`--table`) every
//! [`PERIOD`]. On Kubernetes that file is the operator's ConfigMap, which the kubelet
//! updates in place, while the pods keep running: an edit of `insertQuorum`,
//! `insertQuorumParallel`, `replicas` (which `auto` quorum counts) or `deduplicationWindow`
//! reaches running replicas this way, without a restart.
//!
//! A change of the table's definition (columns, ORDER BY, PARTITION BY, its ZooKeeper path)
//! or of its ensemble is never applied live: the replica keeps what it started with, logs a
//! warning and shows the change in `/status` as `pending_definition_change` until the file
//! matches again or the replica restarts. A file that cannot be read or is invalid leaves
//! every setting as it is and shows up as `table_file_error`.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{info, warn};

use rtable_protocol::manifest::{InsertQuorum, ManifestError, TableSpec, ValidatedTable};

use crate::config::Config;
use crate::replica::Replica;

/// How often the table file is read again.
pub const PERIOD: Duration = Duration::from_secs(10);

/// The settings of the table file that apply to a running replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveSettings {
    /// The table's `insertQuorum` (an insert may ask for another).
    pub insert_quorum: InsertQuorum,
    /// `replicas`: what an `auto` quorum is a majority of.
    pub replicas: u32,
    /// `insertQuorumParallel`.
    pub insert_quorum_parallel: bool,
    /// Block ids kept for deduplication: `--dedup-window` when given, else the file's
    /// `deduplicationWindow`.
    pub dedup_window: usize,
}

impl LiveSettings {
    /// The settings `spec` gives, with the command line's overrides.
    pub fn of(spec: &TableSpec, cfg: &Config) -> LiveSettings {
        LiveSettings {
            insert_quorum: spec.insert_quorum,
            replicas: spec.replicas,
            insert_quorum_parallel: spec.insert_quorum_parallel,
            dedup_window: cfg.dedup_window(spec.deduplication_window),
        }
    }

    /// Replicas an insert without its own `insert_quorum` waits for.
    pub fn required_quorum(&self) -> u32 {
        self.insert_quorum.required(self.replicas)
    }
}

/// What one reading of the table file changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// New settings, when the file's differ from the running ones.
    pub apply: Option<LiveSettings>,
    /// The fields that differ from what the replica started with and are not applied live,
    /// and why; `None` when there are none.
    pub pending_definition_change: Option<String>,
}

/// Compares the file as read now with the table the replica runs (`running`, read at
/// start) and the settings in force (`current`); `cfg` holds the command line's overrides.
/// Pure.
pub fn decide(
    running: &ValidatedTable,
    current: &LiveSettings,
    file: &ValidatedTable,
    cfg: &Config,
) -> Decision {
    let wanted = LiveSettings::of(&file.manifest.spec, cfg);
    let (old, new) = (&running.schema, &file.schema);
    let mut changed = Vec::new();
    if old.columns != new.columns {
        changed.push("spec.columns");
    }
    if old.order_by != new.order_by {
        changed.push("spec.orderBy");
    }
    if old.partition_by != new.partition_by {
        changed.push("spec.partitionBy");
    }
    if running.table_path != file.table_path {
        changed.push("the table path (spec.tablePath, spec.shard, metadata)");
    }
    let (old_zk, new_zk) = (
        &running.manifest.spec.zookeeper,
        &file.manifest.spec.zookeeper,
    );
    // `--zookeeper` replaces the nodes, `--session-timeout-ms` the timeout.
    if cfg.zookeeper.is_none() && old_zk.nodes != new_zk.nodes {
        changed.push("spec.zookeeper.nodes");
    }
    if cfg.session_timeout_ms.is_none()
        && old_zk.session_timeout_seconds != new_zk.session_timeout_seconds
    {
        changed.push("spec.zookeeper.sessionTimeoutSeconds");
    }
    Decision {
        apply: (wanted != *current).then_some(wanted),
        pending_definition_change: (!changed.is_empty()).then(|| {
            format!(
                "{} changed in the table file; not applied while running: this replica keeps \
                 the definition and ensemble it started with until it restarts",
                changed.join(", ")
            )
        }),
    }
}

#[derive(Debug)]
struct State {
    settings: LiveSettings,
    pending_definition_change: Option<String>,
    table_file_error: Option<String>,
}

/// The live settings and the last reload's findings, shared by the replica's tasks.
#[derive(Debug)]
pub struct TableReload {
    state: Mutex<State>,
}

impl TableReload {
    pub fn new(settings: LiveSettings) -> TableReload {
        TableReload {
            state: Mutex::new(State {
                settings,
                pending_definition_change: None,
                table_file_error: None,
            }),
        }
    }

    pub fn settings(&self) -> LiveSettings {
        self.state.lock().settings
    }

    pub fn pending_definition_change(&self) -> Option<String> {
        self.state.lock().pending_definition_change.clone()
    }

    pub fn table_file_error(&self) -> Option<String> {
        self.state.lock().table_file_error.clone()
    }

    /// Takes in one reading of the table file; logs what changed since the last one.
    pub fn update(
        &self,
        replica: &str,
        running: &ValidatedTable,
        file: Result<ValidatedTable, ManifestError>,
        cfg: &Config,
    ) {
        let mut state = self.state.lock();
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                let error = e.to_string();
                if state.table_file_error.as_ref() != Some(&error) {
                    warn!(replica, error = %error, "cannot reload the table file; settings unchanged");
                }
                state.table_file_error = Some(error);
                return;
            }
        };
        if state.table_file_error.take().is_some() {
            info!(replica, "the table file is valid again");
        }
        let d = decide(running, &state.settings, &file, cfg);
        if let Some(new) = d.apply {
            info!(
                replica,
                from = ?state.settings,
                to = ?new,
                "table settings reloaded"
            );
            state.settings = new;
        }
        if d.pending_definition_change != state.pending_definition_change {
            match &d.pending_definition_change {
                Some(m) => warn!(replica, "{m}"),
                None => info!(
                    replica,
                    "the table file's definition matches the running one again"
                ),
            }
            state.pending_definition_change = d.pending_definition_change;
        }
    }
}

/// Re-reads `--table` every [`PERIOD`] for the life of the process.
pub async fn run(replica: Arc<Replica>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the file was just read at start
    loop {
        tick.tick().await;
        let path = replica.cfg.table.clone();
        let file = match tokio::task::spawn_blocking(move || ValidatedTable::from_file(&path)).await
        {
            Ok(f) => f,
            Err(e) => {
                warn!(replica = %replica.name, error = %e, "table file reload task failed");
                continue;
            }
        };
        replica
            .table_reload
            .update(&replica.name, &replica.table, file, &replica.cfg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_for_test;

    fn plain() -> Config {
        parse_for_test(&[])
    }

    const TABLE: &str = r#"
apiVersion: rtable.io/v1alpha1
kind: ReplicatedTable
metadata: {name: events, namespace: default}
spec:
  zookeeper: {nodes: ["zk-0.zk:2181"], sessionTimeoutSeconds: 30}
  columns:
    - {name: ts, type: DateTime}
    - {name: user_id, type: UInt64}
  orderBy: [user_id, ts]
  partitionBy: "toYYYYMM(ts)"
  replicas: 3
  insertQuorum: 1
"#;

    fn table(edit: &[(&str, &str)]) -> ValidatedTable {
        let mut text = TABLE.to_string();
        for (from, to) in edit {
            assert!(text.contains(from), "{from}");
            text = text.replace(from, to);
        }
        ValidatedTable::from_yaml(&text).expect("valid")
    }

    fn settings(
        quorum: InsertQuorum,
        replicas: u32,
        parallel: bool,
        window: usize,
    ) -> LiveSettings {
        LiveSettings {
            insert_quorum: quorum,
            replicas,
            insert_quorum_parallel: parallel,
            dedup_window: window,
        }
    }

    #[test]
    fn the_file_gives_the_dedup_window_unless_the_flag_does() {
        let t = table(&[(
            "insertQuorum: 1",
            "insertQuorum: 1\n  deduplicationWindow: 250",
        )]);
        assert_eq!(
            LiveSettings::of(&t.manifest.spec, &plain()).dedup_window,
            250
        );
        assert_eq!(
            LiveSettings::of(&t.manifest.spec, &parse_for_test(&["--dedup-window", "7"]))
                .dedup_window,
            7
        );
        // Absent from the file: ClickHouse's default.
        assert_eq!(
            LiveSettings::of(&table(&[]).manifest.spec, &plain()).dedup_window,
            1000
        );
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let t = table(&[]);
        let current = LiveSettings::of(&t.manifest.spec, &plain());
        assert_eq!(
            decide(&t, &current, &table(&[]), &plain()),
            Decision {
                apply: None,
                pending_definition_change: None
            }
        );
    }

    #[test]
    fn quorum_mode_replicas_and_dedup_window_apply_live() {
        let running = table(&[]);
        let current = LiveSettings::of(&running.manifest.spec, &plain());
        let file = table(&[
            (
                "insertQuorum: 1",
                "insertQuorum: auto\n  insertQuorumParallel: false\n  deduplicationWindow: 50",
            ),
            ("replicas: 3", "replicas: 5"),
        ]);
        let d = decide(&running, &current, &file, &plain());
        let new = settings(
            InsertQuorum::Auto(rtable_protocol::manifest::AutoQuorum::Auto),
            5,
            false,
            50,
        );
        assert_eq!(
            d,
            Decision {
                apply: Some(new),
                pending_definition_change: None
            }
        );
        assert_eq!(
            new.required_quorum(),
            3,
            "auto is a majority of the new count"
        );
        // Once applied, the same file changes nothing more.
        assert_eq!(decide(&running, &new, &file, &plain()).apply, None);
        // `--dedup-window` keeps overriding the file.
        assert_eq!(
            decide(
                &running,
                &current,
                &file,
                &parse_for_test(&["--dedup-window", "1000"]),
            )
            .apply
            .map(|s| s.dedup_window),
            Some(1000)
        );
    }

    #[test]
    fn definition_changes_are_reported_not_applied() {
        let running = table(&[]);
        let current = LiveSettings::of(&running.manifest.spec, &plain());
        let file = table(&[
            (
                "    - {name: user_id, type: UInt64}",
                "    - {name: user_id, type: UInt64}\n    - {name: value, type: Float64}",
            ),
            ("orderBy: [user_id, ts]", "orderBy: [ts]"),
            (
                "partitionBy: \"toYYYYMM(ts)\"",
                "partitionBy: \"toYYYYMMDD(ts)\"",
            ),
            ("name: events,", "name: clicks,"),
            ("insertQuorum: 1", "insertQuorum: 2"),
        ]);
        let d = decide(&running, &current, &file, &plain());
        // The live setting in the same edit still applies.
        assert_eq!(d.apply.map(|s| s.required_quorum()), Some(2));
        assert_eq!(
            d.pending_definition_change.as_deref(),
            Some(
                "spec.columns, spec.orderBy, spec.partitionBy, the table path (spec.tablePath, \
                 spec.shard, metadata) changed in the table file; not applied while running: \
                 this replica keeps the definition and ensemble it started with until it restarts"
            )
        );
    }

    #[test]
    fn an_ensemble_change_waits_for_a_restart_unless_the_flag_names_it() {
        let running = table(&[]);
        let current = LiveSettings::of(&running.manifest.spec, &plain());
        let file = table(&[("[\"zk-0.zk:2181\"]", "[\"zk-9.zk:2181\"]")]);
        let d = decide(&running, &current, &file, &plain());
        assert!(
            d.pending_definition_change
                .as_deref()
                .is_some_and(|m| m.starts_with("spec.zookeeper.nodes changed")),
            "{d:?}"
        );
        // `--zookeeper` overrides the nodes: a change of the file's does not matter.
        assert_eq!(
            decide(
                &running,
                &current,
                &file,
                &parse_for_test(&["--zookeeper", "127.0.0.1:2181"]),
            )
            .pending_definition_change,
            None
        );
    }

    #[test]
    fn a_session_timeout_change_waits_for_a_restart_unless_the_flag_sets_it() {
        let running = table(&[]);
        let current = LiveSettings::of(&running.manifest.spec, &plain());
        let file = table(&[("sessionTimeoutSeconds: 30", "sessionTimeoutSeconds: 60")]);
        assert_eq!(
            decide(&running, &current, &file, &plain())
                .pending_definition_change
                .as_deref()
                .and_then(|m| m.split(" changed").next()),
            Some("spec.zookeeper.sessionTimeoutSeconds")
        );
        let flagged = parse_for_test(&["--session-timeout-ms", "5000"]);
        assert_eq!(
            decide(&running, &current, &file, &flagged).pending_definition_change,
            None
        );
    }

    #[test]
    fn update_keeps_settings_on_a_bad_file_and_clears_findings_when_it_is_fixed() {
        let running = table(&[]);
        let reload = TableReload::new(LiveSettings::of(&running.manifest.spec, &plain()));
        let bad = ValidatedTable::from_yaml(&TABLE.replace("replicas: 3", "replicas: 0"));
        reload.update("r", &running, bad, &plain());
        assert!(
            reload
                .table_file_error()
                .is_some_and(|e| e.contains("spec.replicas is 0")),
            "{:?}",
            reload.table_file_error()
        );
        assert_eq!(reload.settings().replicas, 3);

        let file = table(&[
            ("orderBy: [user_id, ts]", "orderBy: [ts]"),
            ("replicas: 3", "replicas: 4"),
        ]);
        reload.update("r", &running, Ok(file), &plain());
        assert_eq!(reload.table_file_error(), None);
        assert_eq!(reload.settings().replicas, 4);
        assert!(reload.pending_definition_change().is_some());

        reload.update("r", &running, Ok(table(&[])), &plain());
        assert_eq!(reload.pending_definition_change(), None);
        assert_eq!(
            reload.settings(),
            LiveSettings::of(&running.manifest.spec, &plain())
        );
    }
}
