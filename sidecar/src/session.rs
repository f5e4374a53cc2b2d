//! The ZooKeeper session of this replica and the read-only state that follows it
//! (ClickHouse's RestartingThread).
//!
//! A session is built, the table and replica are created if missing, the replica is
//! activated, and the live client is published to every task. When the session expires the
//! replica turns read-only, a new session is built and activated, and tasks resume with it:
//! no process restart.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};
use zookeeper_client as zk;

use rtable_protocol::tree::{self, CreateOutcome, RegisterOutcome, TreeError};

use crate::replica::Replica;

/// What every task sees of the session.
#[derive(Clone, Default)]
pub struct SessionView {
    /// The live client; `None` while read-only.
    pub client: Option<zk::Client>,
    /// Bumped on every new activation, so tasks can tell a new session from the old one.
    pub generation: u64,
    /// Why the replica refuses inserts; `None` when active.
    pub readonly_reason: Option<String>,
    pub session_expired: bool,
    pub activation: Option<tree::Activation>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("replica is read-only: {reason}")]
pub struct ReadOnly {
    pub reason: String,
}

pub struct Sessions {
    tx: watch::Sender<SessionView>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

impl Sessions {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(SessionView {
            readonly_reason: Some("starting: no ZooKeeper session yet".to_string()),
            ..SessionView::default()
        });
        Sessions { tx }
    }

    pub fn view(&self) -> SessionView {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<SessionView> {
        self.tx.subscribe()
    }

    /// The active client, or why there is none.
    pub fn active(&self) -> Result<(zk::Client, u64), ReadOnly> {
        let v = self.tx.borrow();
        match (&v.client, &v.readonly_reason) {
            (Some(c), None) => Ok((c.clone(), v.generation)),
            (_, reason) => Err(ReadOnly {
                reason: reason
                    .clone()
                    .unwrap_or_else(|| "no ZooKeeper session".to_string()),
            }),
        }
    }

    /// Waits until the replica is active and returns its client.
    pub async fn wait_active(&self) -> (zk::Client, u64) {
        let mut rx = self.subscribe();
        loop {
            if let Ok(active) = self.active() {
                return active;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the replica; park forever if it is gone.
                std::future::pending::<()>().await;
            }
        }
    }

    fn set_readonly(&self, reason: String, expired: bool) {
        self.tx.send_modify(|v| {
            v.client = None;
            v.readonly_reason = Some(reason);
            v.session_expired = expired;
            v.activation = None;
        });
    }

    fn set_active(&self, client: zk::Client, activation: tree::Activation) {
        self.tx.send_modify(|v| {
            v.client = Some(client);
            v.generation += 1;
            v.readonly_reason = None;
            v.session_expired = false;
            v.activation = Some(activation);
        });
    }

    /// Called by a task that saw the session end, so inserts stop at once rather than
    /// after the state watcher notices.
    pub fn report_expired(&self, generation: u64) {
        if self.tx.borrow().generation == generation && self.tx.borrow().client.is_some() {
            self.set_readonly(
                "ZooKeeper session expired; building a new session".to_string(),
                true,
            );
        }
    }
}

/// Runs forever: keeps the replica activated on a live session.
pub async fn run(replica: Arc<Replica>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match establish(&replica).await {
            Ok(client) => {
                backoff = Duration::from_millis(200);
                watch_until_expired(&replica, client).await;
            }
            Err(reason) => {
                warn!(replica = %replica.name, %reason, "replica stays read-only");
                replica.sessions.set_readonly(reason, false);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn establish(replica: &Arc<Replica>) -> Result<zk::Client, String> {
    let connect_string = replica.connect_string();
    let client = replica
        .zk_access
        .connect(
            &connect_string,
            replica.session_timeout,
            replica.session_timeout,
        )
        .await
        .map_err(|e| format!("cannot reach ZooKeeper at {connect_string}: {e}"))?;
    crate::zk_access::prepare(&client, &replica.paths, &replica.zk_access)
        .await
        .map_err(|e| e.to_string())?;
    let schema = &replica.table.schema;
    // A definition that appends columns to the tree's applies the append (the operator may
    // have done it already); one that lacks columns the tree has appended (this pod was not
    // restarted since) keeps serving its own columns: every replica reads its parts with
    // the appended columns filled in, and it reads theirs without them.
    match tree::create_table_allowing_older(&client, &replica.paths, &replica.zk_acl, schema)
        .await
        .map_err(|e| e.to_string())?
    {
        CreateOutcome::ColumnsAppended { before, after } => {
            info!(replica = %replica.name, before, after, "appended columns to the table's definition in ZooKeeper");
        }
        CreateOutcome::TreeAhead { local, tree } => {
            warn!(
                replica = %replica.name,
                local,
                tree,
                "the table in ZooKeeper has columns appended that this replica's definition lacks; \
                 serving the first {local} columns until the replica restarts with the new definition"
            );
        }
        CreateOutcome::Created | CreateOutcome::AlreadyExists => {}
    }
    match tree::register_replica(
        &client,
        &replica.paths,
        &replica.zk_acl,
        &replica.name,
        schema,
    )
    .await
    .map_err(|e| e.to_string())?
    {
        RegisterOutcome::Registered { is_lost } => {
            info!(replica = %replica.name, is_lost, "registered replica");
        }
        RegisterOutcome::AlreadyRegistered => {
            // `replicas/<me>/columns` says which columns this replica runs (ClickHouse
            // keeps it per replica too); it moves when the replica restarts with columns
            // appended.
            tree::update_replica_columns(&client, &replica.paths, &replica.name, schema)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    crate::recovery::before_activation(replica, &client)
        .await
        .map_err(|e| format!("recovery before activation failed: {e}"))?;
    let activation = activate_when_free(replica, &client).await?;
    crate::recovery::after_activation(replica, &client)
        .await
        .map_err(|e| format!("recovery after activation failed: {e}"))?;
    info!(replica = %replica.name, session = format!("{:#x}", client.session_id().0), "replica active");
    replica.sessions.set_active(client.clone(), activation);
    replica.queue_notify.notify_waiters();
    Ok(client)
}

/// A restarted process finds its previous session's `is_active` until that session times
/// out; wait for it rather than fail, as ClickHouse does.
async fn activate_when_free(
    replica: &Arc<Replica>,
    client: &zk::Client,
) -> Result<tree::Activation, String> {
    let deadline =
        tokio::time::Instant::now() + replica.session_timeout * 3 + Duration::from_secs(5);
    loop {
        match tree::activate(
            client,
            &replica.paths,
            &replica.zk_acl,
            &replica.name,
            &replica.host,
        )
        .await
        {
            Ok(a) => return Ok(a),
            Err(TreeError::ReplicaActive { owner, .. })
                if tokio::time::Instant::now() < deadline =>
            {
                replica.sessions.set_readonly(
                    format!(
                        "waiting for the previous session {owner:#x} of this replica to expire"
                    ),
                    false,
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(TreeError::Contention { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn watch_until_expired(replica: &Arc<Replica>, client: zk::Client) {
    let mut states = client.state_watcher();
    let mut views = replica.sessions.subscribe();
    loop {
        tokio::select! {
            state = states.changed() => match state {
                zk::SessionState::Expired | zk::SessionState::AuthFailed | zk::SessionState::Closed => {
                    warn!(replica = %replica.name, ?state, "ZooKeeper session ended; read-only until a new one is active");
                    replica
                        .sessions
                        .set_readonly(format!("ZooKeeper session {state:?}; building a new session"), true);
                    return;
                }
                // Reconnecting to another ensemble member keeps the session: nothing to do.
                _ => {}
            },
            changed = views.changed() => {
                // A task saw the session end first.
                if changed.is_err() || replica.sessions.view().client.is_none() {
                    return;
                }
            }
        }
    }
}
