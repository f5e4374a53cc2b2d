//! How the operator and the sidecar reach a table's ensemble: digest credentials, TLS to
//! the secure client port, and the checks made once connected: that the credentials are
//! the ones the table's tree belongs to, and that a tree created before credentials were
//! configured is moved to its private ACL.
//!
//! ZooKeeper accepts any `addauth digest` (a wrong password only yields an identity that
//! owns nothing), so wrong credentials show only when a node refuses them: [`check`] reads
//! the ACL of the table's root and compares it with the identity the credentials give.

use std::time::Duration;

use zookeeper_client as zk;

use crate::paths::TablePaths;
use crate::tree::TreeError;
use crate::zk_acl::{DigestCredentials, TreeAcl};

/// A CA to verify the ensemble's certificates and an optional client certificate.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ZkTls {
    pub ca_pem: String,
    /// `(certificate chain PEM, private key PEM)`.
    pub client: Option<(String, String)>,
}

impl std::fmt::Debug for ZkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkTls")
            .field("client_certificate", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl ZkTls {
    fn options(&self) -> Result<zk::TlsOptions, zk::Error> {
        let options = zk::TlsOptions::new().with_pem_ca(&self.ca_pem)?;
        match &self.client {
            Some((cert, key)) => options.with_pem_identity(cert, key),
            None => Ok(options),
        }
    }
}

/// Everything but the address needed to open a session on a table's ensemble.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ZkAccess {
    pub credentials: Option<DigestCredentials>,
    /// Where the credentials come from, for messages (`Secret events-zk key digest`,
    /// `--zookeeper-auth-file /etc/...`).
    pub credentials_source: String,
    /// Nodes are readable by anyone (see [`TreeAcl::private`]).
    pub world_read: bool,
    /// Connect to the secure client port; `None` is plain TCP.
    pub tls: Option<ZkTls>,
}

impl ZkAccess {
    /// The ACL every node of the table's tree carries.
    pub fn tree_acl(&self) -> TreeAcl {
        TreeAcl::for_table(self.credentials.as_ref(), self.world_read)
    }

    /// Opens a session, waiting at most `connect_timeout` for the first server. With TLS
    /// every member of `connect_string` is reached over TLS (its certificate must name the
    /// host as written there).
    pub async fn connect(
        &self,
        connect_string: &str,
        session_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<zk::Client, TreeError> {
        let fail = |e| TreeError::zk("connect", connect_string, e);
        let mut connector = zk::Client::connector()
            .with_session_timeout(session_timeout)
            .with_connection_timeout(connect_timeout);
        if let Some(c) = &self.credentials {
            connector = connector.with_auth("digest", &c.auth_bytes());
        }
        match &self.tls {
            Some(tls) => {
                connector
                    .with_tls(tls.options().map_err(fail)?)
                    .secure_connect(connect_string)
                    .await
            }
            None => connector.connect(connect_string).await,
        }
        .map_err(fail)
    }
}

/// What [`check`] found at the table's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeAccess {
    /// No tree yet: it will be created with [`ZkAccess::tree_acl`].
    Absent,
    /// The root carries the expected ACL.
    AsExpected,
    /// The root carries another ACL these credentials may change (an open tree that gets
    /// credentials, or `world_read` switched): run [`migrate`].
    NeedsMigration,
}

/// Checks that these credentials may use the table's tree.
pub async fn check(
    client: &zk::Client,
    paths: &TablePaths,
    access: &ZkAccess,
) -> Result<TreeAccess, TreeError> {
    let root = paths.root();
    let who = match &access.credentials {
        Some(c) => format!(
            "user {} (credentials from {})",
            c.user(),
            access.credentials_source
        ),
        None => "a session without credentials".to_string(),
    };
    let fix = match &access.credentials {
        Some(_) => format!(
            "Put the credentials the tree was created with in {} (or move the table to a new path)",
            access.credentials_source
        ),
        None => "Give the table the credentials its tree was created with (spec.zookeeper.auth, or the sidecar's --zookeeper-auth-file)".to_string(),
    };
    let refused = |why: String| TreeError::AccessRefused {
        root: root.to_string(),
        who: who.clone(),
        why,
        fix: fix.clone(),
    };
    let found = match client.get_acl(root).await {
        Ok((acls, _)) => acls,
        Err(zk::Error::NoNode) => return Ok(TreeAccess::Absent),
        Err(zk::Error::NoAuth) => {
            return Err(refused(
                "reading its ACL is not allowed (NoAuth)".to_string(),
            ));
        }
        Err(e) => return Err(TreeError::zk("get ACL", root, e)),
    };
    let wanted = access.tree_acl();
    if wanted.matches(&found) {
        return Ok(TreeAccess::AsExpected);
    }
    let admin_ids: Vec<String> = match &access.credentials {
        Some(c) => vec![
            format!("digest:{}", c.digest_id()),
            "world:anyone".to_string(),
        ],
        None => vec!["world:anyone".to_string()],
    };
    let may_change = found.iter().any(|a| {
        a.permission().has(zk::Permission::ADMIN)
            && admin_ids.contains(&format!("{}:{}", a.scheme(), a.id()))
    });
    if may_change && access.credentials.is_some() {
        return Ok(TreeAccess::NeedsMigration);
    }
    let owners: Vec<String> = found
        .iter()
        .map(|a| format!("{}:{} {}", a.scheme(), a.id(), a.permission()))
        .collect();
    Err(refused(format!(
        "its root's ACL is [{}]",
        owners.join(", ")
    )))
}

/// Sets the table's ACL on every node of its tree that carries another one. Parents are
/// changed before their children are listed, so a client still using the old ACL cannot
/// add a node the walk misses; the root goes last, so [`check`] finds an interrupted
/// migration unfinished and it runs again. Returns how many nodes changed.
pub async fn migrate(
    client: &zk::Client,
    paths: &TablePaths,
    acl: &TreeAcl,
) -> Result<u64, TreeError> {
    let root = paths.root().to_string();
    let mut changed = 0;
    let mut stack = children(client, &root).await?;
    while let Some(node) = stack.pop() {
        match set_if_different(client, &node, acl).await? {
            None => continue,
            Some(true) => changed += 1,
            Some(false) => {}
        }
        // Children too when the node already had the ACL: a migration interrupted
        // half-way left nodes below it unchanged.
        stack.extend(children(client, &node).await?);
    }
    if set_if_different(client, &root, acl).await? == Some(true) {
        changed += 1;
    }
    Ok(changed)
}

async fn children(client: &zk::Client, node: &str) -> Result<Vec<String>, TreeError> {
    match client.list_children(node).await {
        Ok(names) => Ok(names
            .into_iter()
            .map(|c| format!("{}/{c}", node.trim_end_matches('/')))
            .collect()),
        // An ephemeral or queue entry removed meanwhile.
        Err(zk::Error::NoNode) => Ok(Vec::new()),
        Err(e) => Err(TreeError::zk("list", node, e)),
    }
}

/// Whether the node's ACL was changed; `None` when the node is gone.
async fn set_if_different(
    client: &zk::Client,
    node: &str,
    acl: &TreeAcl,
) -> Result<Option<bool>, TreeError> {
    match client.get_acl(node).await {
        Ok((found, _)) if acl.matches(&found) => return Ok(Some(false)),
        Ok(_) => {}
        Err(zk::Error::NoNode) => return Ok(None),
        Err(e) => return Err(TreeError::zk("get ACL", node, e)),
    }
    match client.set_acl(node, acl.acls(), None).await {
        Ok(_) => Ok(Some(true)),
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(TreeError::zk("set ACL", node, e)),
    }
}
