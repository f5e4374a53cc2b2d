//! A container's environment and command line, by the kubelet's rules:
//! - the image's environment, then `HOSTNAME`, then the `KUBERNETES_SERVICE_*` variables
//!   (pointing at the API server's real address: there is no kube-proxy to route the
//!   `kubernetes` Service's ClusterIP), then `envFrom`, then `env`, a later definition
//!   replacing an earlier one;
//! - `$(VAR)` in `env` values, `command` and `args` expands to variables defined before it,
//!   `$$` is a literal `$`, an unknown reference stays as written;
//! - `command` replaces the image's entrypoint and drops its cmd, `args` replaces the cmd.
//!
//! Field references read the pod as the agent knows it (its IP before the API has it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::Api;

use super::images::Image;
use super::quantity;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EnvError {
    #[error("configmap \"{0}\" not found")]
    ConfigMapNotFound(String),
    #[error("secret \"{0}\" not found")]
    SecretNotFound(String),
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    KeyNotFound {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    #[error("unsupported fieldPath: {0}")]
    FieldPath(String),
    #[error("unsupported resource {resource} in resourceFieldRef of container {container}")]
    Resource { container: String, resource: String },
    #[error("invalid divisor or value in resourceFieldRef: {0}")]
    Quantity(String),
    #[error("reading {kind} {name}: {message}")]
    Api {
        kind: &'static str,
        name: String,
        message: String,
    },
}

/// What the agent knows about the pod and node that the API may not have yet.
#[derive(Debug, Clone, Copy)]
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub pod_ip: Option<Ipv4Addr>,
    pub host_ip: Ipv4Addr,
    /// The node's allocatable CPU (millicores) and memory (bytes): the value of a
    /// `limits.*` reference when the container sets no limit.
    pub allocatable_cpu_milli: u128,
    pub allocatable_memory: u128,
    pub allocatable_ephemeral: u128,
}

/// The ConfigMaps and Secrets a container's environment refers to, read once per start.
#[derive(Debug, Clone, Default)]
pub struct EnvSources {
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
}

impl EnvSources {
    /// Reads every ConfigMap and Secret `container` names; absent ones are left out (an
    /// optional reference may name one), so only `container_env` decides what is missing.
    pub async fn fetch(
        client: &kube::Client,
        namespace: &str,
        container: &Container,
    ) -> Result<EnvSources, EnvError> {
        let (cm_names, secret_names) = referenced(container);
        let mut sources = EnvSources::default();
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        for name in cm_names {
            let found = cms.get_opt(&name).await.map_err(|e| EnvError::Api {
                kind: "configmap",
                name: name.clone(),
                message: e.to_string(),
            })?;
            if let Some(cm) = found {
                sources.config_maps.insert(name, cm);
            }
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        for name in secret_names {
            let found = secrets.get_opt(&name).await.map_err(|e| EnvError::Api {
                kind: "secret",
                name: name.clone(),
                message: e.to_string(),
            })?;
            if let Some(secret) = found {
                sources.secrets.insert(name, secret);
            }
        }
        Ok(sources)
    }
}

/// The ConfigMaps and Secrets a container's `env` and `envFrom` name.
pub fn referenced(container: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut cms = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    for from in container.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            cms.insert(r.name.clone());
        }
        if let Some(r) = &from.secret_ref {
            secrets.insert(r.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(src) = &var.value_from else { continue };
        if let Some(r) = &src.config_map_key_ref {
            cms.insert(r.name.clone());
        }
        if let Some(r) = &src.secret_key_ref {
            secrets.insert(r.name.clone());
        }
    }
    (cms, secrets)
}

fn config_map_data(cm: &ConfigMap) -> BTreeMap<String, String> {
    let mut data = cm.data.clone().unwrap_or_default();
    for (k, v) in cm.binary_data.iter().flatten() {
        data.insert(k.clone(), String::from_utf8_lossy(&v.0).into_owned());
    }
    data
}

fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    let mut data: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone());
    }
    data
}

/// Kubernetes' `$(VAR)` expansion against `lookup`.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
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
            && let Some(value) = lookup(&inner[..end])
        {
            out.push_str(&value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// An ordered environment where a later definition replaces an earlier one in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment(Vec<(String, String)>);

impl Environment {
    pub fn set(&mut self, key: &str, value: String) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    pub fn into_vec(self) -> Vec<(String, String)> {
        self.0
    }
}

/// The value of a `fieldRef` path (also used by downward-API volumes).
pub fn field_value(facts: &PodFacts<'_>, path: &str) -> Result<String, EnvError> {
    let meta = &facts.pod.metadata;
    let spec = facts.pod.spec.as_ref();
    let subscript = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['"))
            .and_then(|rest| rest.strip_suffix("']"))
            .map(str::to_string)
    };
    let pod_ip = facts.pod_ip.map(|ip| ip.to_string()).unwrap_or_default();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(meta.labels.as_ref()),
        "metadata.annotations" => format_map(meta.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.to_string(),
        "status.podIP" | "status.podIPs" => pod_ip,
        _ => {
            if let Some(key) = subscript("metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(key) = subscript("metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(EnvError::FieldPath(path.to_string()));
            }
        }
    })
}

/// `key="value"` lines, sorted, as the downward API writes labels and annotations.
fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of a `resourceFieldRef` for `container_name`, divided by `divisor` and
/// rounded up.
pub fn resource_value(
    facts: &PodFacts<'_>,
    container_name: &str,
    resource: &str,
    divisor: Option<&str>,
) -> Result<String, EnvError> {
    let container = facts
        .pod
        .spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .find(|c| c.name == container_name);
    let resources = container.and_then(|c| c.resources.as_ref());
    let (kind, name) = resource.split_once('.').ok_or_else(|| EnvError::Resource {
        container: container_name.to_string(),
        resource: resource.to_string(),
    })?;
    let set = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        "requests" => resources.and_then(|r| r.requests.as_ref()),
        _ => None,
    }
    .and_then(|m| m.get(name))
    .map(|q| quantity::milli_value(&q.0))
    .transpose()
    .map_err(|e| EnvError::Quantity(e.to_string()))?;
    let milli = match (kind, name, set) {
        (_, _, Some(v)) => v,
        ("limits", "cpu", None) => facts.allocatable_cpu_milli,
        ("limits", "memory", None) => facts.allocatable_memory * 1000,
        ("limits", "ephemeral-storage", None) => facts.allocatable_ephemeral * 1000,
        ("requests", "cpu" | "memory" | "ephemeral-storage", None) => 0,
        _ => {
            return Err(EnvError::Resource {
                container: container_name.to_string(),
                resource: resource.to_string(),
            });
        }
    };
    let divisor = match divisor {
        Some(d) if !d.is_empty() => {
            quantity::milli_value(d).map_err(|e| EnvError::Quantity(e.to_string()))?
        }
        _ => 1000,
    };
    if divisor == 0 {
        return Err(EnvError::Quantity("a divisor of 0".into()));
    }
    Ok(milli.div_ceil(divisor).to_string())
}

/// The `KUBERNETES_SERVICE_*` variables for the API server at `host:port`.
pub fn api_service_env(host: &str, port: u16) -> Vec<(String, String)> {
    let url = format!("tcp://{host}:{port}");
    vec![
        ("KUBERNETES_SERVICE_HOST".into(), host.to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()),
        ("KUBERNETES_PORT".into(), url.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP"), url),
        (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
        (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.to_string()),
        (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), host.to_string()),
    ]
}

/// The environment of `container`.
pub fn container_env(
    facts: &PodFacts<'_>,
    container: &Container,
    image: &Image,
    hostname: &str,
    service_env: &[(String, String)],
    sources: &EnvSources,
) -> Result<Vec<(String, String)>, EnvError> {
    let namespace = facts.pod.metadata.namespace.clone().unwrap_or_default();
    let mut env = Environment::default();
    for (k, v) in image.env() {
        env.set(&k, v);
    }
    env.set("HOSTNAME", hostname.to_string());
    for (k, v) in service_env {
        env.set(k, v.clone());
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            match sources.config_maps.get(&r.name) {
                Some(cm) => config_map_data(cm),
                None if r.optional == Some(true) => continue,
                None => return Err(EnvError::ConfigMapNotFound(r.name.clone())),
            }
        } else if let Some(r) = &from.secret_ref {
            match sources.secrets.get(&r.name) {
                Some(s) => secret_data(s),
                None if r.optional == Some(true) => continue,
                None => return Err(EnvError::SecretNotFound(r.name.clone())),
            }
        } else {
            continue;
        };
        for (k, v) in data {
            // Keys that are not valid variable names are skipped (the kubelet reports
            // them in an event).
            let name = format!("{prefix}{k}");
            if is_env_name(&name) {
                env.set(&name, v);
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => expand(v, &|k| env.get(k)),
            (None, Some(src)) => {
                if let Some(f) = &src.field_ref {
                    field_value(facts, &f.field_path)?
                } else if let Some(r) = &src.resource_field_ref {
                    let target = r.container_name.as_deref().unwrap_or(&container.name);
                    resource_value(
                        facts,
                        target,
                        &r.resource,
                        r.divisor.as_ref().map(|d| d.0.as_str()),
                    )?
                } else if let Some(r) = &src.config_map_key_ref {
                    let found = sources
                        .config_maps
                        .get(&r.name)
                        .map(|cm| config_map_data(cm).get(&r.key).cloned());
                    match (found, r.optional == Some(true)) {
                        (Some(Some(v)), _) => v,
                        (_, true) => continue,
                        (None, false) => return Err(EnvError::ConfigMapNotFound(r.name.clone())),
                        (Some(None), false) => {
                            return Err(EnvError::KeyNotFound {
                                kind: "ConfigMap",
                                namespace,
                                name: r.name.clone(),
                                key: r.key.clone(),
                            });
                        }
                    }
                } else if let Some(r) = &src.secret_key_ref {
                    let found = sources
                        .secrets
                        .get(&r.name)
                        .map(|s| secret_data(s).get(&r.key).cloned());
                    match (found, r.optional == Some(true)) {
                        (Some(Some(v)), _) => v,
                        (_, true) => continue,
                        (None, false) => return Err(EnvError::SecretNotFound(r.name.clone())),
                        (Some(None), false) => {
                            return Err(EnvError::KeyNotFound {
                                kind: "Secret",
                                namespace,
                                name: r.name.clone(),
                                key: r.key.clone(),
                            });
                        }
                    }
                } else {
                    String::new()
                }
            }
            (None, None) => String::new(),
        };
        env.set(&var.name, value);
    }
    Ok(env.into_vec())
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// The container's argv: its `command` or the image's entrypoint, then its `args` or (only
/// without a `command`) the image's cmd, each expanded against `env`.
pub fn command_line(container: &Container, image: &Image, env: &[(String, String)]) -> Vec<String> {
    let non_empty = |v: &Option<Vec<String>>| v.as_ref().filter(|v| !v.is_empty()).cloned();
    let command = non_empty(&container.command);
    let args = non_empty(&container.args);
    let (program, arguments) = match (command, args) {
        (Some(c), a) => (c, a.unwrap_or_default()),
        (None, Some(a)) => (image.entry.entrypoint.clone(), a),
        (None, None) => (image.entry.entrypoint.clone(), image.entry.cmd.clone()),
    };
    let lookup = |k: &str| {
        env.iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
    };
    program
        .iter()
        .chain(arguments.iter())
        .map(|a| expand(a, &lookup))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::images::ImageMap;
    use k8s_openapi::api::core::v1::{
        ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::path::Path;

    fn image() -> Image {
        let map = ImageMap::parse(
            Path::new("m.yaml"),
            "images: [{prefix: app, entrypoint: [/bin/app], cmd: [--default], env: {A: image}}]",
        )
        .expect("map");
        map.resolve("app:1").expect("image")
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-1".into()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn field(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        }
    }

    fn value(name: &str, v: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(v.into()),
            value_from: None,
        }
    }

    #[test]
    fn env_follows_kubelet_order_and_expansion() {
        let pod = pod();
        let facts = PodFacts {
            pod: &pod,
            pod_ip: Some(Ipv4Addr::new(10, 244, 0, 7)),
            host_ip: Ipv4Addr::new(10, 244, 0, 1),
            allocatable_cpu_milli: 2000,
            allocatable_memory: 1 << 30,
            allocatable_ephemeral: 1 << 40,
        };
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("cfg".into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                ("mode".into(), "fast".into()),
                ("1bad".into(), "x".into()),
            ])),
            ..ConfigMap::default()
        };
        let sources = EnvSources {
            config_maps: BTreeMap::from([("cfg".into(), cm)]),
            ..EnvSources::default()
        };
        let container = Container {
            name: "app".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(k8s_openapi::api::core::v1::ConfigMapEnvSource {
                    name: "cfg".into(),
                    optional: None,
                }),
                ..EnvFromSource::default()
            }]),
            env: Some(vec![
                field("POD_NAME", "metadata.name"),
                field("POD_IP", "status.podIP"),
                field("APP", "metadata.labels['app']"),
                value("URL", "http://$(POD_NAME):$(PORT)/$$(POD_NAME)"),
                value("A", "pod"),
                EnvVar {
                    name: "MISSING_OK".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "nope".into(),
                            key: "k".into(),
                            optional: Some(true),
                        }),
                        ..EnvVarSource::default()
                    }),
                },
            ]),
            ..Container::default()
        };
        let env = container_env(&facts, &container, &image(), "web-0", &[], &sources).expect("env");
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("POD_NAME"), Some("web-0"));
        assert_eq!(get("POD_IP"), Some("10.244.0.7"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("URL"), Some("http://web-0:$(PORT)/$(POD_NAME)"));
        assert_eq!(get("A"), Some("pod"), "the pod's env replaces the image's");
        assert_eq!(get("mode"), Some("fast"));
        assert_eq!(get("1bad"), None);
        assert_eq!(get("MISSING_OK"), None);
        assert_eq!(get("HOSTNAME"), Some("web-0"));

        let mut bad = container.clone();
        bad.env = Some(vec![EnvVar {
            name: "X".into(),
            value: None,
            value_from: Some(EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: "cfg".into(),
                    key: "absent".into(),
                    optional: None,
                }),
                ..EnvVarSource::default()
            }),
        }]);
        let err = container_env(&facts, &bad, &image(), "web-0", &[], &sources).expect_err("key");
        assert_eq!(
            err.to_string(),
            "couldn't find key absent in ConfigMap ns/cfg"
        );
    }

    #[test]
    fn command_and_args_override_entrypoint_and_cmd() {
        let image = image();
        let env = vec![("X".to_string(), "1".to_string())];
        let c = |command: Option<Vec<&str>>, args: Option<Vec<&str>>| Container {
            command: command.map(|v| v.into_iter().map(String::from).collect()),
            args: args.map(|v| v.into_iter().map(String::from).collect()),
            ..Container::default()
        };
        assert_eq!(
            command_line(&c(None, None), &image, &env),
            ["/bin/app", "--default"]
        );
        assert_eq!(
            command_line(&c(None, Some(vec!["--x=$(X)"])), &image, &env),
            ["/bin/app", "--x=1"]
        );
        assert_eq!(
            command_line(&c(Some(vec!["sh"]), None), &image, &env),
            ["sh"],
            "a command drops the image's cmd"
        );
    }
}
