//! Which changes of a table call for a reconcile.
//!
//! Its spec (the generation), its finalizers and its deletion do. Its status does not: the
//! operator writes the status itself at the end of every reconcile, and under an insert
//! load that status differs every time (parts, log pointers, delays), so reacting to it
//! would reconcile in a loop, each round costing API writes, ZooKeeper reads and sidecar
//! calls. Status is refreshed by the periodic requeue instead; changes of the objects the
//! table owns (a StatefulSet's pods becoming ready) still trigger through `owns`.

use std::hash::{DefaultHasher, Hash, Hasher};

use kube::Resource;

/// A hash of what a reconcile must react to; equal hashes are filtered out by
/// `predicate_filter`.
pub fn relevant_change<K: Resource>(obj: &K) -> Option<u64> {
    let meta = obj.meta();
    let mut h = DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.finalizers.hash(&mut h);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut h);
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn only_spec_finalizer_and_deletion_changes_count() {
        let mut a = ConfigMap::default();
        a.metadata.generation = Some(1);
        a.metadata.resource_version = Some("10".into());
        let base = relevant_change(&a);
        let mut status_write = a.clone();
        status_write.metadata.resource_version = Some("11".into());
        assert_eq!(relevant_change(&status_write), base);
        let mut edited = a.clone();
        edited.metadata.generation = Some(2);
        assert_ne!(relevant_change(&edited), base);
        let mut finalized = a.clone();
        finalized.metadata.finalizers = Some(vec!["rtable.io/cleanup".into()]);
        assert_ne!(relevant_change(&finalized), base);
        let mut deleted = a.clone();
        deleted.metadata.deletion_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(100).expect("time"),
        ));
        assert_ne!(relevant_change(&deleted), base);
    }
}
