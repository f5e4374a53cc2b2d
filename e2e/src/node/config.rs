//! The agent's settings: its command line (`rtable-node run ...`) and what the test harness
//! passes to start one.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// An IPv4 network of the pods, e.g. `10.244.0.0/24`. Its first address belongs to the
/// bridge (the pods' gateway and the node's InternalIP); pods get the following ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodCidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{input}` is not an IPv4 CIDR with a prefix of /16 to /30 (e.g. 10.244.0.0/24): {why}")]
pub struct CidrError {
    input: String,
    why: &'static str,
}

impl FromStr for PodCidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| CidrError {
            input: s.to_string(),
            why,
        };
        let (addr, prefix) = s.split_once('/').ok_or_else(|| err("no /prefix"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err("bad address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| err("bad prefix"))?;
        if !(16..=30).contains(&prefix) {
            return Err(err("prefix out of range"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(PodCidr {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

impl std::fmt::Display for PodCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl PodCidr {
    /// The bridge's address: the network's first host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The addresses pods may get: every host address after the gateway.
    pub fn pod_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let broadcast = u32::from(self.network) | (u32::MAX >> self.prefix);
        (first..broadcast).map(Ipv4Addr::from)
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 0.001)
    } else if let Some(secs) = s.strip_suffix('s') {
        (secs, 1.0)
    } else if let Some(mins) = s.strip_suffix('m') {
        (mins, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration such as 500ms, 2s or 5m"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("`{s}` is not a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// `rtable-node run` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeConfig {
    /// The Node's name (and the `system:node:<name>` identity of the kubeconfig).
    #[arg(long)]
    pub node_name: String,
    /// Kubeconfig with the node's client certificate (user `system:node:<name>`, group
    /// `system:nodes`): everything a kubelet does goes through it.
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Kubeconfig of the cluster add-ons the agent also runs (the DNS server and the volume
    /// provisioner), which need more than a node may read: Services, EndpointSlices,
    /// PersistentVolumes, StorageClasses. See `provisioner::addon_rbac`.
    #[arg(long)]
    pub addons_kubeconfig: PathBuf,
    /// Where the agent keeps pod directories, logs, IP allocations and volume images.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The Linux bridge the pods' veths join (created if missing).
    #[arg(long, default_value = "rtbr0")]
    pub bridge: String,
    /// The pods' network; its first address is the bridge's.
    #[arg(long, default_value = "10.244.0.0/24")]
    pub pod_cidr: PodCidr,
    /// YAML file mapping image names to local programs (see `images`).
    #[arg(long)]
    pub image_map: PathBuf,
    /// The API server as pods reach it (`host:port`), for `KUBERNETES_SERVICE_HOST/PORT`
    /// and the `kubernetes.default` DNS name; defaults to the kubeconfig's server.
    #[arg(long)]
    pub api_endpoint: Option<String>,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// How often the node Lease is renewed.
    #[arg(long, default_value = "2s", value_parser = parse_secs)]
    pub lease_renew_interval: Duration,
    #[arg(long, default_value = "40")]
    pub lease_duration_seconds: i32,
    /// How often the node status (conditions' heartbeats) is written.
    #[arg(long, default_value = "10s", value_parser = parse_secs)]
    pub status_interval: Duration,
    /// First CrashLoopBackOff delay (a kubelet uses 10s), doubled per crash up to the max.
    #[arg(long, default_value = "10s", value_parser = parse_secs)]
    pub backoff_initial: Duration,
    #[arg(long, default_value = "300s", value_parser = parse_secs)]
    pub backoff_max: Duration,
    /// How often ConfigMap, Secret and downward-API volumes are brought up to date.
    #[arg(long, default_value = "60s", value_parser = parse_secs)]
    pub volume_resync: Duration,
    /// TTL of the DNS server's answers.
    #[arg(long, default_value = "5")]
    pub dns_ttl: u32,
    /// The node's pod capacity.
    #[arg(long, default_value = "110")]
    pub max_pods: u32,
}

impl NodeConfig {
    /// A config with the defaults of the command line.
    pub fn new(
        node_name: &str,
        kubeconfig: PathBuf,
        addons_kubeconfig: PathBuf,
        state_dir: PathBuf,
        image_map: PathBuf,
    ) -> NodeConfig {
        NodeConfig {
            node_name: node_name.to_string(),
            kubeconfig,
            addons_kubeconfig,
            state_dir,
            bridge: "rtbr0".into(),
            pod_cidr: PodCidr {
                network: Ipv4Addr::new(10, 244, 0, 0),
                prefix: 24,
            },
            image_map,
            api_endpoint: None,
            cluster_domain: "cluster.local".into(),
            lease_renew_interval: Duration::from_secs(2),
            lease_duration_seconds: 40,
            status_interval: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            volume_resync: Duration::from_secs(60),
            dns_ttl: 5,
            max_pods: 110,
        }
    }

    /// The `rtable-node run` arguments that give this config.
    pub fn to_args(&self) -> Vec<String> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut args = vec![
            "run".to_string(),
            format!("--node-name={}", self.node_name),
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--addons-kubeconfig={}", self.addons_kubeconfig.display()),
            format!("--state-dir={}", self.state_dir.display()),
            format!("--bridge={}", self.bridge),
            format!("--pod-cidr={}", self.pod_cidr),
            format!("--image-map={}", self.image_map.display()),
            format!("--cluster-domain={}", self.cluster_domain),
            format!("--lease-renew-interval={}", ms(self.lease_renew_interval)),
            format!("--lease-duration-seconds={}", self.lease_duration_seconds),
            format!("--status-interval={}", ms(self.status_interval)),
            format!("--backoff-initial={}", ms(self.backoff_initial)),
            format!("--backoff-max={}", ms(self.backoff_max)),
            format!("--volume-resync={}", ms(self.volume_resync)),
            format!("--dns-ttl={}", self.dns_ttl),
            format!("--max-pods={}", self.max_pods),
        ];
        if let Some(api) = &self.api_endpoint {
            args.push(format!("--api-endpoint={api}"));
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_masks() {
        let c: PodCidr = "10.244.3.7/24".parse().expect("cidr");
        assert_eq!(c.network, Ipv4Addr::new(10, 244, 3, 0));
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 3, 1));
        let pods: Vec<_> = c.pod_addresses().collect();
        assert_eq!(pods.first(), Some(&Ipv4Addr::new(10, 244, 3, 2)));
        assert_eq!(pods.last(), Some(&Ipv4Addr::new(10, 244, 3, 254)));
        assert!("10.244.0.0".parse::<PodCidr>().is_err());
        assert!("10.244.0.0/31".parse::<PodCidr>().is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_secs("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_secs("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_secs("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_secs("x").is_err());
    }
}
