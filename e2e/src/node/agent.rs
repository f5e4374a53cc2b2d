//! `rtable-node run`: wires the agent's parts together: the bridge, the Node and its
//! heartbeats, the cluster DNS, the volume provisioner and the pod sync loop, until
//! SIGTERM or SIGINT, when every pod on the node is stopped and its sandbox removed
//! (volumes stay: they are the cluster's).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::config::NodeConfig;
use super::dns::{self, Stores, Zone};
use super::events::Events;
use super::images::{ImageError, ImageMap};
use super::launch::NodeFacts;
use super::network::{self, Network, NetworkError};
use super::pod_worker::NodeContext;
use super::registration::{self, MachineInfo, RegistrationError};
use super::{provisioner, sync};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("rtable-node must run as root: it creates network namespaces, mounts and loop devices")]
    NotRoot,
    #[error("creating the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Images(#[from] ImageError),
    #[error("loading the kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("`{0}` is not an API endpoint `host:port`")]
    Endpoint(String),
    #[error("setting up the bridge: {0}")]
    Network(#[from] NetworkError),
    #[error("registering the node: {0}")]
    Registration(#[from] RegistrationError),
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
    #[error(transparent)]
    KubeletApi(#[from] super::kubelet_api::KubeletApiError),
    #[error("finding the agent's own binary: {0}")]
    SelfExe(#[source] std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// A client for a kubeconfig file, and its server URL.
pub async fn client_for(path: &Path) -> Result<(kube::Client, String), AgentError> {
    let err = |message: String| AgentError::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|e| err(e.to_string()))?;
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(|e| err(e.to_string()))?;
    Ok((client, server))
}

/// `host` and `port` of an endpoint given as `host:port` or a URL.
fn host_port(endpoint: &str) -> Result<(String, u16), AgentError> {
    let bad = || AgentError::Endpoint(endpoint.to_string());
    let rest = endpoint.split("://").last().unwrap_or(endpoint);
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

pub async fn run(cfg: NodeConfig) -> Result<(), AgentError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AgentError::NotRoot);
    }
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| AgentError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let images = Arc::new(ImageMap::load(&cfg.image_map)?);
    let (client, server) = client_for(&cfg.kubeconfig).await?;
    let (addons, _) = client_for(&cfg.addons_kubeconfig).await?;
    let (api_host, api_port) = host_port(cfg.api_endpoint.as_deref().unwrap_or(&server))?;

    let (bridge, cidr) = (cfg.bridge.clone(), cfg.pod_cidr);
    tokio::task::spawn_blocking(move || network::ensure_bridge(&bridge, &cidr))
        .await
        .map_err(|e| NetworkError::Command {
            command: "ensure bridge".into(),
            stderr: e.to_string(),
        })??;
    let network = Network::new(&cfg.bridge, cfg.pod_cidr, &cfg.state_dir)?;
    let host_ip = network.gateway();
    let machine = MachineInfo::read(&cfg.state_dir);
    let node = registration::register(&client, &cfg, &machine, host_ip).await?;
    info!(node = %cfg.node_name, %host_ip, api = %format!("{api_host}:{api_port}"), "node registered");

    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(registration::heartbeat(
        client.clone(),
        cfg.clone(),
        node,
        stop.child_token(),
    ));

    // The DNS server starts once its watches have listed everything (it never answers
    // NXDOMAIN for lack of data); pods start meanwhile, as on a cluster whose DNS is late.
    let (dns_stop, dns_addons, api_ip) = (
        stop.child_token(),
        addons.clone(),
        api_host.parse::<Ipv4Addr>().ok(),
    );
    let (domain, ttl) = (cfg.cluster_domain.clone(), cfg.dns_ttl);
    let dns_task = tokio::spawn(async move {
        let stores = Stores::start(&dns_addons, dns_stop.child_token()).await;
        let zone = Zone {
            domain,
            api: api_ip,
            ttl,
            directory: Arc::new(stores),
        };
        dns::serve(host_ip, zone, dns_stop).await
    });

    let api_stop = stop.child_token();
    let (node_name, logs_dir) = (cfg.node_name.clone(), cfg.state_dir.join("logs"));
    let kubelet_task = tokio::spawn(async move {
        super::kubelet_api::serve(
            std::net::IpAddr::V4(host_ip),
            &node_name,
            logs_dir,
            api_stop,
        )
        .await
    });

    let provisioner_stop = stop.child_token();
    let (provisioner_client, node_name, state_dir) =
        (addons.clone(), cfg.node_name.clone(), cfg.state_dir.clone());
    tasks.spawn(async move {
        if let Err(e) =
            provisioner::run(provisioner_client, node_name, &state_dir, provisioner_stop).await
        {
            error!(error = %e, "the volume provisioner stopped");
        }
    });

    let ctx = Arc::new(NodeContext {
        images,
        network,
        events: Events::new(client.clone(), &cfg.node_name),
        node: NodeFacts {
            allocatable_cpu_milli: u128::from(machine.cpus) * 1000,
            allocatable_memory: u128::from(machine.memory_bytes),
            allocatable_ephemeral: u128::from(machine.ephemeral_storage_bytes),
            agent_pid: std::process::id() as i32,
            state_dir: cfg.state_dir.clone(),
        },
        host_ip,
        api_host,
        api_port,
        self_exe: std::env::current_exe().map_err(AgentError::SelfExe)?,
        client,
        cfg,
    });
    let sync_task = tokio::spawn(sync::run(ctx, stop.child_token()));

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    // A server that cannot bind ends the agent: the node would be half there.
    let failed: Option<AgentError> = tokio::select! {
        _ = term.recv() => None,
        _ = int.recv() => None,
        result = dns_task => match result {
            Ok(Err(e)) => Some(e.into()),
            _ => None,
        },
        result = kubelet_task => match result {
            Ok(Err(e)) => Some(e.into()),
            _ => None,
        },
    };
    info!("stopping");
    stop.cancel();
    let _ = sync_task.await;
    while tasks.join_next().await.is_some() {}
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split() {
        assert_eq!(
            host_port("https://10.244.0.1:6443").expect("url"),
            ("10.244.0.1".into(), 6443)
        );
        assert_eq!(
            host_port("10.0.0.1:443/").expect("plain"),
            ("10.0.0.1".into(), 443)
        );
        assert!(host_port("https://host").is_err());
    }
}
