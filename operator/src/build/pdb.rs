//! The PodDisruptionBudget: voluntary evictions (drains, upgrades) may take down at most
//! `replicas - quorum` replicas, so quorum inserts keep succeeding through a drain, and
//! never fewer than one, so a drain always finishes.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{Names, owned_meta};
use crate::crd::{ReplicatedTable, selector_labels};

/// How many replicas may be evicted at once: `max(1, replicas - quorum)`.
///
/// When `replicas > quorum`, that many leave `quorum` replicas running, so quorum inserts
/// keep succeeding through a drain. When the quorum needs every replica (1 replica, 2 with
/// `auto`, or `insertQuorum == replicas`), one replica may still go: a budget of 0 would
/// block every node drain and cluster upgrade until someone edits the table, whereas one
/// evicted replica only makes the sidecars refuse quorum inserts (503, too few live
/// replicas) until its pod is back, which the same replica crashing would do anyway.
pub fn max_unavailable(replicas: u32, quorum: u32) -> u32 {
    replicas.saturating_sub(quorum).max(1)
}

pub fn pod_disruption_budget(rt: &ReplicatedTable) -> PodDisruptionBudget {
    let replicas = u32::try_from(rt.spec.replicas).unwrap_or(0);
    let allowed = max_unavailable(replicas, rt.spec.quorum());
    PodDisruptionBudget {
        metadata: owned_meta(rt, &Names::of(rt).pdb),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(i32::try_from(allowed).unwrap_or(0))),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&rt.name_any())),
                ..LabelSelector::default()
            }),
            // An unready replica does not count towards the quorum anyway; letting it be
            // evicted keeps a broken pod from blocking a node drain.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".to_string()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;
    use rtable_protocol::manifest::{AutoQuorum, InsertQuorum};

    #[test]
    fn pdb_matches_fixture() {
        let rt = fixtures::table("table.yaml");
        fixtures::assert_golden("pdb.yaml", &pod_disruption_budget(&rt));
    }

    /// For every replicas/quorum pair the CRD allows: a drain can always evict a replica;
    /// when the quorum leaves room, evicting the allowed number still leaves a quorum of
    /// replicas and evicting one more would not; when it does not, exactly one may go.
    #[test]
    fn pdb_maths_for_every_replicas_quorum_pair() {
        // Every count the CRD allows (1..=64) with every explicit quorum and `auto`.
        for replicas in 1..=64u32 {
            let mut quorums: Vec<InsertQuorum> =
                (1..=replicas).map(InsertQuorum::Replicas).collect();
            quorums.push(InsertQuorum::Auto(AutoQuorum::Auto));
            for q in quorums {
                let quorum = q.required(replicas);
                let allowed = max_unavailable(replicas, quorum);
                assert!(allowed >= 1, "{replicas}/{q:?} blocks every drain");
                if replicas > quorum {
                    assert!(replicas - allowed >= quorum, "{replicas}/{q:?}");
                    assert!(
                        replicas - allowed < quorum + 1,
                        "{replicas}/{q:?} is needlessly strict"
                    );
                } else {
                    assert_eq!(allowed, 1, "{replicas}/{q:?}: one at a time");
                }
            }
        }
        let auto = |r| InsertQuorum::Auto(AutoQuorum::Auto).required(r);
        assert_eq!(max_unavailable(3, 2), 1);
        assert_eq!(max_unavailable(3, 3), 1);
        assert_eq!(max_unavailable(5, auto(5)), 2);
        assert_eq!(max_unavailable(1, auto(1)), 1);
        assert_eq!(max_unavailable(2, auto(2)), 1);
        assert_eq!(max_unavailable(2, 1), 1);
        assert_eq!(max_unavailable(64, 1), 63);
    }

    #[test]
    fn pdb_follows_the_spec_and_never_blocks_a_drain() {
        let allowed = |replicas: i32, quorum: InsertQuorum| {
            let mut rt = fixtures::table("table.yaml");
            rt.spec.replicas = replicas;
            rt.spec.insert_quorum = quorum;
            pod_disruption_budget(&rt)
                .spec
                .and_then(|s| s.max_unavailable)
        };
        let auto = InsertQuorum::Auto(AutoQuorum::Auto);
        assert_eq!(
            allowed(5, InsertQuorum::Replicas(5)),
            Some(IntOrString::Int(1))
        );
        assert_eq!(
            allowed(5, InsertQuorum::Replicas(2)),
            Some(IntOrString::Int(3))
        );
        assert_eq!(allowed(1, auto), Some(IntOrString::Int(1)));
        assert_eq!(allowed(2, auto), Some(IntOrString::Int(1)));
    }
}
