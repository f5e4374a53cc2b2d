//! Pod networking: one Linux bridge per node, one network namespace per pod joined to it
//! by a veth pair, addresses from the node's pod CIDR recorded as files (as the
//! `host-local` CNI plugin does), so an agent that restarts keeps its pods' addresses.
//!
//! Everything goes through the `ip` command (iproute2): the steps are the ones an operator
//! would type to debug it, and `ip netns add` gives each namespace a name under
//! `/run/netns` that outlives its processes and that `ip netns exec` can enter.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tokio::process::Command;
use tracing::debug;

use super::config::PodCidr;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "the `ip` command (iproute2) is missing: install it (apt-get install iproute2); the node agent builds pod networks with it"
    )]
    IpMissing,
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("running `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no free address left in {cidr} for pod {uid}")]
    Exhausted { cidr: PodCidr, uid: String },
}

/// Runs `ip ARGS`, turning a failure into an error with its output.
pub async fn ip(args: &[&str]) -> Result<String, NetworkError> {
    let command = format!("ip {}", args.join(" "));
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NetworkError::IpMissing
            } else {
                NetworkError::Spawn {
                    command: command.clone(),
                    source,
                }
            }
        })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The same, for code that is not async (the test harness's setup and cleanup).
pub fn ip_blocking(args: &[&str]) -> Result<String, NetworkError> {
    let command = format!("ip {}", args.join(" "));
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NetworkError::IpMissing
            } else {
                NetworkError::Spawn {
                    command: command.clone(),
                    source,
                }
            }
        })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates `bridge` with the CIDR's gateway address and brings it up; a bridge that exists
/// already is kept (an agent restarting, or a harness that made it before the API server
/// had to bind its address). Blocking: the harness calls it before any runtime exists.
pub fn ensure_bridge(bridge: &str, cidr: &PodCidr) -> Result<(), NetworkError> {
    if ip_blocking(&["link", "show", "dev", bridge]).is_err() {
        ip_blocking(&["link", "add", bridge, "type", "bridge"])?;
    }
    let address = format!("{}/{}", cidr.gateway(), cidr.prefix);
    let shown = ip_blocking(&["-4", "addr", "show", "dev", bridge])?;
    if !shown.contains(&format!("inet {address} ")) {
        ip_blocking(&["addr", "add", &address, "dev", bridge])?;
    }
    ip_blocking(&["link", "set", bridge, "up"])?;
    Ok(())
}

/// Deletes `bridge` if it exists.
pub fn delete_bridge(bridge: &str) -> Result<(), NetworkError> {
    if ip_blocking(&["link", "show", "dev", bridge]).is_ok() {
        ip_blocking(&["link", "del", bridge])?;
    }
    Ok(())
}

/// The name of a pod's network namespace (`/run/netns/<name>`).
pub fn netns_name(uid: &str) -> String {
    format!("rtable-{uid}")
}

/// The host end of a pod's veth: `rtv` + 12 hex digits of its UID (names are limited to
/// 15 bytes).
fn host_veth(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .collect();
    format!("rtv{hex}")
}

/// `0a:58:` and the address's four bytes: a locally administered unicast MAC.
fn mac_of(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("0a:58:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// A pod's network, as created.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub netns: String,
    pub netns_path: PathBuf,
    pub ip: Ipv4Addr,
}

/// The node's pod network: the bridge and the address allocations.
#[derive(Debug)]
pub struct Network {
    pub bridge: String,
    pub cidr: PodCidr,
    ipam_dir: PathBuf,
    /// Allocation is check-then-create on files; one at a time.
    lock: tokio::sync::Mutex<()>,
}

impl Network {
    pub fn new(bridge: &str, cidr: PodCidr, state_dir: &Path) -> Result<Network, NetworkError> {
        let ipam_dir = state_dir.join("ipam");
        std::fs::create_dir_all(&ipam_dir).map_err(|source| NetworkError::Io {
            path: ipam_dir.clone(),
            source,
        })?;
        Ok(Network {
            bridge: bridge.to_string(),
            cidr,
            ipam_dir,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.cidr.gateway()
    }

    /// The address recorded for `uid`, or a new one.
    async fn allocate(&self, uid: &str) -> Result<Ipv4Addr, NetworkError> {
        let _guard = self.lock.lock().await;
        if let Some(ip) = self.allocated(uid)? {
            return Ok(ip);
        }
        for ip in self.cidr.pod_addresses() {
            let path = self.ipam_dir.join(ip.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => {
                    std::fs::write(&path, uid)
                        .map_err(|source| NetworkError::Io { path, source })?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(NetworkError::Io { path, source }),
            }
        }
        Err(NetworkError::Exhausted {
            cidr: self.cidr,
            uid: uid.to_string(),
        })
    }

    /// The address allocated to `uid`, if any.
    pub fn allocated(&self, uid: &str) -> Result<Option<Ipv4Addr>, NetworkError> {
        let entries = std::fs::read_dir(&self.ipam_dir).map_err(|source| NetworkError::Io {
            path: self.ipam_dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            if std::fs::read_to_string(entry.path()).is_ok_and(|owner| owner == uid)
                && let Ok(ip) = entry.file_name().to_string_lossy().parse()
            {
                return Ok(Some(ip));
            }
        }
        Ok(None)
    }

    fn release(&self, uid: &str) -> Result<(), NetworkError> {
        if let Some(ip) = self.allocated(uid)? {
            let path = self.ipam_dir.join(ip.to_string());
            std::fs::remove_file(&path).map_err(|source| NetworkError::Io { path, source })?;
        }
        Ok(())
    }

    /// The pods (UIDs) holding addresses: what a restarted agent must reconcile.
    pub fn allocations(&self) -> Vec<String> {
        std::fs::read_dir(&self.ipam_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The pod's namespace with `eth0` on the bridge, its address, `lo`, and a default
    /// route through the bridge. Leftovers of an earlier attempt are removed first, so it
    /// can be retried.
    pub async fn create_pod_network(&self, uid: &str) -> Result<PodNetwork, NetworkError> {
        let ip_addr = self.allocate(uid).await?;
        let netns = netns_name(uid);
        let veth = host_veth(uid);
        let _ = ip(&["netns", "del", &netns]).await;
        let _ = ip(&["link", "del", &veth]).await;
        ip(&["netns", "add", &netns]).await?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])
        .await?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"]).await?;
        // The MAC follows from the address (as the CNI bridge plugin did): a reused address
        // keeps its MAC, so neighbour caches on the host and in other pods stay right.
        ip(&[
            "-n",
            &netns,
            "link",
            "set",
            "eth0",
            "address",
            &mac_of(ip_addr),
        ])
        .await?;
        let address = format!("{ip_addr}/{}", self.cidr.prefix);
        ip(&["-n", &netns, "addr", "add", &address, "dev", "eth0"]).await?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"]).await?;
        ip(&["-n", &netns, "link", "set", "lo", "up"]).await?;
        let gateway = self.gateway().to_string();
        ip(&["-n", &netns, "route", "add", "default", "via", &gateway]).await?;
        debug!(%netns, %address, %veth, "pod network created");
        Ok(PodNetwork {
            netns_path: PathBuf::from("/run/netns").join(&netns),
            netns,
            ip: ip_addr,
        })
    }

    /// Deletes the pod's namespace (which takes its veth pair with it) and frees its
    /// address. Idempotent.
    pub async fn delete_pod_network(&self, uid: &str) -> Result<(), NetworkError> {
        let netns = netns_name(uid);
        if Path::new("/run/netns").join(&netns).exists() {
            ip(&["netns", "del", &netns]).await?;
        }
        let _ = ip(&["link", "del", &host_veth(uid)]).await;
        let _guard = self.lock.lock().await;
        self.release(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limits() {
        let uid = "0c6f3a2e-5d1b-4a7e-9f00-123456789abc";
        assert_eq!(host_veth(uid), "rtv0c6f3a2e5d1b");
        assert!(host_veth(uid).len() <= 15);
        assert_eq!(netns_name(uid), format!("rtable-{uid}"));
        assert_eq!(mac_of(Ipv4Addr::new(10, 244, 0, 2)), "0a:58:0a:f4:00:02");
    }
}
