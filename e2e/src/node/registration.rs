//! The Node object and the node's heartbeats, as a kubelet keeps them: the Node is created
//! with the `node.kubernetes.io/not-ready:NoSchedule` taint (nothing is scheduled before the
//! node-lifecycle controller has seen it Ready), the `kube-node-lease/<node>` Lease is renewed
//! every few seconds (the heartbeat the node-lifecycle controller watches), and the status
//! conditions are rewritten with fresh heartbeat times less often.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::NodeConfig;

pub const LEASE_NAMESPACE: &str = "kube-node-lease";

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("creating Node {node}: {source}")]
    Create {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading Node {node}: {source}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of Node {node}: {source}")]
    Status {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("renewing Lease {LEASE_NAMESPACE}/{node}: {source}")]
    Lease {
        node: String,
        #[source]
        source: kube::Error,
    },
}

/// What the node reports about the machine: read once at start.
#[derive(Debug, Clone)]
pub struct MachineInfo {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: u64,
    pub boot_id: String,
    pub machine_id: String,
    pub kernel: String,
    pub os_image: String,
}

impl MachineInfo {
    pub fn read(state_dir: &Path) -> MachineInfo {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let memory_kib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        let ephemeral = nix::sys::statvfs::statvfs(state_dir)
            .map(|s| s.blocks() * s.fragment_size())
            .unwrap_or(0);
        let os_image = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "Linux".into());
        let boot_id = read("/proc/sys/kernel/random/boot_id");
        let machine_id = Some(read("/etc/machine-id"))
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| boot_id.replace('-', ""));
        MachineInfo {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            memory_bytes: memory_kib * 1024,
            ephemeral_storage_bytes: ephemeral,
            boot_id,
            machine_id,
            kernel: read("/proc/sys/kernel/osrelease"),
            os_image,
        }
    }
}

/// `GOARCH` spelling of this machine's architecture, as the `kubernetes.io/arch` label.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// The node's conditions: healthy, with `now` as the heartbeat and, for a condition whose
/// status is unchanged since `previous`, its old transition time.
pub fn conditions(previous: &[NodeCondition], now: &Time) -> Vec<NodeCondition> {
    let make = |type_: &str, status: &str, reason: &str, message: &str| {
        let transition = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        NodeCondition {
            type_: type_.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(transition),
        }
    };
    vec![
        make(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        make(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
        ),
        make(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ),
        make(
            "Ready",
            "True",
            "KubeletReady",
            "rtable-node is posting ready status",
        ),
    ]
}

/// The Node as first registered.
pub fn node_object(cfg: &NodeConfig, machine: &MachineInfo, host_ip: Ipv4Addr) -> Node {
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), cfg.node_name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), go_arch().to_string()),
    ]);
    let annotations = BTreeMap::from([
        // Volumes are attached by the attach/detach controller's rules, as on a kubelet
        // with the default --enable-controller-attach-detach.
        (
            "volumes.kubernetes.io/controller-managed-attach-detach".to_string(),
            "true".to_string(),
        ),
        ("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string()),
    ]);
    Node {
        metadata: ObjectMeta {
            name: Some(cfg.node_name.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "node.kubernetes.io/not-ready".into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        }),
        status: Some(node_status(cfg, machine, host_ip, &[])),
    }
}

/// The full status: capacity, addresses, system info and conditions.
pub fn node_status(
    cfg: &NodeConfig,
    machine: &MachineInfo,
    host_ip: Ipv4Addr,
    previous_conditions: &[NodeCondition],
) -> NodeStatus {
    let capacity = BTreeMap::from([
        ("cpu".to_string(), Quantity(machine.cpus.to_string())),
        (
            "memory".to_string(),
            Quantity(format!("{}Ki", machine.memory_bytes / 1024)),
        ),
        ("pods".to_string(), Quantity(cfg.max_pods.to_string())),
        (
            "ephemeral-storage".to_string(),
            Quantity(format!("{}Ki", machine.ephemeral_storage_bytes / 1024)),
        ),
    ]);
    NodeStatus {
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        // No `Hostname` address: the API server prefers it for reaching the kubelet API
        // (`kubectl logs`), and a node name resolves nowhere on this machine.
        addresses: Some(vec![NodeAddress {
            type_: "InternalIP".into(),
            address: host_ip.to_string(),
        }]),
        conditions: Some(conditions(previous_conditions, &now())),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(super::kubelet_api::PORT),
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: go_arch().into(),
            boot_id: machine.boot_id.clone(),
            container_runtime_version: format!(
                "{}://{}",
                super::RUNTIME_NAME,
                env!("CARGO_PKG_VERSION")
            ),
            kernel_version: machine.kernel.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: super::KUBELET_VERSION.into(),
            machine_id: machine.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: machine.os_image.clone(),
            system_uuid: machine.machine_id.clone(),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    }
}

/// Creates the Node, or takes over an existing one of the same name (an agent restarting):
/// its status is rewritten, its spec (taints an operator set, unschedulable) left alone.
pub async fn register(
    client: &kube::Client,
    cfg: &NodeConfig,
    machine: &MachineInfo,
    host_ip: Ipv4Addr,
) -> Result<Node, RegistrationError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = cfg.node_name.clone();
    let created = match nodes
        .create(&PostParams::default(), &node_object(cfg, machine, host_ip))
        .await
    {
        Ok(n) => {
            info!(node = %node, "registered the Node");
            n
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            info!(node = %node, "the Node exists already; taking it over");
            nodes
                .get(&node)
                .await
                .map_err(|source| RegistrationError::Get {
                    node: node.clone(),
                    source,
                })?
        }
        Err(source) => return Err(RegistrationError::Create { node, source }),
    };
    let previous = created
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let status = node_status(cfg, machine, host_ip, &previous);
    nodes
        .patch_status(
            &node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .map_err(|source| RegistrationError::Status { node, source })
}

fn lease_object(cfg: &NodeConfig, node: &Node) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(cfg.node_name.clone()),
            namespace: Some(LEASE_NAMESPACE.into()),
            // As a kubelet does: the Lease goes when the Node goes.
            owner_references: node.metadata.uid.clone().map(|uid| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: cfg.node_name.clone(),
                    uid,
                    ..OwnerReference::default()
                }]
            }),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(cfg.node_name.clone()),
            lease_duration_seconds: Some(cfg.lease_duration_seconds),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        }),
    }
}

async fn renew_lease(
    leases: &Api<Lease>,
    cfg: &NodeConfig,
    node: &Node,
) -> Result<(), RegistrationError> {
    let err = |source| RegistrationError::Lease {
        node: cfg.node_name.clone(),
        source,
    };
    let patch = serde_json::json!({
        "spec": {
            "holderIdentity": cfg.node_name,
            "leaseDurationSeconds": cfg.lease_duration_seconds,
            "renewTime": MicroTime(Timestamp::now()),
        }
    });
    match leases
        .patch(
            &cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => leases
            .create(&PostParams::default(), &lease_object(cfg, node))
            .await
            .map(drop)
            .map_err(err),
        Err(e) => Err(err(e)),
    }
}

/// Renews the Lease every `lease_renew_interval` and rewrites the status every
/// `status_interval` until `stop`. Failures are logged and retried at the next tick: a
/// missed heartbeat is what the node-lifecycle controller is there to notice.
pub async fn heartbeat(client: kube::Client, cfg: NodeConfig, node: Node, stop: CancellationToken) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let nodes: Api<Node> = Api::all(client);
    let mut lease_tick = tokio::time::interval(cfg.lease_renew_interval);
    let mut status_tick = tokio::time::interval(cfg.status_interval);
    lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lease_tick.tick() => {
                match renew_lease(&leases, &cfg, &node).await {
                    Ok(()) => debug!("renewed the node lease"),
                    Err(e) => warn!(error = %e, "lease renewal failed"),
                }
            }
            _ = status_tick.tick() => {
                let conditions = conditions(&previous, &now());
                let patch = serde_json::json!({ "status": { "conditions": conditions } });
                let written = nodes
                    .patch_status(&cfg.node_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                match written {
                    Ok(_) => previous = conditions,
                    Err(e) => warn!(error = %e, "node status update failed"),
                }
            }
        }
    }
}
