//! Scale-down that never loses an acknowledged insert.
//!
//! The StatefulSet removes the highest ordinals first, and with
//! `persistentVolumeClaimRetentionPolicy.whenScaled: Delete` a removed pod's volume goes with
//! it. That volume may hold the only copy of a part the other replicas have not fetched yet
//! (an insert acknowledged by that replica a moment ago, a merge only it has done). So the
//! StatefulSet only shrinks as far as every removed replica's parts (`replicas/<name>/parts`
//! in ZooKeeper, where every acknowledged insert and every fetch registers its part) are
//! held by a surviving replica, as such or merged into a covering part.
//!
//! [`decide`] is the pure rule; [`plan`] reads what it needs through the [`Backend`].

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::{Api, Client};
use rtable_protocol::PartName;

use crate::backend::{Backend, ZkTarget};
use crate::build::Names;
use crate::error::{Error, kube_err};
use crate::status::{HoldReason, ScaleDownHold};

/// How many part names a hold's status message lists.
const EXAMPLES: usize = 3;

/// One registered replica of the table: its StatefulSet ordinal and its parts as listed
/// under `replicas/<name>/parts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaParts {
    pub ordinal: u32,
    pub name: String,
    pub parts: Vec<String>,
}

/// How many pods the StatefulSet may have now, and what keeps it from having fewer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub replicas: u32,
    pub blocker: Option<Blocker>,
}

/// The highest ordinal that must stay: the parts of it no survivor holds (sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    pub replica: String,
    pub uncovered: Vec<String>,
    /// How many parts it has in all.
    pub total: usize,
}

/// The parts of the replicas that stay (ordinals below the desired count).
struct Survivors<'a> {
    names: HashSet<&'a str>,
    by_partition: HashMap<String, Vec<PartName>>,
}

impl<'a> Survivors<'a> {
    fn of(replicas: impl Iterator<Item = &'a ReplicaParts>) -> Self {
        let mut names = HashSet::new();
        let mut by_partition: HashMap<String, Vec<PartName>> = HashMap::new();
        for part in replicas.flat_map(|r| r.parts.iter()) {
            names.insert(part.as_str());
            // A name that does not parse can still match exactly; it covers nothing else.
            if let Ok(p) = PartName::parse(part) {
                by_partition
                    .entry(p.partition_id.clone())
                    .or_default()
                    .push(p);
            }
        }
        Survivors {
            names,
            by_partition,
        }
    }

    /// Whether a survivor holds `part` or a part covering it. Only one part is asked to
    /// cover it: data spread over several survivor parts (the sources of a merge only the
    /// removed replica has done) does not count, the survivors will fetch or do the merge.
    fn cover(&self, part: &str) -> bool {
        if self.names.contains(part) {
            return true;
        }
        let Ok(p) = PartName::parse(part) else {
            return false;
        };
        self.by_partition
            .get(&p.partition_id)
            .is_some_and(|held| held.iter().any(|h| h.contains(&p)))
    }
}

/// The StatefulSet's replica count for a table with `desired` replicas whose StatefulSet
/// has `current`: the StatefulSet removes the highest ordinal first, so walk down from
/// `current - 1` and let an ordinal go only when a survivor (ordinal < `desired`) holds each
/// of its parts or a covering part; the first one that may not stays, and every ordinal
/// below it. An ordinal with no registered replica holds nothing acknowledged and may go.
/// Never below `desired`, never above `current`; a scale-up (or no change) is `desired`.
pub fn decide(desired: u32, current: u32, replicas: &[ReplicaParts]) -> Decision {
    let unblocked = Decision {
        replicas: desired,
        blocker: None,
    };
    if desired >= current {
        return unblocked;
    }
    let survivors = Survivors::of(replicas.iter().filter(|r| r.ordinal < desired));
    for ordinal in (desired..current).rev() {
        for r in replicas.iter().filter(|r| r.ordinal == ordinal) {
            let mut uncovered: Vec<String> = r
                .parts
                .iter()
                .filter(|p| !survivors.cover(p))
                .cloned()
                .collect();
            if !uncovered.is_empty() {
                uncovered.sort();
                return Decision {
                    replicas: ordinal + 1,
                    blocker: Some(Blocker {
                        replica: r.name.clone(),
                        uncovered,
                        total: r.parts.len(),
                    }),
                };
            }
        }
    }
    unblocked
}

/// The replica count reconcile applies to the StatefulSet, and why it is above the desired
/// one when it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub replicas: u32,
    pub hold: Option<ScaleDownHold>,
}

/// Reads the parts of ordinals `0..current` and [`decide`]s. `target` is the table's
/// ensemble, or why it cannot be reached (no credentials): a scale-down that cannot be
/// checked keeps every pod, since shrinking blind is what loses data.
pub async fn plan(
    backend: &dyn Backend,
    target: Result<&ZkTarget, &str>,
    table_path: &str,
    names: &Names,
    desired: u32,
    current: Option<u32>,
) -> Plan {
    let table = names.statefulset.as_str();
    let Some(current) = current.filter(|c| *c > desired) else {
        return Plan {
            replicas: desired,
            hold: None,
        };
    };
    let unreadable = |why: String| {
        tracing::warn!(
            table,
            desired,
            current,
            reason = %why,
            "scale-down held: cannot read the replicas' parts"
        );
        Plan {
            replicas: current,
            hold: Some(ScaleDownHold {
                kept: current,
                why: HoldReason::PartsUnreadable(why),
            }),
        }
    };
    let target = match target {
        Ok(t) => t,
        Err(why) => return unreadable(why.to_string()),
    };
    let reads = (0..current).map(|ordinal| async move {
        let name = names.pod(ordinal);
        let parts = backend.parts(target, table_path, &name).await?;
        Ok::<_, rtable_protocol::tree::TreeError>(ReplicaParts {
            ordinal,
            name,
            parts,
        })
    });
    let replicas = match futures::future::try_join_all(reads).await {
        Ok(r) => r,
        Err(e) => return unreadable(e.to_string()),
    };
    let decision = decide(desired, current, &replicas);
    let Some(blocker) = decision.blocker else {
        tracing::info!(
            table,
            from = current,
            to = decision.replicas,
            "scale-down: every removed replica's parts are on a survivor"
        );
        return Plan {
            replicas: decision.replicas,
            hold: None,
        };
    };
    tracing::info!(
        table,
        replica = %blocker.replica,
        desired,
        kept = decision.replicas,
        missing = blocker.uncovered.len(),
        first = %blocker.uncovered[0],
        "scale-down held: the replica has parts no survivor holds yet"
    );
    Plan {
        replicas: decision.replicas,
        hold: Some(ScaleDownHold {
            kept: decision.replicas,
            why: HoldReason::PartsNotOnSurvivors {
                replica: blocker.replica,
                missing: blocker.uncovered.len(),
                total: blocker.total,
                examples: blocker.uncovered.into_iter().take(EXAMPLES).collect(),
            },
        }),
    }
}

/// The replica count of the StatefulSet as it is now (`spec.replicas`, which Kubernetes
/// defaults to 1), `None` before it exists.
pub async fn current_replicas(client: &Client, ns: &str, name: &str) -> Result<Option<u32>, Error> {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let sts = api
        .get_opt(name)
        .await
        .map_err(kube_err(format!("get statefulset {name}")))?;
    Ok(sts.map(|s| {
        let n = s.spec.and_then(|spec| spec.replicas).unwrap_or(1);
        u32::try_from(n).unwrap_or(0)
    }))
}

/// Sets the built StatefulSet's replica count to the planned one (the builder stays a pure
/// function of the spec).
pub fn limit(sts: &mut StatefulSet, replicas: u32) {
    if let Some(spec) = sts.spec.as_mut() {
        spec.replicas = Some(i32::try_from(replicas).unwrap_or(i32::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(ordinal: u32, parts: &[&str]) -> ReplicaParts {
        ReplicaParts {
            ordinal,
            name: format!("events-{ordinal}"),
            parts: parts.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn kept(d: &Decision) -> (u32, Option<&str>, Vec<&str>) {
        (
            d.replicas,
            d.blocker.as_ref().map(|b| b.replica.as_str()),
            d.blocker
                .as_ref()
                .map(|b| b.uncovered.iter().map(String::as_str).collect())
                .unwrap_or_default(),
        )
    }

    #[test]
    fn a_replica_whose_parts_are_all_on_a_survivor_goes() {
        let r = [
            replica(0, &["all_1_1_0", "all_2_2_0"]),
            replica(1, &["all_1_1_0"]),
            replica(2, &["all_1_1_0", "all_2_2_0"]),
        ];
        assert_eq!(kept(&decide(2, 3, &r)), (2, None, vec![]));
    }

    #[test]
    fn a_part_only_the_removed_replica_has_keeps_it() {
        let r = [
            replica(0, &["all_1_1_0"]),
            replica(1, &["all_1_1_0"]),
            replica(2, &["all_1_1_0", "all_3_3_0", "all_2_2_0"]),
        ];
        let d = decide(2, 3, &r);
        assert_eq!(
            kept(&d),
            (3, Some("events-2"), vec!["all_2_2_0", "all_3_3_0"])
        );
        assert_eq!(d.blocker.map(|b| b.total), Some(3));
    }

    #[test]
    fn a_covering_merged_part_on_a_survivor_counts() {
        let r = [
            replica(0, &["all_1_3_1"]),
            replica(1, &[]),
            replica(2, &["all_1_1_0", "all_2_2_0", "all_3_3_0"]),
        ];
        assert_eq!(kept(&decide(2, 3, &r)), (2, None, vec![]));
        // A mutated part covers its source; another partition or a wider range does not.
        let r = [
            replica(0, &["all_1_1_0_5", "2024_1_1_0"]),
            replica(1, &["all_2_3_1"]),
            replica(2, &["all_1_1_0", "all_1_4_1", "other_1_1_0"]),
        ];
        assert_eq!(
            kept(&decide(2, 3, &r)),
            (3, Some("events-2"), vec!["all_1_4_1", "other_1_1_0"])
        );
    }

    #[test]
    fn a_merge_only_the_removed_replica_did_keeps_it_until_a_survivor_has_it() {
        // The survivors hold the sources, not one part covering the merged one.
        let r = [
            replica(0, &["all_1_1_0", "all_2_2_0"]),
            replica(1, &["all_1_1_0", "all_2_2_0"]),
            replica(2, &["all_1_2_1"]),
        ];
        assert_eq!(
            kept(&decide(2, 3, &r)),
            (3, Some("events-2"), vec!["all_1_2_1"])
        );
    }

    #[test]
    fn the_walk_stops_at_the_first_ordinal_that_must_stay() {
        // 5 -> 1: events-4 and events-3 may go, events-2 may not; events-1 keeps its
        // place below it even though its parts are on events-0.
        let r = [
            replica(0, &["all_1_1_0"]),
            replica(1, &["all_1_1_0"]),
            replica(2, &["all_2_2_0"]),
            replica(3, &["all_1_1_0"]),
            replica(4, &[]),
        ];
        assert_eq!(
            kept(&decide(1, 5, &r)),
            (3, Some("events-2"), vec!["all_2_2_0"])
        );
        // Only the survivors (ordinal < desired) count: events-3 holding events-4's part
        // does not let events-4 go, since events-3 goes too.
        let r = [
            replica(0, &[]),
            replica(1, &[]),
            replica(2, &["all_2_2_0"]),
            replica(3, &["all_2_2_0"]),
        ];
        assert_eq!(
            kept(&decide(2, 4, &r)),
            (4, Some("events-3"), vec!["all_2_2_0"])
        );
    }

    #[test]
    fn unregistered_ordinals_and_empty_replicas_go() {
        let r = [replica(0, &["all_1_1_0"]), replica(2, &[])];
        assert_eq!(kept(&decide(1, 4, &r)), (1, None, vec![]));
    }

    #[test]
    fn never_below_desired_nor_above_current() {
        let r = [
            replica(0, &[]),
            replica(1, &["all_8_8_0"]),
            replica(2, &["all_9_9_0"]),
            replica(5, &["all_7_7_0"]),
        ];
        // A scale-up or no change is the desired count, whatever the parts.
        assert_eq!(kept(&decide(3, 3, &r)), (3, None, vec![]));
        assert_eq!(kept(&decide(5, 3, &r)), (5, None, vec![]));
        // events-5 is past the current count (already removed): not looked at.
        assert_eq!(
            kept(&decide(2, 3, &r)),
            (3, Some("events-2"), vec!["all_9_9_0"])
        );
        // events-1 is not looked at either: it survives.
        assert_eq!(kept(&decide(2, 2, &r)), (2, None, vec![]));
    }

    #[test]
    fn a_name_that_does_not_parse_is_covered_only_by_itself() {
        let r = [
            replica(0, &["tmp_weird", "all_1_5_2"]),
            replica(1, &["tmp_weird", "garbage"]),
        ];
        assert_eq!(
            kept(&decide(1, 2, &r)),
            (2, Some("events-1"), vec!["garbage"])
        );
    }
}
