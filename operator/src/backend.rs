//! The operator's few calls outside the Kubernetes API: the ZooKeeper tree (through
//! `rtable_protocol::tree`) and the sidecars' `/status`. Behind a trait so reconcile is
//! tested with a scripted fake while the real one runs against a real ensemble.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use rtable_protocol::paths::TablePaths;
use rtable_protocol::schema::TableSchema;
use rtable_protocol::tree::{self, DropOutcome, ReplicaState, TreeError};
use rtable_protocol::zk_access::{self, TreeAccess, ZkAccess};
use tokio::sync::Mutex;
use zookeeper_client as zk;

use crate::status::SidecarStatus;

/// How to reach a table's ensemble.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ZkTarget {
    /// `host:port,...` with an optional chroot.
    pub connect: String,
    pub session_timeout: Duration,
    /// Credentials (and so the tree's ACL) and TLS.
    pub access: ZkAccess,
}

pub trait Backend: Send + Sync {
    /// Creates the tree, or checks that an existing one holds the same definition.
    fn ensure_table<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
        schema: &'a TableSchema,
    ) -> BoxFuture<'a, Result<(), TreeError>>;
    /// Every registered replica's state, sorted by name.
    fn replicas<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaState>, TreeError>>;
    /// The names under `replicas/<replica>/parts`, sorted; empty for a replica that is not
    /// registered (it holds nothing acknowledged).
    fn parts<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, TreeError>>;
    /// Drops one replica's metadata; refused (`TreeError::ReplicaActive`) while it is active.
    fn drop_replica<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<DropOutcome, TreeError>>;
    fn remove_table<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
    ) -> BoxFuture<'a, Result<(), TreeError>>;
    /// A sidecar's `/status`; `None` when it does not answer (it is then reported from
    /// ZooKeeper alone).
    fn sidecar_status<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Option<SidecarStatus>>;
    /// Whether the fully qualified DNS name `host` exists (see [`crate::zookeeper_address`]).
    fn resolves<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, bool>;
}

/// The real backend: one cached ZooKeeper session per ensemble, dropped on any
/// connection-level error so the next reconcile reconnects.
pub struct ZooKeeperBackend {
    sessions: Mutex<HashMap<ZkTarget, zk::Client>>,
    http: reqwest::Client,
    connect_timeout: Duration,
}

impl ZooKeeperBackend {
    pub fn new(connect_timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(ZooKeeperBackend {
            sessions: Mutex::new(HashMap::new()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()?,
            connect_timeout,
        })
    }

    async fn client(&self, target: &ZkTarget) -> Result<zk::Client, TreeError> {
        if let Some(c) = self.sessions.lock().await.get(target)
            && !c.state().is_terminated()
        {
            return Ok(c.clone());
        }
        // Connected without holding the map, and within a deadline of our own: one table's
        // unreachable or unresolvable ensemble must not hold up every other table's reconcile
        // (the client's connection timeout does not bound a name that does not resolve).
        let client = match tokio::time::timeout(
            self.connect_timeout * 2,
            target.access.connect(
                &target.connect,
                target.session_timeout,
                self.connect_timeout,
            ),
        )
        .await
        {
            Ok(connected) => connected?,
            Err(_) => {
                return Err(TreeError::zk(
                    "connect",
                    target.connect.clone(),
                    zk::Error::Timeout,
                ));
            }
        };
        let mut sessions = self.sessions.lock().await;
        // Another reconcile of the same ensemble may have connected meanwhile: keep one.
        match sessions.get(target) {
            Some(c) if !c.state().is_terminated() => Ok(c.clone()),
            _ => {
                sessions.insert(target.clone(), client.clone());
                Ok(client)
            }
        }
    }

    /// Forgets a session after a transient failure: a fresh one is built next time.
    async fn forget_on_transient<T>(
        &self,
        target: &ZkTarget,
        r: Result<T, TreeError>,
    ) -> Result<T, TreeError> {
        if let Err(e) = &r
            && e.is_transient()
        {
            self.sessions.lock().await.remove(target);
        }
        r
    }
}

impl Backend for ZooKeeperBackend {
    fn ensure_table<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
        schema: &'a TableSchema,
    ) -> BoxFuture<'a, Result<(), TreeError>> {
        Box::pin(async move {
            let r = async {
                let client = self.client(target).await?;
                let paths = TablePaths::new(table_path);
                // Wrong credentials are reported as such, not as a failed create; a tree
                // made before the credentials were configured gets the table's ACL.
                match zk_access::check(&client, &paths, &target.access).await? {
                    TreeAccess::NeedsMigration => {
                        let changed =
                            zk_access::migrate(&client, &paths, &target.access.tree_acl()).await?;
                        tracing::info!(table_path, changed, "moved the table's tree to its ACL");
                    }
                    TreeAccess::Absent | TreeAccess::AsExpected => {}
                }
                tree::create_table(&client, &paths, &target.access.tree_acl(), schema).await?;
                Ok(())
            }
            .await;
            self.forget_on_transient(target, r).await
        })
    }

    fn replicas<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ReplicaState>, TreeError>> {
        Box::pin(async move {
            let r = async {
                let client = self.client(target).await?;
                let paths = TablePaths::new(table_path);
                let mut out = Vec::new();
                for name in tree::list_replicas(&client, &paths).await? {
                    match tree::read_replica_state(&client, &paths, &name).await {
                        Ok(s) => out.push(s),
                        // Dropped between the list and the read: not a replica any more.
                        Err(TreeError::NoReplica { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            }
            .await;
            self.forget_on_transient(target, r).await
        })
    }

    fn parts<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, TreeError>> {
        Box::pin(async move {
            let r = async {
                let client = self.client(target).await?;
                let path = TablePaths::new(table_path).replica(replica).parts();
                match client.list_children(&path).await {
                    Ok(mut names) => {
                        names.sort();
                        Ok(names)
                    }
                    Err(zk::Error::NoNode) => Ok(Vec::new()),
                    Err(e) => Err(TreeError::zk("list", path, e)),
                }
            }
            .await;
            self.forget_on_transient(target, r).await
        })
    }

    fn drop_replica<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
        replica: &'a str,
    ) -> BoxFuture<'a, Result<DropOutcome, TreeError>> {
        Box::pin(async move {
            let r = async {
                let client = self.client(target).await?;
                tree::drop_replica(&client, &TablePaths::new(table_path), replica).await
            }
            .await;
            self.forget_on_transient(target, r).await
        })
    }

    fn remove_table<'a>(
        &'a self,
        target: &'a ZkTarget,
        table_path: &'a str,
    ) -> BoxFuture<'a, Result<(), TreeError>> {
        Box::pin(async move {
            let r = async {
                let client = self.client(target).await?;
                tree::remove_table(&client, &TablePaths::new(table_path)).await
            }
            .await;
            self.forget_on_transient(target, r).await
        })
    }

    fn resolves<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            // The trailing dot keeps the resolver from trying the operator's own search path.
            let absolute = format!("{}.:{port}", host.trim_end_matches('.'));
            match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(absolute))
                .await
            {
                Ok(Ok(mut addrs)) => addrs.next().is_some(),
                Ok(Err(e)) => {
                    tracing::debug!(host, error = %e, "name does not resolve");
                    false
                }
                Err(_) => {
                    tracing::debug!(host, "name lookup timed out");
                    false
                }
            }
        })
    }

    fn sidecar_status<'a>(&'a self, url: &'a str) -> BoxFuture<'a, Option<SidecarStatus>> {
        Box::pin(async move {
            let resp = match self.http.get(url).send().await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    tracing::debug!(url, status = %r.status(), "sidecar status not available");
                    return None;
                }
                Err(e) => {
                    tracing::debug!(url, error = %e, "sidecar did not answer");
                    return None;
                }
            };
            match resp.json::<SidecarStatus>().await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(url, error = %e, "sidecar /status is not the expected JSON");
                    None
                }
            }
        })
    }
}
