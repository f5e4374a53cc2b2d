//! The PodDisruptionBudget: voluntary evictions (drains, upgrades) may take down at most
//! `replicas - quorum` replicas, so quorum inserts keep succeeding through a drain.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{Names, owned_meta};
use crate::crd::{ReplicatedTable, selector_labels};

/// How many replicas may be evicted at once without dropping below the insert quorum.
/// Zero when the quorum needs every replica: then a drain waits for a scale-up or a
/// lower quorum instead of failing inserts.
pub fn max_unavailable(replicas: u32, quorum: u32) -> u32 {
    replicas.saturating_sub(quorum)
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

    /// For every replicas/quorum pair: evicting the allowed number still leaves a quorum of
    /// healthy replicas, and evicting one more would not.
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
                assert!(replicas - allowed >= quorum, "{replicas}/{q:?}");
                assert!(
                    replicas - allowed < quorum + 1,
                    "{replicas}/{q:?} is needlessly strict"
                );
            }
        }
        assert_eq!(max_unavailable(3, 2), 1);
        assert_eq!(max_unavailable(3, 3), 0);
        assert_eq!(
            max_unavailable(5, InsertQuorum::Auto(AutoQuorum::Auto).required(5)),
            2
        );
        assert_eq!(max_unavailable(1, 1), 0);
    }

    #[test]
    fn pdb_follows_the_spec() {
        let mut rt = fixtures::table("table.yaml");
        rt.spec.replicas = 5;
        rt.spec.insert_quorum = InsertQuorum::Replicas(5);
        let pdb = pod_disruption_budget(&rt);
        assert_eq!(
            pdb.spec.and_then(|s| s.max_unavailable),
            Some(IntOrString::Int(0))
        );
    }
}
