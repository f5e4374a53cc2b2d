//! Who may call which client endpoint. Each route declares the role it needs where it is
//! routed (`gate.require(Role::Writer, post(insert))`); the gate answers 401 when the
//! caller is not known and 403 when it is known but its role is too low, both naming what
//! is missing. Roles are ordered: reader < writer < admin, a higher role may do all a lower
//! one may.
//!
//! Without a users file the gate is open and every request passes, as before users
//! existed: insecure, for a laptop or a network nobody else reaches.
//!
//! Peers do not pass here: the interserver endpoints check the interserver secret
//! ([`secret_matches`]) and, with TLS, the peer's certificate.

pub mod credentials;
pub mod role;
pub mod users;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use parking_lot::RwLock;
use subtle::ConstantTimeEq;
use tracing::{info, warn};

use credentials::Credentials;
pub use role::Role;
pub use users::Users;

const CLICKHOUSE_USER: &str = "x-clickhouse-user";
const CLICKHOUSE_KEY: &str = "x-clickhouse-key";

/// The caller a request was let through for, in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    Missing { needs: Role },
    /// An `Authorization` header this API does not read.
    Malformed { why: String },
    /// Unknown user, wrong password or unknown token (not told apart: that would tell
    /// a guesser which user names exist).
    Rejected { scheme: &'static str },
    /// Known, but the role is too low.
    Forbidden {
        user: String,
        has: Role,
        needs: Role,
    },
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Forbidden { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The answer's message; `what` is the request (`POST /insert`).
    pub fn message(&self, what: &str) -> String {
        match self {
            Refusal::Missing { needs } => format!(
                "{what} needs a user with role {needs} or above: send HTTP Basic credentials (user:password) or `Authorization: Bearer <token>`"
            ),
            Refusal::Malformed { why } => format!(
                "{what}: the Authorization header {why}; send `Basic <base64 of user:password>` or `Bearer <token>`"
            ),
            Refusal::Rejected { scheme } => format!(
                "{what}: the {scheme} credentials were not accepted (unknown user, wrong password or unknown token)"
            ),
            Refusal::Forbidden { user, has, needs } => {
                format!("{what} needs role {needs} or above; user `{user}` has role {has}")
            }
        }
    }

    fn into_response(self, what: &str) -> Response {
        let status = self.status();
        let body = serde_json::json!({ "error": self.message(what) });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            let headers = response.headers_mut();
            headers.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"rtable\", charset=\"UTF-8\""),
            );
            headers.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"rtable\""),
            );
        }
        response
    }
}

/// The decision, without I/O: who the request's headers say the caller is, and whether
/// that is enough. `Authorization` (Basic or Bearer) first, else ClickHouse's own
/// `X-ClickHouse-User` / `X-ClickHouse-Key`, which its clients and drivers send.
pub fn decide(users: &Users, headers: &HeaderMap, needs: Role) -> Result<Caller, Refusal> {
    let credentials = match (
        headers.get(header::AUTHORIZATION),
        headers.get(CLICKHOUSE_USER),
    ) {
        (Some(value), _) => Credentials::parse(value).map_err(|why| Refusal::Malformed { why })?,
        (None, Some(user)) => Credentials::clickhouse(user, headers.get(CLICKHOUSE_KEY))
            .map_err(|why| Refusal::Malformed { why })?,
        (None, None) => return Err(Refusal::Missing { needs }),
    };
    let user = match &credentials {
        Credentials::Basic { user, password } => users.basic(user, password),
        Credentials::Bearer(token) => users.bearer(token),
    }
    .ok_or(Refusal::Rejected {
        scheme: credentials.scheme(),
    })?;
    if user.role < needs {
        return Err(Refusal::Forbidden {
            user: user.name.clone(),
            has: user.role,
            needs,
        });
    }
    Ok(Caller {
        name: user.name.clone(),
        role: user.role,
    })
}

/// The client API's users, or none (open). Cheap to clone; a reload is seen by every clone.
#[derive(Clone, Default)]
pub struct Gate {
    users: Option<Arc<RwLock<Arc<Users>>>>,
    /// `/metrics` needs a reader too (`--metrics-require-auth`); else it is open, as
    /// Prometheus scrapes usually are.
    metrics_need_auth: bool,
}

impl Gate {
    /// Every request passes (no users file).
    pub fn open() -> Gate {
        Gate::default()
    }

    pub fn with_users(users: Users, metrics_need_auth: bool) -> Gate {
        Gate {
            users: Some(Arc::new(RwLock::new(Arc::new(users)))),
            metrics_need_auth,
        }
    }

    pub fn is_open(&self) -> bool {
        self.users.is_none()
    }

    /// `route` answered only for callers with `role` or above.
    pub fn require<S>(&self, role: Role, route: MethodRouter<S>) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        match &self.users {
            None => route,
            Some(users) => route.route_layer(axum::middleware::from_fn_with_state(
                Need {
                    users: users.clone(),
                    role: Needs::Fixed(role),
                },
                check,
            )),
        }
    }

    /// Every route of `router` (a group routed elsewhere, such as `/query`) answered only
    /// for callers with the role `role_for(method, path)` or above.
    pub fn require_all(
        &self,
        role_for: fn(&Method, &str) -> Role,
        router: axum::Router,
    ) -> axum::Router {
        match &self.users {
            None => router,
            Some(users) => router.route_layer(axum::middleware::from_fn_with_state(
                Need {
                    users: users.clone(),
                    role: Needs::ByRequest(role_for),
                },
                check,
            )),
        }
    }

    /// `/metrics`: open, or for readers with `--metrics-require-auth`.
    pub fn metrics<S>(&self, route: MethodRouter<S>) -> MethodRouter<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        if self.metrics_need_auth {
            self.require(Role::Reader, route)
        } else {
            route
        }
    }

    /// Re-reads `path` whenever it changes (a Secret updated in place); a file that no
    /// longer parses is logged and the users before it stay.
    pub async fn watch(self, path: PathBuf, period: Duration) {
        let Some(current) = self.users.clone() else {
            return;
        };
        crate::file_watch::on_change(vec![path.clone()], period, move || {
            match Users::load(&path) {
                Ok(users) => {
                    info!(users = users.len(), file = %path.display(), "users file reloaded");
                    *current.write() = Arc::new(users);
                }
                Err(e) => warn!(error = %e, "users file changed but cannot be used; keeping the users loaded before"),
            }
        })
        .await;
    }
}

#[derive(Clone)]
struct Need {
    users: Arc<RwLock<Arc<Users>>>,
    role: Needs,
}

#[derive(Clone, Copy)]
enum Needs {
    Fixed(Role),
    ByRequest(fn(&Method, &str) -> Role),
}

async fn check(State(need): State<Need>, mut request: Request, next: Next) -> Response {
    let users = need.users.read().clone();
    let role = match need.role {
        Needs::Fixed(role) => role,
        Needs::ByRequest(role_for) => role_for(request.method(), request.uri().path()),
    };
    match decide(&users, request.headers(), role) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => {
            let what = format!("{} {}", request.method(), request.uri().path());
            info!(request = %what, refusal = ?refusal, "client request refused");
            refusal.into_response(&what)
        }
    }
}

/// Whether `given` is the interserver secret. Both are hashed first and the digests
/// compared in constant time, so neither the contents nor the length of the secret leak
/// through the time an answer takes.
pub fn secret_matches(expected: &str, given: Option<&str>) -> bool {
    let Some(given) = given else {
        return false;
    };
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    digest(expected)
        .as_ref()
        .ct_eq(digest(given).as_ref())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use users::SaltedHash;

    fn users() -> Users {
        let entry = |name: &str, role: &str| {
            format!(
                "  - name: {name}\n    role: {role}\n    password: \"{}\"\n",
                SaltedHash::render(&format!("{name}-pw"), "salt")
            )
        };
        Users::parse(
            &format!(
                "users:\n{}{}{}",
                entry("r", "reader"),
                entry("w", "writer"),
                entry("a", "admin")
            ),
            "test",
        )
        .expect("parses")
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        use base64::Engine as _;
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).expect("header"),
        );
        h
    }

    #[test]
    fn a_higher_role_may_do_what_a_lower_one_may_and_not_the_reverse() {
        let u = users();
        assert!(decide(&u, &basic("a", "a-pw"), Role::Writer).is_ok());
        assert!(decide(&u, &basic("w", "w-pw"), Role::Reader).is_ok());
        assert_eq!(
            decide(&u, &basic("r", "r-pw"), Role::Writer),
            Err(Refusal::Forbidden {
                user: "r".into(),
                has: Role::Reader,
                needs: Role::Writer
            })
        );
        assert_eq!(
            decide(&u, &HeaderMap::new(), Role::Reader),
            Err(Refusal::Missing {
                needs: Role::Reader
            })
        );
        assert_eq!(
            decide(&u, &basic("w", "r-pw"), Role::Reader),
            Err(Refusal::Rejected { scheme: "Basic" })
        );
    }

    #[test]
    fn clickhouse_user_headers_authenticate_too() {
        let u = users();
        let mut h = HeaderMap::new();
        h.insert(CLICKHOUSE_USER, HeaderValue::from_static("w"));
        h.insert(CLICKHOUSE_KEY, HeaderValue::from_static("w-pw"));
        assert_eq!(
            decide(&u, &h, Role::Writer).map(|c| c.name),
            Ok("w".to_string())
        );
    }

    #[test]
    fn refusals_name_what_is_missing() {
        let m = Refusal::Forbidden {
            user: "w".into(),
            has: Role::Writer,
            needs: Role::Admin,
        }
        .message("POST /drop_partition");
        assert_eq!(
            m,
            "POST /drop_partition needs role admin or above; user `w` has role writer"
        );
        assert!(
            Refusal::Missing {
                needs: Role::Writer
            }
            .message("POST /insert")
            .contains("role writer")
        );
    }

    #[test]
    fn the_secret_matches_only_itself() {
        assert!(secret_matches("s3cret", Some("s3cret")));
        assert!(!secret_matches("s3cret", Some("s3cre")));
        assert!(!secret_matches("s3cret", Some("s3cret ")));
        assert!(!secret_matches("s3cret", None));
    }
}
