//! What the init shim is told for one start of one container: the image's stand-in, the
//! command line and environment (recomputed at every start, as a kubelet does, so a
//! changed ConfigMap reaches a restarted container), the user, and where every volume and
//! pod file is mounted.
//!
//! A container's files on the host: `<pod dir>/containers/<name>/` holds the spec of its
//! latest start, the scratch mount point of its writable layer, its termination-message
//! file and the shim's error file; its logs are
//! `<state dir>/logs/<namespace>_<pod>_<uid>/<name>/<restart>.log`, as under
//! `/var/log/pods` on a kubelet's node.

use std::collections::BTreeMap;
use std::hash::{Hash as _, Hasher as _};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::sync::watch;

use super::env::{self, EnvError, EnvSources, PodFacts};
use super::images::{Image, ImageError, ImageMap};
use super::init::{InitSpec, ProcessSpec};
use super::rootfs::{MountSpec, RootfsSpec};
use super::volumes::VolumePath;

/// Default size of a container's writable layer (a tmpfs: memory is used only as written).
const DEFAULT_SCRATCH_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0}")]
    Config(#[from] EnvError),
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LaunchError {
    /// The `waiting.reason` a kubelet reports for it.
    pub fn reason(&self) -> &'static str {
        match self {
            LaunchError::Image(_) => "ErrImagePull",
            LaunchError::Config(_) | LaunchError::Invalid(_) => "CreateContainerConfigError",
            LaunchError::Io { .. } => "CreateContainerError",
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError {
    let path = path.to_path_buf();
    move |source| LaunchError::Io { what, path, source }
}

/// The pod's sandbox: what every container of the pod shares.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `<state dir>/pods/<uid>`.
    pub dir: PathBuf,
    pub logs_dir: PathBuf,
    pub netns: Option<PathBuf>,
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub hostname: String,
    pub etc_hosts: PathBuf,
    pub resolv_conf: PathBuf,
    pub etc_hostname: PathBuf,
}

impl Sandbox {
    pub fn container_dir(&self, container: &str) -> PathBuf {
        self.dir.join("containers").join(container)
    }
}

/// Node facts every start needs.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub allocatable_cpu_milli: u128,
    pub allocatable_memory: u128,
    pub allocatable_ephemeral: u128,
    /// The agent's pid: containers die with it.
    pub agent_pid: i32,
    pub state_dir: PathBuf,
}

/// A container start, ready for the shim.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub spec: InitSpec,
    pub spec_path: PathBuf,
    pub log_path: PathBuf,
    pub container_id: String,
    pub image: Image,
    pub termination_log: PathBuf,
}

/// Everything a container start needs, shared by the pod's containers.
pub struct PodLaunch {
    pub client: kube::Client,
    pub images: Arc<ImageMap>,
    pub sandbox: Arc<Sandbox>,
    pub volumes: BTreeMap<String, VolumePath>,
    pub pod: watch::Receiver<Pod>,
    pub service_env: Vec<(String, String)>,
    pub node: NodeFacts,
}

impl PodLaunch {
    pub fn facts<'a>(&self, pod: &'a Pod) -> PodFacts<'a> {
        PodFacts {
            pod,
            pod_ip: Some(self.sandbox.pod_ip),
            host_ip: self.sandbox.host_ip,
            allocatable_cpu_milli: self.node.allocatable_cpu_milli,
            allocatable_memory: self.node.allocatable_memory,
            allocatable_ephemeral: self.node.allocatable_ephemeral,
        }
    }

    /// Resolves the image alone, for a status that names it before the first start.
    pub fn image(&self, container: &Container) -> Result<Image, ImageError> {
        self.images
            .resolve(container.image.as_deref().unwrap_or_default())
    }

    /// Prepares start number `restart` (0 for the first) of `container`.
    pub async fn prepare(
        &self,
        container: &Container,
        restart: i32,
    ) -> Result<Prepared, LaunchError> {
        let pod = self.pod.borrow().clone();
        let sb = &self.sandbox;
        let image = self.image(container)?;
        let sources = EnvSources::fetch(&self.client, &sb.namespace, container).await?;
        let facts = self.facts(&pod);
        let environment = env::container_env(
            &facts,
            container,
            &image,
            &sb.hostname,
            &self.service_env,
            &sources,
        )?;
        let argv = env::command_line(container, &image, &environment);
        if argv.is_empty() {
            return Err(LaunchError::Invalid(format!(
                "no command specified for container {} (neither the pod nor the image map gives one)",
                container.name
            )));
        }
        let (uid, gid, groups, no_new_privs, read_only) = security(&pod, container)?;

        let dir = sb.container_dir(&container.name);
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch).map_err(io("creating", &scratch))?;
        let termination_log = dir.join("termination-log");
        std::fs::write(&termination_log, b"").map_err(io("creating", &termination_log))?;
        // Any container user may write its termination message.
        std::fs::set_permissions(&termination_log, std::fs::Permissions::from_mode(0o666))
            .map_err(io("setting the mode of", &termination_log))?;
        let error_file = dir.join("start-error");
        let _ = std::fs::remove_file(&error_file);

        let mut mounts = Vec::new();
        let lookup = |k: &str| {
            environment
                .iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        for m in container.volume_mounts.iter().flatten() {
            let volume = self.volumes.get(&m.name).ok_or_else(|| {
                LaunchError::Invalid(format!(
                    "volumeMount {} of container {} names no volume of the pod",
                    m.name, container.name
                ))
            })?;
            let sub_path = match (&m.sub_path, &m.sub_path_expr) {
                (Some(p), _) if !p.is_empty() => Some(p.clone()),
                (_, Some(e)) if !e.is_empty() => Some(env::expand(e, &lookup)),
                _ => None,
            };
            let source = match sub_path {
                Some(sub) => {
                    if Path::new(&sub).components().any(|c| {
                        matches!(
                            c,
                            std::path::Component::ParentDir | std::path::Component::RootDir
                        )
                    }) {
                        return Err(LaunchError::Invalid(format!(
                            "subPath {sub:?} of volumeMount {} must be a relative path without `..`",
                            m.name
                        )));
                    }
                    let source = volume.path.join(&sub);
                    if !source.exists() {
                        std::fs::create_dir_all(&source)
                            .map_err(io("creating subPath", &source))?;
                    }
                    source
                }
                None => volume.path.clone(),
            };
            mounts.push(MountSpec {
                source,
                target: m.mount_path.clone(),
                read_only: m.read_only == Some(true) || volume.read_only,
            });
        }
        for (source, target) in [
            (&sb.etc_hosts, "/etc/hosts"),
            (&sb.resolv_conf, "/etc/resolv.conf"),
            (&sb.etc_hostname, "/etc/hostname"),
        ] {
            if !mounts.iter().any(|m| m.target == target) {
                mounts.push(MountSpec {
                    source: source.clone(),
                    target: target.into(),
                    read_only: false,
                });
            }
        }
        let termination_path = container
            .termination_message_path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/dev/termination-log".into());
        mounts.push(MountSpec {
            source: termination_log.clone(),
            target: termination_path,
            read_only: false,
        });

        let scratch_bytes = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("ephemeral-storage"))
            .and_then(|q| super::quantity::value(&q.0).ok())
            .map_or(DEFAULT_SCRATCH_BYTES, |v| v as u64);
        let cwd = container
            .working_dir
            .clone()
            .filter(|d| !d.is_empty())
            .or_else(|| image.entry.working_dir.clone())
            .unwrap_or_else(|| "/".into());
        let container_id = container_id(&sb.uid, &container.name, restart);
        let spec = InitSpec {
            name: format!("{}/{}/{}", sb.namespace, sb.name, container.name),
            parent_pid: self.node.agent_pid,
            netns: sb.netns.clone(),
            hostname: sb.hostname.clone(),
            rootfs: RootfsSpec {
                scratch,
                scratch_bytes,
                image_root: image.entry.root.clone(),
                image_files: image
                    .entry
                    .files
                    .iter()
                    .map(|(target, source)| MountSpec {
                        source: source.clone(),
                        target: target.clone(),
                        read_only: true,
                    })
                    .collect(),
                image_dirs: image.entry.owned_dirs().map_err(LaunchError::Invalid)?,
                image_paths: image
                    .entry
                    .path
                    .iter()
                    .filter(|p| p.exists())
                    .cloned()
                    .collect(),
                read_only,
                hide: vec![self.node.state_dir.clone()],
            },
            mounts,
            process: ProcessSpec {
                argv,
                env: environment,
                cwd,
                uid,
                gid,
                groups,
                no_new_privs,
            },
            error_file,
        };
        let spec_path = dir.join("spec.json");
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| LaunchError::Io {
            what: "encoding",
            path: spec_path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_private(&spec_path, &json)?;
        let log_dir = sb.logs_dir.join(&container.name);
        std::fs::create_dir_all(&log_dir).map_err(io("creating", &log_dir))?;
        Ok(Prepared {
            spec,
            spec_path,
            log_path: log_dir.join(format!("{restart}.log")),
            container_id,
            image,
            termination_log,
        })
    }
}

/// The spec holds the environment, secrets included: readable by root only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), LaunchError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("writing", path))?;
    file.write_all(bytes).map_err(io("writing", path))
}

/// uid, gid, supplementary groups, no_new_privs and read-only root of a container: its
/// security context over the pod's; the pod's fsGroup joins the groups.
#[allow(clippy::type_complexity)]
fn security(
    pod: &Pod,
    container: &Container,
) -> Result<(u32, u32, Vec<u32>, bool, bool), LaunchError> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = container.security_context.as_ref();
    let id = |v: Option<i64>, what: &str| -> Result<Option<u32>, LaunchError> {
        v.map(|v| {
            u32::try_from(v)
                .map_err(|_| LaunchError::Invalid(format!("{what} {v} is not a valid id")))
        })
        .transpose()
    };
    let uid = id(
        sc.and_then(|s| s.run_as_user)
            .or(pod_sc.and_then(|s| s.run_as_user)),
        "runAsUser",
    )?
    .unwrap_or(0);
    let gid = id(
        sc.and_then(|s| s.run_as_group)
            .or(pod_sc.and_then(|s| s.run_as_group)),
        "runAsGroup",
    )?
    .unwrap_or(0);
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or(pod_sc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    if non_root && uid == 0 {
        return Err(LaunchError::Invalid(
            "container has runAsNonRoot and image will run as root".into(),
        ));
    }
    let mut groups: Vec<u32> = Vec::new();
    for g in pod_sc
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default()
        .into_iter()
        .chain(pod_sc.and_then(|s| s.fs_group))
    {
        let g = id(Some(g), "group")?.unwrap_or(0);
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let no_new_privs = sc.and_then(|s| s.allow_privilege_escalation) == Some(false);
    let read_only = sc.and_then(|s| s.read_only_root_filesystem) == Some(true);
    Ok((uid, gid, groups, no_new_privs, read_only))
}

/// A 64-hex-digit ID, unique per pod, container and start.
fn container_id(uid: &str, name: &str, restart: i32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (0..4u8)
        .map(|i| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (i, uid, name, restart, nanos).hash(&mut h);
            format!("{:016x}", h.finish())
        })
        .collect()
}

/// The pod's `/etc/hosts`, as a kubelet writes it.
pub fn hosts_file(pod_ip: Ipv4Addr, hostname: &str, fqdn: Option<&str>, pod: &Pod) -> String {
    let mut text = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    match fqdn {
        Some(fqdn) => text.push_str(&format!("{pod_ip}\t{fqdn}\t{hostname}\n")),
        None => text.push_str(&format!("{pod_ip}\t{hostname}\n")),
    }
    let aliases = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_aliases.clone())
        .unwrap_or_default();
    if !aliases.is_empty() {
        text.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            text.push_str(&format!(
                "{}\t{}\n",
                a.ip,
                a.hostnames.unwrap_or_default().join("\t")
            ));
        }
    }
    text
}

/// The pod's `/etc/resolv.conf` for its `dnsPolicy` and `dnsConfig`.
pub fn resolv_conf(pod: &Pod, nameserver: Ipv4Addr, cluster_domain: &str) -> String {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let policy = spec
        .and_then(|s| s.dns_policy.clone())
        .unwrap_or_else(|| "ClusterFirst".into());
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    let (mut servers, mut searches, mut options): (Vec<String>, Vec<String>, Vec<String>) =
        match policy.as_str() {
            "None" => (vec![], vec![], vec![]),
            "Default" => host_resolv_conf(),
            "ClusterFirst" if host_network => host_resolv_conf(),
            _ => (
                vec![nameserver.to_string()],
                vec![
                    format!("{namespace}.svc.{cluster_domain}"),
                    format!("svc.{cluster_domain}"),
                    cluster_domain.to_string(),
                ],
                vec!["ndots:5".into()],
            ),
        };
    if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
        servers.extend(config.nameservers.iter().flatten().cloned());
        searches.extend(config.searches.iter().flatten().cloned());
        for o in config.options.iter().flatten() {
            let text = match &o.value {
                Some(v) => format!("{}:{v}", o.name.clone().unwrap_or_default()),
                None => o.name.clone().unwrap_or_default(),
            };
            let key = text.split(':').next().unwrap_or_default().to_string();
            options.retain(|x| x.split(':').next() != Some(key.as_str()));
            options.push(text);
        }
    }
    let mut text = String::new();
    if !searches.is_empty() {
        text.push_str(&format!("search {}\n", searches.join(" ")));
    }
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    if !options.is_empty() {
        text.push_str(&format!("options {}\n", options.join(" ")));
    }
    text
}

fn host_resolv_conf() -> (Vec<String>, Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let (mut servers, mut searches, mut options) = (vec![], vec![], vec![]);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => servers.extend(words.map(str::to_string)),
            Some("search") => searches.extend(words.map(str::to_string)),
            Some("options") => options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    (servers, searches, options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn cluster_first_resolv_conf_has_the_search_list() {
        let pod = Pod {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        assert_eq!(
            resolv_conf(&pod, Ipv4Addr::new(10, 244, 0, 1), "cluster.local"),
            "search shop.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.244.0.1\noptions ndots:5\n"
        );
    }

    #[test]
    fn hosts_file_names_the_pod() {
        let text = hosts_file(
            Ipv4Addr::new(10, 244, 0, 5),
            "web-0",
            Some("web-0.web.shop.svc.cluster.local"),
            &Pod::default(),
        );
        assert!(
            text.ends_with("10.244.0.5\tweb-0.web.shop.svc.cluster.local\tweb-0\n"),
            "{text}"
        );
    }

    #[test]
    fn container_ids_are_64_hex_digits() {
        let id = container_id("u", "c", 0);
        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, container_id("u", "c", 1));
    }
}
