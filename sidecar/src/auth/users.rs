//! The users file: who may call the client API, with which password or token, in which
//! role. Mounted from a Kubernetes Secret; a hash, never a password, is stored.
//!
//! ```yaml
//! users:
//!   - name: loader
//!     role: writer                               # reader < writer < admin
//!     password: "sha256:<salt hex>:<hex of SHA-256(password || salt)>"
//!     token: "sha256:<salt hex>:<hex of SHA-256(token || salt)>"   # optional, for `Bearer`
//! ```
//!
//! The hash is ClickHouse's `sha256_password` with a salt: SHA-256 over the password's
//! bytes followed by the salt's bytes (the salt as written, hex text). Verifying costs
//! one SHA-256 per request, so authentication adds nothing measurable to an insert; a
//! slow hash (argon2) would have to be cached per connection to say the same, and the
//! passwords this API expects are generated, long and random (see `docs/security.md`).

use std::path::Path;

use ring::digest;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::role::Role;

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("users file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "users file {path} is not valid: {source}; it must be `users:` followed by entries with `name`, `role` (reader, writer or admin) and `password` and/or `token`"
    )]
    Yaml {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("users file {path}: user #{index}: {message}")]
    Entry {
        path: String,
        index: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: String,
    role: Role,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

/// A salted SHA-256 hash as the users file writes it: `sha256:<salt>:<64 hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaltedHash {
    salt: String,
    digest: [u8; 32],
}

impl SaltedHash {
    pub fn parse(text: &str) -> Result<SaltedHash, String> {
        let mut fields = text.splitn(3, ':');
        let (Some("sha256"), Some(salt), Some(hex)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(
                "must be `sha256:<salt>:<hex digest>` (see docs/security.md for how to make one)"
                    .to_string(),
            );
        };
        if hex.len() != 64 {
            return Err(format!(
                "the digest has {} characters; SHA-256 in hex has 64",
                hex.len()
            ));
        }
        let mut digest = [0u8; 32];
        for (i, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("the digest `{hex}` is not hexadecimal"))?;
        }
        Ok(SaltedHash {
            salt: salt.to_string(),
            digest,
        })
    }

    /// The hash of `secret` with `salt`, in the users file's text form.
    pub fn render(secret: &str, salt: &str) -> String {
        let d = Self::digest_of(secret, salt);
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{salt}:{hex}")
    }

    fn digest_of(secret: &str, salt: &str) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(secret.as_bytes());
        ctx.update(salt.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// Constant time in the digest: a timing difference says nothing about how close a
    /// guess came.
    pub fn matches(&self, secret: &str) -> bool {
        Self::digest_of(secret, &self.salt)
            .ct_eq(&self.digest)
            .into()
    }
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub role: Role,
    password: Option<SaltedHash>,
    token: Option<SaltedHash>,
}

/// The users of one replica's client API.
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: Vec<User>,
}

impl Users {
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Users::parse(&text, &path.display().to_string())
    }

    /// `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Users, UsersError> {
        let file: UsersFile = serde_yaml::from_str(text).map_err(|source| UsersError::Yaml {
            path: origin.to_string(),
            source,
        })?;
        let mut users: Vec<User> = Vec::with_capacity(file.users.len());
        for (index, entry) in file.users.into_iter().enumerate() {
            let bad = |message: String| UsersError::Entry {
                path: origin.to_string(),
                index: index + 1,
                message,
            };
            if entry.name.is_empty() || entry.name.contains(':') {
                return Err(bad(format!(
                    "name `{}` must be non-empty and without `:` (HTTP Basic splits on it)",
                    entry.name
                )));
            }
            if users.iter().any(|u| u.name == entry.name) {
                return Err(bad(format!("user `{}` is defined twice", entry.name)));
            }
            let hash =
                |field: &str, text: Option<String>| -> Result<Option<SaltedHash>, UsersError> {
                    text.map(|t| {
                        SaltedHash::parse(&t)
                            .map_err(|e| bad(format!("`{field}` of user `{}` {e}", entry.name)))
                    })
                    .transpose()
                };
            let password = hash("password", entry.password.clone())?;
            let token = hash("token", entry.token.clone())?;
            if password.is_none() && token.is_none() {
                return Err(bad(format!(
                    "user `{}` has neither `password` nor `token`; give it at least one",
                    entry.name
                )));
            }
            users.push(User {
                name: entry.name,
                role: entry.role,
                password,
                token,
            });
        }
        Ok(Users { users })
    }

    /// The user these Basic credentials name, when the password is right. Every hash of
    /// the file is not compared: the name picks the user, as a login does.
    pub fn basic(&self, name: &str, password: &str) -> Option<&User> {
        let user = self.users.iter().find(|u| u.name == name)?;
        user.password
            .as_ref()
            .is_some_and(|h| h.matches(password))
            .then_some(user)
    }

    /// The user whose token this is. Every user's token is compared, so the time taken
    /// does not depend on which one matched.
    pub fn bearer(&self, token: &str) -> Option<&User> {
        let mut found = None;
        for user in &self.users {
            if user.token.as_ref().is_some_and(|h| h.matches(token)) && found.is_none() {
                found = Some(user);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> String {
        format!(
            "users:\n  - name: ann\n    role: reader\n    password: \"{}\"\n  - name: bot\n    role: writer\n    token: \"{}\"\n",
            SaltedHash::render("ann-pw", "s1"),
            SaltedHash::render("bot-token", "s2"),
        )
    }

    #[test]
    fn a_password_or_token_finds_its_user_and_nothing_else_does() {
        let users = Users::parse(&file(), "users.yaml").expect("parses");
        assert_eq!(
            users.basic("ann", "ann-pw").map(|u| u.role),
            Some(Role::Reader)
        );
        assert!(users.basic("ann", "ann-pw ").is_none());
        assert!(
            users.basic("bot", "bot-token").is_none(),
            "bot has no password"
        );
        assert_eq!(
            users.bearer("bot-token").map(|u| u.name.as_str()),
            Some("bot")
        );
        assert!(users.bearer("ann-pw").is_none());
    }

    #[test]
    fn the_hash_is_sha256_of_the_password_then_the_salt() {
        // printf 'secretsalt' | sha256sum
        assert_eq!(
            SaltedHash::render("secret", "salt"),
            "sha256:salt:f84fa2149dbb62ed4e0cf1f550d2949b33a6513d3a7707e08502511c79ccb0ee"
        );
    }

    #[test]
    fn bad_entries_name_the_user_and_the_fix() {
        let e = Users::parse("users:\n  - name: x\n    role: reader\n", "u.yaml")
            .expect_err("no password");
        assert!(
            e.to_string().contains("neither `password` nor `token`"),
            "{e}"
        );
        let e = Users::parse(
            "users:\n  - name: x\n    role: root\n    password: sha256:a:00\n",
            "u.yaml",
        )
        .expect_err("bad role");
        assert!(e.to_string().contains("u.yaml"), "{e}");
        let e = Users::parse(
            "users:\n  - name: x\n    role: reader\n    password: sha256:a:00\n",
            "u.yaml",
        )
        .expect_err("short digest");
        assert!(e.to_string().contains("64"), "{e}");
    }
}
