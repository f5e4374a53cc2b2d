//! The one checker every fault scenario ends with.
//!
//! Clients record every insert they attempt (unique `user_id`s, a dedup token) and the
//! outcome of every try: acknowledged, rejected (4xx) or unknown (503, other 5xx, timeout,
//! connection error). Once the faults stop, [`Checker::verify`] waits for the live replicas
//! to converge and asserts:
//!
//! - every acknowledged insert's rows are present exactly once on every replica;
//! - rows of inserts whose outcome stayed unknown are present at most once, and an insert
//!   shows up whole or not at all;
//! - rows of rejected (4xx) or never-sent inserts, and of deliberately malformed ("poison")
//!   inserts, are absent; no row appears that no client attempted;
//! - every replica holds the identical row multiset and the identical set of parts;
//! - no part was lost: `lost_part_count == 0`, `queue_size == 0` everywhere;
//! - `/status` matches reality: `rows` equals the rows `/select` returns, its `parts` list
//!   equals the replica's `parts` children in ZooKeeper and each has its file on disk,
//!   parts of one partition are disjoint, `active_replicas` equals the live sidecars and
//!   `total_replicas` the registered ones, `log_pointer` is past `log_max_index`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use rtable_protocol::status::ReplicaStatus;

use crate::client::ReplicaClient;
use crate::cluster::Cluster;
use crate::poll::{Check, poll_until};

/// The outcome of one HTTP try of an insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 200: acknowledged (`deduplicated` when an earlier try had committed it).
    Acked { deduplicated: bool },
    /// 4xx: refused, nothing committed.
    Rejected { status: u16, error: String },
    /// 503 (read-only, ZooKeeper unavailable, outcome unknown) or another 5xx.
    Unavailable { status: u16, error: String },
    /// No answer within the client's deadline.
    Timeout,
    /// Connection refused or dropped.
    Connection(String),
}

impl Attempt {
    fn is_unknown(&self) -> bool {
        matches!(
            self,
            Attempt::Unavailable { .. } | Attempt::Timeout | Attempt::Connection(_)
        )
    }
}

/// What the checker concluded about one insert from its tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Acked,
    Rejected,
    Unknown,
    NotSent,
}

/// One insert as planned by a client: rows `first_id..first_id + rows`.
#[derive(Debug, Clone)]
pub struct InsertPlan {
    pub index: usize,
    pub token: String,
    pub first_id: u64,
    pub rows: u64,
    pub pad: usize,
    pub month: u32,
    /// A malformed body that every replica must refuse.
    pub poison: bool,
}

impl InsertPlan {
    pub fn ids(&self) -> std::ops::Range<u64> {
        self.first_id..self.first_id + self.rows
    }

    /// The JSONEachRow body of this insert (its last line broken when it is poison).
    pub fn body(&self) -> String {
        let mut out = String::with_capacity(self.rows as usize * (self.pad + 110));
        for id in self.ids() {
            out.push_str(&row(&self.token, id, self.pad, self.month).to_string());
            out.push('\n');
        }
        if self.poison {
            out.push_str("{\"user_id\": , \"event\": \"poison\"}\n");
        }
        out
    }
}

/// The row a client inserts for `id`: its `event` names the token and the id, then `pad`
/// pseudo-random hex characters (incompressible, so parts have a real size).
pub fn row(token: &str, id: u64, pad: usize, month: u32) -> Value {
    let mut event = format!("{token}/{id}/");
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while event.len() < token.len() + 22 + pad {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        event.push_str(&format!("{x:016x}"));
    }
    event.truncate(token.len() + 22 + pad);
    json!({
        "ts": format!("2025-{month:02}-{:02} {:02}:{:02}:{:02}", 1 + id % 28, id % 24, id % 60, (id / 60) % 60),
        "user_id": id,
        "event": event,
        "value": if id.is_multiple_of(5) { Value::Null } else { json!(id as f64 / 8.0) },
    })
}

#[derive(Debug)]
struct Record {
    plan: InsertPlan,
    attempts: Vec<(String, Attempt)>,
    hedged: bool,
}

impl Record {
    fn outcome(&self) -> Outcome {
        if self
            .attempts
            .iter()
            .any(|(_, a)| matches!(a, Attempt::Acked { .. }))
        {
            Outcome::Acked
        } else if self.attempts.iter().any(|(_, a)| a.is_unknown()) {
            Outcome::Unknown
        } else if self.attempts.is_empty() {
            Outcome::NotSent
        } else {
            Outcome::Rejected
        }
    }
}

#[derive(Debug, Default)]
struct State {
    inserts: Vec<Record>,
    next_id: u64,
}

/// A replica the checker reads: its `/status`, `/select` and the part directories on its
/// disk.
#[derive(Debug, Clone)]
pub struct LiveReplica {
    pub name: String,
    pub client: ReplicaClient,
    pub parts_dir: std::path::PathBuf,
}

/// Records inserts and their outcomes; shared by every client task (`Arc<Checker>`).
#[derive(Debug, Default)]
pub struct Checker {
    state: Mutex<State>,
}

#[derive(Debug, Clone)]
struct Snapshot {
    status: ReplicaStatus,
    lines: Vec<String>,
    zk_parts: BTreeSet<String>,
    /// Parts `/status` listed whose `data.parquet` was not on disk right after (a merge
    /// may have retired them in between); a snapshot is only accepted when this is empty.
    missing_files: Vec<String>,
}

/// Counts from one verification, printed by `verify`.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub inserts: usize,
    pub attempts: usize,
    pub acked: usize,
    pub acked_first_try: usize,
    pub acked_after_retry: usize,
    /// Acknowledged after an earlier try of the same token had an unknown outcome.
    pub acked_after_unknown: usize,
    pub acks_deduplicated: usize,
    pub hedged: usize,
    pub rejected: usize,
    pub poison: usize,
    pub unknown_present: usize,
    pub unknown_absent: usize,
    pub not_sent: usize,
    pub tries_503: usize,
    pub tries_other_5xx: usize,
    pub tries_timeout: usize,
    pub tries_connection: usize,
    pub tries_4xx: usize,
    pub acked_rows: u64,
    pub rows_per_replica: u64,
    pub parts_per_replica: usize,
    pub live_replicas: usize,
    pub total_replicas: u64,
    pub log_max_index: Option<u64>,
    pub converge_secs: f64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "checker: {} inserts ({} tries): {} acked ({} first try, {} after a retry, {} after an unknown outcome, {} acks deduplicated, {} hedged), {} rejected, {} poison refused, unknown outcome: {} present / {} absent, {} never sent",
            self.inserts,
            self.attempts,
            self.acked,
            self.acked_first_try,
            self.acked_after_retry,
            self.acked_after_unknown,
            self.acks_deduplicated,
            self.hedged,
            self.rejected,
            self.poison,
            self.unknown_present,
            self.unknown_absent,
            self.not_sent
        )?;
        writeln!(
            f,
            "checker: failed tries: {} x 503, {} x other 5xx, {} x 4xx, {} timeouts, {} connection errors",
            self.tries_503,
            self.tries_other_5xx,
            self.tries_4xx,
            self.tries_timeout,
            self.tries_connection
        )?;
        write!(
            f,
            "checker: {} live of {} replicas converged in {:.1}s on {} rows ({} acknowledged) in {} parts each, log_max_index {:?}; identical rows, parts and ZooKeeper part lists, no lost part",
            self.live_replicas,
            self.total_replicas,
            self.converge_secs,
            self.rows_per_replica,
            self.acked_rows,
            self.parts_per_replica,
            self.log_max_index
        )
    }
}

impl Checker {
    pub fn new() -> Checker {
        Checker::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Plans a new insert of `rows` rows (fresh ids, a fresh token `prefix-index`).
    pub fn plan(&self, prefix: &str, rows: u64, pad: usize, poison: bool) -> InsertPlan {
        let mut s = self.lock();
        let index = s.inserts.len();
        let first_id = s.next_id;
        s.next_id += rows.max(1);
        let plan = InsertPlan {
            index,
            token: format!("{prefix}-{index}"),
            first_id,
            rows,
            pad,
            month: 1 + (index % 3) as u32,
            poison,
        };
        s.inserts.push(Record {
            plan: plan.clone(),
            attempts: Vec::new(),
            hedged: false,
        });
        plan
    }

    /// Records the outcome of one try of insert `index` on `replica`.
    pub fn record(&self, index: usize, replica: &str, attempt: Attempt) {
        let mut s = self.lock();
        if let Some(r) = s.inserts.get_mut(index) {
            r.attempts.push((replica.to_string(), attempt));
        }
    }

    /// Marks an insert as sent to two replicas at once.
    pub fn mark_hedged(&self, index: usize) {
        if let Some(r) = self.lock().inserts.get_mut(index) {
            r.hedged = true;
        }
    }

    pub fn acked(&self) -> usize {
        self.lock()
            .inserts
            .iter()
            .filter(|r| r.outcome() == Outcome::Acked)
            .count()
    }

    pub fn inserts(&self) -> usize {
        self.lock().inserts.len()
    }

    /// Inserts whose final outcome is unknown (no ack).
    pub fn unknown(&self) -> usize {
        self.lock()
            .inserts
            .iter()
            .filter(|r| r.outcome() == Outcome::Unknown)
            .count()
    }

    /// Tries with an unknown outcome, over all inserts (including later acked ones).
    pub fn unknown_tries(&self) -> usize {
        self.lock()
            .inserts
            .iter()
            .flat_map(|r| r.attempts.iter())
            .filter(|(_, a)| a.is_unknown())
            .count()
    }

    pub fn outcome(&self, index: usize) -> Option<Outcome> {
        self.lock().inserts.get(index).map(Record::outcome)
    }

    /// Sends `plan` to `client` once and records the try (`name` identifies the replica).
    pub async fn try_insert(
        &self,
        client: &reqwest::Client,
        base_url: &str,
        name: &str,
        plan: &InsertPlan,
        body: &str,
        quorum: Option<u32>,
    ) -> Attempt {
        let attempt = send_insert(client, base_url, &plan.token, body, quorum).await;
        self.record(plan.index, name, attempt.clone());
        attempt
    }

    /// Waits until the live replicas of `cluster` have converged, then checks every
    /// property listed in the module documentation, prints the report and returns it.
    pub async fn verify(&self, cluster: &Cluster) -> anyhow::Result<Report> {
        let live: Vec<LiveReplica> = cluster
            .replicas
            .iter()
            .filter(|r| r.pid().is_some())
            .map(|r| LiveReplica {
                name: r.name().to_string(),
                client: r.client().clone(),
                parts_dir: r.data_dir().join("parts"),
            })
            .collect();
        let zk = cluster.zk_client().await?;
        let total = cluster.replicas.len() as u32;
        self.verify_replicas(&live, &zk, &cluster.paths(), total)
            .await
    }

    /// [`Checker::verify`] for replicas that run anywhere (pods of a StatefulSet, say):
    /// `live` are the replicas expected to converge, `total` how many are registered in
    /// the table's tree at `paths`, which `zk` reads.
    pub async fn verify_replicas(
        &self,
        live: &[LiveReplica],
        zk: &zookeeper_client::Client,
        paths: &rtable_protocol::TablePaths,
        total: u32,
    ) -> anyhow::Result<Report> {
        let started = Instant::now();
        anyhow::ensure!(!live.is_empty(), "no replica is running");
        let clients: Vec<(String, ReplicaClient)> = live
            .iter()
            .map(|r| (r.name.clone(), r.client.clone()))
            .collect();
        let parts_dirs: Vec<std::path::PathBuf> =
            live.iter().map(|r| r.parts_dir.clone()).collect();
        let converged = poll_until(
            "the live replicas to converge (checker)",
            Duration::from_secs(120),
            Duration::from_millis(250),
            || {
                let clients = clients.clone();
                let parts_dirs = parts_dirs.clone();
                let zk = zk.clone();
                let paths = paths.clone();
                let live_count = live.len() as u32;
                async move {
                    let mut snaps = Vec::new();
                    for ((name, c), parts_dir) in clients.iter().zip(&parts_dirs) {
                        let status: ReplicaStatus = serde_json::from_value(c.status_json().await?)
                            .with_context(|| format!("/status of {name}"))?;
                        if status.is_readonly {
                            return Ok(Check::Wait(format!(
                                "{name} is read-only: {:?}",
                                status.readonly_reason
                            )));
                        }
                        if status.queue_size != 0 {
                            return Ok(Check::Wait(format!(
                                "{name} has {} queue entries",
                                status.queue_size
                            )));
                        }
                        if status.active_replicas != Some(live_count) {
                            return Ok(Check::Wait(format!(
                                "{name} sees {:?} active replicas, {live_count} are live",
                                status.active_replicas
                            )));
                        }
                        if let Some(max) = status.log_max_index
                            && status.log_pointer != Some(max + 1)
                        {
                            return Ok(Check::Wait(format!(
                                "{name} log_pointer {:?}, log_max_index {max}",
                                status.log_pointer
                            )));
                        }
                        let lines = c.select_sorted_lines().await?;
                        let zk_parts: BTreeSet<String> = zk
                            .list_children(&paths.replica(name).parts())
                            .await
                            .with_context(|| format!("listing the parts of {name}"))?
                            .into_iter()
                            .collect();
                        let missing_files: Vec<String> = status
                            .parts
                            .iter()
                            .filter(|p| !parts_dir.join(p).join("data.parquet").is_file())
                            .cloned()
                            .collect();
                        snaps.push(Snapshot {
                            status,
                            lines,
                            zk_parts,
                            missing_files,
                        });
                    }
                    // A merge may retire parts between the /status read and the look at
                    // the disk; a part whose files are really gone never settles and is
                    // reported when the wait runs out.
                    for s in &snaps {
                        if let Some(part) = s.missing_files.first() {
                            return Ok(Check::Wait(format!(
                                "{}: part {part} listed but has no data.parquet",
                                s.status.replica_name
                            )));
                        }
                    }
                    let first = &snaps[0];
                    for s in &snaps[1..] {
                        if s.lines != first.lines {
                            return Ok(Check::Wait(format!(
                                "{} has {} rows, {} has {}",
                                first.status.replica_name,
                                first.lines.len(),
                                s.status.replica_name,
                                s.lines.len()
                            )));
                        }
                        if s.status.parts != first.status.parts {
                            return Ok(Check::Wait(format!(
                                "parts differ: {} {:?} vs {} {:?}",
                                first.status.replica_name,
                                first.status.parts,
                                s.status.replica_name,
                                s.status.parts
                            )));
                        }
                        if s.status.log_max_index != first.status.log_max_index {
                            return Ok(Check::Wait("log_max_index differs".to_string()));
                        }
                    }
                    for s in &snaps {
                        let listed: BTreeSet<String> = s.status.parts.iter().cloned().collect();
                        if listed != s.zk_parts {
                            return Ok(Check::Wait(format!(
                                "{}: /status parts {:?} but ZooKeeper lists {:?}",
                                s.status.replica_name, listed, s.zk_parts
                            )));
                        }
                    }
                    Ok(Check::Done(snaps))
                }
            },
        )
        .await;
        let snaps = match converged {
            Ok(s) => s,
            Err(e) => {
                let mut detail = String::new();
                for ((name, c), parts_dir) in clients.iter().zip(&parts_dirs) {
                    let status = c.get("/status").await.map(|r| r.text());
                    let queue = c.get("/queue").await.map(|r| r.text());
                    let select = match c.select_sorted_lines().await {
                        Ok(lines) => format!("{} rows", lines.len()),
                        Err(e) => format!("FAILED: {e:#}"),
                    };
                    detail.push_str(&format!(
                        "\n{name} /status: {}\n{name} /queue: {}\n{name} /select: {select}",
                        status.as_deref().unwrap_or("?"),
                        queue.unwrap_or_else(|e| e.to_string())
                    ));
                    // Active parts whose files are gone explain a failing /select.
                    if let Ok(text) = &status
                        && let Ok(st) = serde_json::from_str::<ReplicaStatus>(text)
                    {
                        for part in &st.parts {
                            let file = parts_dir.join(part).join("data.parquet");
                            if !file.is_file() {
                                detail.push_str(&format!(
                                    "\n{name}: active part {part} has no {} on disk",
                                    file.display()
                                ));
                            }
                        }
                    }
                }
                return Err(e.context(format!("the cluster did not converge:{detail}")));
            }
        };
        let converge_secs = started.elapsed().as_secs_f64();
        let report = self.check(&snaps, total, converge_secs)?;
        println!("{report}");
        Ok(report)
    }

    fn check(&self, snaps: &[Snapshot], total: u32, converge_secs: f64) -> anyhow::Result<Report> {
        let s = self.lock();
        let mut report = Report {
            inserts: s.inserts.len(),
            live_replicas: snaps.len(),
            total_replicas: u64::from(total),
            converge_secs,
            ..Report::default()
        };
        // Which insert does each id belong to?
        let mut owner: BTreeMap<u64, usize> = BTreeMap::new();
        for (i, r) in s.inserts.iter().enumerate() {
            // Ranges are disjoint and increasing: store only the first id.
            owner.insert(r.plan.first_id, i);
        }
        let owner_of = |id: u64| -> Option<usize> {
            let (_, &i) = owner.range(..=id).next_back()?;
            s.inserts[i].plan.ids().contains(&id).then_some(i)
        };

        let mut problems: Vec<String> = Vec::new();
        let mut present_by_replica: Vec<BTreeMap<usize, u64>> = Vec::new();
        for snap in snaps {
            let name = &snap.status.replica_name;
            let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
            let mut per_insert: BTreeMap<usize, u64> = BTreeMap::new();
            for line in &snap.lines {
                let v: Value = serde_json::from_str(line)
                    .with_context(|| format!("{name}: a row is not JSON: {line}"))?;
                let Some(id) = v["user_id"].as_u64() else {
                    problems.push(format!("{name}: row without a user_id: {line}"));
                    continue;
                };
                *seen.entry(id).or_default() += 1;
                match owner_of(id) {
                    None => problems.push(format!(
                        "{name}: row {id} was never attempted by any client: {line}"
                    )),
                    Some(i) => {
                        let plan = &s.inserts[i].plan;
                        let event = v["event"].as_str().unwrap_or_default();
                        let prefix = format!("{}/{id}/", plan.token);
                        if !event.starts_with(&prefix)
                            || event.len() != plan.token.len() + 22 + plan.pad
                        {
                            problems.push(format!(
                                "{name}: row {id} has event {:?}..., expected {prefix}... of {} bytes",
                                &event[..event.len().min(60)],
                                plan.token.len() + 22 + plan.pad
                            ));
                        }
                        *per_insert.entry(i).or_default() += 1;
                    }
                }
            }
            for (id, n) in &seen {
                if *n > 1 {
                    problems.push(format!("{name}: row {id} is present {n} times"));
                }
            }
            // Status vs reality.
            if snap.status.rows != snap.lines.len() as u64 {
                problems.push(format!(
                    "{name}: /status rows {} but /select returned {}",
                    snap.status.rows,
                    snap.lines.len()
                ));
            }
            if snap.status.lost_part_count != 0 {
                problems.push(format!(
                    "{name}: lost_part_count {}",
                    snap.status.lost_part_count
                ));
            }
            if snap.status.queue_size != 0 {
                problems.push(format!("{name}: queue_size {}", snap.status.queue_size));
            }
            if snap.status.is_session_expired || snap.status.is_readonly {
                problems.push(format!(
                    "{name}: read-only ({:?}) or session expired",
                    snap.status.readonly_reason
                ));
            }
            if snap.status.active_replicas != Some(snaps.len() as u32) {
                problems.push(format!(
                    "{name}: active_replicas {:?}, {} sidecars are live",
                    snap.status.active_replicas,
                    snaps.len()
                ));
            }
            if snap.status.total_replicas != Some(total) {
                problems.push(format!(
                    "{name}: total_replicas {:?}, the cluster has {total}",
                    snap.status.total_replicas
                ));
            }
            let listed: BTreeSet<String> = snap.status.parts.iter().cloned().collect();
            if listed != snap.zk_parts {
                problems.push(format!(
                    "{name}: /status parts {listed:?} but ZooKeeper lists {:?}",
                    snap.zk_parts
                ));
            }
            let mut parsed = Vec::new();
            // Every listed part had its data.parquet at snapshot time: the wait above only
            // accepts such snapshots, and fails with the missing files otherwise.
            for part in &snap.status.parts {
                match rtable_protocol::PartName::parse(part) {
                    Ok(p) => parsed.push((part.clone(), p)),
                    Err(e) => problems.push(format!("{name}: part name {part}: {e}")),
                }
            }
            for (a, (na, pa)) in parsed.iter().enumerate() {
                for (nb, pb) in &parsed[a + 1..] {
                    if !pa.is_disjoint(pb) {
                        problems.push(format!("{name}: active parts {na} and {nb} overlap"));
                    }
                }
            }
            present_by_replica.push(per_insert);
        }

        // Per insert, against its recorded outcome.
        for (i, r) in s.inserts.iter().enumerate() {
            report.attempts += r.attempts.len();
            for (_, a) in &r.attempts {
                match a {
                    Attempt::Acked { deduplicated: true } => report.acks_deduplicated += 1,
                    Attempt::Acked { .. } => {}
                    Attempt::Rejected { .. } => report.tries_4xx += 1,
                    Attempt::Unavailable { status: 503, .. } => report.tries_503 += 1,
                    Attempt::Unavailable { .. } => report.tries_other_5xx += 1,
                    Attempt::Timeout => report.tries_timeout += 1,
                    Attempt::Connection(_) => report.tries_connection += 1,
                }
            }
            if r.hedged {
                report.hedged += 1;
            }
            let outcome = r.outcome();
            let counts: Vec<u64> = present_by_replica
                .iter()
                .map(|m| m.get(&i).copied().unwrap_or(0))
                .collect();
            let token = &r.plan.token;
            for (snap, &n) in snaps.iter().zip(&counts) {
                if n != 0 && n != r.plan.rows {
                    problems.push(format!(
                        "{}: insert {token} is partly present: {n} of {} rows",
                        snap.status.replica_name, r.plan.rows
                    ));
                }
            }
            let present = counts.iter().any(|n| *n > 0);
            if r.plan.poison {
                report.poison += 1;
                if outcome == Outcome::Acked {
                    problems.push(format!(
                        "poison insert {token} was acknowledged: {:?}",
                        r.attempts
                    ));
                }
                if present {
                    problems.push(format!("poison insert {token} is present: {counts:?}"));
                }
                continue;
            }
            match outcome {
                Outcome::Acked => {
                    report.acked += 1;
                    report.acked_rows += r.plan.rows;
                    let first_ack = r
                        .attempts
                        .iter()
                        .position(|(_, a)| matches!(a, Attempt::Acked { .. }))
                        .unwrap_or(0);
                    if first_ack == 0 || (r.hedged && first_ack == 1) {
                        report.acked_first_try += 1;
                    } else {
                        report.acked_after_retry += 1;
                    }
                    if r.attempts[..first_ack].iter().any(|(_, a)| a.is_unknown()) {
                        report.acked_after_unknown += 1;
                    }
                    for (snap, &n) in snaps.iter().zip(&counts) {
                        if n != r.plan.rows {
                            problems.push(format!(
                                "{}: acknowledged insert {token} ({} rows, ids {:?}) has {n} rows; tries: {:?}",
                                snap.status.replica_name, r.plan.rows, r.plan.ids(), r.attempts
                            ));
                        }
                    }
                }
                Outcome::Unknown => {
                    if present {
                        report.unknown_present += 1;
                    } else {
                        report.unknown_absent += 1;
                    }
                }
                Outcome::Rejected | Outcome::NotSent => {
                    if outcome == Outcome::Rejected {
                        report.rejected += 1;
                    } else {
                        report.not_sent += 1;
                    }
                    if present {
                        problems.push(format!(
                            "insert {token} was {outcome:?} yet is present: {counts:?}; tries: {:?}",
                            r.attempts
                        ));
                    }
                }
            }
        }
        drop(s);

        // Identical rows and parts everywhere.
        let first = &snaps[0];
        for snap in &snaps[1..] {
            if snap.lines != first.lines {
                problems.push(format!(
                    "{} and {} hold different rows ({} vs {})",
                    first.status.replica_name,
                    snap.status.replica_name,
                    first.lines.len(),
                    snap.lines.len()
                ));
            }
            if snap.status.parts != first.status.parts {
                problems.push(format!(
                    "{} and {} hold different parts",
                    first.status.replica_name, snap.status.replica_name
                ));
            }
        }
        report.rows_per_replica = first.lines.len() as u64;
        report.parts_per_replica = first.status.parts.len();
        report.log_max_index = first.status.log_max_index;
        let expected_min = report.acked_rows;
        if report.rows_per_replica < expected_min {
            problems.push(format!(
                "{} rows per replica, fewer than the {expected_min} acknowledged",
                report.rows_per_replica
            ));
        }
        if !problems.is_empty() {
            let shown: Vec<&String> = problems.iter().take(40).collect();
            anyhow::bail!(
                "checker found {} problems (first {}):\n{}\n{report}",
                problems.len(),
                shown.len(),
                shown
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(report)
    }
}

/// One `POST /insert` with a dedup token, classified.
pub async fn send_insert(
    client: &reqwest::Client,
    base_url: &str,
    token: &str,
    body: &str,
    quorum: Option<u32>,
) -> Attempt {
    let mut url = format!(
        "{base_url}/insert?format=JSONEachRow&dedup_token={}",
        crate::client::url_encode(token)
    );
    if let Some(q) = quorum {
        url.push_str(&format!("&insert_quorum={q}"));
    }
    let answer = match client.post(url).body(body.to_string()).send().await {
        Ok(a) => a,
        Err(e) if e.is_timeout() => return Attempt::Timeout,
        Err(e) => return Attempt::Connection(format!("{e:#}")),
    };
    let status = answer.status().as_u16();
    let text = match answer.text().await {
        Ok(t) => t,
        Err(e) if e.is_timeout() => return Attempt::Timeout,
        Err(e) => return Attempt::Connection(format!("reading the answer: {e:#}")),
    };
    match status {
        200 => match serde_json::from_str::<crate::client::InsertAnswer>(&text) {
            Ok(a) => Attempt::Acked {
                deduplicated: a.deduplicated,
            },
            // A 200 we cannot read: count it as unknown, never as acknowledged.
            Err(e) => Attempt::Unavailable {
                status,
                error: format!("unreadable 200 answer {text:?}: {e}"),
            },
        },
        400..=499 => Attempt::Rejected {
            status,
            error: text,
        },
        _ => Attempt::Unavailable {
            status,
            error: text,
        },
    }
}
