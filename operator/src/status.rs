//! Status maths: what the operator observed in, `ReplicatedTableStatus` out. Pure, so every
//! health state (healthy, lagging, lost, inactive, ZooKeeper down, schema mismatch) is a
//! unit test.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{ReplicaStatus, ReplicatedTableStatus};

pub const READY: &str = "Ready";
pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// A replica further behind than this is reported as lagging.
pub const LAG_THRESHOLD_SECONDS: u64 = 300;

/// A sidecar's `GET /status` answer. The operator's own `ReplicaStatus` is the CRD's
/// per-replica status, hence the name here.
pub use rtable_protocol::status::ReplicaStatus as SidecarStatus;

/// One replica as read from ZooKeeper, plus its sidecar's answer when it gave one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaObservation {
    pub name: String,
    /// Whether the replica belongs to the desired ordinals (not one being scaled away).
    pub desired: bool,
    pub active: bool,
    pub lost: bool,
    pub log_pointer: Option<u64>,
    pub queue_size: u32,
    pub parts: u32,
    pub sidecar: Option<SidecarStatus>,
}

/// What the operator learned from ZooKeeper this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeObservation {
    /// The spec itself is invalid; nothing was applied.
    InvalidSpec(String),
    Unavailable(String),
    SchemaMismatch(String),
    Healthy(Vec<ReplicaObservation>),
}

/// The StatefulSet's view of the pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodsObservation {
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    /// The StatefulSet controller has not yet seen the current spec (its status is for an
    /// older generation) or is still rolling it out (two revisions): the counts above may
    /// describe the previous spec's pods, so they cannot make the new generation Ready.
    pub pending_rollout: bool,
}

impl PodsObservation {
    pub fn of(sts: &k8s_openapi::api::apps::v1::StatefulSet) -> PodsObservation {
        let Some(s) = sts.status.as_ref() else {
            return PodsObservation {
                pending_rollout: true,
                ..PodsObservation::default()
            };
        };
        let seen = s.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
        let one_revision = match (&s.current_revision, &s.update_revision) {
            (Some(current), Some(update)) => current == update,
            _ => true,
        };
        PodsObservation {
            replicas: s.replicas,
            ready: s.ready_replicas.unwrap_or(0),
            updated: s.updated_replicas.unwrap_or(0),
            pending_rollout: !seen || !one_revision,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub generation: Option<i64>,
    pub desired_replicas: u32,
    pub quorum: u32,
    pub selector: String,
    pub table_path: Option<String>,
    pub pods: PodsObservation,
    pub tree: TreeObservation,
    /// Replicas of removed ordinals that still wait to be dropped from ZooKeeper.
    pub pending_drops: Vec<String>,
    /// A scale-down the operator holds back: the StatefulSet keeps more pods than desired
    /// until the replicas it would remove have nothing a survivor lacks (see `scale_down`).
    pub scale_down_hold: Option<ScaleDownHold>,
    /// Objects the API server refused this round, each as `<Kind> <name>: <why>` (an
    /// immutable StatefulSet field edited, a missing Secret): the spec is not applied.
    pub apply_failures: Vec<String>,
}

/// Why the StatefulSet keeps `kept` pods although fewer are desired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleDownHold {
    pub kept: u32,
    pub why: HoldReason,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldReason {
    /// `replica` (the highest ordinal kept) has parts no surviving replica holds, neither
    /// as such nor merged into a covering part: its volume may hold their only copy.
    PartsNotOnSurvivors {
        replica: String,
        /// How many of its parts, out of `total`, and the first few names.
        missing: usize,
        total: usize,
        examples: Vec<String>,
    },
    /// The parts could not be read (ZooKeeper unreachable, no credentials): nothing is
    /// removed until they can be.
    PartsUnreadable(String),
}

impl ScaleDownHold {
    fn message(&self, desired: u32) -> String {
        match &self.why {
            HoldReason::PartsNotOnSurvivors {
                replica,
                missing,
                total,
                examples,
            } => format!(
                "keeping {replica} ({} pods, {desired} desired): {missing} of its {total} parts \
                 are not on a surviving replica yet ({}{}); it is removed once they are fetched",
                self.kept,
                examples.join(", "),
                if *missing > examples.len() {
                    ", ..."
                } else {
                    ""
                },
            ),
            HoldReason::PartsUnreadable(why) => format!(
                "keeping {} pods ({desired} desired) until the replicas' parts can be read: {why}",
                self.kept
            ),
        }
    }
}

struct Verdict {
    status: &'static str,
    reason: &'static str,
    message: String,
}

fn yes(reason: &'static str, message: impl Into<String>) -> Verdict {
    Verdict {
        status: "True",
        reason,
        message: message.into(),
    }
}
fn no(reason: &'static str, message: impl Into<String>) -> Verdict {
    Verdict {
        status: "False",
        reason,
        message: message.into(),
    }
}
fn unknown(reason: &'static str, message: impl Into<String>) -> Verdict {
    Verdict {
        status: "Unknown",
        reason,
        message: message.into(),
    }
}

/// Computes the status. `previous` keeps `lastTransitionTime` of conditions whose status did
/// not change, as the API conventions require; `now` stamps the ones that did.
pub fn compute(obs: &Observation, previous: &[Condition], now: &Time) -> ReplicatedTableStatus {
    let replicas: &[ReplicaObservation] = match &obs.tree {
        TreeObservation::Healthy(r) => r,
        _ => &[],
    };
    let desired: Vec<&ReplicaObservation> = replicas.iter().filter(|r| r.desired).collect();
    let active = desired.iter().filter(|r| r.active).count() as u32;
    let delay = |r: &ReplicaObservation| r.sidecar.as_ref().map(|s| s.absolute_delay);
    let max_delay = replicas.iter().filter_map(delay).max().unwrap_or(0);

    // Problems, most severe first: the first one names Ready's and Degraded's reason.
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    match &obs.tree {
        TreeObservation::InvalidSpec(m) => problems.push(("InvalidSpec", m.clone())),
        TreeObservation::Unavailable(m) => problems.push(("ZooKeeperUnavailable", m.clone())),
        TreeObservation::SchemaMismatch(m) => problems.push(("SchemaMismatch", m.clone())),
        TreeObservation::Healthy(_) => {}
    }
    if !obs.apply_failures.is_empty() {
        problems.push(("ApplyFailed", obs.apply_failures.join("; ")));
    }
    let cloning: Vec<&str> = desired
        .iter()
        .filter(|r| r.lost && r.active)
        .map(|r| r.name.as_str())
        .collect();
    let lost: Vec<&str> = desired
        .iter()
        .filter(|r| r.lost && !r.active)
        .map(|r| r.name.as_str())
        .collect();
    if !lost.is_empty() {
        problems.push((
            "ReplicaLost",
            format!("lost and not active: {}", lost.join(", ")),
        ));
    }
    if let TreeObservation::Healthy(_) = obs.tree {
        let registered: Vec<&str> = desired.iter().map(|r| r.name.as_str()).collect();
        let inactive: Vec<&str> = desired
            .iter()
            .filter(|r| !r.active && !r.lost)
            .map(|r| r.name.as_str())
            .collect();
        let missing = obs.desired_replicas.saturating_sub(registered.len() as u32);
        if !inactive.is_empty() {
            problems.push((
                "ReplicaInactive",
                format!("no ZooKeeper session: {}", inactive.join(", ")),
            ));
        }
        if active == obs.quorum && obs.desired_replicas > obs.quorum {
            problems.push((
                "QuorumAtRisk",
                format!("{active} replicas active, exactly the insert quorum: one more failure stops quorum inserts"),
            ));
        }
        let lagging: Vec<String> = replicas
            .iter()
            .filter_map(|r| {
                delay(r)
                    .filter(|d| *d > LAG_THRESHOLD_SECONDS)
                    .map(|d| format!("{} ({d}s)", r.name))
            })
            .collect();
        if !lagging.is_empty() {
            problems.push((
                "ReplicaLagging",
                format!(
                    "behind by more than {LAG_THRESHOLD_SECONDS}s: {}",
                    lagging.join(", ")
                ),
            ));
        }
        let file_errors: Vec<String> = replicas
            .iter()
            .filter_map(|r| {
                let error = r.sidecar.as_ref()?.table_file_error.as_ref()?;
                Some(format!("{}: {error}", r.name))
            })
            .collect();
        if !file_errors.is_empty() {
            problems.push((
                "TableFileError",
                format!(
                    "sidecars cannot apply the table file and keep their settings: {}",
                    file_errors.join("; ")
                ),
            ));
        }
        let unreadable: Vec<String> = replicas
            .iter()
            .filter_map(|r| {
                let n = r.sidecar.as_ref()?.unreadable_queue_entries;
                (n > 0).then(|| format!("{} ({n})", r.name))
            })
            .collect();
        if !unreadable.is_empty() {
            problems.push((
                "UnreadableQueueEntries",
                format!(
                    "queue entries that do not parse and are never executed (see the replica's /queue): {}",
                    unreadable.join(", ")
                ),
            ));
        }
        if missing > 0 && obs.pods.replicas as u32 >= obs.desired_replicas {
            // Pods exist but never registered: they are starting or crash-looping.
            problems.push((
                "ReplicaInactive",
                format!("{missing} replicas not registered in ZooKeeper yet"),
            ));
        }
    }

    let available = match &obs.tree {
        TreeObservation::InvalidSpec(m) => no("InvalidSpec", m.clone()),
        TreeObservation::Unavailable(m) => unknown("ZooKeeperUnavailable", m.clone()),
        // The replicas are only read once the tree holds this definition: how many are
        // active is not known, which is not the same as none.
        TreeObservation::SchemaMismatch(_) => unknown(
            "SchemaMismatch",
            "replicas not read: the ZooKeeper tree holds another table definition (see Degraded); \
             fix the spec to match the tree to see them again",
        ),
        _ if active >= obs.quorum => yes(
            "QuorumActive",
            format!(
                "{active} of {} replicas active, insert quorum {}",
                obs.desired_replicas, obs.quorum
            ),
        ),
        _ => no(
            "QuorumLost",
            format!(
                "{active} of {} replicas active, below the insert quorum {}: quorum inserts fail",
                obs.desired_replicas, obs.quorum
            ),
        ),
    };

    let pending_definition: Vec<String> = replicas
        .iter()
        .filter_map(|r| {
            let change = r.sidecar.as_ref()?.pending_definition_change.as_ref()?;
            Some(format!("{}: {change}", r.name))
        })
        .collect();
    let desired_i32 = i32::try_from(obs.desired_replicas).unwrap_or(i32::MAX);
    let progress: Option<(&'static str, String)> =
        if matches!(obs.tree, TreeObservation::InvalidSpec(_)) {
            None
        } else if let Some(hold) = &obs.scale_down_hold {
            Some(("ScalingDown", hold.message(obs.desired_replicas)))
        } else if !obs.pending_drops.is_empty() {
            Some((
                "ScalingDown",
                format!("waiting to drop replicas: {}", obs.pending_drops.join(", ")),
            ))
        } else if obs.pods.replicas < desired_i32 {
            Some((
                "ScalingUp",
                format!("{} of {desired_i32} pods exist", obs.pods.replicas),
            ))
        } else if obs.pods.replicas > desired_i32 {
            Some((
                "ScalingDown",
                format!("{} pods, {desired_i32} desired", obs.pods.replicas),
            ))
        } else if obs.pods.pending_rollout {
            Some((
                "RollingUpdate",
                "the StatefulSet controller has not rolled out the current spec yet".to_string(),
            ))
        } else if obs.pods.updated < desired_i32 {
            Some((
                "RollingUpdate",
                format!("{} of {desired_i32} pods updated", obs.pods.updated),
            ))
        } else if !pending_definition.is_empty() {
            // Pods already rolled but a sidecar still runs its old definition: it restarts
            // with the new one (the schema hash rolls the pods), or its restart is stuck.
            Some((
                "DefinitionPending",
                format!(
                    "waiting for sidecars to restart with the new definition: {}",
                    pending_definition.join("; ")
                ),
            ))
        } else if !cloning.is_empty() {
            Some((
                "ReplicaCloning",
                format!("cloning from a peer: {}", cloning.join(", ")),
            ))
        } else if obs.pods.ready < desired_i32 {
            Some((
                "PodsStarting",
                format!("{} of {desired_i32} pods ready", obs.pods.ready),
            ))
        } else {
            None
        };
    let progressing = match &progress {
        Some((reason, message)) => yes(reason, message.clone()),
        None if !obs.apply_failures.is_empty() => no(
            "ApplyFailed",
            "the spec is not applied: the API server refused an object (see Degraded)",
        ),
        None => no("Stable", "the StatefulSet matches the spec"),
    };
    let degraded = match problems.first() {
        Some((reason, message)) => yes(reason, message.clone()),
        None => no("AsExpected", "no problem found"),
    };
    let ready = match (problems.first(), &progress) {
        (Some((reason, message)), _) => no(reason, message.clone()),
        (None, Some((reason, message))) => no(reason, message.clone()),
        (None, None) if available.status == "True" => yes(
            "AllReplicasReady",
            format!(
                "{active} of {} replicas active and in sync",
                obs.desired_replicas
            ),
        ),
        (None, None) => no(available.reason, available.message.clone()),
    };

    let conditions = [
        (READY, ready),
        (AVAILABLE, available),
        (PROGRESSING, progressing),
        (DEGRADED, degraded),
    ]
    .into_iter()
    .map(|(type_, v)| condition(type_, v, obs.generation, previous, now))
    .collect();

    ReplicatedTableStatus {
        observed_generation: obs.generation,
        replicas: obs.pods.replicas,
        ready_replicas: obs.pods.ready,
        active_replicas: i32::try_from(active).unwrap_or(i32::MAX),
        quorum: i32::try_from(obs.quorum).unwrap_or(i32::MAX),
        max_delay_seconds: i64::try_from(max_delay).unwrap_or(i64::MAX),
        selector: obs.selector.clone(),
        table_path: obs.table_path.clone(),
        replica_statuses: replicas.iter().map(replica_status).collect(),
        conditions,
    }
}

fn replica_status(r: &ReplicaObservation) -> ReplicaStatus {
    ReplicaStatus {
        name: r.name.clone(),
        active: r.active,
        lost: r.lost,
        log_pointer: r.log_pointer,
        queue_size: r
            .sidecar
            .as_ref()
            .map_or(r.queue_size, |s| count(s.queue_size)),
        inserts_in_queue: r.sidecar.as_ref().map_or(0, |s| count(s.inserts_in_queue)),
        absolute_delay_seconds: r.sidecar.as_ref().map(|s| s.absolute_delay),
        parts: r.sidecar.as_ref().map_or(r.parts, |s| count(s.parts_count)),
    }
}

/// A sidecar's count in the CRD's 32-bit field; a count past it shows as the maximum.
fn count(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn condition(
    type_: &str,
    v: Verdict,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == v.status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status: v.status.to_string(),
        reason: v.reason.to_string(),
        // The API limits messages to 32 KiB; a schema diff can be long.
        message: truncate(&v.message, 4096),
        observed_generation: generation,
        last_transition_time,
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A condition whose status or reason changed; each one becomes a Kubernetes Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    /// Warning events for bad news: Ready/Available turning non-True, Degraded turning True.
    pub warning: bool,
}

pub fn transitions(previous: &[Condition], current: &[Condition]) -> Vec<Transition> {
    current
        .iter()
        .filter(|c| {
            !previous
                .iter()
                .any(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason)
        })
        .map(|c| Transition {
            type_: c.type_.clone(),
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            warning: match c.type_.as_str() {
                DEGRADED => c.status == "True",
                PROGRESSING => false,
                _ => c.status != "True",
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("timestamp"))
    }

    fn replica(i: u32) -> ReplicaObservation {
        ReplicaObservation {
            name: format!("events-{i}"),
            desired: true,
            active: true,
            lost: false,
            log_pointer: Some(10),
            queue_size: 0,
            parts: 4,
            sidecar: Some(SidecarStatus {
                replica_name: format!("events-{i}"),
                parts_count: 4,
                log_pointer: Some(10),
                log_max_index: Some(9),
                absolute_delay: 1,
                ..SidecarStatus::default()
            }),
        }
    }

    fn healthy() -> Observation {
        Observation {
            generation: Some(7),
            desired_replicas: 3,
            quorum: 2,
            selector: "app.kubernetes.io/instance=events,app.kubernetes.io/name=rtable".into(),
            table_path: Some("/clickhouse/tables/01/ns.events".into()),
            pods: PodsObservation {
                replicas: 3,
                ready: 3,
                updated: 3,
                pending_rollout: false,
            },
            tree: TreeObservation::Healthy((0..3).map(replica).collect()),
            pending_drops: vec![],
            scale_down_hold: None,
            apply_failures: vec![],
        }
    }

    fn get<'a>(s: &'a ReplicatedTableStatus, type_: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition present")
    }

    fn summary(s: &ReplicatedTableStatus) -> Vec<(String, String, String)> {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    fn expect(s: &ReplicatedTableStatus, want: [(&str, &str, &str); 4]) {
        let want: Vec<_> = want
            .iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect();
        assert_eq!(summary(s), want);
    }

    #[test]
    fn healthy_table_is_ready_with_observed_generation() {
        let s = compute(&healthy(), &[], &t(100));
        expect(
            &s,
            [
                ("Ready", "True", "AllReplicasReady"),
                ("Available", "True", "QuorumActive"),
                ("Progressing", "False", "Stable"),
                ("Degraded", "False", "AsExpected"),
            ],
        );
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(7))
        );
        assert_eq!(s.observed_generation, Some(7));
        assert_eq!(
            (
                s.active_replicas,
                s.ready_replicas,
                s.quorum,
                s.max_delay_seconds
            ),
            (3, 3, 2, 1)
        );
        assert_eq!(s.replica_statuses.len(), 3);
        assert_eq!(s.replica_statuses[0].parts, 4);
    }

    #[test]
    fn lagging_replica_degrades_but_keeps_availability() {
        let mut o = healthy();
        if let TreeObservation::Healthy(r) = &mut o.tree
            && let Some(sc) = r[1].sidecar.as_mut()
        {
            sc.absolute_delay = 900;
            sc.queue_size = 42;
        }
        let s = compute(&o, &[], &t(100));
        expect(
            &s,
            [
                ("Ready", "False", "ReplicaLagging"),
                ("Available", "True", "QuorumActive"),
                ("Progressing", "False", "Stable"),
                ("Degraded", "True", "ReplicaLagging"),
            ],
        );
        assert!(get(&s, READY).message.contains("events-1 (900s)"));
        assert_eq!(s.max_delay_seconds, 900);
        assert_eq!(s.replica_statuses[1].queue_size, 42);
    }

    #[test]
    fn lost_replica_that_is_not_cloning_is_reported() {
        let mut o = healthy();
        if let TreeObservation::Healthy(r) = &mut o.tree {
            r[2].lost = true;
            r[2].active = false;
            r[2].sidecar = None;
        }
        let s = compute(&o, &[], &t(100));
        assert_eq!(get(&s, READY).reason, "ReplicaLost");
        assert_eq!(get(&s, DEGRADED).reason, "ReplicaLost");
        assert!(get(&s, DEGRADED).message.contains("events-2"));
        // Two active of quorum two on three replicas: still available.
        assert_eq!(get(&s, AVAILABLE).status, "True");
    }

    #[test]
    fn lost_but_active_replica_is_cloning_not_degraded() {
        let mut o = healthy();
        if let TreeObservation::Healthy(r) = &mut o.tree {
            r[2].lost = true;
        }
        let s = compute(&o, &[], &t(100));
        expect(
            &s,
            [
                ("Ready", "False", "ReplicaCloning"),
                ("Available", "True", "QuorumActive"),
                ("Progressing", "True", "ReplicaCloning"),
                ("Degraded", "False", "AsExpected"),
            ],
        );
    }

    #[test]
    fn inactive_replicas_put_the_quorum_at_risk_then_break_it() {
        let mut o = healthy();
        if let TreeObservation::Healthy(r) = &mut o.tree {
            r[0].active = false;
        }
        let s = compute(&o, &[], &t(100));
        assert_eq!(get(&s, DEGRADED).reason, "ReplicaInactive");
        assert_eq!(get(&s, AVAILABLE).status, "True");
        let reasons: Vec<_> = s.conditions.iter().map(|c| c.reason.as_str()).collect();
        assert!(!reasons.contains(&"QuorumLost"));
        // Exactly at quorum: the risk is spelled out in Degraded's message list.
        assert!(get(&s, READY).message.contains("events-0"));

        if let TreeObservation::Healthy(r) = &mut o.tree {
            r[1].active = false;
        }
        let s = compute(&o, &[], &t(100));
        assert_eq!(get(&s, AVAILABLE).status, "False");
        assert_eq!(get(&s, AVAILABLE).reason, "QuorumLost");
        assert_eq!(s.active_replicas, 1);
    }

    #[test]
    fn quorum_at_risk_when_active_equals_quorum() {
        let mut o = healthy();
        o.desired_replicas = 3;
        if let TreeObservation::Healthy(r) = &mut o.tree {
            r.truncate(2);
        }
        o.pods.replicas = 2;
        o.pods.ready = 2;
        o.pods.updated = 2;
        let s = compute(&o, &[], &t(100));
        assert_eq!(get(&s, DEGRADED).reason, "QuorumAtRisk");
        assert_eq!(get(&s, PROGRESSING).reason, "ScalingUp");
    }

    #[test]
    fn zookeeper_down_makes_availability_unknown() {
        let mut o = healthy();
        o.tree = TreeObservation::Unavailable("connect zk-0:2181: timeout".into());
        let s = compute(&o, &[], &t(100));
        expect(
            &s,
            [
                ("Ready", "False", "ZooKeeperUnavailable"),
                ("Available", "Unknown", "ZooKeeperUnavailable"),
                ("Progressing", "False", "Stable"),
                ("Degraded", "True", "ZooKeeperUnavailable"),
            ],
        );
        assert!(get(&s, READY).message.contains("zk-0:2181"));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(7))
        );
    }

    #[test]
    fn a_sidecar_waiting_to_restart_for_a_new_definition_is_progressing() {
        let mut o = healthy();
        if let TreeObservation::Healthy(r) = &mut o.tree
            && let Some(sidecar) = &mut r[1].sidecar
        {
            sidecar.pending_definition_change = Some("spec.columns changed".into());
        }
        let s = compute(&o, &[], &t(100));
        expect(
            &s,
            [
                ("Ready", "False", "DefinitionPending"),
                ("Available", "True", "QuorumActive"),
                ("Progressing", "True", "DefinitionPending"),
                ("Degraded", "False", "AsExpected"),
            ],
        );
        assert!(
            get(&s, "Progressing")
                .message
                .contains("events-1: spec.columns changed")
        );
        // A rolling update in progress explains it first.
        o.pods.updated = 1;
        let s = compute(&o, &[], &t(100));
        assert_eq!(get(&s, "Progressing").reason, "RollingUpdate");
    }

    #[test]
    fn an_unreadable_table_file_degrades_and_names_the_replica() {
        let mut o = healthy();
        if let TreeObservation::Healthy(r) = &mut o.tree
            && let Some(sidecar) = &mut r[2].sidecar
        {
            sidecar.table_file_error = Some("spec.replicas: must be at least 1".into());
        }
        let s = compute(&o, &[], &t(100));
        expect(
            &s,
            [
                ("Ready", "False", "TableFileError"),
                ("Available", "True", "QuorumActive"),
                ("Progressing", "False", "Stable"),
                ("Degraded", "True", "TableFileError"),
            ],
        );
        assert!(
            get(&s, "Degraded")
                .message
                .contains("events-2: spec.replicas: must be at least 1")
        );
    }

    /// A sidecar's whole `/status` answer with `fields` replaced: the shared type is read
    /// strictly, so a test answer carries every field as a real sidecar's does.
    fn sidecar_json(fields: serde_json::Value) -> String {
        let mut v = serde_json::to_value(SidecarStatus::default()).expect("serializes");
        for (k, x) in fields.as_object().expect("an object") {
            v[k] = x.clone();
        }
        v.to_string()
    }

    #[test]
    fn sidecar_status_json_carries_the_table_file_fields() {
        let s: SidecarStatus = serde_json::from_str(&sidecar_json(serde_json::json!({
            "replica_name": "events-0", "parts_count": 3,
            "pending_definition_change": "spec.orderBy changed", "table_file_error": null
        })))
        .expect("parses");
        assert_eq!(
            s.pending_definition_change.as_deref(),
            Some("spec.orderBy changed")
        );
        assert_eq!(s.table_file_error, None);
        assert_eq!(s.parts_count, 3);
    }

    #[test]
    fn a_spec_the_statefulset_controller_has_not_rolled_out_is_not_ready() {
        use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
        let sts = |generation: i64, observed: i64, current: &str, update: &str| StatefulSet {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                generation: Some(generation),
                ..Default::default()
            },
            status: Some(StatefulSetStatus {
                observed_generation: Some(observed),
                replicas: 3,
                ready_replicas: Some(3),
                updated_replicas: Some(3),
                current_revision: Some(current.into()),
                update_revision: Some(update.into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        // Right after an edit: the apply's answer still carries the old generation's status.
        let mut o = healthy();
        o.pods = PodsObservation::of(&sts(2, 1, "a", "a"));
        let s = compute(&o, &[], &t(1));
        assert_eq!(get(&s, READY).status, "False");
        assert_eq!(get(&s, PROGRESSING).reason, "RollingUpdate");
        // Seen, but two revisions: still rolling.
        o.pods = PodsObservation::of(&sts(2, 2, "a", "b"));
        assert_eq!(get(&compute(&o, &[], &t(1)), READY).status, "False");
        // Rolled out.
        o.pods = PodsObservation::of(&sts(2, 2, "b", "b"));
        assert_eq!(get(&compute(&o, &[], &t(1)), READY).status, "True");
    }

    #[test]
    fn an_unreadable_queue_entry_degrades_the_table_naming_the_replica() {
        let mut o = healthy();
        if let TreeObservation::Healthy(r) = &mut o.tree
            && let Some(sc) = r[2].sidecar.as_mut()
        {
            sc.unreadable_queue_entries = 1;
        }
        let s = compute(&o, &[], &t(1));
        assert_eq!(get(&s, DEGRADED).reason, "UnreadableQueueEntries");
        assert!(get(&s, DEGRADED).message.contains("events-2 (1)"));
    }

    #[test]
    fn a_refused_object_is_degraded_and_not_ready_with_the_api_servers_reason() {
        let mut o = healthy();
        o.apply_failures = vec![
            "StatefulSet events: spec: Forbidden: updates to statefulset spec for fields other than ... are forbidden".into(),
        ];
        let s = compute(&o, &[], &t(1));
        expect(
            &s,
            [
                ("Ready", "False", "ApplyFailed"),
                ("Available", "True", "QuorumActive"),
                ("Progressing", "False", "ApplyFailed"),
                ("Degraded", "True", "ApplyFailed"),
            ],
        );
        assert!(
            get(&s, DEGRADED)
                .message
                .contains("StatefulSet events: spec: Forbidden")
        );
    }

    #[test]
    fn schema_mismatch_is_reported_not_hidden() {
        let mut o = healthy();
        o.tree = TreeObservation::SchemaMismatch("columns differ".into());
        let s = compute(&o, &[], &t(100));
        assert_eq!(get(&s, READY).reason, "SchemaMismatch");
        assert_eq!(get(&s, DEGRADED).reason, "SchemaMismatch");
        assert_eq!(get(&s, DEGRADED).message, "columns differ");
        // No replica was read: availability is unknown, not lost.
        expect(
            &s,
            [
                ("Ready", "False", "SchemaMismatch"),
                ("Available", "Unknown", "SchemaMismatch"),
                ("Progressing", "False", "Stable"),
                ("Degraded", "True", "SchemaMismatch"),
            ],
        );
        assert!(
            get(&s, AVAILABLE).message.starts_with("replicas not read"),
            "{}",
            get(&s, AVAILABLE).message
        );
        assert!(
            s.replica_statuses.is_empty(),
            "no replica is reported from a mismatched tree"
        );
    }

    #[test]
    fn rolling_update_and_pending_drops_are_progress() {
        let mut o = healthy();
        o.pods.updated = 1;
        assert_eq!(
            get(&compute(&o, &[], &t(1)), PROGRESSING).reason,
            "RollingUpdate"
        );
        o.pending_drops = vec!["events-3".into()];
        let s = compute(&o, &[], &t(1));
        assert_eq!(get(&s, PROGRESSING).reason, "ScalingDown");
        assert_eq!(get(&s, READY).status, "False");
    }

    #[test]
    fn a_held_scale_down_names_the_replica_and_its_missing_parts() {
        let mut o = healthy();
        o.desired_replicas = 2;
        o.scale_down_hold = Some(ScaleDownHold {
            kept: 3,
            why: HoldReason::PartsNotOnSurvivors {
                replica: "events-2".into(),
                missing: 4,
                total: 9,
                examples: vec!["all_3_3_0".into(), "all_4_4_0".into()],
            },
        });
        let s = compute(&o, &[], &t(1));
        let p = get(&s, PROGRESSING);
        assert_eq!(
            (p.status.as_str(), p.reason.as_str()),
            ("True", "ScalingDown")
        );
        assert_eq!(
            p.message,
            "keeping events-2 (3 pods, 2 desired): 4 of its 9 parts are not on a surviving \
             replica yet (all_3_3_0, all_4_4_0, ...); it is removed once they are fetched"
        );
        assert_eq!(get(&s, READY).reason, "ScalingDown");

        o.scale_down_hold = Some(ScaleDownHold {
            kept: 3,
            why: HoldReason::PartsUnreadable("connection loss".into()),
        });
        let s = compute(&o, &[], &t(1));
        assert!(get(&s, PROGRESSING).message.contains("connection loss"));
    }

    #[test]
    fn transition_time_only_moves_when_status_changes() {
        let first = compute(&healthy(), &[], &t(100));
        let same = compute(&healthy(), &first.conditions, &t(200));
        assert!(
            same.conditions
                .iter()
                .all(|c| c.last_transition_time == t(100))
        );
        assert!(transitions(&first.conditions, &same.conditions).is_empty());

        let mut o = healthy();
        o.tree = TreeObservation::Unavailable("down".into());
        let down = compute(&o, &same.conditions, &t(300));
        assert_eq!(get(&down, READY).last_transition_time, t(300));
        assert_eq!(get(&down, PROGRESSING).last_transition_time, t(100));
        let events = transitions(&same.conditions, &down.conditions);
        let kinds: Vec<_> = events
            .iter()
            .map(|e| (e.type_.as_str(), e.warning))
            .collect();
        assert_eq!(
            kinds,
            vec![("Ready", true), ("Available", true), ("Degraded", true)]
        );
    }

    #[test]
    fn sidecar_status_json_parses() {
        let s: SidecarStatus = serde_json::from_str(&sidecar_json(serde_json::json!({
            "replica_name": "events-0", "is_readonly": false, "is_session_expired": false,
            "readonly_reason": null, "queue_size": 3, "inserts_in_queue": 1, "log_max_index": 12,
            "log_pointer": null, "absolute_delay": 2, "total_replicas": 3, "active_replicas": null,
            "parts_count": 2, "parts": ["all_1_1_0", "all_2_2_0"], "rows": 1000, "bytes": 4096,
            "is_leader": true
        })))
        .expect("parses");
        assert_eq!(
            (
                s.queue_size,
                s.inserts_in_queue,
                s.absolute_delay,
                s.parts_count
            ),
            (3, 1, 2, 2)
        );
        assert_eq!((s.log_max_index, s.log_pointer), (Some(12), None));
        assert_eq!((s.total_replicas, s.active_replicas), (Some(3), None));
    }

    #[test]
    fn a_sidecar_answer_missing_a_field_is_refused_not_read_as_zero() {
        let mut v: serde_json::Value =
            serde_json::from_str(&sidecar_json(serde_json::json!({}))).expect("json");
        v.as_object_mut().expect("object").remove("queue_size");
        let err = serde_json::from_value::<SidecarStatus>(v).expect_err("strict");
        assert!(err.to_string().contains("queue_size"), "{err}");
    }
}
