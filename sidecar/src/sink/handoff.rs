//! Handoff, the inserting side: a small quorum insert's part is copied to the
//! `insert_quorum - 1` peers it needs *before* the commit, and the commit multi records
//! it for them too (see `crate::handoff` for the peer's rules). The insert then reaches
//! its quorum with that one multi: no wait for the peers' log pull, fetch and record.
//!
//! Anything short of every needed peer answering in time leaves the commit as it was
//! (the quorum node, and the peers' fetches); copies they took anyway are used by their
//! GET entries, or discarded once the commit's fate is settled.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::debug;
use zookeeper_client as zk;

use crate::exchange;
use crate::replica::{Replica, SECRET_HEADER};
use crate::store::StagedPart;

/// A peer that answers slower than this is not waited for: the commit goes ahead
/// without counting on it.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(1);

/// A peer that took the part, and the version of its `host` node the commit must check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub peer: String,
    pub host_version: i32,
}

#[derive(Deserialize)]
struct Answer {
    staged: bool,
    #[serde(default)]
    host_version: Option<i32>,
    #[serde(default)]
    reason: Option<String>,
}

/// Hands `part` (committed under block number lock `lock`) to `needed` peers. Returns
/// them all, or nothing when any of them did not take it.
pub async fn hand_off(
    replica: &Arc<Replica>,
    client: &zk::Client,
    part: &StagedPart,
    lock: &str,
    needed: usize,
) -> Vec<Accepted> {
    if needed == 0 || part.checksums.total_bytes() > replica.cfg.push_max_bytes {
        return Vec::new();
    }
    let peers = match crate::push::active_peers(replica, client).await {
        Ok(p) => p,
        Err(e) => {
            debug!(replica = %replica.name, error = %e, "cannot list peers to hand off to");
            return Vec::new();
        }
    };
    if peers.len() < needed {
        return Vec::new();
    }
    // Spread the copies over the peers.
    let start = rand::random::<u32>() as usize % peers.len();
    let chosen: Vec<_> = peers
        .iter()
        .cycle()
        .skip(start)
        .take(needed)
        .cloned()
        .collect();
    let body = match read_part(part).await {
        Ok(b) => b,
        Err(e) => {
            debug!(replica = %replica.name, part = %part.name, error = %e, "cannot read a part to hand off");
            return Vec::new();
        }
    };
    let sends = chosen
        .iter()
        .map(|peer| send(replica, &peer.address, part, lock, body.clone()));
    let mut accepted = Vec::with_capacity(needed);
    for (peer, result) in chosen.iter().zip(futures::future::join_all(sends).await) {
        match result {
            Ok(Answer {
                staged: true,
                host_version: Some(host_version),
                ..
            }) => accepted.push(Accepted {
                peer: peer.name.clone(),
                host_version,
            }),
            Ok(answer) => {
                debug!(replica = %replica.name, part = %part.name, peer = %peer.name, reason = answer.reason.as_deref().unwrap_or(""), "peer did not take the handoff");
            }
            Err(e) => {
                debug!(replica = %replica.name, part = %part.name, peer = %peer.name, error = %e, "handoff failed");
                if e.is_unreachable() {
                    replica.push_peers.forget();
                }
            }
        }
    }
    if accepted.len() < needed {
        return Vec::new();
    }
    accepted
}

/// Parts up to this size are read on the insert's own task: a few small reads from the
/// page cache cost less than a hop to a blocking thread and back.
const INLINE_READ_MAX_BYTES: u64 = 64 << 10;

async fn read_part(part: &StagedPart) -> std::io::Result<bytes::Bytes> {
    let dir = part.dir.clone();
    let checksums = part.checksums.clone();
    let read = move || {
        let mut outgoing = exchange::OutgoingPart::open(&dir, &checksums)?;
        let mut body = Vec::with_capacity(outgoing.content_length() as usize);
        while let Some(chunk) = outgoing.next_chunk(exchange::CHUNK_BYTES)? {
            body.extend_from_slice(&chunk);
        }
        Ok(bytes::Bytes::from(body))
    };
    if part.checksums.total_bytes() <= INLINE_READ_MAX_BYTES {
        return read();
    }
    tokio::task::spawn_blocking(read)
        .await
        .map_err(std::io::Error::other)?
}

async fn send(
    replica: &Replica,
    address: &str,
    part: &StagedPart,
    lock: &str,
    body: bytes::Bytes,
) -> Result<Answer, HandoffError> {
    let mut url = reqwest::Url::parse(&format!("http://{address}/handoff/{}", part.name))
        .map_err(|e| HandoffError::Address(address.to_string(), e.to_string()))?;
    url.query_pairs_mut()
        .append_pair("source", &replica.name)
        .append_pair("lock", lock);
    let mut request = replica.http.post(url).timeout(HANDOFF_TIMEOUT).body(body);
    if let Some(secret) = &replica.secret {
        request = request.header(SECRET_HEADER, secret);
    }
    Ok(request.send().await?.error_for_status()?.json().await?)
}

#[derive(Debug, thiserror::Error)]
enum HandoffError {
    #[error("bad peer address {0}: {1}")]
    Address(String, String),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

impl HandoffError {
    /// The peer may have moved: its address is read again next time.
    fn is_unreachable(&self) -> bool {
        match self {
            HandoffError::Address(..) => true,
            HandoffError::Http(e) => e.is_connect() || e.is_timeout(),
        }
    }
}
