//! Multi-process test harness for rtable: a real ZooKeeper ensemble on loopback, sidecar
//! processes, an HTTP client for their API, and a `Cluster` tying them together.
//!
//! Every process writes its log to a file under the cluster's directory; when a test
//! panics, the cluster keeps that directory and prints the tail of every log.

pub mod client;
pub mod cluster;
pub mod poll;
pub mod ports;
pub mod process;
pub mod sidecar_proc;
pub mod zk_ensemble;

pub use client::{InsertAnswer, ReplicaClient, Response};
pub use cluster::{Cluster, ClusterOptions};
pub use poll::{Check, poll_until};
pub use sidecar_proc::{SidecarConfig, SidecarProc};
pub use zk_ensemble::ZkEnsemble;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or(manifest_dir)
}

/// The example manifest every test cluster and the playground use by default.
pub fn example_manifest() -> PathBuf {
    repo_root().join("examples").join("events.yaml")
}

static SERIAL: Mutex<()> = Mutex::new(());

/// Serializes tests that start processes inside one test binary (cargo runs test
/// binaries one after another already). Hold the guard for the whole test.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether the harness should keep its temp directories (`RTABLE_E2E_KEEP=1`).
pub fn keep_dirs() -> bool {
    std::env::var("RTABLE_E2E_KEEP").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The last `lines` lines of a text file, or a note saying why there are none.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            all[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
