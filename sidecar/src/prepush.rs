//! The inserter's side of a quorum part's push (the peer's side is `queue::quorum_push`).
//!
//! A parallel quorum insert's part is sent to the peers its commit counts on while its
//! commit multi is in flight, so the peers receive, verify and fsync it during the commit instead of
//! after it. Once the commit's outcome is known, each peer gets a `go`: committed as log
//! entry N (the peer records and counts the part at once), or aborted (it drops the
//! part). The first peer whose record completes the quorum says so in its answer, which
//! ends the insert's wait without waiting for ZooKeeper's watch event; everything else
//! about the quorum is as before. A push that fails anywhere costs only its bytes: the
//! peer's queue entry fetches the part as always.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::debug;
use zookeeper_client as zk;

use rtable_protocol::PartName;

use crate::exchange;
use crate::push::{self, Peer};
use crate::queue::quorum_push::Go;
use crate::replica::{Replica, SECRET_HEADER};

/// How long the part's request and its `go` may take before the push is abandoned.
const PUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Pushes under way for one commit; dropped without [`PrePush::committed`], every peer is
/// told the commit did not happen.
#[derive(Default)]
pub struct PrePush {
    parts: Vec<(PartName, watch::Sender<Option<Go>>)>,
}

impl PrePush {
    /// Starts pushing `parts` (staged, with their quorums) to the active peers.
    pub fn start(replica: &Arc<Replica>, client: &zk::Client, parts: Vec<(PartName, u32)>) -> Self {
        if parts.is_empty() || replica.cfg.push_max_bytes == 0 {
            return PrePush::default();
        }
        let mut started = PrePush::default();
        for (part, quorum) in parts {
            let (tx, rx) = watch::channel(None);
            tokio::spawn(push_part(
                replica.clone(),
                client.clone(),
                part.clone(),
                quorum,
                rx,
            ));
            started.parts.push((part, tx));
        }
        started
    }

    /// The commit landed: `indexes` are the parts' log entries.
    pub fn committed(self, indexes: &[(PartName, u64)]) {
        for (part, tx) in &self.parts {
            let go = indexes
                .iter()
                .find(|(p, _)| p == part)
                .map_or(Go::Abort, |(_, index)| Go::Commit(*index));
            tx.send_replace(Some(go));
        }
    }
}

impl Drop for PrePush {
    fn drop(&mut self) {
        for (_, tx) in &self.parts {
            tx.send_if_modified(|go| {
                if go.is_none() {
                    *go = Some(Go::Abort);
                    true
                } else {
                    false
                }
            });
        }
    }
}

async fn push_part(
    replica: Arc<Replica>,
    client: zk::Client,
    part: PartName,
    quorum: u32,
    go: watch::Receiver<Option<Go>>,
) {
    let peers = match push::active_peers(&replica, &client).await {
        Ok(p) => p,
        Err(e) => {
            debug!(replica = %replica.name, error = %e, "cannot list peers to push to");
            return;
        }
    };
    let Some(body) = read_body(&replica, &part).await else {
        return;
    };
    // Only the peers the commit counts on (the first `quorum - 1` of the same cached list,
    // see `sink::committer`): the others copy the part through their queue as usual,
    // after the insert was answered, instead of competing with the commit for the disk
    // and the cores.
    let needed = (quorum as usize).saturating_sub(1);
    let sends = peers
        .iter()
        .take(needed)
        .map(|peer| push_to(&replica, peer, &part, quorum, body.clone(), go.clone()));
    futures::future::join_all(sends).await;
}

/// The staged part's files as one exchange body, when small enough to push.
async fn read_body(replica: &Replica, part: &PartName) -> Option<bytes::Bytes> {
    let store = replica.store.clone();
    let name = part.clone();
    let max = replica.cfg.push_max_bytes;
    let read = tokio::task::spawn_blocking(move || {
        let Some((mut outgoing, first, _keep)) = exchange::open_for_sending(&store, &name)? else {
            return Ok(None);
        };
        let mut body = first;
        while let Some(chunk) = outgoing.next_chunk(exchange::CHUNK_BYTES)? {
            body.extend_from_slice(&chunk);
            if body.len() as u64 > max {
                return Ok(None);
            }
        }
        Ok::<_, std::io::Error>(Some(bytes::Bytes::from(body)))
    })
    .await;
    match read {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            debug!(replica = %replica.name, %part, error = %e, "cannot read a part to push");
            None
        }
        Err(_) => None,
    }
}

/// The part's request and, once the commit's outcome is known, its `go`, to one peer.
async fn push_to(
    replica: &Replica,
    peer: &Peer,
    part: &PartName,
    quorum: u32,
    body: bytes::Bytes,
    mut go: watch::Receiver<Option<Go>>,
) {
    let address = &peer.address;
    let url = format!(
        "http://{address}/push/{part}?source={}&quorum={quorum}",
        replica.name
    );
    let data = post(replica, url, Some(body));
    tokio::pin!(data);
    // A push answered before the commit's outcome is known was refused or failed: the
    // peer holds nothing and needs no word.
    let word = tokio::select! {
        sent = &mut data => {
            if let Ok(answer) = &sent {
                debug!(replica = %replica.name, %part, peer = %address, %answer, "quorum part's push refused");
            }
            return log_failure(replica, part, address, sent);
        }
        word = go.wait_for(Option::is_some) => match word {
            Ok(word) => *word,
            Err(_) => None,
        },
    };
    let word = async {
        let url = match word {
            Some(Go::Commit(index)) => format!("http://{address}/push/{part}/go?log={index}"),
            _ => format!("http://{address}/push/{part}/go"),
        };
        match post(replica, url, None).await {
            Ok(answer) => {
                debug!(replica = %replica.name, %part, peer = %address, %answer, "quorum part's go answered");
                if completed_quorum(&answer) {
                    replica.quorum_waits.completed(&part.to_string());
                }
            }
            Err(e) => {
                debug!(replica = %replica.name, %part, peer = %address, error = %e, "quorum part's go failed")
            }
        }
    };
    let (sent, ()) = tokio::join!(data, word);
    log_failure(replica, part, address, sent);
}

fn log_failure(
    replica: &Replica,
    part: &PartName,
    address: &str,
    sent: Result<String, reqwest::Error>,
) {
    if let Err(e) = sent {
        debug!(replica = %replica.name, %part, peer = %address, error = %e, "quorum part's push failed; the peer fetches it itself");
        if e.is_connect() {
            replica.push_peers.forget();
        }
    }
}

async fn post(
    replica: &Replica,
    url: String,
    body: Option<bytes::Bytes>,
) -> Result<String, reqwest::Error> {
    let mut request = replica.http.post(&url).timeout(PUSH_TIMEOUT);
    if let Some(body) = body {
        request = request.body(body);
    }
    if let Some(secret) = &replica.secret {
        request = request.header(SECRET_HEADER, secret);
    }
    request.send().await?.error_for_status()?.text().await
}

/// Whether a peer's answer to a `go` says its record completed the quorum.
fn completed_quorum(answer: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(answer)
        .ok()
        .and_then(|v| v.get("quorum")?.as_str().map(|q| q == "completed"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_completed_record_ends_the_wait() {
        assert!(completed_quorum(r#"{"taken":true,"quorum":"completed"}"#));
        assert!(!completed_quorum(r#"{"taken":true,"quorum":"counted"}"#));
        assert!(!completed_quorum(r#"{"taken":false,"reason":"x"}"#));
        assert!(!completed_quorum("not json"));
    }
}
