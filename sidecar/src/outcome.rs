//! Parts whose ZooKeeper commit has an unknown outcome (the connection dropped while the
//! multi that creates `replicas/<me>/parts/<part>` was in flight). The staged directory is
//! the only copy of the rows, so it is never dropped on a guess: the `parts` node decides,
//! read once ZooKeeper answers again, on whatever session this replica has by then.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::replica::Replica;
use crate::store::StagedPart;

/// Whether `replicas/<me>/parts/<part>` exists. `None`: no answer within `patience`.
///
/// The read follows a `sync`: a session opened after the old one expired may sit on a
/// follower that has not applied the commit yet, and a stale "absent" would discard rows
/// that ZooKeeper has acknowledged.
pub async fn check_committed(replica: &Replica, part: &str, patience: Duration) -> Option<bool> {
    let path = replica.paths.replica(&replica.name).part(part);
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Ok((client, _)) = replica.sessions.active() {
            let answer = match client.sync(&path).await {
                Ok(()) | Err(zookeeper_client::Error::NoNode) => client.check_stat(&path).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(stat) => return Some(stat.is_some()),
                Err(e) => {
                    debug!(replica = %replica.name, %part, error = %e, "cannot check commit yet")
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps checking until ZooKeeper answers, then activates each part (committed) or
/// discards it (never committed, so never acknowledged: its client was told to retry).
pub async fn resolve_later(replica: Arc<Replica>, parts: Vec<StagedPart>) {
    for s in parts {
        let name = s.name.to_string();
        loop {
            match check_committed(&replica, &name, Duration::from_secs(60)).await {
                Some(true) => {
                    info!(replica = %replica.name, part = %name, "unknown-outcome commit turned out committed");
                    if let Err(e) = replica.store.activate_staged(s) {
                        warn!(replica = %replica.name, part = %name, error = %e, "could not activate resolved part");
                    }
                    break;
                }
                Some(false) => {
                    info!(replica = %replica.name, part = %name, "unknown-outcome commit was not applied; discarding");
                    replica.store.discard_staged(s);
                    break;
                }
                None => continue,
            }
        }
    }
}
