//! The replica's way into ZooKeeper: credentials and TLS material read from the files the
//! flags name, and the access check every new session makes before it touches the tree
//! (see `rtable_protocol::zk_access`).

use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};
use zookeeper_client as zk;

use rtable_protocol::TablePaths;
use rtable_protocol::tree::TreeError;
use rtable_protocol::zk_access::{self, TreeAccess, ZkAccess, ZkTls};
use rtable_protocol::zk_acl::DigestCredentials;

use crate::config::Config;

/// Reads the files the ZooKeeper flags name; an error names the flag, the file and the fix.
pub fn from_config(cfg: &Config) -> Result<ZkAccess, String> {
    let read = |flag: &str, path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
    };
    let mut access = ZkAccess {
        world_read: cfg.zookeeper_acl_world_read,
        ..ZkAccess::default()
    };
    if let Some(path) = &cfg.zookeeper_auth_file {
        let text = read("--zookeeper-auth-file", path)?;
        let source = match &cfg.zookeeper_auth_source {
            Some(source) => format!("{source} (--zookeeper-auth-file {})", path.display()),
            None => format!("--zookeeper-auth-file {}", path.display()),
        };
        access.credentials =
            Some(DigestCredentials::parse(&text).map_err(|e| format!("{source}: {e}"))?);
        access.credentials_source = source;
    } else if cfg.zookeeper_acl_world_read {
        return Err(
            "--zookeeper-acl-world-read needs --zookeeper-auth-file: without credentials the tree is open to anyone already"
                .to_string(),
        );
    }
    let client = match (&cfg.zookeeper_tls_cert_file, &cfg.zookeeper_tls_key_file) {
        (Some(cert), Some(key)) => Some((
            read("--zookeeper-tls-cert-file", cert)?,
            read("--zookeeper-tls-key-file", key)?,
        )),
        (None, None) => None,
        _ => {
            return Err(
                "--zookeeper-tls-cert-file and --zookeeper-tls-key-file go together: give both or neither"
                    .to_string(),
            );
        }
    };
    match (&cfg.zookeeper_tls_ca_file, client) {
        (Some(ca), client) => {
            access.tls = Some(ZkTls {
                ca_pem: read("--zookeeper-tls-ca-file", ca)?,
                client,
            })
        }
        (None, Some(_)) => {
            return Err(
                "--zookeeper-tls-cert-file needs --zookeeper-tls-ca-file (the CA that signed the ensemble's certificates)"
                    .to_string(),
            );
        }
        (None, None) => {}
    }
    Ok(access)
}

/// Run by each new session before it creates or reads the table's tree: refuses a tree
/// these credentials do not own and moves a tree with another ACL to this table's.
pub async fn prepare(
    client: &zk::Client,
    paths: &TablePaths,
    access: &ZkAccess,
) -> Result<(), TreeError> {
    match zk_access::check(client, paths, access).await? {
        TreeAccess::Absent | TreeAccess::AsExpected => Ok(()),
        TreeAccess::NeedsMigration => {
            let changed = zk_access::migrate(client, paths, &access.tree_acl()).await?;
            info!(
                root = paths.root(),
                changed, "moved the table's tree to its ACL"
            );
            Ok(())
        }
    }
}

/// At start, before any task runs: credentials the tree refuses stop the process with the
/// refusal (a pod in CrashLoopBackOff naming the Secret). An unreachable ensemble is not
/// an error here: the session task keeps trying and checks again on every session.
pub async fn verify_at_start(
    connect_string: &str,
    session_timeout: Duration,
    paths: &TablePaths,
    access: &ZkAccess,
) -> Result<(), String> {
    let client = match access
        .connect(connect_string, session_timeout, session_timeout)
        .await
    {
        Ok(client) => client,
        Err(e) => {
            warn!(error = %e, "ZooKeeper not reachable at start; the session task keeps trying");
            return Ok(());
        }
    };
    match zk_access::check(&client, paths, access).await {
        Err(e @ TreeError::AccessRefused { .. }) => Err(e.to_string()),
        Err(e) => {
            warn!(error = %e, "cannot check ZooKeeper access at start; the session task checks again");
            Ok(())
        }
        Ok(_) => Ok(()),
    }
}
