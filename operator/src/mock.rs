//! A scripted Kubernetes API server for tests (the kube-rs controller-rs `fixtures.rs`
//! pattern): a tower-test mock that expects an exact sequence of requests. Each step
//! asserts method, path, content type, query and body, then answers with canned JSON; a
//! missing or extra request fails the test.

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

pub type Check = Box<dyn Fn(&Value) + Send>;
pub type Respond = Box<dyn Fn(&Value) -> (u16, Value) + Send>;

pub struct Step {
    pub method: &'static str,
    pub path: String,
    /// Exact `Content-Type` of the request, when it has a body that matters.
    pub content_type: Option<&'static str>,
    /// `key=value` pairs the query string must hold.
    pub query: Vec<&'static str>,
    pub check: Check,
    pub respond: Respond,
}

pub fn step(method: &'static str, path: &str) -> Step {
    Step {
        method,
        path: path.to_string(),
        content_type: None,
        query: vec![],
        check: Box::new(|_| {}),
        respond: Box::new(|body| (200, body.clone())),
    }
}

/// A server-side apply: PATCH with the apply content type, our field manager, forced.
pub fn ssa_step(path: &str) -> Step {
    let mut s = step("PATCH", path);
    s.content_type = Some("application/apply-patch+yaml");
    s.query = vec!["fieldManager=rtable-operator", "force=true"];
    s
}

/// A JSON patch (what kube's finalizer helper sends).
pub fn json_patch_step(path: &str) -> Step {
    let mut s = step("PATCH", path);
    s.content_type = Some("application/json-patch+json");
    s
}

/// The body must equal `expected` exactly.
pub fn exactly(expected: Value) -> impl Fn(&Value) + Send + 'static {
    move |body| {
        assert!(
            body == &expected,
            "request body differs\n--- sent ---\n{}\n--- expected ---\n{}",
            serde_json::to_string_pretty(body).unwrap_or_default(),
            serde_json::to_string_pretty(&expected).unwrap_or_default()
        );
    }
}

pub fn to_json<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).expect("serializes")
}

impl Step {
    pub fn check(mut self, f: impl Fn(&Value) + Send + 'static) -> Self {
        self.check = Box::new(f);
        self
    }
    pub fn respond(mut self, f: impl Fn(&Value) -> (u16, Value) + Send + 'static) -> Self {
        self.respond = Box::new(f);
        self
    }
    pub fn not_found(self) -> Self {
        self.respond(|_| {
            (
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
            )
        })
    }
}

/// A client talking to the scripted server, and the task that verifies the script. Drop
/// every clone of the client, then await [`finish`] to check that nothing was left over.
pub fn server(steps: Vec<Step>) -> (Client, JoinHandle<()>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let verifier = tokio::spawn(async move {
        for (i, s) in steps.into_iter().enumerate() {
            let (request, send) = handle.next_request().await.unwrap_or_else(|| {
                panic!(
                    "step {i}: expected {} {}, but no more requests came",
                    s.method, s.path
                )
            });
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let path = uri.split('?').next().unwrap_or_default().to_string();
            assert_eq!(
                (method.as_str(), path.as_str()),
                (s.method, s.path.as_str()),
                "step {i} ({uri})"
            );
            if let Some(want) = s.content_type {
                let got = request
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                assert_eq!(got, want, "step {i} ({method} {uri}): content type");
            }
            let query: Vec<&str> = uri
                .split_once('?')
                .map(|(_, q)| q.split('&').collect())
                .unwrap_or_default();
            for pair in &s.query {
                assert!(query.contains(pair), "step {i} ({method} {uri}): no {pair}");
            }
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .expect("request body");
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("JSON body")
            };
            (s.check)(&body);
            let (code, answer) = (s.respond)(&body);
            let response = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                .expect("response");
            send.send_response(response);
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!(
                "unexpected extra request {} {}",
                request.method(),
                request.uri()
            );
        }
    });
    (Client::new(service, "default"), verifier)
}

/// Waits for the verifier: every step was requested and nothing more.
pub async fn finish(verifier: JoinHandle<()>) {
    tokio::time::timeout(std::time::Duration::from_secs(5), verifier)
        .await
        .expect("verifier finished")
        .expect("every request matched its step");
}

impl Step {
    /// Answers `409 Conflict`, as the API server does for a stale resourceVersion.
    pub fn conflict(self) -> Self {
        self.respond(|_| {
            (
                409,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
            )
        })
    }
}
