//! A pod's volumes on the host, under `<pod dir>/volumes/<name>`, ready to be bind-mounted
//! into its containers:
//! - ConfigMap, Secret, downwardAPI and projected volumes are written by an atomic writer
//!   with a kubelet's layout (`..<timestamp>/` holds the files, `..data` links to it, each
//!   top-level entry links into `..data`), so a refresh swaps one symlink and a container
//!   never reads half an update; they are refreshed every resync and their
//!   service-account tokens before 80% of their lifetime has passed;
//! - emptyDir is a directory (mode 0777), or a tmpfs of its `sizeLimit` for
//!   `medium: Memory`;
//! - a PersistentVolumeClaim is its bound PersistentVolume's `local` (or `hostPath`) path,
//!   which the provisioner keeps mounted; hostPath is the host path.
//!
//! With a pod `fsGroup`, files and directories are given that group and group access, as
//! a kubelet does for volumes that support ownership management.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod,
    Secret, ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use tracing::debug;

use super::env::{self, PodFacts};
use super::quantity;

/// A file of an atomically written volume: content and mode.
type Payload = BTreeMap<String, (Vec<u8>, u32)>;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: {kind} \"{name}\" not found")]
    NotFound {
        volume: String,
        kind: &'static str,
        name: String,
    },
    #[error("volume {volume}: {kind} {name} has no key {key}")]
    KeyNotFound {
        volume: String,
        kind: &'static str,
        name: String,
        key: String,
    },
    #[error("volume {volume}: reading {kind} {name}: {source}")]
    Api {
        volume: String,
        kind: &'static str,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "volume {volume}: PersistentVolumeClaim {claim} is not bound yet (the provisioner or the binder has not made its volume)"
    )]
    Unbound { volume: String, claim: String },
    #[error("volume {volume}: {message}")]
    Unsupported { volume: String, message: String },
    #[error("volume {volume}: {what} {path}: {source}")]
    Io {
        volume: String,
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume}: {source}")]
    Field {
        volume: String,
        #[source]
        source: env::EnvError,
    },
    #[error("volume {volume}: `{command}` failed: {message}")]
    Command {
        volume: String,
        command: String,
        message: String,
    },
}

/// Where a volume is on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePath {
    pub path: PathBuf,
    /// The volume kind is always mounted read-only (ConfigMap, Secret, downwardAPI,
    /// projected), whatever the volumeMount says.
    pub read_only: bool,
}

/// Everything a volume needs from the agent.
pub struct VolumeContext<'a> {
    pub client: &'a kube::Client,
    pub facts: PodFacts<'a>,
}

#[derive(Debug, Clone)]
struct Token {
    token: String,
    refresh_at: Instant,
}

/// A pod's volumes.
#[derive(Debug)]
pub struct PodVolumes {
    dir: PathBuf,
    pub paths: BTreeMap<String, VolumePath>,
    tokens: BTreeMap<(String, String), Token>,
    memory_mounts: Vec<PathBuf>,
}

fn io_err(
    volume: &str,
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> VolumeError {
    let (volume, path) = (volume.to_string(), path.to_path_buf());
    move |source| VolumeError::Io {
        volume,
        what,
        path,
        source,
    }
}

impl PodVolumes {
    pub fn new(dir: &Path) -> PodVolumes {
        PodVolumes {
            dir: dir.to_path_buf(),
            paths: BTreeMap::new(),
            tokens: BTreeMap::new(),
            memory_mounts: Vec::new(),
        }
    }

    /// Sets up every volume of the pod that is not set up yet, and rewrites the
    /// atomically written ones (a refresh). Stops at the first volume that cannot be set
    /// up; what is done stays done, so a retry continues from there.
    pub async fn sync(&mut self, ctx: &VolumeContext<'_>) -> Result<(), VolumeError> {
        let volumes: Vec<Volume> = ctx
            .facts
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let fs_group = fs_group(ctx.facts.pod);
        for volume in &volumes {
            let path = self.dir.join(&volume.name);
            let set_up = self.paths.contains_key(&volume.name);
            let written = if let Some(payload) = self.payload(ctx, volume).await? {
                write_atomic(&path, &payload, fs_group).map_err(io_err(
                    &volume.name,
                    "writing",
                    &path,
                ))?;
                Some(VolumePath {
                    path,
                    read_only: true,
                })
            } else if set_up {
                None
            } else {
                Some(self.set_up_other(ctx, volume, &path, fs_group).await?)
            };
            if let Some(v) = written {
                self.paths.insert(volume.name.clone(), v);
            }
        }
        Ok(())
    }

    /// The earliest time a service-account token must be renewed.
    pub fn next_token_refresh(&self) -> Option<Instant> {
        self.tokens.values().map(|t| t.refresh_at).min()
    }

    /// The files of an atomically written volume, `None` for other kinds.
    async fn payload(
        &mut self,
        ctx: &VolumeContext<'_>,
        volume: &Volume,
    ) -> Result<Option<Payload>, VolumeError> {
        let name = &volume.name;
        let mut payload = Payload::new();
        if let Some(src) = &volume.config_map {
            let mode = src.default_mode.unwrap_or(0o644) as u32;
            let data = config_map(ctx, name, &src.name, src.optional == Some(true)).await?;
            project(
                name,
                "ConfigMap",
                &src.name,
                data,
                src.items.as_deref(),
                mode,
                src.optional == Some(true),
                &mut payload,
            )?;
        } else if let Some(src) = &volume.secret {
            let mode = src.default_mode.unwrap_or(0o644) as u32;
            let secret_name = src.secret_name.clone().unwrap_or_default();
            let data = secret(ctx, name, &secret_name, src.optional == Some(true)).await?;
            project(
                name,
                "Secret",
                &secret_name,
                data,
                src.items.as_deref(),
                mode,
                src.optional == Some(true),
                &mut payload,
            )?;
        } else if let Some(src) = &volume.downward_api {
            let mode = src.default_mode.unwrap_or(0o644) as u32;
            downward(
                ctx,
                name,
                src.items.as_deref().unwrap_or_default(),
                mode,
                &mut payload,
            )?;
        } else if let Some(src) = &volume.projected {
            let mode = src.default_mode.unwrap_or(0o644) as u32;
            for source in src.sources.iter().flatten() {
                if let Some(cm) = &source.config_map {
                    let optional = cm.optional == Some(true);
                    let data = config_map(ctx, name, &cm.name, optional).await?;
                    project(
                        name,
                        "ConfigMap",
                        &cm.name,
                        data,
                        cm.items.as_deref(),
                        mode,
                        optional,
                        &mut payload,
                    )?;
                } else if let Some(s) = &source.secret {
                    let optional = s.optional == Some(true);
                    let data = secret(ctx, name, &s.name, optional).await?;
                    project(
                        name,
                        "Secret",
                        &s.name,
                        data,
                        s.items.as_deref(),
                        mode,
                        optional,
                        &mut payload,
                    )?;
                } else if let Some(d) = &source.downward_api {
                    downward(
                        ctx,
                        name,
                        d.items.as_deref().unwrap_or_default(),
                        mode,
                        &mut payload,
                    )?;
                } else if let Some(t) = &source.service_account_token {
                    let token = self
                        .token(
                            ctx,
                            name,
                            &t.path,
                            t.audience.as_deref(),
                            t.expiration_seconds,
                        )
                        .await?;
                    payload.insert(t.path.clone(), (token.into_bytes(), mode));
                } else {
                    return Err(VolumeError::Unsupported {
                        volume: name.clone(),
                        message: "only configMap, secret, downwardAPI and serviceAccountToken projections are supported".into(),
                    });
                }
            }
        } else {
            return Ok(None);
        }
        Ok(Some(payload))
    }

    /// The pod-bound token for one projection: the one held until its refresh time, then
    /// a new one from the TokenRequest API.
    async fn token(
        &mut self,
        ctx: &VolumeContext<'_>,
        volume: &str,
        path: &str,
        audience: Option<&str>,
        expiration_seconds: Option<i64>,
    ) -> Result<String, VolumeError> {
        let key = (volume.to_string(), path.to_string());
        if let Some(t) = self.tokens.get(&key)
            && t.refresh_at > Instant::now()
        {
            return Ok(t.token.clone());
        }
        let pod = ctx.facts.pod;
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let ttl = expiration_seconds.unwrap_or(3600).max(600);
        let request = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: TokenRequestSpec {
                audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
                expiration_seconds: Some(ttl),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            status: None,
        };
        let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
        let answer = api
            .create_token_request(&sa, &PostParams::default(), &request)
            .await
            .map_err(|source| VolumeError::Api {
                volume: volume.to_string(),
                kind: "token of ServiceAccount",
                name: format!("{namespace}/{sa}"),
                source: Box::new(source),
            })?;
        let token = answer.status.map(|s| s.token).unwrap_or_default();
        // A kubelet renews at 80% of the lifetime it asked for.
        let refresh_at = Instant::now() + Duration::from_secs(ttl as u64 * 8 / 10);
        debug!(volume, path, "requested a service-account token");
        self.tokens.insert(
            key,
            Token {
                token: token.clone(),
                refresh_at,
            },
        );
        Ok(token)
    }

    async fn set_up_other(
        &mut self,
        ctx: &VolumeContext<'_>,
        volume: &Volume,
        path: &Path,
        fs_group: Option<u32>,
    ) -> Result<VolumePath, VolumeError> {
        let name = &volume.name;
        if let Some(empty) = &volume.empty_dir {
            create_dir(name, path, 0o777)?;
            if empty.medium.as_deref() == Some("Memory") {
                let size = match &empty.size_limit {
                    Some(q) => quantity::value(&q.0).map_err(|e| VolumeError::Unsupported {
                        volume: name.clone(),
                        message: e.to_string(),
                    })?,
                    None => ctx.facts.allocatable_memory / 2,
                };
                mount_tmpfs(name, path, size).await?;
                self.memory_mounts.push(path.to_path_buf());
            }
            set_ownership(path, fs_group, true).map_err(io_err(
                name,
                "setting the group of",
                path,
            ))?;
            return Ok(VolumePath {
                path: path.to_path_buf(),
                read_only: false,
            });
        }
        if let Some(claim) = &volume.persistent_volume_claim {
            let local = claim_path(ctx, name, &claim.claim_name).await?;
            set_ownership(&local, fs_group, false).map_err(io_err(
                name,
                "setting the group of",
                &local,
            ))?;
            return Ok(VolumePath {
                path: local,
                read_only: claim.read_only == Some(true),
            });
        }
        if let Some(host) = &volume.host_path {
            let host_path = PathBuf::from(&host.path);
            match host.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => create_dir(name, &host_path, 0o755)?,
                "FileOrCreate" => {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&host_path)
                        .map_err(io_err(name, "creating", &host_path))?;
                }
                "Directory" if !host_path.is_dir() => {
                    return Err(VolumeError::Unsupported {
                        volume: name.clone(),
                        message: format!(
                            "hostPath type check failed: {} is not a directory",
                            host.path
                        ),
                    });
                }
                "File" if !host_path.is_file() => {
                    return Err(VolumeError::Unsupported {
                        volume: name.clone(),
                        message: format!("hostPath type check failed: {} is not a file", host.path),
                    });
                }
                _ => {}
            }
            return Ok(VolumePath {
                path: host_path,
                read_only: false,
            });
        }
        Err(VolumeError::Unsupported {
            volume: name.clone(),
            message: "this volume type is not supported by rtable-node (supported: configMap, secret, downwardAPI, projected, emptyDir, persistentVolumeClaim, hostPath)".into(),
        })
    }

    /// Unmounts what the agent mounted for the pod and removes its volume directories
    /// (emptyDir data goes with the pod; persistent volumes are elsewhere).
    pub async fn tear_down(&mut self) -> Result<(), VolumeError> {
        for path in self.memory_mounts.drain(..) {
            unmount(&path).await?;
        }
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).map_err(io_err("(all)", "removing", &self.dir))?;
        }
        self.paths.clear();
        self.tokens.clear();
        Ok(())
    }
}

fn fs_group(pod: &Pod) -> Option<u32> {
    pod.spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.fs_group)
        .and_then(|g| u32::try_from(g).ok())
}

fn create_dir(volume: &str, path: &Path, mode: u32) -> Result<(), VolumeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io_err(volume, "creating", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(
        volume,
        "setting the mode of",
        path,
    ))
}

async fn config_map(
    ctx: &VolumeContext<'_>,
    volume: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
    let namespace = ctx.facts.pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let found = api.get_opt(name).await.map_err(|source| VolumeError::Api {
        volume: volume.to_string(),
        kind: "ConfigMap",
        name: name.to_string(),
        source: Box::new(source),
    })?;
    match found {
        Some(cm) => {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            for (k, v) in cm.binary_data.unwrap_or_default() {
                data.insert(k, v.0);
            }
            Ok(Some(data))
        }
        None if optional => Ok(None),
        None => Err(VolumeError::NotFound {
            volume: volume.to_string(),
            kind: "configmap",
            name: name.to_string(),
        }),
    }
}

async fn secret(
    ctx: &VolumeContext<'_>,
    volume: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
    let namespace = ctx.facts.pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let found = api.get_opt(name).await.map_err(|source| VolumeError::Api {
        volume: volume.to_string(),
        kind: "Secret",
        name: name.to_string(),
        source: Box::new(source),
    })?;
    match found {
        Some(s) => {
            let mut data: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            for (k, v) in s.string_data.unwrap_or_default() {
                data.insert(k, v.into_bytes());
            }
            Ok(Some(data))
        }
        None if optional => Ok(None),
        None => Err(VolumeError::NotFound {
            volume: volume.to_string(),
            kind: "secret",
            name: name.to_string(),
        }),
    }
}

/// Adds a ConfigMap's or Secret's keys (all, or the listed `items`) to `payload`.
#[allow(clippy::too_many_arguments)]
fn project(
    volume: &str,
    kind: &'static str,
    name: &str,
    data: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&[KeyToPath]>,
    default_mode: u32,
    optional: bool,
    payload: &mut Payload,
) -> Result<(), VolumeError> {
    let Some(data) = data else { return Ok(()) };
    match items {
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(bytes) => {
                        let mode = item.mode.map_or(default_mode, |m| m as u32);
                        payload.insert(item.path.clone(), (bytes.clone(), mode));
                    }
                    None if optional => {}
                    None => {
                        return Err(VolumeError::KeyNotFound {
                            volume: volume.to_string(),
                            kind,
                            name: name.to_string(),
                            key: item.key.clone(),
                        });
                    }
                }
            }
        }
        None => {
            for (k, v) in data {
                payload.insert(k, (v, default_mode));
            }
        }
    }
    Ok(())
}

fn downward(
    ctx: &VolumeContext<'_>,
    volume: &str,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
    payload: &mut Payload,
) -> Result<(), VolumeError> {
    let field_err = |source| VolumeError::Field {
        volume: volume.to_string(),
        source,
    };
    for item in items {
        let value = if let Some(f) = &item.field_ref {
            env::field_value(&ctx.facts, &f.field_path).map_err(field_err)?
        } else if let Some(r) = &item.resource_field_ref {
            let container = r.container_name.clone().unwrap_or_default();
            env::resource_value(
                &ctx.facts,
                &container,
                &r.resource,
                r.divisor.as_ref().map(|d| d.0.as_str()),
            )
            .map_err(field_err)?
        } else {
            continue;
        };
        let mode = item.mode.map_or(default_mode, |m| m as u32);
        payload.insert(item.path.clone(), (value.into_bytes(), mode));
    }
    Ok(())
}

/// The host path of the PersistentVolume bound to `claim`.
async fn claim_path(
    ctx: &VolumeContext<'_>,
    volume: &str,
    claim: &str,
) -> Result<PathBuf, VolumeError> {
    let namespace = ctx.facts.pod.metadata.namespace.clone().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let api_err = |kind: &'static str, name: &str| {
        let (volume, name) = (volume.to_string(), name.to_string());
        move |source| VolumeError::Api {
            volume,
            kind,
            name,
            source: Box::new(source),
        }
    };
    let pvc = claims
        .get_opt(claim)
        .await
        .map_err(api_err("PersistentVolumeClaim", claim))?
        .ok_or_else(|| VolumeError::NotFound {
            volume: volume.to_string(),
            kind: "persistentvolumeclaim",
            name: claim.to_string(),
        })?;
    let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let pv_name = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
    let (true, Some(pv_name)) = (bound, pv_name) else {
        return Err(VolumeError::Unbound {
            volume: volume.to_string(),
            claim: format!("{namespace}/{claim}"),
        });
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = pvs
        .get(&pv_name)
        .await
        .map_err(api_err("PersistentVolume", &pv_name))?;
    let spec = pv.spec.unwrap_or_default();
    let path = spec
        .local
        .map(|l| l.path)
        .or(spec.host_path.map(|h| h.path))
        .ok_or_else(|| VolumeError::Unsupported {
            volume: volume.to_string(),
            message: format!("PersistentVolume {pv_name} is neither `local` nor `hostPath`"),
        })?;
    let path = PathBuf::from(path);
    if !path.is_dir() {
        return Err(VolumeError::Unsupported {
            volume: volume.to_string(),
            message: format!(
                "PersistentVolume {pv_name}'s path {} does not exist on this node",
                path.display()
            ),
        });
    }
    Ok(path)
}

/// Gives `path` (and, unless only the root is wrong and `recursive` is false, what is
/// under it) the group `gid` with group access and setgid directories, as a kubelet's
/// `fsGroupChangePolicy: OnRootMismatch` does.
fn set_ownership(path: &Path, gid: Option<u32>, recursive: bool) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(gid) = gid else { return Ok(()) };
    let root = std::fs::metadata(path)?;
    if root.gid() == gid && root.mode() & 0o2070 == 0o2070 && !recursive {
        return Ok(());
    }
    fn walk(path: &Path, gid: u32) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(std::io::Error::from)?;
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if meta.is_dir() {
            mode | 0o2070
        } else {
            mode | 0o060
        };
        if wanted != mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                walk(&entry?.path(), gid)?;
            }
        }
        Ok(())
    }
    walk(path, gid)
}

/// Writes `payload` into `dir` the way a kubelet's AtomicWriter does; returns whether
/// anything changed. Files get their mode (and the group `gid`, readable by it).
pub fn write_atomic(dir: &Path, payload: &Payload, gid: Option<u32>) -> std::io::Result<bool> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    let data_link = dir.join("..data");
    let current = std::fs::read_link(&data_link).ok();
    if let Some(current) = &current
        && same_payload(&dir.join(current), payload)
    {
        return Ok(false);
    }
    let stamp = chrono::Utc::now()
        .format("..%Y_%m_%d_%H_%M_%S.%f")
        .to_string();
    let staged = dir.join(&stamp);
    std::fs::DirBuilder::new().mode(0o755).create(&staged)?;
    for (rel, (bytes, mode)) in payload {
        let file = staged.join(rel);
        if let Some(parent) = file.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
        }
        std::fs::write(&file, bytes)?;
        let mut mode = *mode & 0o7777;
        if let Some(gid) = gid {
            nix::unistd::chown(&file, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(std::io::Error::from)?;
            mode |= 0o040;
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
    }
    if let Some(gid) = gid {
        for d in [dir, &staged] {
            nix::unistd::chown(d, None, Some(nix::unistd::Gid::from_raw(gid)))
                .map_err(std::io::Error::from)?;
        }
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    symlink(&stamp, &tmp_link)?;
    std::fs::rename(&tmp_link, &data_link)?;
    let top: BTreeSet<String> = payload
        .keys()
        .filter_map(|p| p.split('/').find(|c| !c.is_empty()).map(str::to_string))
        .collect();
    for name in &top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{name}"), &link)?;
        }
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale_link = !name.starts_with("..") && !top.contains(&name);
        let old_stamp = name.starts_with("..")
            && name != "..data"
            && name != stamp
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if stale_link {
            std::fs::remove_file(entry.path())?;
        } else if old_stamp {
            std::fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(true)
}

fn same_payload(dir: &Path, payload: &Payload) -> bool {
    fn count_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        if e.file_type().is_ok_and(|t| t.is_dir()) {
                            count_files(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    count_files(dir) == payload.len()
        && payload.iter().all(|(rel, (bytes, mode))| {
            let file = dir.join(rel);
            std::fs::read(&file).is_ok_and(|b| &b == bytes)
                && std::fs::metadata(&file)
                    .is_ok_and(|m| m.permissions().mode() & 0o707 == mode & 0o707)
        })
}

async fn mount_tmpfs(volume: &str, path: &Path, size: u128) -> Result<(), VolumeError> {
    let options = format!("size={size},mode=0777");
    run(
        volume,
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            &options,
            "tmpfs",
            &path.to_string_lossy(),
        ],
    )
    .await
}

async fn unmount(path: &Path) -> Result<(), VolumeError> {
    run("(memory)", "umount", &[&path.to_string_lossy()]).await
}

async fn run(volume: &str, program: &str, args: &[&str]) -> Result<(), VolumeError> {
    let command = format!("{program} {}", args.join(" "));
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| VolumeError::Command {
            volume: volume.to_string(),
            command: command.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(VolumeError::Command {
            volume: volume.to_string(),
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_swap_a_symlink_and_skip_identical_payloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = dir.path().join("config");
        let mut payload = Payload::new();
        payload.insert("table.yaml".into(), (b"a: 1".to_vec(), 0o440));
        payload.insert("secret/interserver".into(), (b"s3cr3t".to_vec(), 0o440));
        assert!(write_atomic(&vol, &payload, None).expect("write"));
        assert_eq!(
            std::fs::read_to_string(vol.join("secret/interserver")).expect("read"),
            "s3cr3t"
        );
        assert!(
            std::fs::symlink_metadata(vol.join("table.yaml"))
                .expect("meta")
                .file_type()
                .is_symlink()
        );
        let mode = std::fs::metadata(vol.join("table.yaml"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o440);
        assert!(
            !write_atomic(&vol, &payload, None).expect("rewrite"),
            "unchanged"
        );

        payload.remove("secret/interserver");
        payload.insert("table.yaml".into(), (b"a: 2".to_vec(), 0o440));
        assert!(write_atomic(&vol, &payload, None).expect("update"));
        assert_eq!(
            std::fs::read_to_string(vol.join("table.yaml")).expect("read"),
            "a: 2"
        );
        assert!(!vol.join("secret").exists(), "a removed key's link goes");
        let stamps = std::fs::read_dir(&vol)
            .expect("list")
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("..") && n != "..data"
            })
            .count();
        assert_eq!(stamps, 1, "the old payload directory is removed");
    }
}
