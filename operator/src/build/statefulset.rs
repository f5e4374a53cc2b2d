//! The StatefulSet: one pod per replica, each with the sidecar, its volume and optionally
//! the user's container. The pod template only depends on what should roll the pods
//! (image, resources, the user container, `spec.pod`, the ZooKeeper chroot and auth, and
//! the table's schema through [`SCHEMA_HASH_ANNOTATION`]); everything else reaches the
//! sidecar through the ConfigMap. Security contexts, default resources and `spec.pod`
//! come from [`super::pod`].

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    ConfigMapProjection, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec,
    PodTemplateSpec, Probe, ProjectedVolumeSource, SecretProjection, TopologySpreadConstraint,
    Volume, VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::pod::{
    add_metadata, apply_scheduling, container_security_context, pod_security_context,
    sidecar_resources,
};
use super::{
    BuildConfig, CONFIG_DIR, DATA_DIR, INTERSERVER_KEY, Names, SIDECAR_CONTAINER, SIDECAR_PORT,
    SIDECAR_PORT_NAME, TABLE_KEY, owned_meta, string_map,
};
use crate::crd::{HttpSecurity, ReplicatedTable, UserContainer, selector_labels};

const DATA_VOLUME: &str = "data";
const CONFIG_VOLUME: &str = "config";
/// Path of the ZooKeeper digest credentials inside the config volume.
const ZK_AUTH_FILE: &str = "zookeeper-auth/digest";
/// Paths of the ZooKeeper TLS files inside the config volume (cert-manager's key names).
const ZK_TLS_CA_FILE: &str = "zookeeper-tls/ca.crt";
const ZK_TLS_CERT_FILE: &str = "zookeeper-tls/tls.crt";
const ZK_TLS_KEY_FILE: &str = "zookeeper-tls/tls.key";
/// The interserver listener's port when `spec.security` is set (ClickHouse's
/// `interserver_http_port`); clients stay on `SIDECAR_PORT`.
pub const INTERSERVER_PORT: i32 = 9010;
const INTERSERVER_PORT_NAME: &str = "interserver";
const USERS_FILE: &str = "users/users.yaml";
const HTTP_TLS_DIR: &str = "tls";

/// Pod-template annotation holding [`schema_hash`]: a schema change (a column appended)
/// changes the template, so the StatefulSet rolls the pods and every sidecar restarts with
/// the new definition (a sidecar reads its table definition once, at start).
pub const SCHEMA_HASH_ANNOTATION: &str = "rtable.io/schema-hash";

/// XXH3-128 (hex) of the table definition the sidecar applies at start: `columns`,
/// `orderBy` and `partitionBy`, in the text of the tree's `columns` node plus the keys.
pub fn schema_hash(rt: &ReplicatedTable) -> String {
    let spec = &rt.spec;
    let columns: Vec<rtable_protocol::Column> = spec
        .columns
        .iter()
        .map(|c| rtable_protocol::Column {
            name: c.name.clone(),
            ty: c.ty.clone(),
        })
        .collect();
    let text = format!(
        "{}order by: {}\npartition by: {}\n",
        rtable_protocol::columns::render(&columns),
        spec.order_by.join(", "),
        spec.partition_by
    );
    rtable_protocol::hash::file_hash(text.as_bytes()).to_hex()
}

pub fn stateful_set(rt: &ReplicatedTable, config: &BuildConfig) -> StatefulSet {
    let names = Names::of(rt);
    let name = rt.name_any();
    let spec = &rt.spec;
    let selector = selector_labels(&name);
    let mut pod_labels = selector.clone();
    pod_labels.insert("app.kubernetes.io/component".into(), "replica".into());

    let mut containers = vec![sidecar_container(rt, config, &names)];
    if let Some(user) = &spec.user_container {
        containers.push(user_container(user));
    }
    let mut sources = vec![
        VolumeProjection {
            config_map: Some(ConfigMapProjection {
                name: names.config_map.clone(),
                items: Some(vec![key_to_path(TABLE_KEY, TABLE_KEY)]),
                ..ConfigMapProjection::default()
            }),
            ..VolumeProjection::default()
        },
        VolumeProjection {
            secret: Some(SecretProjection {
                name: spec
                    .security
                    .as_ref()
                    .and_then(|s| s.interserver_secret_name.clone())
                    .unwrap_or_else(|| names.secret.clone()),
                items: Some(vec![key_to_path(
                    INTERSERVER_KEY,
                    &format!("secret/{INTERSERVER_KEY}"),
                )]),
                ..SecretProjection::default()
            }),
            ..VolumeProjection::default()
        },
    ];
    // One projected volume instead of nested mounts: a mount point inside a read-only
    // volume cannot always be created by the runtime.
    if let Some(auth) = &spec.zookeeper.auth {
        sources.push(VolumeProjection {
            secret: Some(SecretProjection {
                name: auth.secret_name.clone(),
                items: Some(vec![key_to_path(&auth.key, ZK_AUTH_FILE)]),
                ..SecretProjection::default()
            }),
            ..VolumeProjection::default()
        });
    }
    if let Some(tls) = &spec.zookeeper.tls {
        let mut items = vec![key_to_path("ca.crt", ZK_TLS_CA_FILE)];
        if tls.client_certificate {
            items.push(key_to_path("tls.crt", ZK_TLS_CERT_FILE));
            items.push(key_to_path("tls.key", ZK_TLS_KEY_FILE));
        }
        sources.push(VolumeProjection {
            secret: Some(SecretProjection {
                name: tls.secret_name.clone(),
                items: Some(items),
                ..SecretProjection::default()
            }),
            ..VolumeProjection::default()
        });
    }
    if let Some(security) = &spec.security {
        sources.extend(http_security_sources(security));
    }
    let volumes = vec![Volume {
        name: CONFIG_VOLUME.to_string(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(sources),
            default_mode: Some(0o440),
        }),
        ..Volume::default()
    }];

    let mut storage_request = BTreeMap::new();
    storage_request.insert("storage".to_string(), spec.storage.size.clone());
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_string()),
            labels: Some(selector.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(storage_request),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };

    let label_selector = LabelSelector {
        match_labels: Some(selector.clone()),
        ..LabelSelector::default()
    };
    let settings = spec.pod.clone().unwrap_or_default();
    let mut template_meta = ObjectMeta {
        labels: Some(pod_labels),
        annotations: Some(string_map(&[
            ("kubectl.kubernetes.io/default-container", SIDECAR_CONTAINER),
            (SCHEMA_HASH_ANNOTATION, &schema_hash(rt)),
        ])),
        ..ObjectMeta::default()
    };
    add_metadata(&mut template_meta, &settings);
    let mut pod_spec = PodSpec {
        containers,
        volumes: Some(volumes),
        // The sidecar never talks to the Kubernetes API.
        automount_service_account_token: Some(false),
        security_context: Some(pod_security_context(settings.security_context.as_ref())),
        termination_grace_period_seconds: Some(60),
        ..PodSpec::default()
    };
    // Spread replicas over nodes so one node failure costs one replica; ScheduleAnyway
    // keeps small clusters (kind, k3d) schedulable.
    let default_spread = vec![TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "kubernetes.io/hostname".to_string(),
        when_unsatisfiable: "ScheduleAnyway".to_string(),
        label_selector: Some(label_selector.clone()),
        ..TopologySpreadConstraint::default()
    }];
    apply_scheduling(&mut pod_spec, &settings, default_spread);
    StatefulSet {
        metadata: owned_meta(rt, &names.statefulset),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.replicas),
            service_name: Some(names.headless_service.clone()),
            selector: label_selector.clone(),
            // Replicas are peers, not a chain: a lost replica-0 must not keep replica-1 from
            // starting, and scale-up should start every new replica at once.
            pod_management_policy: Some("Parallel".to_string()),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(
                        spec.persistent_volume_claim_retention_policy
                            .when_deleted
                            .as_str()
                            .to_string(),
                    ),
                    when_scaled: Some(
                        spec.persistent_volume_claim_retention_policy
                            .when_scaled
                            .as_str()
                            .to_string(),
                    ),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(template_meta),
                spec: Some(pod_spec),
            },
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

fn key_to_path(key: &str, path: &str) -> KeyToPath {
    KeyToPath {
        key: key.to_string(),
        path: path.to_string(),
        mode: None,
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        value_from: None,
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_string(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The Secrets `spec.security` names, projected into the config volume (the pods read
/// them; the operator never does).
fn http_security_sources(security: &HttpSecurity) -> Vec<VolumeProjection> {
    let secret = |name: &String, items: Vec<KeyToPath>| VolumeProjection {
        secret: Some(SecretProjection {
            name: name.clone(),
            items: Some(items),
            ..SecretProjection::default()
        }),
        ..VolumeProjection::default()
    };
    let mut sources = Vec::new();
    if let Some(users) = &security.users_secret_name {
        sources.push(secret(users, vec![key_to_path("users.yaml", USERS_FILE)]));
    }
    if let Some(tls) = &security.tls_secret_name {
        let items = ["tls.crt", "tls.key", "ca.crt"]
            .iter()
            .map(|k| key_to_path(k, &format!("{HTTP_TLS_DIR}/{k}")))
            .collect();
        sources.push(secret(tls, items));
    }
    sources
}

/// The sidecar's settings for `spec.security` (see `rtable-sidecar --help`).
fn http_security_env(security: &HttpSecurity) -> Vec<EnvVar> {
    let mut vars = vec![env(
        "RTABLE_INTERSERVER_LISTEN",
        &format!("0.0.0.0:{INTERSERVER_PORT}"),
    )];
    if security.users_secret_name.is_some() {
        vars.push(env(
            "RTABLE_USERS_FILE",
            &format!("{CONFIG_DIR}/{USERS_FILE}"),
        ));
    }
    if security.tls_secret_name.is_some() {
        vars.push(env(
            "RTABLE_TLS_DIR",
            &format!("{CONFIG_DIR}/{HTTP_TLS_DIR}"),
        ));
        if security.interserver_mutual_tls {
            vars.push(env("RTABLE_INTERSERVER_MTLS", "true"));
        }
    }
    if security.metrics_require_auth {
        vars.push(env("RTABLE_METRICS_REQUIRE_AUTH", "true"));
    }
    vars
}

fn http_probe(path: &str, period: i32, failures: i32, https: bool) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(SIDECAR_PORT_NAME.to_string()),
            // The kubelet does not verify the certificate; the probes are open endpoints.
            scheme: https.then(|| "HTTPS".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    }
}

fn sidecar_container(rt: &ReplicatedTable, config: &BuildConfig, names: &Names) -> Container {
    let spec = &rt.spec;
    let namespace = rt.namespace().unwrap_or_default();
    let security = spec.security.as_ref();
    let peer_port = if security.is_some() {
        INTERSERVER_PORT
    } else {
        SIDECAR_PORT
    };
    let https = security.is_some_and(|s| s.tls_secret_name.is_some());
    let advertise = format!(
        "$(POD_NAME).{}.{namespace}.svc.{}:{peer_port}",
        names.headless_service, config.cluster_domain
    );
    let args: Vec<String> = [
        "--table",
        &format!("{CONFIG_DIR}/{TABLE_KEY}"),
        "--replica",
        "$(POD_NAME)",
        "--data-dir",
        DATA_DIR,
        "--listen",
        &format!("0.0.0.0:{SIDECAR_PORT}"),
        "--advertise",
        &advertise,
        "--interserver-secret-file",
        &format!("{CONFIG_DIR}/secret/{INTERSERVER_KEY}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut env_vars = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        env("RTABLE_LOG_FORMAT", "json"),
    ];
    // The manifest holds the bare ensemble (host:port entries, as the protocol validates
    // them); a chroot only exists in the connect string, so it travels as the override.
    if spec.zookeeper.root.is_some() {
        env_vars.push(env("RTABLE_ZOOKEEPER", &spec.connect_string()));
    }
    let mounts = vec![
        VolumeMount {
            name: DATA_VOLUME.to_string(),
            mount_path: DATA_DIR.to_string(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: CONFIG_VOLUME.to_string(),
            mount_path: CONFIG_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    if let Some(auth) = &spec.zookeeper.auth {
        env_vars.push(env(
            "RTABLE_ZOOKEEPER_AUTH_FILE",
            &format!("{CONFIG_DIR}/{ZK_AUTH_FILE}"),
        ));
        env_vars.push(env(
            "RTABLE_ZOOKEEPER_AUTH_SOURCE",
            &format!("Secret {} key {}", auth.secret_name, auth.key),
        ));
        if auth.world_readable {
            env_vars.push(env("RTABLE_ZOOKEEPER_ACL_WORLD_READ", "true"));
        }
    }
    if let Some(tls) = &spec.zookeeper.tls {
        env_vars.push(env(
            "RTABLE_ZOOKEEPER_TLS_CA_FILE",
            &format!("{CONFIG_DIR}/{ZK_TLS_CA_FILE}"),
        ));
        if tls.client_certificate {
            env_vars.push(env(
                "RTABLE_ZOOKEEPER_TLS_CERT_FILE",
                &format!("{CONFIG_DIR}/{ZK_TLS_CERT_FILE}"),
            ));
            env_vars.push(env(
                "RTABLE_ZOOKEEPER_TLS_KEY_FILE",
                &format!("{CONFIG_DIR}/{ZK_TLS_KEY_FILE}"),
            ));
        }
    }
    let mut ports = vec![ContainerPort {
        name: Some(SIDECAR_PORT_NAME.to_string()),
        container_port: SIDECAR_PORT,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }];
    if let Some(security) = security {
        env_vars.extend(http_security_env(security));
        ports.push(ContainerPort {
            name: Some(INTERSERVER_PORT_NAME.to_string()),
            container_port: INTERSERVER_PORT,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        });
    }
    Container {
        name: SIDECAR_CONTAINER.to_string(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| config.default_image.clone()),
        ),
        command: Some(vec!["rtable-sidecar".to_string()]),
        args: Some(args),
        env: Some(env_vars),
        ports: Some(ports),
        // Startup may scan many parts or wait for ZooKeeper; liveness starts after it.
        startup_probe: Some(http_probe("/healthz", 5, 60, https)),
        liveness_probe: Some(http_probe("/healthz", 10, 3, https)),
        // Ready = active in ZooKeeper and not read-only: only then may clients insert here.
        readiness_probe: Some(http_probe("/readyz", 5, 2, https)),
        resources: Some(sidecar_resources(spec.resources.as_ref())),
        volume_mounts: Some(mounts),
        // The sidecar writes only under its data volume, so its root can be read-only.
        security_context: Some(container_security_context(true, None)),
        ..Container::default()
    }
}

fn user_container(user: &UserContainer) -> Container {
    let mut env_vars = vec![env(
        "RTABLE_URL",
        &format!("http://127.0.0.1:{SIDECAR_PORT}"),
    )];
    env_vars.extend(user.env.iter().cloned());
    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    Container {
        name: user.name.clone(),
        image: Some(user.image.clone()),
        command: non_empty(&user.command),
        args: non_empty(&user.args),
        env: Some(env_vars),
        ports: (!user.ports.is_empty()).then(|| user.ports.clone()),
        resources: user.resources.clone(),
        security_context: Some(container_security_context(
            false,
            user.security_context.as_ref(),
        )),
        // Read-only: only the sidecar may change parts, or replicas would diverge.
        volume_mounts: Some(vec![VolumeMount {
            name: DATA_VOLUME.to_string(),
            mount_path: DATA_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

/// `(argv, env)` of the sidecar process; `argv[0]` is the binary.
pub type SidecarCommand = (Vec<String>, Vec<(String, String)>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SidecarCommandError {
    #[error("StatefulSet has no pod spec")]
    NoPodSpec,
    #[error("StatefulSet has no `{SIDECAR_CONTAINER}` container")]
    NoSidecar,
    #[error("env var {0} of the sidecar comes from {1}, which only exists in a cluster")]
    Unresolvable(String, String),
}

/// The sidecar's command line and environment for one ordinal, with `$(VAR)` references
/// expanded the way the kubelet does, so a local playground runs exactly what a pod runs.
/// Returns `(argv, env)`; `argv[0]` is the binary.
pub fn sidecar_command(
    sts: &StatefulSet,
    ordinal: u32,
) -> Result<SidecarCommand, SidecarCommandError> {
    let pod_spec = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .ok_or(SidecarCommandError::NoPodSpec)?;
    let container = pod_spec
        .containers
        .iter()
        .find(|c| c.name == SIDECAR_CONTAINER)
        .ok_or(SidecarCommandError::NoSidecar)?;
    let pod_name = format!("{}-{ordinal}", sts.name_any());
    let namespace = sts.namespace().unwrap_or_default();
    let mut env_out: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => expand(v, &env_out),
            (None, Some(src)) => match src.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => pod_name.clone(),
                Some("metadata.namespace") => namespace.clone(),
                other => {
                    return Err(SidecarCommandError::Unresolvable(
                        var.name.clone(),
                        other.unwrap_or("a secret or config map").to_string(),
                    ));
                }
            },
            (None, None) => String::new(),
        };
        env_out.push((var.name.clone(), value));
    }
    let argv = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map(|a| expand(a, &env_out))
        .collect();
    Ok((argv, env_out))
}

/// Kubernetes' `$(VAR)` expansion: known variables are replaced, `$$` escapes a `$`, and an
/// unknown reference stays as written.
fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, value)) = env.iter().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests;
