//! Push: right after a small insert commits, its replica sends the part to every active
//! peer, which installs it as a prefetch (see `queue::prefetch::refuse_push`). ZooKeeper
//! stays the only authority: a peer still pulls the GET_PART entry, queues and records the
//! part exactly as before; the push only saves it the watch event, the entry read and the
//! download's round trip, which are most of the replication lag of a small part. A peer
//! that cannot take a push says so and fetches as usual; a push lost on the way costs
//! nothing but its bytes.
//!
//! Only parts without a quorum are pushed (a quorum part is acknowledged by the peer's
//! queue entry), and only small ones: a big part's transfer dwarfs the round trips saved,
//! and a declined push would waste its bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::debug;
use zookeeper_client as zk;

use rtable_protocol::PartName;
use rtable_protocol::host::HostInfo;

use crate::exchange;
use crate::replica::{Replica, SECRET_HEADER};

/// How long a list of peers is trusted before it is read again (only when pushing: an
/// idle table reads nothing).
const PEERS_TTL: Duration = Duration::from_secs(60);
/// A push that takes longer than this is abandoned; the peer's entry fetches the part.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The other active replicas' names and interserver addresses, as last read from ZooKeeper.
#[derive(Default)]
pub struct Peers {
    cached: Mutex<Option<(Instant, Vec<Peer>)>>,
}

/// An active peer: its replica name and interserver address.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub address: String,
}

impl Peers {
    fn fresh(&self) -> Option<Vec<Peer>> {
        let cached = self.cached.lock();
        let (at, addresses) = cached.as_ref()?;
        (at.elapsed() < PEERS_TTL).then(|| addresses.clone())
    }

    /// How many other replicas were active when the list was last read, if that was
    /// recently (without copying the list).
    pub fn fresh_len(&self) -> Option<usize> {
        let cached = self.cached.lock();
        let (at, peers) = cached.as_ref()?;
        (at.elapsed() < PEERS_TTL).then_some(peers.len())
    }

    /// Forgets the list (a push failed to connect: a peer may have moved).
    pub fn forget(&self) {
        self.cached.lock().take();
    }
}

/// A committed part to push and the index of its GET_PART entry in the log.
#[derive(Debug, Clone)]
pub struct Committed {
    pub part: PartName,
    pub log_index: u64,
    /// Peers that hold the part already (they took it as a quorum handoff).
    pub holders: Vec<String>,
}

/// Pushes every part to every active peer, in the background.
pub fn spawn(replica: Arc<Replica>, client: zk::Client, parts: Vec<Committed>) {
    if parts.is_empty() || replica.cfg.push_max_bytes == 0 {
        return;
    }
    tokio::spawn(async move {
        let peers = match active_peers(&replica, &client).await {
            Ok(p) => p,
            Err(e) => {
                debug!(replica = %replica.name, error = %e, "cannot list peers to push to");
                return;
            }
        };
        if peers.is_empty() {
            return;
        }
        for c in parts {
            let addresses: Vec<String> = peers
                .iter()
                .filter(|p| !c.holders.contains(&p.name))
                .map(|p| p.address.clone())
                .collect();
            if !addresses.is_empty() {
                push_part(&replica, &addresses, &c).await;
            }
        }
    });
}

async fn push_part(replica: &Arc<Replica>, peers: &[String], c: &Committed) {
    let Some(active) = replica.store.get(&c.part) else {
        return;
    };
    if active.bytes > replica.cfg.push_max_bytes {
        return;
    }
    drop(active);
    let store = replica.store.clone();
    let part = c.part.clone();
    // Read once, sent to every peer.
    let body = tokio::task::spawn_blocking(move || {
        let Some((mut outgoing, first, _keep)) = exchange::open_for_sending(&store, &part)? else {
            return Err(std::io::Error::other("the part is not active any more"));
        };
        let mut body = first;
        while let Some(chunk) = outgoing.next_chunk(exchange::CHUNK_BYTES)? {
            body.extend_from_slice(&chunk);
        }
        Ok::<_, std::io::Error>(bytes::Bytes::from(body))
    })
    .await;
    let body = match body {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            debug!(replica = %replica.name, part = %c.part, error = %e, "cannot read a part to push");
            return;
        }
        Err(_) => return,
    };
    let sends = peers
        .iter()
        .map(|address| send(replica, address, c, body.clone()));
    for (address, result) in peers.iter().zip(futures::future::join_all(sends).await) {
        match result {
            Ok(answer) => {
                debug!(replica = %replica.name, part = %c.part, peer = %address, %answer, "pushed part")
            }
            Err(e) => {
                debug!(replica = %replica.name, part = %c.part, peer = %address, error = %e, "push failed; the peer fetches the part itself");
                if e.is_connect() || e.is_timeout() {
                    replica.push_peers.forget();
                }
            }
        }
    }
}

async fn send(
    replica: &Replica,
    address: &str,
    c: &Committed,
    body: bytes::Bytes,
) -> Result<String, reqwest::Error> {
    let url = format!(
        "{}://{address}/push/{}?source={}&log={}",
        replica.host.scheme, c.part, replica.name, c.log_index
    );
    let mut request = replica.http.post(&url).timeout(PUSH_TIMEOUT).body(body);
    if let Some(secret) = &replica.secret {
        request = request.header(SECRET_HEADER, secret);
    }
    let response = request.send().await?.error_for_status()?;
    response.text().await
}

/// The other active replicas: cached, or read from ZooKeeper (one listing and one
/// multi-read).
pub async fn active_peers(replica: &Replica, client: &zk::Client) -> Result<Vec<Peer>, zk::Error> {
    if let Some(p) = replica.push_peers.fresh() {
        return Ok(p);
    }
    let names = client.list_children(&replica.paths.replicas()).await?;
    let others: Vec<&String> = names.iter().filter(|n| **n != replica.name).collect();
    let mut reader = client.new_multi_reader();
    for name in &others {
        let rp = replica.paths.replica(name);
        reader.add_get_data(&rp.is_active())?;
        reader.add_get_data(&rp.host())?;
    }
    let results = if others.is_empty() {
        Vec::new()
    } else {
        reader.commit().await?
    };
    let mut peers = Vec::new();
    for (name, pair) in others.iter().zip(results.chunks(2)) {
        let [active, host] = pair else { continue };
        let (zk::MultiReadResult::Data { .. }, zk::MultiReadResult::Data { data, .. }) =
            (active, host)
        else {
            continue;
        };
        let Some(host) = std::str::from_utf8(data)
            .ok()
            .and_then(|h| HostInfo::parse(h).ok())
        else {
            continue;
        };
        peers.push(Peer {
            name: (*name).clone(),
            address: host.address(),
        });
    }
    *replica.push_peers.cached.lock() = Some((Instant::now(), peers.clone()));
    Ok(peers)
}
