//! The StatefulSet against its golden fixtures, and what may roll the pods.

use super::*;
use crate::build::fixtures;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

#[test]
fn statefulset_matches_fixture() {
    let rt = fixtures::table("table.yaml");
    fixtures::assert_golden(
        "statefulset.yaml",
        &stateful_set(&rt, &BuildConfig::default()),
    );
}

#[test]
fn statefulset_with_every_option_matches_fixture() {
    let rt = fixtures::table("table-full.yaml");
    fixtures::assert_golden(
        "statefulset-full.yaml",
        &stateful_set(&rt, &BuildConfig::default()),
    );
}

/// Only replicas, resources, image, `spec.pod` and the schema may change the StatefulSet; quorum
/// and dedup settings reach the sidecar through the ConfigMap and must not roll pods.
#[test]
fn only_replicas_resources_image_pod_settings_and_schema_change_the_statefulset() {
    let rt = fixtures::table("table.yaml");
    let cfg = BuildConfig::default();
    let base = stateful_set(&rt, &cfg);

    let mut quiet = rt.clone();
    quiet.spec.deduplication_window = 5;
    quiet.spec.insert_quorum_parallel = false;
    quiet.spec.insert_quorum = rtable_protocol::manifest::InsertQuorum::Replicas(3);
    quiet.spec.zookeeper.nodes.push("zk-9:2181".into());
    assert_eq!(stateful_set(&quiet, &cfg), base);

    let template = |s: &StatefulSet| s.spec.as_ref().map(|s| s.template.clone());
    let mut scaled = rt.clone();
    scaled.spec.replicas = 5;
    let s = stateful_set(&scaled, &cfg);
    assert_eq!(s.spec.as_ref().and_then(|s| s.replicas), Some(5));
    assert_eq!(template(&s), template(&base), "scaling must not roll pods");

    let mut image = rt.clone();
    image.spec.image = Some("rtable-sidecar:dev".into());
    assert_ne!(template(&stateful_set(&image, &cfg)), template(&base));

    let mut resources = rt.clone();
    resources.spec.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("1Gi".into()),
        )])),
        ..Default::default()
    });
    assert_ne!(template(&stateful_set(&resources, &cfg)), template(&base));

    let mut pod = rt.clone();
    pod.spec.pod = Some(crate::crd::PodSettings {
        priority_class_name: Some("rtable-critical".into()),
        ..Default::default()
    });
    assert_ne!(template(&stateful_set(&pod, &cfg)), template(&base));
}

/// Appending a column (or any change of `orderBy`/`partitionBy`) changes the pod
/// template's schema hash and nothing else, so the pods roll and every sidecar restarts
/// with the new definition.
#[test]
fn a_schema_change_rolls_the_pods_through_the_schema_hash_annotation() {
    let rt = fixtures::table("table.yaml");
    let cfg = BuildConfig::default();
    let base = stateful_set(&rt, &cfg);
    let annotations = |s: &StatefulSet| {
        s.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default()
    };
    let hash = annotations(&base)
        .get(SCHEMA_HASH_ANNOTATION)
        .cloned()
        .expect("schema hash annotation");
    assert_eq!(hash.len(), 32, "{hash}");
    assert_eq!(hash, schema_hash(&rt), "stable for the same spec");

    let mut appended = rt.clone();
    appended.spec.columns.push(crate::crd::ColumnDef {
        name: "extra".into(),
        ty: "Nullable(String)".parse().expect("type"),
    });
    let mut reordered = rt.clone();
    reordered.spec.order_by.reverse();
    let mut repartitioned = rt.clone();
    repartitioned.spec.partition_by = "".parse().expect("partition key");
    for (what, changed) in [
        ("a column appended", appended),
        ("orderBy", reordered),
        ("partitionBy", repartitioned),
    ] {
        let sts = stateful_set(&changed, &cfg);
        let new_hash = annotations(&sts)
            .get(SCHEMA_HASH_ANNOTATION)
            .cloned()
            .expect("annotation");
        assert_ne!(new_hash, hash, "{what} changes the hash");
        // Nothing but that annotation differs.
        let mut back = sts.clone();
        if let Some(meta) = back
            .spec
            .as_mut()
            .and_then(|s| s.template.metadata.as_mut())
        {
            meta.annotations
                .get_or_insert_with(Default::default)
                .insert(SCHEMA_HASH_ANNOTATION.to_string(), hash.clone());
        }
        assert_eq!(back, base, "{what} changes only the schema hash");
    }
}

#[test]
fn sidecar_command_expands_pod_references() {
    let rt = fixtures::table("table.yaml");
    let sts = stateful_set(&rt, &BuildConfig::default());
    let (argv, env) = sidecar_command(&sts, 2).expect("command");
    assert_eq!(
        argv,
        [
            "rtable-sidecar",
            "--table",
            "/etc/rtable/table.yaml",
            "--replica",
            "events-2",
            "--data-dir",
            "/var/lib/rtable",
            "--listen",
            "0.0.0.0:9009",
            "--advertise",
            "events-2.events-replicas.analytics.svc.cluster.local:9009",
            "--interserver-secret-file",
            "/etc/rtable/secret/interserver",
        ]
    );
    assert!(env.contains(&("POD_NAME".into(), "events-2".into())));
    assert!(env.contains(&("POD_NAMESPACE".into(), "analytics".into())));
    assert!(env.contains(&("RTABLE_LOG_FORMAT".into(), "json".into())));
}

#[test]
fn expansion_follows_kubelet_rules() {
    let env = vec![("A".to_string(), "x".to_string())];
    assert_eq!(expand("$(A)-$(B)-$$(A)-$", &env), "x-$(B)-$(A)-$");
    assert_eq!(expand("plain", &env), "plain");
}

/// The checks of the `restricted` Pod Security Standard (Kubernetes 1.35) that a pod
/// template can fail, each named as PodSecurity admission names it. Empty = admitted.
fn restricted_violations(template: &PodTemplateSpec) -> Vec<String> {
    let pod = template.spec.as_ref().expect("pod spec");
    let psc = pod.security_context.clone().unwrap_or_default();
    let mut found = Vec::new();
    let allowed_volume = |v: &Volume| {
        v.config_map.is_some()
            || v.secret.is_some()
            || v.projected.is_some()
            || v.empty_dir.is_some()
            || v.downward_api.is_some()
            || v.persistent_volume_claim.is_some()
            || v.ephemeral.is_some()
            || v.csi.is_some()
    };
    for v in pod.volumes.iter().flatten() {
        if !allowed_volume(v) {
            found.push(format!("restricted volume types ({})", v.name));
        }
    }
    if psc.run_as_non_root == Some(false) {
        found.push("runAsNonRoot != true (pod)".into());
    }
    if psc.run_as_user == Some(0) {
        found.push("runAsUser=0 (pod)".into());
    }
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    for c in &pod.containers {
        let sc = c.security_context.clone().unwrap_or_default();
        if sc.privileged == Some(true) {
            found.push(format!("privileged ({})", c.name));
        }
        if sc.allow_privilege_escalation != Some(false) {
            found.push(format!("allowPrivilegeEscalation != false ({})", c.name));
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.iter().flatten().any(|d| d == "ALL") {
            found.push(format!("unrestricted capabilities: drop ALL ({})", c.name));
        }
        if caps.add.iter().flatten().any(|a| a != "NET_BIND_SERVICE") {
            found.push(format!("unrestricted capabilities: add ({})", c.name));
        }
        match sc.run_as_non_root.or(psc.run_as_non_root) {
            Some(true) if sc.run_as_non_root != Some(false) => {}
            _ => found.push(format!("runAsNonRoot != true ({})", c.name)),
        }
        if sc.run_as_user == Some(0) {
            found.push(format!("runAsUser=0 ({})", c.name));
        }
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .map(|p| p.type_.as_str())
            .or(pod_seccomp);
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            found.push(format!("seccompProfile ({})", c.name));
        }
        if c.ports.iter().flatten().any(|p| p.host_port.is_some()) {
            found.push(format!("hostPort ({})", c.name));
        }
    }
    found
}

/// Both fixtures' pods (the sidecar alone, and with a user container and every pod
/// setting) pass the `restricted` Pod Security Standard without any override; a pod-level
/// `runAsNonRoot: false` is what fails it.
#[test]
fn replica_pods_are_restricted_by_default() {
    let template = |rt: &crate::crd::ReplicatedTable| {
        stateful_set(rt, &BuildConfig::default())
            .spec
            .expect("spec")
            .template
    };
    for file in ["table.yaml", "table-full.yaml"] {
        let rt = fixtures::table(file);
        assert_eq!(
            restricted_violations(&template(&rt)),
            Vec::<String>::new(),
            "{file}"
        );
    }
    let mut rt = fixtures::table("table.yaml");
    rt.spec.pod = Some(crate::crd::PodSettings {
        security_context: Some(k8s_openapi::api::core::v1::PodSecurityContext {
            run_as_non_root: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    });
    let violations = restricted_violations(&template(&rt));
    assert!(
        violations.iter().any(|v| v.contains("runAsNonRoot")),
        "{violations:?}"
    );
}

/// The labels and annotations the builder puts on a pod are exactly the keys `spec.pod`
/// may not set, so the reserved lists cannot fall behind the builder.
#[test]
fn reserved_pod_keys_are_the_ones_the_builder_sets() {
    let rt = fixtures::table("table.yaml");
    let meta = stateful_set(&rt, &BuildConfig::default())
        .spec
        .and_then(|s| s.template.metadata)
        .expect("template metadata");
    let keys = |m: Option<BTreeMap<String, String>>| {
        let mut k: Vec<String> = m.unwrap_or_default().into_keys().collect();
        k.sort();
        k
    };
    let sorted = |list: &[&str]| {
        let mut k: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        k.sort();
        k
    };
    assert_eq!(keys(meta.labels), sorted(&crate::crd::RESERVED_POD_LABELS));
    assert_eq!(
        keys(meta.annotations),
        sorted(&crate::crd::RESERVED_POD_ANNOTATIONS)
    );
}
