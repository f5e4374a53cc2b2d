//! The one place that decides which ACL a node rtable creates carries.
//!
//! A table without credentials keeps ClickHouse's default: every node open to anyone. A
//! table with digest credentials (`user:password`) gets, on every node of its tree, one
//! entry giving the credentials' identity (`digest:user:base64(sha1(user:password))`, the
//! identity ZooKeeper derives from `addauth digest user:password`) all rights, and nothing
//! for anyone else; `world_read` adds read for anyone, for debugging with zkCli. The id is
//! spelled out rather than using ZooKeeper's `auth` scheme so the ACL is the same whatever
//! else the session authenticated with (a TLS client certificate adds an `x509` identity).
//!
//! Shared ancestors (`/clickhouse/tables`, a chroot's parents) are not part of any table:
//! see [`ancestor`].

use std::sync::LazyLock;

use base64::Engine;
use sha1::{Digest, Sha1};
use zookeeper_client as zk;

/// Digest credentials `user:password`, as `addauth digest` takes them.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DigestCredentials {
    user: String,
    password: String,
}

impl std::fmt::Debug for DigestCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DigestCredentials({}:<redacted>)", self.user)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "ZooKeeper credentials must be one line `user:password` with a non-empty user and password (got {got})"
)]
pub struct CredentialsError {
    got: &'static str,
}

impl DigestCredentials {
    /// Reads `user:password`; surrounding whitespace (a trailing newline) is ignored.
    pub fn parse(text: &str) -> Result<Self, CredentialsError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(CredentialsError {
                got: "an empty value",
            });
        }
        if text.contains('\n') {
            return Err(CredentialsError {
                got: "several lines",
            });
        }
        match text.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                Ok(DigestCredentials {
                    user: user.to_string(),
                    password: password.to_string(),
                })
            }
            Some(_) => Err(CredentialsError {
                got: "an empty user or password",
            }),
            None => Err(CredentialsError { got: "no `:`" }),
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// What `addauth digest` sends.
    pub fn auth_bytes(&self) -> Vec<u8> {
        format!("{}:{}", self.user, self.password).into_bytes()
    }

    /// The `digest` scheme id ZooKeeper gives a session authenticated with these
    /// credentials: `user:base64(sha1("user:password"))`.
    pub fn digest_id(&self) -> String {
        let hash = Sha1::digest(self.auth_bytes());
        format!(
            "{}:{}",
            self.user,
            base64::engine::general_purpose::STANDARD.encode(hash)
        )
    }
}

/// The ACL of every node of one table's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeAcl {
    acls: Vec<zk::Acl>,
}

impl TreeAcl {
    /// No credentials: anyone may do anything (ClickHouse's default without `auth`).
    pub fn open() -> Self {
        TreeAcl {
            acls: zk::Acls::anyone_all().to_vec(),
        }
    }

    /// Everything for the credentials' identity; nothing, or read with `world_read`, for
    /// anyone else.
    pub fn private(credentials: &DigestCredentials, world_read: bool) -> Self {
        let mut acls = vec![zk::Acl::new(
            zk::Permission::ALL,
            zk::AuthId::new("digest", &credentials.digest_id()),
        )];
        if world_read {
            acls.push(zk::Acl::new(zk::Permission::READ, zk::AuthId::anyone()));
        }
        TreeAcl { acls }
    }

    pub fn for_table(credentials: Option<&DigestCredentials>, world_read: bool) -> Self {
        match credentials {
            Some(c) => Self::private(c, world_read),
            None => Self::open(),
        }
    }

    pub fn acls(&self) -> &[zk::Acl] {
        &self.acls
    }

    pub fn is_open(&self) -> bool {
        self.acls == zk::Acls::anyone_all().to_vec()
    }

    /// Whether a node's ACL as read from ZooKeeper is this one (order does not matter).
    pub fn matches(&self, found: &[zk::Acl]) -> bool {
        found.len() == self.acls.len() && found.iter().all(|a| self.acls.contains(a))
    }

    pub fn persistent(&self) -> zk::CreateOptions<'_> {
        zk::CreateMode::Persistent.with_acls(zk::Acls::new(&self.acls))
    }
    pub fn persistent_sequential(&self) -> zk::CreateOptions<'_> {
        zk::CreateMode::PersistentSequential.with_acls(zk::Acls::new(&self.acls))
    }
    pub fn ephemeral(&self) -> zk::CreateOptions<'_> {
        zk::CreateMode::Ephemeral.with_acls(zk::Acls::new(&self.acls))
    }
    pub fn ephemeral_sequential(&self) -> zk::CreateOptions<'_> {
        zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::new(&self.acls))
    }
}

/// Ancestors such as `/clickhouse/tables` hold many tables, each with its own credentials:
/// anyone may list them and create or delete children, so any table can be created and
/// removed below them. Nobody gets write or admin, so no table's owner can lock the others
/// out (set the ancestor's ACL or data). Deleting a child needs the child to be empty, and
/// emptying a table's root needs that table's credentials, so this exposes no table.
static ANCESTOR: LazyLock<[zk::Acl; 1]> = LazyLock::new(|| {
    [zk::Acl::new(
        zk::Permission::READ | zk::Permission::CREATE | zk::Permission::DELETE,
        zk::AuthId::anyone(),
    )]
});

pub fn ancestor() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::new(&*ANCESTOR))
}

/// The ACL [`ancestor`] creates with.
pub fn ancestor_acls() -> &'static [zk::Acl] {
    &*ANCESTOR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_id_is_the_one_zookeeper_derives() {
        // `java org.apache.zookeeper.server.auth.DigestAuthenticationProvider super:secret`
        // prints super:secret->super:lK75jTNcA+U9vtVEw5vB51mj/w4=
        let c = DigestCredentials::parse("super:secret\n").expect("valid");
        assert_eq!(c.digest_id(), "super:lK75jTNcA+U9vtVEw5vB51mj/w4=");
    }

    #[test]
    fn credentials_name_what_is_wrong() {
        for (text, why) in [
            ("", "an empty value"),
            ("user", "no `:`"),
            (":pw", "an empty user or password"),
            ("u:", "an empty user or password"),
            ("u:p\nv:q", "several lines"),
        ] {
            let e = DigestCredentials::parse(text).expect_err(text);
            assert!(e.to_string().contains(why), "{text:?}: {e}");
        }
        let c = DigestCredentials::parse("u:p:q").expect("a password may hold `:`");
        assert_eq!(c.auth_bytes(), b"u:p:q");
        assert!(
            !format!("{c:?}").contains("p:q"),
            "Debug leaks the password"
        );
    }

    #[test]
    fn a_private_acl_names_only_the_credentials() {
        let c = DigestCredentials::parse("rt:pw").expect("valid");
        let acl = TreeAcl::private(&c, false);
        assert_eq!(acl.acls().len(), 1);
        assert_eq!(acl.acls()[0].scheme(), "digest");
        assert_eq!(acl.acls()[0].id(), c.digest_id());
        assert_eq!(acl.acls()[0].permission(), zk::Permission::ALL);
        assert!(!acl.is_open());
        let debug = TreeAcl::private(&c, true);
        assert_eq!(debug.acls().len(), 2);
        assert!(debug.matches(&[debug.acls()[1].clone(), debug.acls()[0].clone()]));
        assert!(!debug.matches(acl.acls()));
        assert!(TreeAcl::for_table(None, true).is_open());
    }
}
