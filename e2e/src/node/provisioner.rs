//! A volume provisioner for the StorageClass `rtable-local` (`WaitForFirstConsumer`, the
//! cluster's default), the way local-path-provisioner and external-provisioner work:
//! - when the scheduler has picked this node for a claim's first pod (the claim's
//!   `volume.kubernetes.io/selected-node` annotation), a sparse image of the claimed size
//!   under `<state dir>/volumes/` gets an ext4 filesystem and is loop-mounted, and a `local`
//!   PersistentVolume with node affinity to this node and a `claimRef` to the claim is
//!   created; the persistentvolume-binder controller binds the two;
//! - the volume is a real filesystem of that size: `df` shows it, writes fill it up, and
//!   it outlives the pods that use it;
//! - when its claim is deleted the binder marks the volume `Released`; with the reclaim
//!   policy `Delete` the provisioner unmounts it, removes the image and deletes the PV.
//!
//! It runs with the add-ons identity (see [`addon_rbac`]): a node may not create volumes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{
    LocalVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::cleanup;
use super::quantity;

/// The provisioner's name, as StorageClasses and PVs name it.
pub const PROVISIONER: &str = "rtable.io/node-local";
pub const STORAGE_CLASS: &str = "rtable-local";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
/// The smallest filesystem made: ext4's own structures need a few MiB.
const MIN_BYTES: u128 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("creating StorageClass {STORAGE_CLASS}: {0}")]
    StorageClass(#[source] kube::Error),
    #[error("claim {claim}: {message}")]
    Claim { claim: String, message: String },
    #[error("creating PersistentVolume {name}: {source}")]
    CreatePv {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting PersistentVolume {name}: {source}")]
    DeletePv {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
}

/// The StorageClass the provisioner serves: the cluster's default, bound when a pod is
/// scheduled (the provisioner must know the node), deleted with its claim.
pub fn storage_class() -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(STORAGE_CLASS.into()),
            annotations: Some(BTreeMap::from([(
                DEFAULT_CLASS.to_string(),
                "true".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        provisioner: PROVISIONER.into(),
        reclaim_policy: Some("Delete".into()),
        volume_binding_mode: Some("WaitForFirstConsumer".into()),
        allow_volume_expansion: Some(false),
        ..StorageClass::default()
    }
}

/// What the add-ons identity `user` needs: the DNS server's Services and EndpointSlices,
/// the provisioner's volumes, claims and classes, and Events.
pub fn addon_rbac(user: &str) -> (ClusterRole, ClusterRoleBinding) {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..PolicyRule::default()
    };
    let name = "rtable-node-addons".to_string();
    let role = ClusterRole {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![
            rule(&[""], &["services", "endpoints"], &["get", "list", "watch"]),
            rule(
                &["discovery.k8s.io"],
                &["endpointslices"],
                &["get", "list", "watch"],
            ),
            rule(
                &[""],
                &["persistentvolumes"],
                &[
                    "get", "list", "watch", "create", "delete", "patch", "update",
                ],
            ),
            rule(
                &[""],
                &["persistentvolumeclaims"],
                &["get", "list", "watch", "patch", "update"],
            ),
            rule(
                &["storage.k8s.io"],
                &["storageclasses"],
                &["get", "list", "watch", "create"],
            ),
            rule(
                &["", "events.k8s.io"],
                &["events"],
                &["create", "patch", "update"],
            ),
        ]),
        ..ClusterRole::default()
    };
    let binding = ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name,
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "User".into(),
            name: user.to_string(),
            namespace: None,
        }]),
    };
    (role, binding)
}

async fn run_command(program: &str, args: &[&str]) -> Result<(), ProvisionError> {
    let command = format!("{program} {}", args.join(" "));
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| ProvisionError::Command {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ProvisionError::Command {
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The provisioner of one node.
pub struct Provisioner {
    client: kube::Client,
    node: String,
    dir: PathBuf,
    claims: Store<PersistentVolumeClaim>,
    volumes: Store<PersistentVolume>,
    classes: Store<StorageClass>,
    /// Volumes this run created: not orphans even before the watch shows them.
    created: std::sync::Mutex<BTreeSet<String>>,
}

fn claim_name(pvc: &PersistentVolumeClaim) -> String {
    format!(
        "{}/{}",
        pvc.metadata.namespace.as_deref().unwrap_or_default(),
        pvc.metadata.name.as_deref().unwrap_or_default()
    )
}

impl Provisioner {
    fn image(&self, pv: &str) -> PathBuf {
        self.dir.join(format!("{pv}.img"))
    }

    fn mount_point(&self, pv: &str) -> PathBuf {
        self.dir.join(pv)
    }

    /// The class a claim uses: its own, or the default one.
    fn class_of(&self, pvc: &PersistentVolumeClaim) -> Option<std::sync::Arc<StorageClass>> {
        let wanted = pvc.spec.as_ref().and_then(|s| s.storage_class_name.clone());
        self.classes.state().into_iter().find(|c| match &wanted {
            Some(name) => c.metadata.name.as_deref() == Some(name.as_str()),
            None => {
                c.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_CLASS))
                    .map(String::as_str)
                    == Some("true")
            }
        })
    }

    fn wants_volume(&self, pvc: &PersistentVolumeClaim) -> bool {
        let spec = pvc.spec.as_ref();
        let unbound = spec
            .and_then(|s| s.volume_name.as_deref())
            .is_none_or(str::is_empty);
        let here = pvc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SELECTED_NODE))
            == Some(&self.node);
        let ours = self
            .class_of(pvc)
            .is_some_and(|c| c.provisioner == PROVISIONER);
        unbound && here && ours && pvc.metadata.deletion_timestamp.is_none()
    }

    fn is_ours(&self, pv: &PersistentVolume) -> bool {
        let by_us = pv
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PROVISIONED_BY))
            .map(String::as_str)
            == Some(PROVISIONER);
        let on_this_node = pv
            .spec
            .as_ref()
            .and_then(|s| s.node_affinity.as_ref())
            .and_then(|a| a.required.as_ref())
            .is_some_and(|r| {
                r.node_selector_terms.iter().any(|t| {
                    t.match_expressions
                        .iter()
                        .flatten()
                        .any(|e| e.values.iter().flatten().any(|v| v == &self.node))
                })
            });
        by_us && on_this_node
    }

    async fn mounted(&self, mount: &Path) -> bool {
        cleanup::mount_points()
            .map(|m| m.iter().any(|p| p == mount))
            .unwrap_or(false)
    }

    /// The image of `bytes`, formatted and mounted (each step skipped if done).
    async fn ensure_filesystem(&self, pv: &str, bytes: u128) -> Result<PathBuf, ProvisionError> {
        let image = self.image(pv);
        let mount = self.mount_point(pv);
        if self.mounted(&mount).await {
            return Ok(mount);
        }
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ProvisionError::Io { what, path, source }
        };
        if !image.exists() {
            let staging = image.with_extension("img.new");
            let file = std::fs::File::create(&staging).map_err(io("creating", &staging))?;
            file.set_len(bytes as u64).map_err(io("sizing", &staging))?;
            drop(file);
            // No reserved blocks: the claim's size is what the pod may write.
            run_command(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-m",
                    "0",
                    "-L",
                    &pv.chars().take(16).collect::<String>(),
                    &staging.to_string_lossy(),
                ],
            )
            .await?;
            std::fs::rename(&staging, &image).map_err(io("renaming", &staging))?;
        }
        std::fs::create_dir_all(&mount).map_err(io("creating", &mount))?;
        run_command(
            "mount",
            &[
                "-o",
                "loop",
                &image.to_string_lossy(),
                &mount.to_string_lossy(),
            ],
        )
        .await?;
        Ok(mount)
    }

    async fn provision(&self, pvc: &PersistentVolumeClaim) -> Result<(), ProvisionError> {
        let claim = claim_name(pvc);
        let err = |message: String| ProvisionError::Claim {
            claim: claim.clone(),
            message,
        };
        let uid = pvc
            .metadata
            .uid
            .clone()
            .ok_or_else(|| err("no uid".into()))?;
        let spec = pvc.spec.clone().unwrap_or_default();
        let request = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .cloned()
            .ok_or_else(|| err("requests no storage".into()))?;
        let bytes = quantity::value(&request.0).map_err(|e| err(e.to_string()))?;
        // Whole MiB, at least MIN_BYTES.
        let bytes = bytes.max(MIN_BYTES).div_ceil(1 << 20) << 20;
        let class = self
            .class_of(pvc)
            .ok_or_else(|| err("its StorageClass is gone".into()))?;
        let name = format!("pvc-{uid}");
        let mount = self.ensure_filesystem(&name, bytes).await?;
        let pv = PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                annotations: Some(BTreeMap::from([(
                    PROVISIONED_BY.to_string(),
                    PROVISIONER.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeSpec {
                capacity: Some(BTreeMap::from([(
                    "storage".to_string(),
                    // The claim's own quantity when the image has exactly its size, so the
                    // binder's comparison and `kubectl get pv` show what was asked.
                    if quantity::value(&request.0).ok() == Some(bytes) {
                        request.clone()
                    } else {
                        Quantity(format!("{}Mi", bytes >> 20))
                    },
                )])),
                access_modes: spec.access_modes.clone(),
                claim_ref: Some(ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("PersistentVolumeClaim".into()),
                    namespace: pvc.metadata.namespace.clone(),
                    name: pvc.metadata.name.clone(),
                    uid: Some(uid),
                    ..ObjectReference::default()
                }),
                persistent_volume_reclaim_policy: class
                    .reclaim_policy
                    .clone()
                    .or(Some("Delete".into())),
                storage_class_name: class.metadata.name.clone(),
                volume_mode: Some("Filesystem".into()),
                local: Some(LocalVolumeSource {
                    path: mount.to_string_lossy().into_owned(),
                    fs_type: Some("ext4".into()),
                }),
                node_affinity: Some(VolumeNodeAffinity {
                    required: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: "kubernetes.io/hostname".into(),
                                operator: "In".into(),
                                values: Some(vec![self.node.clone()]),
                            }]),
                            ..NodeSelectorTerm::default()
                        }],
                    }),
                }),
                ..PersistentVolumeSpec::default()
            }),
            ..PersistentVolume::default()
        };
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        match api.create(&PostParams::default(), &pv).await {
            Ok(_) => {
                info!(claim = %claim, pv = %name, bytes, "provisioned a volume");
                self.created_names().insert(name.clone());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                debug!(pv = %name, "the volume exists already")
            }
            Err(source) => return Err(ProvisionError::CreatePv { name, source }),
        }
        Ok(())
    }

    fn created_names(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.created.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Unmounts and removes a volume's filesystem.
    async fn remove_filesystem(&self, pv: &str) -> Result<(), ProvisionError> {
        let mount = self.mount_point(pv);
        if self.mounted(&mount).await {
            run_command("umount", &[&mount.to_string_lossy()]).await?;
        }
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ProvisionError::Io { what, path, source }
        };
        if mount.exists() {
            std::fs::remove_dir(&mount).map_err(io("removing", &mount))?;
        }
        let image = self.image(pv);
        if image.exists() {
            std::fs::remove_file(&image).map_err(io("removing", &image))?;
        }
        Ok(())
    }

    async fn reclaim(&self, pv: &PersistentVolume) -> Result<(), ProvisionError> {
        let name = pv.metadata.name.clone().unwrap_or_default();
        self.remove_filesystem(&name).await?;
        self.created_names().remove(&name);
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => info!(pv = %name, "deleted a released volume"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => return Err(ProvisionError::DeletePv { name, source }),
        }
        Ok(())
    }

    /// One level-triggered pass over every claim and volume.
    async fn reconcile(&self) {
        for pvc in self.claims.state() {
            if self.wants_volume(&pvc)
                && let Err(e) = self.provision(&pvc).await
            {
                warn!(error = %e, "provisioning failed; will retry");
            }
        }
        let mut known = BTreeSet::new();
        for pv in self.volumes.state() {
            if !self.is_ours(&pv) {
                continue;
            }
            let name = pv.metadata.name.clone().unwrap_or_default();
            known.insert(name.clone());
            let spec = pv.spec.clone().unwrap_or_default();
            let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
            let delete = spec.persistent_volume_reclaim_policy.as_deref() == Some("Delete");
            if phase == Some("Released") && delete {
                if let Err(e) = self.reclaim(&pv).await {
                    warn!(error = %e, pv = %name, "reclaiming failed; will retry");
                }
            } else if pv.metadata.deletion_timestamp.is_none() {
                // After an agent restart: mount what the cluster still uses.
                let bytes = spec
                    .capacity
                    .as_ref()
                    .and_then(|c| c.get("storage"))
                    .and_then(|q| quantity::value(&q.0).ok())
                    .unwrap_or(MIN_BYTES);
                if self.image(&name).exists()
                    && let Err(e) = self.ensure_filesystem(&name, bytes).await
                {
                    warn!(error = %e, pv = %name, "remounting failed; will retry");
                }
            }
        }
        // Filesystems whose volume is gone (deleted by hand, or a crash between the two
        // steps of a reclaim).
        known.extend(self.created_names().iter().cloned());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(pv) = file.strip_suffix(".img")
                && !known.contains(pv)
                && let Err(e) = self.remove_filesystem(pv).await
            {
                warn!(error = %e, pv, "removing an orphaned filesystem failed");
            }
        }
    }
}

/// Creates the StorageClass and provisions until `stop`. Filesystems stay mounted when it
/// stops: volumes belong to the cluster, not to the agent's run.
pub async fn run(
    client: kube::Client,
    node: String,
    state_dir: &Path,
    stop: CancellationToken,
) -> Result<(), ProvisionError> {
    let classes_api: Api<StorageClass> = Api::all(client.clone());
    match classes_api
        .create(&PostParams::default(), &storage_class())
        .await
    {
        Ok(_) => info!(class = STORAGE_CLASS, "created the default StorageClass"),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(ProvisionError::StorageClass(e)),
    }
    let dir = state_dir.join("volumes");
    std::fs::create_dir_all(&dir).map_err(|source| ProvisionError::Io {
        what: "creating",
        path: dir.clone(),
        source,
    })?;
    let changed = std::sync::Arc::new(Notify::new());
    let (claims, claims_w) = reflector::store();
    let (volumes, volumes_w) = reflector::store();
    let (classes, classes_w) = reflector::store();
    let drive = {
        let n1 = changed.clone();
        let n2 = changed.clone();
        let n3 = changed.clone();
        let claims_s = reflector::reflector(
            claims_w,
            watcher(
                Api::<PersistentVolumeClaim>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .for_each(move |_| {
            n1.notify_one();
            async {}
        });
        let volumes_s = reflector::reflector(
            volumes_w,
            watcher(
                Api::<PersistentVolume>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .for_each(move |_| {
            n2.notify_one();
            async {}
        });
        let classes_s =
            reflector::reflector(classes_w, watcher(classes_api, watcher::Config::default()))
                .default_backoff()
                .for_each(move |_| {
                    n3.notify_one();
                    async {}
                });
        futures::future::join3(claims_s, volumes_s, classes_s)
    };
    let stop_drive = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = drive => {}
            () = stop_drive.cancelled() => {}
        }
    });
    let _ = claims.wait_until_ready().await;
    let _ = volumes.wait_until_ready().await;
    let _ = classes.wait_until_ready().await;
    let provisioner = Provisioner {
        client,
        node,
        dir,
        claims,
        volumes,
        classes,
        created: std::sync::Mutex::new(BTreeSet::new()),
    };
    loop {
        provisioner.reconcile().await;
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}
