//! Helpers shared by the replication tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use zookeeper_client as zk;

/// Generous upper bounds: the machine is shared; polls return as soon as the condition holds.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// `n` rows with user ids `first..first+n`, over two months (two partitions).
pub fn rows(first: u64, n: u64) -> Vec<Value> {
    (first..first + n)
        .map(|id| {
            json!({
                "ts": format!("2025-0{}-{:02} 10:{:02}:00", 1 + id % 2, 1 + id % 28, id % 60),
                "user_id": id,
                "event": format!("event-{}", id % 7),
                "value": if id % 3 == 0 { Value::Null } else { json!(id as f64 / 4.0) },
            })
        })
        .collect()
}

/// `n` rows all in January 2025 (one partition, `202501`).
pub fn january_rows(first: u64, n: u64) -> Vec<Value> {
    (first..first + n)
        .map(|id| {
            json!({
                "ts": format!("2025-01-{:02} 08:00:{:02}", 1 + id % 28, id % 60),
                "user_id": id,
                "event": "click",
                "value": id as f64,
            })
        })
        .collect()
}

/// The user ids in JSONEachRow lines, sorted.
pub fn user_ids(lines: &[String]) -> Vec<u64> {
    let mut ids: Vec<u64> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            v["user_id"]
                .as_u64()
                .unwrap_or_else(|| panic!("user_id in {l}"))
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// Every node under `root` with its data (ephemeral `is_active` content excluded, since
/// it is a session's identity, not table state).
pub async fn tree_snapshot(client: &zk::Client, root: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_string()];
    while let Some(path) = stack.pop() {
        let data = match client.get_data(&path).await {
            Ok((d, _)) => d,
            Err(zk::Error::NoNode) => continue,
            Err(e) => panic!("get {path}: {e}"),
        };
        let children = match client.list_children(&path).await {
            Ok(c) => c,
            Err(zk::Error::NoNode) => continue,
            Err(e) => panic!("list {path}: {e}"),
        };
        let data = if path.ends_with("/is_active") {
            Vec::new()
        } else {
            data
        };
        out.insert(path.clone(), data);
        for c in children {
            stack.push(format!("{path}/{c}"));
        }
    }
    out
}

/// Runs a Python snippet (DuckDB/pyarrow checks) and returns its trimmed stdout.
pub fn python(script: &str) -> String {
    let out =
        std::process::Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
            .arg("-c")
            .arg(script)
            .output()
            .expect("run python3 (install it and the packages with scripts/setup.sh)");
    assert!(
        out.status.success(),
        "python failed (missing packages? run scripts/setup.sh):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
