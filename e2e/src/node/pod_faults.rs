//! Test hooks: what a scenario does to a pod from the node's side, the way a failing
//! network or a crash would, without the pod's programs (or the operator) knowing.
//!
//! They work on the sandbox [`super::network`] builds (the network namespace
//! `rtable-<pod uid>` with its `eth0`), so they need root, as the agent does. The agent
//! itself never calls them.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use nix::sched::CloneFlags;

use super::network::{NetworkError, ip, netns_name};

#[derive(Debug, thiserror::Error)]
pub enum PodFaultError {
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("entering the network namespace of pod {uid}: {source}")]
    Enter {
        uid: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET {path} on port {port} inside pod {uid}: {source}")]
    Http {
        uid: String,
        port: u16,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET {path} inside pod {uid}: not an HTTP answer: {answer:?}")]
    NotHttp {
        uid: String,
        path: String,
        answer: String,
    },
}

/// Sets the pod's `eth0` down (cut off from every other pod, the node and the API
/// server) or up again. Its loopback stays up, so the pod still talks to itself.
pub async fn set_link(uid: &str, up: bool) -> Result<(), NetworkError> {
    let state = if up { "up" } else { "down" };
    ip(&["-n", &netns_name(uid), "link", "set", "eth0", state]).await?;
    if up {
        // Setting a link down drops its routes; the default route goes with them.
        let gateway = ip(&["-n", &netns_name(uid), "-4", "route", "show"]).await?;
        if !gateway.contains("default") {
            restore_default_route(uid).await?;
        }
    }
    Ok(())
}

/// The default route through the bridge's address, which is the gateway of eth0's subnet
/// (`.1`, as [`super::network::Network`] assigns it).
async fn restore_default_route(uid: &str) -> Result<(), NetworkError> {
    let netns = netns_name(uid);
    let shown = ip(&["-n", &netns, "-4", "-o", "addr", "show", "dev", "eth0"]).await?;
    let address: Option<Ipv4Addr> = shown
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|a| a.parse().ok());
    let Some(address) = address else {
        return Err(NetworkError::Command {
            command: format!("ip -n {netns} addr show dev eth0"),
            stderr: format!("no IPv4 address in {shown:?}"),
        });
    };
    let [a, b, c, _] = address.octets();
    let gateway = Ipv4Addr::new(a, b, c, 1).to_string();
    ip(&["-n", &netns, "route", "add", "default", "via", &gateway]).await?;
    Ok(())
}

/// The processes in the pod's network namespace: its containers' processes.
pub async fn pids(uid: &str) -> Result<Vec<i32>, NetworkError> {
    let out = ip(&["netns", "pids", &netns_name(uid)]).await?;
    Ok(out.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// `GET path` on `127.0.0.1:port` from inside the pod's network namespace (so it works
/// while the pod is cut off): the status code and the body. Blocking; HTTP/1.0.
pub fn http_get_inside(uid: &str, port: u16, path: &str) -> Result<(u16, String), PodFaultError> {
    let uid_owned = uid.to_string();
    let path_owned = path.to_string();
    // A thread of its own enters the namespace: the caller's threads stay where they are.
    let answer = std::thread::scope(|s| {
        s.spawn(move || -> Result<String, PodFaultError> {
            let netns = std::path::Path::new("/run/netns").join(netns_name(&uid_owned));
            let enter = |source| PodFaultError::Enter {
                uid: uid_owned.clone(),
                source,
            };
            let fd = std::fs::File::open(&netns).map_err(enter)?;
            nix::sched::setns(fd, CloneFlags::CLONE_NEWNET)
                .map_err(|e| enter(std::io::Error::from(e)))?;
            let http = |source| PodFaultError::Http {
                uid: uid_owned.clone(),
                port,
                path: path_owned.clone(),
                source,
            };
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut stream =
                TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(http)?;
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(http)?;
            write!(
                stream,
                "GET {path_owned} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
            )
            .map_err(http)?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).map_err(http)?;
            Ok(answer)
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok());
    let body = answer.split_once("\r\n\r\n").map(|(_, body)| body);
    match (status, body) {
        (Some(status), Some(body)) => Ok((status, body.to_string())),
        _ => Err(PodFaultError::NotHttp {
            uid: uid.to_string(),
            path: path.to_string(),
            answer,
        }),
    }
}
