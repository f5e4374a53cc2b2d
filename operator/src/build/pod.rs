//! What every replica pod gets besides its containers' commands: the security contexts
//! (the `restricted` Pod Security Standard by default), the sidecar's default resources,
//! and the user's `spec.pod` settings. Pure functions of the spec.
//!
//! Invariant: with no overrides, a replica pod passes the `restricted` Pod Security
//! Standard, and the labels that select it are the operator's alone (user labels and
//! annotations are added, never allowed to replace the operator's; `validate` refuses the
//! reserved keys before a build).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecurityContext, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::PodSettings;

/// The uid, gid and fsGroup of every replica pod: fixed, so the data volume's group
/// ownership is predictable across restarts and image changes (volumes written by earlier
/// operator versions are owned by it too).
pub const POD_UID: i64 = 10001;

/// The pod-level security context: the defaults, then every field `user` sets.
pub fn pod_security_context(user: Option<&PodSecurityContext>) -> PodSecurityContext {
    let d = PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(POD_UID),
        run_as_group: Some(POD_UID),
        fs_group: Some(POD_UID),
        // Only when the volume's root is not owned yet: a recursive chown of many parts at
        // every start would delay the replica.
        fs_group_change_policy: Some("OnRootMismatch".to_string()),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    };
    let Some(u) = user.cloned() else {
        return d;
    };
    // Every field listed, so a field a newer Kubernetes adds fails to compile here
    // instead of being dropped silently.
    PodSecurityContext {
        app_armor_profile: u.app_armor_profile.or(d.app_armor_profile),
        fs_group: u.fs_group.or(d.fs_group),
        fs_group_change_policy: u.fs_group_change_policy.or(d.fs_group_change_policy),
        run_as_group: u.run_as_group.or(d.run_as_group),
        run_as_non_root: u.run_as_non_root.or(d.run_as_non_root),
        run_as_user: u.run_as_user.or(d.run_as_user),
        se_linux_change_policy: u.se_linux_change_policy.or(d.se_linux_change_policy),
        se_linux_options: u.se_linux_options.or(d.se_linux_options),
        seccomp_profile: u.seccomp_profile.or(d.seccomp_profile),
        supplemental_groups: u.supplemental_groups.or(d.supplemental_groups),
        supplemental_groups_policy: u
            .supplemental_groups_policy
            .or(d.supplemental_groups_policy),
        sysctls: u.sysctls.or(d.sysctls),
        windows_options: u.windows_options.or(d.windows_options),
    }
}

/// A container's security context: no privilege escalation, every capability dropped
/// (what `restricted` asks of each container; non-root and seccomp come from the pod),
/// a read-only root filesystem when `read_only_root`, then every field `user` sets.
pub fn container_security_context(
    read_only_root: bool,
    user: Option<&SecurityContext>,
) -> SecurityContext {
    let d = SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        read_only_root_filesystem: read_only_root.then_some(true),
        ..SecurityContext::default()
    };
    let Some(u) = user.cloned() else {
        return d;
    };
    SecurityContext {
        allow_privilege_escalation: u
            .allow_privilege_escalation
            .or(d.allow_privilege_escalation),
        app_armor_profile: u.app_armor_profile.or(d.app_armor_profile),
        capabilities: u.capabilities.or(d.capabilities),
        privileged: u.privileged.or(d.privileged),
        proc_mount: u.proc_mount.or(d.proc_mount),
        read_only_root_filesystem: u.read_only_root_filesystem.or(d.read_only_root_filesystem),
        run_as_group: u.run_as_group.or(d.run_as_group),
        run_as_non_root: u.run_as_non_root.or(d.run_as_non_root),
        run_as_user: u.run_as_user.or(d.run_as_user),
        se_linux_options: u.se_linux_options.or(d.se_linux_options),
        seccomp_profile: u.seccomp_profile.or(d.seccomp_profile),
        windows_options: u.windows_options.or(d.windows_options),
    }
}

/// The sidecar's resources: the user's when set (`{}` included: no requests at all),
/// otherwise requests of 100m CPU and 128Mi memory and a 1Gi memory limit, so the pod is
/// Burstable. The sidecar idles at about 12 MiB and peaked at 105 MiB under many small
/// concurrent inserts (BENCHMARKS.md), hence the 128Mi request. A single insert holds its
/// whole body (up to `--max-body-bytes`, 256 MiB) plus its columns and encoded part: a
/// 349 MiB CSV insert peaked at 1179 MiB, about 3.4 times the body, so 256 MiB needs about
/// 870 MiB and a 1Gi limit keeps the largest accepted insert from being OOM-killed. No CPU
/// limit: throttling only adds latency to inserts and fetches.
pub fn sidecar_resources(user: Option<&ResourceRequirements>) -> ResourceRequirements {
    if let Some(user) = user {
        return user.clone();
    }
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("100m")),
            ("memory".to_string(), q("128Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), q("1Gi"))])),
        claims: None,
    }
}

/// Adds the user's labels and annotations to the pod template's: the operator's own keys
/// win (validation refuses them before a build, this keeps the selector intact anyway).
pub fn add_metadata(meta: &mut ObjectMeta, settings: &PodSettings) {
    for (field, user) in [
        (&mut meta.labels, &settings.labels),
        (&mut meta.annotations, &settings.annotations),
    ] {
        if user.is_empty() {
            continue;
        }
        let map = field.get_or_insert_with(BTreeMap::new);
        for (k, v) in user {
            map.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

/// Sets the scheduling, pull and priority fields of `spec.pod` on the pod spec;
/// `default_spread` stays unless the user gives topology spread constraints of their own.
pub fn apply_scheduling(
    pod: &mut PodSpec,
    settings: &PodSettings,
    default_spread: Vec<TopologySpreadConstraint>,
) {
    pod.image_pull_secrets = non_empty(&settings.image_pull_secrets);
    pod.tolerations = non_empty(&settings.tolerations);
    pod.node_selector =
        (!settings.node_selector.is_empty()).then(|| settings.node_selector.clone());
    pod.affinity = settings.affinity.clone();
    pod.priority_class_name = settings.priority_class_name.clone();
    pod.topology_spread_constraints = match &settings.topology_spread_constraints {
        Some(own) => non_empty(own),
        None => Some(default_spread),
    };
}

fn non_empty<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_restricted_and_overrides_replace_only_their_fields() {
        let d = pod_security_context(None);
        assert_eq!(d.run_as_non_root, Some(true));
        assert_eq!(
            (d.run_as_user, d.run_as_group, d.fs_group),
            (Some(POD_UID), Some(POD_UID), Some(POD_UID))
        );
        assert_eq!(
            d.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        let user = PodSecurityContext {
            run_as_user: Some(1000),
            supplemental_groups: Some(vec![5]),
            ..PodSecurityContext::default()
        };
        let merged = pod_security_context(Some(&user));
        assert_eq!(merged.run_as_user, Some(1000));
        assert_eq!(merged.supplemental_groups, Some(vec![5]));
        assert_eq!(merged.run_as_non_root, Some(true));
        assert_eq!(merged.seccomp_profile, d.seccomp_profile);
        assert_eq!(
            pod_security_context(Some(&PodSecurityContext::default())),
            d
        );

        let c = container_security_context(true, None);
        assert_eq!(c.allow_privilege_escalation, Some(false));
        assert_eq!(c.read_only_root_filesystem, Some(true));
        assert_eq!(
            c.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            container_security_context(false, None).read_only_root_filesystem,
            None
        );
        let own = SecurityContext {
            run_as_user: Some(0),
            ..SecurityContext::default()
        };
        let merged = container_security_context(false, Some(&own));
        assert_eq!(merged.run_as_user, Some(0));
        assert_eq!(merged.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn the_sidecar_is_burstable_unless_resources_are_set() {
        let r = sidecar_resources(None);
        let requests = r.requests.expect("requests");
        assert_eq!(requests["cpu"], Quantity("100m".into()));
        assert_eq!(requests["memory"], Quantity("128Mi".into()));
        let limits = r.limits.expect("limits");
        assert_eq!(limits["memory"], Quantity("1Gi".into()));
        assert!(!limits.contains_key("cpu"), "no CPU limit");
        let none = ResourceRequirements::default();
        assert_eq!(sidecar_resources(Some(&none)), none, "`{{}}` means none");
    }

    #[test]
    fn user_metadata_never_replaces_the_operators() {
        let mut meta = ObjectMeta {
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".into(),
                "rtable".into(),
            )])),
            ..ObjectMeta::default()
        };
        let settings = PodSettings {
            labels: BTreeMap::from([
                ("app.kubernetes.io/name".into(), "other".into()),
                ("team".into(), "data".into()),
            ]),
            annotations: BTreeMap::from([("a".into(), "b".into())]),
            ..PodSettings::default()
        };
        add_metadata(&mut meta, &settings);
        let labels = meta.labels.expect("labels");
        assert_eq!(labels["app.kubernetes.io/name"], "rtable");
        assert_eq!(labels["team"], "data");
        assert_eq!(meta.annotations.expect("annotations")["a"], "b");
    }

    #[test]
    fn own_spread_constraints_replace_the_default_and_empty_turns_it_off() {
        let default = vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            ..TopologySpreadConstraint::default()
        }];
        let mut pod = PodSpec::default();
        apply_scheduling(&mut pod, &PodSettings::default(), default.clone());
        assert_eq!(pod.topology_spread_constraints, Some(default.clone()));
        assert_eq!(pod.tolerations, None);
        let zone = TopologySpreadConstraint {
            topology_key: "topology.kubernetes.io/zone".into(),
            ..default[0].clone()
        };
        let own = PodSettings {
            topology_spread_constraints: Some(vec![zone.clone()]),
            ..PodSettings::default()
        };
        apply_scheduling(&mut pod, &own, default.clone());
        assert_eq!(pod.topology_spread_constraints, Some(vec![zone]));
        let off = PodSettings {
            topology_spread_constraints: Some(vec![]),
            ..PodSettings::default()
        };
        apply_scheduling(&mut pod, &off, default);
        assert_eq!(pod.topology_spread_constraints, None);
    }
}
