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

use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
use futures::stream::BoxStream;
use serde::Deserialize;
use tracing::debug;
use zookeeper_client as zk;

use crate::exchange;
use crate::replica::{Replica, SECRET_HEADER};
use crate::store::{EncodedPart, StagedPart};
use rtable_protocol::PartName;

/// A peer that answers slower than this is not waited for: the commit goes ahead
/// without counting on it.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(1);

/// A peer that took the part, and the version of its `host` node the commit must check.
#[derive(Debug)]
pub struct Accepted {
    pub peer: String,
    pub host_version: i32,
    /// The peer's word that its copy is durable, still to come: its fsync overlaps the
    /// commit, and the insert is acknowledged only once it arrived. `None`: durable already.
    pub durable: Option<Confirmation>,
}

/// The second line of a peer's answer, once its copy is fsynced (or was discarded).
/// (In a mutex only to be `Sync`, as the group holding it is shared across awaits.)
pub struct Confirmation(parking_lot::Mutex<BoxFuture<'static, Result<(), String>>>);

impl std::fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Confirmation")
    }
}

impl Confirmation {
    /// Waits up to `patience` for the peer's word; `Err` says why the copy cannot be counted.
    pub async fn wait(self, patience: Duration) -> Result<(), String> {
        match tokio::time::timeout(patience, self.0.into_inner()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!(
                "no word that the copy is durable within {} ms",
                patience.as_millis()
            )),
        }
    }
}

/// The first line of a peer's answer (the only one from a peer that answers once durable).
#[derive(Deserialize)]
struct Answer {
    staged: bool,
    #[serde(default)]
    host_version: Option<i32>,
    #[serde(default)]
    reason: Option<String>,
    /// `Some(false)`: verified, and a second line follows once fsynced.
    #[serde(default)]
    durable: Option<bool>,
}

#[derive(Deserialize)]
struct DurableLine {
    durable: bool,
    #[serde(default)]
    reason: Option<String>,
}

/// The part to hand off: staged on disk, or encoded in memory while it is being written
/// (sent from memory, so the copy and the local write overlap).
pub enum Source<'a> {
    Staged(&'a StagedPart),
    Encoded(&'a PartName, &'a EncodedPart),
}

impl Source<'_> {
    fn name(&self) -> &PartName {
        match self {
            Source::Staged(s) => &s.name,
            Source::Encoded(name, _) => name,
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Source::Staged(s) => s.checksums.total_bytes(),
            Source::Encoded(_, e) => e.checksums.total_bytes(),
        }
    }

    async fn body(&self) -> std::io::Result<bytes::Bytes> {
        match self {
            Source::Staged(s) => read_part(s).await,
            Source::Encoded(_, e) => Ok(exchange::body_of(&e.files())),
        }
    }
}

/// Hands `part` (committed under block number lock `lock`) to `needed` peers. Returns
/// them all, or nothing when any of them did not take it.
pub async fn hand_off(
    replica: &Arc<Replica>,
    client: &zk::Client,
    part: Source<'_>,
    lock: &str,
    needed: usize,
) -> Vec<Accepted> {
    if needed == 0 || part.bytes() > replica.cfg.push_max_bytes {
        return Vec::new();
    }
    let name = part.name();
    let started = std::time::Instant::now();
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
    let body = match part.body().await {
        Ok(b) => b,
        Err(e) => {
            debug!(replica = %replica.name, part = %name, error = %e, "cannot read a part to hand off");
            return Vec::new();
        }
    };
    let read_at = started.elapsed();
    let sends = chosen
        .iter()
        .map(|peer| send(replica, &peer.address, name, lock, body.clone()));
    let mut accepted = Vec::with_capacity(needed);
    for (peer, result) in chosen.iter().zip(futures::future::join_all(sends).await) {
        match result {
            Ok((
                Answer {
                    staged: true,
                    host_version: Some(host_version),
                    ..
                },
                durable,
            )) => accepted.push(Accepted {
                peer: peer.name.clone(),
                host_version,
                durable,
            }),
            Ok((answer, _)) => {
                debug!(replica = %replica.name, part = %name, peer = %peer.name, reason = answer.reason.as_deref().unwrap_or(""), "peer did not take the handoff");
            }
            Err(e) => {
                debug!(replica = %replica.name, part = %name, peer = %peer.name, error = %e, "handoff failed");
                if e.is_unreachable() {
                    replica.push_peers.forget();
                }
            }
        }
    }
    debug!(
        replica = %replica.name,
        part = %name,
        read_us = read_at.as_micros() as u64,
        answered_us = started.elapsed().as_micros() as u64,
        "handoff timing"
    );
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

/// Sends the part and reads the first line of the answer within [`HANDOFF_TIMEOUT`];
/// the second line, when one follows, is left to the returned [`Confirmation`].
async fn send(
    replica: &Replica,
    address: &str,
    part: &PartName,
    lock: &str,
    body: bytes::Bytes,
) -> Result<(Answer, Option<Confirmation>), HandoffError> {
    let mut url = reqwest::Url::parse(&format!(
        "{}://{address}/handoff/{part}",
        replica.host.scheme
    ))
    .map_err(|e| HandoffError::Address(address.to_string(), e.to_string()))?;
    url.query_pairs_mut()
        .append_pair("source", &replica.name)
        .append_pair("lock", lock)
        .append_pair("early", "true");
    let mut request = replica.http.post(url).body(body);
    if let Some(secret) = &replica.secret {
        request = request.header(SECRET_HEADER, secret);
    }
    let first = async {
        let response = request.send().await?.error_for_status()?;
        let mut lines = Lines {
            stream: Box::pin(response.bytes_stream()),
            buf: Vec::new(),
        };
        let line = lines.next().await?.ok_or(HandoffError::Empty)?;
        let answer: Answer = serde_json::from_slice(&line)?;
        Ok::<_, HandoffError>((answer, lines))
    };
    let (answer, mut lines) = tokio::time::timeout(HANDOFF_TIMEOUT, first)
        .await
        .map_err(|_| HandoffError::Timeout)??;
    if !(answer.staged && answer.durable == Some(false)) {
        return Ok((answer, None));
    }
    let durable = async move {
        let line = lines
            .next()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the peer ended its answer before its copy was durable")?;
        let line: DurableLine = serde_json::from_slice(&line)
            .map_err(|e| format!("unreadable second line from the peer: {e}"))?;
        if line.durable {
            Ok(())
        } else {
            Err(line.reason.unwrap_or_else(|| "no reason given".to_string()))
        }
    };
    Ok((
        answer,
        Some(Confirmation(parking_lot::Mutex::new(durable.boxed()))),
    ))
}

/// Newline-separated lines of a streamed answer.
struct Lines {
    stream: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
}

impl Lines {
    async fn next(&mut self) -> Result<Option<Vec<u8>>, HandoffError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(Some(line));
            }
            match self.stream.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk?),
                None if self.buf.is_empty() => return Ok(None),
                None => return Ok(Some(std::mem::take(&mut self.buf))),
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum HandoffError {
    #[error("bad peer address {0}: {1}")]
    Address(String, String),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("no answer within {} ms", HANDOFF_TIMEOUT.as_millis())]
    Timeout,
    #[error("the peer's answer was empty")]
    Empty,
    #[error("unreadable answer: {0}")]
    Json(#[from] serde_json::Error),
}

impl HandoffError {
    /// The peer may have moved: its address is read again next time.
    fn is_unreachable(&self) -> bool {
        match self {
            HandoffError::Address(..) | HandoffError::Timeout => true,
            HandoffError::Http(e) => e.is_connect() || e.is_timeout(),
            HandoffError::Empty | HandoffError::Json(_) => false,
        }
    }
}
