//! An HTTP client for one replica's API (see the sidecar's `api` module).

use std::time::Duration;

use anyhow::Context as _;
// 0.12: its rustls runs on ring, so a client of a TLS replica needs no process-wide
// crypto provider (see Cargo.toml).
use reqwest12 as reqwest;
use serde::Deserialize;
use serde_json::Value;

use rtable_protocol::status::ReplicaStatus;

/// The secret header of interserver requests.
pub const SECRET_HEADER: &str = "X-Rtable-Secret";

#[derive(Debug, Clone)]
pub struct ReplicaClient {
    base: String,
    http: reqwest::Client,
    credentials: Option<Credentials>,
}

/// What a client of a replica with a users file sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic { user: String, password: String },
    Bearer(String),
}

/// A raw answer: status code and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("answer {} is not JSON: {}", self.status, self.text()))
    }
}

/// A successful `/insert` answer.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct InsertAnswer {
    pub parts: Vec<String>,
    pub rows: u64,
    pub deduplicated: bool,
}

/// One row of `/queue`.
#[derive(Debug, Clone, Deserialize)]
pub struct QueueEntry {
    #[serde(default)]
    pub node_name: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub source_replica: String,
    #[serde(default)]
    pub new_part_name: String,
    #[serde(default)]
    pub num_tries: u64,
    #[serde(default)]
    pub last_exception: Option<String>,
    #[serde(default)]
    pub postpone_reason: Option<String>,
}

impl ReplicaClient {
    /// `base` is `http://host:port`.
    pub fn new(base: &str) -> anyhow::Result<ReplicaClient> {
        Self::with_tls(base, None)
    }

    /// `base` is `https://host:port` when `tls` is given: the client trusts its CA (and
    /// presents its certificate, if any).
    pub fn with_tls(
        base: &str,
        tls: Option<tokio_rustls::rustls::ClientConfig>,
    ) -> anyhow::Result<ReplicaClient> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4);
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls(tls);
        }
        let http = builder.build().context("building the HTTP client")?;
        Ok(ReplicaClient {
            base: base.trim_end_matches('/').to_string(),
            http,
            credentials: None,
        })
    }

    /// The same client sending `credentials` with every request (`None`: anonymous).
    pub fn as_user(&self, credentials: Option<Credentials>) -> ReplicaClient {
        ReplicaClient {
            credentials,
            ..self.clone()
        }
    }

    /// The same client against another base URL (the replica's interserver listener).
    pub fn at(&self, base: &str) -> ReplicaClient {
        ReplicaClient {
            base: base.trim_end_matches('/').to_string(),
            ..self.clone()
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(&self, request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<Response> {
        let request = match &self.credentials {
            None => request,
            Some(Credentials::Basic { user, password }) => request.basic_auth(user, Some(password)),
            Some(Credentials::Bearer(token)) => request.bearer_auth(token),
        };
        let answer = request
            .send()
            .await
            .with_context(|| format!("{what} on {}", self.base))?;
        let status = answer.status().as_u16();
        let body = answer
            .bytes()
            .await
            .with_context(|| format!("reading the answer of {what} on {}", self.base))?;
        Ok(Response {
            status,
            body: body.to_vec(),
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Response> {
        self.send(self.http.get(format!("{}{path}", self.base)), path)
            .await
    }

    /// `POST /insert?format=F[&dedup_token=T]`, whatever the answer.
    pub async fn insert_raw(
        &self,
        format: &str,
        body: impl Into<reqwest::Body>,
        dedup_token: Option<&str>,
    ) -> anyhow::Result<Response> {
        let mut url = format!("{}/insert?format={}", self.base, url_encode(format));
        if let Some(t) = dedup_token {
            url.push_str("&dedup_token=");
            url.push_str(&url_encode(t));
        }
        let request = self.http.post(url).body(body);
        self.send(request, "POST /insert").await
    }

    /// `POST /query?format=F` with the SQL as the body, whatever the answer.
    pub async fn query(&self, sql: &str, format: &str) -> anyhow::Result<Response> {
        let url = format!("{}/query?format={}", self.base, url_encode(format));
        let request = self.http.post(url).body(sql.to_string());
        self.send(request, "POST /query").await
    }

    /// ClickHouse's HTTP interface: `POST /?query=Q` with `body`, whatever the answer.
    pub async fn clickhouse(
        &self,
        query: &str,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<Response> {
        let url = format!("{}/?query={}", self.base, url_encode(query));
        let request = self.http.post(url).body(body);
        self.send(request, "POST /?query=").await
    }

    /// An insert that must succeed.
    pub async fn insert(
        &self,
        format: &str,
        body: impl Into<reqwest::Body>,
        dedup_token: Option<&str>,
    ) -> anyhow::Result<InsertAnswer> {
        let r = self.insert_raw(format, body, dedup_token).await?;
        anyhow::ensure!(
            r.status == 200,
            "insert on {} answered {}: {}",
            self.base,
            r.status,
            r.text()
        );
        serde_json::from_slice(&r.body)
            .with_context(|| format!("insert answer is not the expected JSON: {}", r.text()))
    }

    /// Inserts JSON rows (one object per line).
    pub async fn insert_json(&self, rows: &[Value]) -> anyhow::Result<InsertAnswer> {
        self.insert("JSONEachRow", json_lines(rows), None).await
    }

    /// `GET /select?format=F` body.
    pub async fn select(&self, format: &str) -> anyhow::Result<Vec<u8>> {
        let r = self.get(&format!("/select?format={format}")).await?;
        anyhow::ensure!(
            r.status == 200,
            "select on {} answered {}: {}",
            self.base,
            r.status,
            r.text()
        );
        Ok(r.body)
    }

    /// All rows as JSONEachRow lines, sorted (parts are sorted individually; the set is
    /// what replicas must agree on).
    pub async fn select_sorted_lines(&self) -> anyhow::Result<Vec<String>> {
        let body = self.select("JSONEachRow").await?;
        let text = String::from_utf8(body).context("select output is not UTF-8")?;
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        lines.sort();
        Ok(lines)
    }

    pub async fn status(&self) -> anyhow::Result<ReplicaStatus> {
        let r = self.get("/status").await?;
        anyhow::ensure!(
            r.status == 200,
            "/status answered {}: {}",
            r.status,
            r.text()
        );
        serde_json::from_slice(&r.body)
            .with_context(|| format!("/status is not the expected JSON: {}", r.text()))
    }

    pub async fn status_json(&self) -> anyhow::Result<Value> {
        self.get("/status").await?.json()
    }

    pub async fn queue(&self) -> anyhow::Result<Vec<QueueEntry>> {
        let r = self.get("/queue").await?;
        anyhow::ensure!(
            r.status == 200,
            "/queue answered {}: {}",
            r.status,
            r.text()
        );
        serde_json::from_slice(&r.body)
            .with_context(|| format!("/queue is not the expected JSON: {}", r.text()))
    }

    /// `/readyz` status code and body.
    pub async fn readyz(&self) -> anyhow::Result<(u16, String)> {
        let r = self.get("/readyz").await?;
        Ok((r.status, r.text()))
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        let r = self.get("/metrics").await?;
        anyhow::ensure!(r.status == 200, "/metrics answered {}", r.status);
        Ok(r.text())
    }

    /// The sum of a metric's samples (over all label sets), `None` when absent.
    pub async fn metric(&self, name: &str) -> anyhow::Result<Option<f64>> {
        Ok(metric_value(&self.metrics().await?, name))
    }

    /// `POST path` with an empty body, whatever the answer.
    pub async fn post(&self, path: &str) -> anyhow::Result<Response> {
        self.send(self.http.post(format!("{}{path}", self.base)), path)
            .await
    }

    /// The `WWW-Authenticate` challenges of a `GET path` (for 401 answers).
    pub async fn challenges(&self, path: &str) -> anyhow::Result<Vec<String>> {
        let answer = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path} on {}", self.base))?;
        Ok(answer
            .headers()
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect())
    }

    /// Interserver `GET /parts/<name>`, with the secret header when given.
    pub async fn get_part(&self, name: &str, secret: Option<&str>) -> anyhow::Result<Response> {
        let mut request = self.http.get(format!("{}/parts/{name}", self.base));
        if let Some(s) = secret {
            request = request.header(SECRET_HEADER, s);
        }
        self.send(request, "GET /parts").await
    }

    /// `POST /push/<name>?source=..&log=..` with `body`, as a peer pushes a part.
    pub async fn push_part(
        &self,
        name: &str,
        source: &str,
        log_index: u64,
        body: Vec<u8>,
        secret: Option<&str>,
    ) -> anyhow::Result<Response> {
        let url = format!(
            "{}/push/{name}?source={}&log={log_index}",
            self.base,
            url_encode(source)
        );
        let mut request = self.http.post(url).body(body);
        if let Some(s) = secret {
            request = request.header(SECRET_HEADER, s);
        }
        self.send(request, "POST /push").await
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
pub fn url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// JSON values as a JSONEachRow body.
pub fn json_lines(rows: &[Value]) -> String {
    let mut out = String::new();
    for r in rows {
        out.push_str(&r.to_string());
        out.push('\n');
    }
    out
}

/// Sums the samples of `name` in Prometheus text (`name{...} value` or `name value`).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest
            .rsplit(' ')
            .find(|s| !s.is_empty())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(v) = value {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_sum_over_labels() {
        let text = "# HELP rtable_fetches_total x\n# TYPE rtable_fetches_total counter\n\
                    rtable_fetches_total{replica=\"a\"} 3\nrtable_fetches_total_other 9\n\
                    rtable_queue_size 2\n";
        assert_eq!(metric_value(text, "rtable_fetches_total"), Some(3.0));
        assert_eq!(metric_value(text, "rtable_queue_size"), Some(2.0));
        assert_eq!(metric_value(text, "rtable_missing"), None);
    }
}
