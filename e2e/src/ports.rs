//! Loopback ports for test processes.
//!
//! Ports come from 20000-32767, below Linux's ephemeral range (32768-60999), so an outgoing
//! connection of some other process cannot take a port between our check and the child's
//! bind. Ports handed out in this process are remembered and never handed out twice.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::Mutex;

const LOW: u16 = 20_000;
const HIGH: u16 = 32_767;

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(
        "port {port} on 127.0.0.1 is in use ({source}); stop whatever listens there or choose other ports (e.g. --base-port)"
    )]
    InUse {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("no free loopback port found in {LOW}-{HIGH} after {tried} tries")]
    Exhausted { tried: u32 },
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Checks that `port` can be bound on 127.0.0.1 right now.
pub fn check_free(port: u16) -> Result<(), PortError> {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
        .map(drop)
        .map_err(|source| PortError::InUse { port, source })
}

/// Checks a list of requested ports; the error names the first port in use.
pub fn check_all_free(ports: &[u16]) -> Result<(), PortError> {
    ports.iter().try_for_each(|p| check_free(*p))
}

/// `n` distinct free loopback ports.
pub fn free_ports(n: usize) -> Result<Vec<u16>, PortError> {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let handed = guard.get_or_insert_with(HashSet::new);
    let span = u32::from(HIGH - LOW) + 1;
    // Different processes start at different places, so parallel test runs rarely meet.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let mut out = Vec::with_capacity(n);
    let mut tried = 0u32;
    let mut candidate = seed % span;
    while out.len() < n {
        if tried >= span {
            return Err(PortError::Exhausted { tried });
        }
        tried += 1;
        // 7919 is prime and does not divide the span: the walk visits every port once.
        candidate = (candidate + 7919) % span;
        let port = LOW + candidate as u16;
        if handed.contains(&port) || check_free(port).is_err() {
            continue;
        }
        handed.insert(port);
        out.push(port);
    }
    Ok(out)
}

/// A base port such that `base..base+len` are all free (for tools that derive their
/// ports from one base, like the playground's `--base-port`).
pub fn free_block(len: u16) -> Result<u16, PortError> {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let handed = guard.get_or_insert_with(HashSet::new);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let blocks = u32::from((HIGH - LOW) / len);
    for attempt in 0..blocks {
        let base = LOW + (((seed + attempt * 7919) % blocks) as u16) * len;
        let ports: Vec<u16> = (base..base + len).collect();
        if ports.iter().any(|p| handed.contains(p)) || check_all_free(&ports).is_err() {
            continue;
        }
        handed.extend(ports);
        return Ok(base);
    }
    Err(PortError::Exhausted { tried: blocks })
}

/// One free loopback port.
pub fn free_port() -> Result<u16, PortError> {
    Ok(free_ports(1)?[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() {
        let ports = free_ports(20).expect("free ports");
        let set: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(set.len(), 20);
        for p in &ports {
            assert!((LOW..=HIGH).contains(p));
            check_free(*p).expect("still free");
        }
    }

    #[test]
    fn a_port_in_use_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let err = check_free(port).expect_err("in use").to_string();
        assert!(err.contains(&port.to_string()), "{err}");
        assert!(err.contains("in use"), "{err}");
    }
}
