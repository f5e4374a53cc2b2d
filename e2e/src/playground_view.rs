//! The playground's status view: the table as `kubectl get rt -o wide` would list it, its
//! replicas and its conditions.
//!
//! Nothing here decides health. The view gathers what the operator would observe (the
//! ZooKeeper tree, each sidecar's `/status`, and readiness standing in for the StatefulSet's
//! pod counts), hands it to the operator's own `status::compute`, and prints the result
//! through the printer columns of the operator's own CRD.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use zookeeper_client as zk;

use rtable_e2e::ReplicaClient;
use rtable_operator::crd::{ReplicatedTable, ReplicatedTableStatus, selector_labels};
use rtable_operator::k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rtable_operator::k8s_openapi::jiff::Timestamp;
use rtable_operator::status::{
    self, Observation, PodsObservation, ReplicaObservation, SidecarStatus, TreeObservation,
};
use rtable_protocol::paths::TablePaths;
use rtable_protocol::schema::TableSchema;
use rtable_protocol::tree::{self, TreeError};
use rtable_protocol::zk_acl::TreeAcl;

/// How long one sidecar call may take before the replica is shown as not answering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long reading the ZooKeeper tree may take before it is reported unavailable.
const TREE_TIMEOUT: Duration = Duration::from_secs(5);

/// The table as the API server would hold it, and what is needed to observe it.
pub struct StatusView {
    rt: ReplicatedTable,
    schema: TableSchema,
    paths: TablePaths,
    zookeeper: String,
    session: Option<zk::Client>,
    /// The previous round's status: conditions keep their `lastTransitionTime`.
    last: ReplicatedTableStatus,
}

/// One sidecar's answer to `GET /status`, or why there is none.
struct Answer {
    json: Option<Value>,
    error: Option<String>,
}

/// One round: the computed status plus the sidecars' answers it was computed from.
pub struct Snapshot {
    object: Value,
    status: ReplicatedTableStatus,
    replicas: Vec<(String, Answer)>,
}

impl StatusView {
    /// The manifest as it would be applied for `replicas` pods (the playground's
    /// `--replicas` replaces `spec.replicas`, as the rendering does), created now.
    pub fn new(manifest: &Path, replicas: usize, zookeeper: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(manifest)
            .with_context(|| format!("reading {}", manifest.display()))?;
        let mut rt: ReplicatedTable = serde_yaml::from_str(&text)
            .with_context(|| format!("{} is not a ReplicatedTable", manifest.display()))?;
        if rt.metadata.namespace.is_none() {
            rt.metadata.namespace = Some("default".to_string());
        }
        rt.spec.replicas = i32::try_from(replicas).context("too many replicas")?;
        // What the API server sets on create.
        rt.metadata.generation = Some(1);
        rt.metadata.creation_timestamp = Some(Time(Timestamp::now()));
        let table = rtable_operator::validate::validate(&rt)
            .map_err(|e| anyhow::anyhow!("{}: {e}", manifest.display()))?;
        Ok(StatusView {
            paths: TablePaths::new(table.table_path.clone()),
            schema: table.schema,
            rt,
            zookeeper: zookeeper.to_string(),
            session: None,
            last: ReplicatedTableStatus::default(),
        })
    }

    /// Observes the table the way the operator's reconcile does and computes its status.
    pub async fn observe(&mut self, clients: &[(String, ReplicaClient)]) -> Snapshot {
        let mut answers = Vec::new();
        let mut ready = 0;
        for (name, c) in clients {
            // A stopped process must not freeze the view: it is reported as not answering.
            let answer = match tokio::time::timeout(ANSWER_TIMEOUT, c.status_json()).await {
                Ok(Ok(v)) => Answer {
                    json: Some(v),
                    error: None,
                },
                Ok(Err(e)) => Answer {
                    json: None,
                    error: Some(format!("{e:#}")),
                },
                Err(_) => Answer {
                    json: None,
                    error: Some(format!("no answer within {ANSWER_TIMEOUT:?}")),
                },
            };
            // The pod's readiness probe is the sidecar's /readyz.
            if answer.json.is_some()
                && matches!(
                    tokio::time::timeout(ANSWER_TIMEOUT, c.readyz()).await,
                    Ok(Ok((200, _)))
                )
            {
                ready += 1;
            }
            answers.push((name.clone(), answer));
        }
        let pods = i32::try_from(clients.len()).unwrap_or(i32::MAX);
        let desired = u32::try_from(self.rt.spec.replicas).unwrap_or(0);
        let tree = match tokio::time::timeout(TREE_TIMEOUT, self.read_tree()).await {
            Ok(Ok(states)) => TreeObservation::Healthy(
                states
                    .into_iter()
                    .map(|s| self.replica(s, desired, &answers))
                    .collect(),
            ),
            Ok(Err(TreeError::SchemaMismatch { diff, path, .. })) => {
                TreeObservation::SchemaMismatch(format!(
                    "the tree at {path} holds another definition (left unchanged): {diff}"
                ))
            }
            Ok(Err(e)) => {
                // The next round opens a fresh session.
                self.session = None;
                TreeObservation::Unavailable(e.to_string())
            }
            Err(_) => {
                self.session = None;
                TreeObservation::Unavailable(format!(
                    "ZooKeeper {} did not answer within {TREE_TIMEOUT:?}",
                    self.zookeeper
                ))
            }
        };
        let name = self.rt.metadata.name.clone().unwrap_or_default();
        let obs = Observation {
            generation: self.rt.metadata.generation,
            desired_replicas: desired,
            quorum: self.rt.spec.quorum(),
            selector: selector_labels(&name)
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            table_path: Some(self.paths.root().to_string()),
            // Every process runs the rendering of this very manifest: all pods are updated.
            pods: PodsObservation {
                replicas: pods,
                ready,
                updated: pods,
                pending_rollout: false,
            },
            tree,
            pending_drops: vec![],
            scale_down_hold: None,
            apply_failures: vec![],
        };
        let status = status::compute(&obs, &self.last.conditions, &Time(Timestamp::now()));
        self.last = status.clone();
        let mut rt = self.rt.clone();
        rt.status = Some(status.clone());
        Snapshot {
            object: serde_json::to_value(&rt).unwrap_or(Value::Null),
            status,
            replicas: answers,
        }
    }

    /// The operator's tree observation: the table is created or checked against the
    /// manifest's schema, then every registered replica is read.
    async fn read_tree(&mut self) -> Result<Vec<tree::ReplicaState>, TreeError> {
        let client = match &self.session {
            Some(c) if !c.state().is_terminated() => c.clone(),
            _ => {
                let c = tree::connect(
                    &self.zookeeper,
                    Duration::from_secs(10),
                    Duration::from_secs(2),
                )
                .await?;
                self.session = Some(c.clone());
                c
            }
        };
        tree::create_table(&client, &self.paths, &TreeAcl::open(), &self.schema).await?;
        let mut out = Vec::new();
        for name in tree::list_replicas(&client, &self.paths).await? {
            match tree::read_replica_state(&client, &self.paths, &name).await {
                Ok(s) => out.push(s),
                Err(TreeError::NoReplica { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn replica(
        &self,
        s: tree::ReplicaState,
        desired: u32,
        answers: &[(String, Answer)],
    ) -> ReplicaObservation {
        let prefix = format!("{}-", self.rt.metadata.name.as_deref().unwrap_or_default());
        let is_desired = s
            .name
            .strip_prefix(&prefix)
            .and_then(|o| o.parse::<u32>().ok())
            .is_some_and(|o| o < desired);
        let json = answers
            .iter()
            .find(|(n, _)| *n == s.name)
            .and_then(|(_, a)| a.json.as_ref());
        // ACTIVE is what the replica itself reports (system.replicas' is_active); a sidecar
        // that does not answer is judged by its `is_active` node, as the operator does.
        let active = json
            .and_then(|v| v["replica_is_active"].as_bool())
            .unwrap_or(s.is_active);
        ReplicaObservation {
            desired: is_desired,
            active,
            lost: s.is_lost,
            log_pointer: s.log_pointer,
            queue_size: s.queue_size,
            parts: s.parts_count,
            sidecar: json.and_then(sidecar_status),
            name: s.name,
        }
    }
}

/// The operator's input from a sidecar's `/status` JSON, parsed by the operator's own
/// type (what its backend does), so the playground shows a contract break instead of
/// papering over it.
fn sidecar_status(v: &Value) -> Option<SidecarStatus> {
    match serde_json::from_value(v.clone()) {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("playground: the operator cannot read this /status reply: {e}");
            None
        }
    }
}

impl Snapshot {
    /// The three tables: `kubectl get rt -o wide`, the replicas, the conditions.
    pub fn render(&self) -> String {
        let mut out = String::from("$ kubectl get rt -o wide\n");
        out.push_str(&self.printer_columns());
        out.push('\n');
        out.push_str(&self.replica_table());
        out.push('\n');
        out.push_str(&self.conditions());
        out
    }

    /// The CRD's printer columns, every priority (that is `-o wide`), after NAME.
    fn printer_columns(&self) -> String {
        let columns = printer_columns();
        let mut header = vec!["NAME".to_string()];
        let mut row = vec![
            self.object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ];
        for c in &columns {
            header.push(c["name"].as_str().unwrap_or_default().to_uppercase());
            let path = c["jsonPath"].as_str().unwrap_or_default();
            let values = json_path(&self.object, path);
            let cell = if values.is_empty() {
                "<none>".to_string()
            } else {
                values
                    .iter()
                    .map(|v| cell(v, c["type"].as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            row.push(cell);
        }
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        table(&header, &[row])
    }

    fn replica_table(&self) -> String {
        let mut rows = Vec::new();
        let or_dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for r in &self.status.replica_statuses {
            let answer = self
                .replicas
                .iter()
                .find(|(n, _)| *n == r.name)
                .map(|(_, a)| a);
            let json = answer.and_then(|a| a.json.as_ref());
            let reason = match answer {
                Some(Answer {
                    json: Some(v),
                    error: None,
                }) => v["readonly_reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                Some(Answer { error: Some(e), .. }) => format!("/status: {e}"),
                _ => "no process".to_string(),
            };
            rows.push(vec![
                r.name.clone(),
                r.active.to_string(),
                r.lost.to_string(),
                or_dash(r.log_pointer),
                r.queue_size.to_string(),
                r.inserts_in_queue.to_string(),
                r.absolute_delay_seconds
                    .map_or("-".to_string(), |d| format!("{d}s")),
                r.parts.to_string(),
                or_dash(json.and_then(|v| v["rows"].as_u64())),
                reason,
            ]);
        }
        // Processes the tree does not list (ZooKeeper unreachable, or not registered yet).
        for (name, a) in &self.replicas {
            if self.status.replica_statuses.iter().any(|r| r.name == *name) {
                continue;
            }
            let mut row = vec![name.clone()];
            row.extend(std::iter::repeat_n("-".to_string(), 8));
            row.push(match &a.error {
                Some(e) => format!("not in the ZooKeeper tree; /status: {e}"),
                None => "not in the ZooKeeper tree".to_string(),
            });
            rows.push(row);
        }
        table(
            &[
                "REPLICA",
                "ACTIVE",
                "LOST",
                "LOG_POINTER",
                "QUEUE",
                "INSERTS_IN_QUEUE",
                "DELAY",
                "PARTS",
                "ROWS",
                "REASON",
            ],
            &rows,
        )
    }

    fn conditions(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .status
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                ]
            })
            .collect();
        table(&["CONDITION", "STATUS", "REASON", "MESSAGE"], &rows)
    }
}

/// `spec.versions[0].additionalPrinterColumns` of the CRD the operator installs.
fn printer_columns() -> Vec<Value> {
    let crd: Value = rtable_operator::crd::crd_yaml()
        .ok()
        .and_then(|y| serde_yaml::from_str(&y).ok())
        .unwrap_or(Value::Null);
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A cell the way kubectl prints a column of that type.
fn cell(v: &Value, type_: &str) -> String {
    match (type_, v) {
        ("date", Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| {
                let age = chrono::Utc::now().signed_duration_since(t);
                human_duration(age.num_seconds())
            })
            .unwrap_or_else(|_| s.clone()),
        (_, Value::String(s)) => s.clone(),
        (_, v) => v.to_string(),
    }
}

/// The subset of kubectl's JSONPath the CRD's columns use: `.a.b` and `.a[?(@.k=="v")].b`.
fn json_path<'a>(root: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut current = vec![root];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            let key = &after[..end];
            current = current.into_iter().filter_map(|v| v.get(key)).collect();
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix("[?(@.") {
            let Some(close) = after.find(")]") else {
                return vec![];
            };
            let Some((key, want)) = after[..close].split_once("==") else {
                return vec![];
            };
            let want = want.trim_matches(['"', '\'']);
            current = current
                .into_iter()
                .filter_map(Value::as_array)
                .flatten()
                .filter(|item| item[key].as_str() == Some(want))
                .collect();
            rest = &after[close + 2..];
        } else {
            return vec![];
        }
    }
    current.retain(|v| !v.is_null());
    current
}

/// kubectl's AGE (apimachinery's `duration.HumanDuration`).
fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    let s = seconds.max(0);
    let (m, h) = (s / 60, s / 3600);
    let pair = |a: i64, unit_a: &str, b: i64, unit_b: &str| {
        if b == 0 {
            format!("{a}{unit_a}")
        } else {
            format!("{a}{unit_a}{b}{unit_b}")
        }
    };
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        pair(m, "m", s % 60, "s")
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        pair(h, "h", m % 60, "m")
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        pair(h / 24, "d", h % 24, "h")
    } else if h < 24 * 365 * 2 {
        format!("{}d", h / 24)
    } else if h < 24 * 365 * 8 {
        pair(h / 24 / 365, "y", (h / 24) % 365, "d")
    } else {
        format!("{}y", h / 24 / 365)
    }
}

/// Left-aligned columns three spaces apart, like kubectl's tabwriter.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count()) + 3;
                s.push_str(c);
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_path_reads_fields_and_filters() {
        let v = json!({"status": {"quorum": 2, "conditions": [
            {"type": "Available", "reason": "QuorumActive"},
            {"type": "Ready", "reason": "AllReplicasReady"}
        ]}});
        assert_eq!(json_path(&v, ".status.quorum"), vec![&json!(2)]);
        assert_eq!(
            json_path(&v, ".status.conditions[?(@.type==\"Ready\")].reason"),
            vec![&json!("AllReplicasReady")]
        );
        assert!(json_path(&v, ".status.tablePath").is_empty());
    }

    #[test]
    fn every_printer_column_is_understood() {
        let columns = printer_columns();
        let names: Vec<&str> = columns.iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(
            names,
            [
                "Replicas",
                "Active",
                "Ready",
                "Max delay",
                "Age",
                "Quorum",
                "Status",
                "Path"
            ]
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let cases = [
            (5, "5s"),
            (119, "119s"),
            (125, "2m5s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (10 * 3600, "10h"),
            (3 * 86400, "3d"),
            (400 * 86400, "400d"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
    }

    #[test]
    fn sidecar_json_becomes_the_operators_input() {
        // A whole answer, as a sidecar sends it (the shared type is read strictly).
        let mut answer = serde_json::to_value(SidecarStatus::default()).expect("serializes");
        let fields = json!({
            "replica_name": "events-1", "is_readonly": false, "readonly_reason": null,
            "queue_size": 2, "inserts_in_queue": 1, "log_max_index": null, "log_pointer": 4,
            "absolute_delay": 3, "parts_count": 2, "parts": ["a", "b"], "rows": 30
        });
        for (k, v) in fields.as_object().expect("an object") {
            answer[k] = v.clone();
        }
        let s = sidecar_status(&answer).expect("parses");
        assert_eq!(
            (
                s.queue_size,
                s.inserts_in_queue,
                s.log_pointer,
                s.log_max_index
            ),
            (2, 1, Some(4), None)
        );
        assert_eq!((s.absolute_delay, s.parts_count, s.rows), (3, 2, 30));
        assert!(!s.is_readonly);
    }
}
