//! Multi-process test harness for rtable: a real ZooKeeper ensemble on loopback, sidecar
//! processes, an HTTP client for their API, and a `Cluster` tying them together.
//!
//! Every process writes its log to a file under the cluster's directory; when a test
//! panics, the cluster keeps that directory and prints the tail of every log.

pub mod checker;
pub mod client;
pub mod cluster;
pub mod driver;
pub mod kube;
pub mod node;
pub mod poll;
pub mod ports;
pub mod process;
pub mod rendered;
pub mod security;
pub mod sidecar_proc;
pub mod zk_ensemble;

pub use client::{InsertAnswer, ReplicaClient, Response};
pub use cluster::{Cluster, ClusterOptions};
pub use poll::{Check, poll_until};
pub use sidecar_proc::{SidecarConfig, SidecarProc};
pub use zk_ensemble::ZkEnsemble;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

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

static SERIAL: AtomicBool = AtomicBool::new(false);

/// Held for a whole test: tests that start processes run one at a time. Released on drop,
/// also when the test panics.
///
/// It deliberately lives across `.await`s (it is a flag, not a lock guard): the async tests
/// each own their runtime and thread, so waiting for it never stalls another test.
pub struct SerialGuard(());

impl Drop for SerialGuard {
    fn drop(&mut self) {
        SERIAL.store(false, Ordering::Release);
    }
}

/// Serializes tests that start processes inside one test binary (cargo runs test
/// binaries one after another already). Hold the guard for the whole test.
pub fn serial() -> SerialGuard {
    while SERIAL
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    SerialGuard(())
}

/// Whether the harness should keep its temp directories (`RTABLE_E2E_KEEP=1`).
pub fn keep_dirs() -> bool {
    std::env::var("RTABLE_E2E_KEEP").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The last `lines` lines of a text file, or a note saying why there are none.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail_text(&String::from_utf8_lossy(&bytes), lines),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The last `lines` lines of `text`.
pub fn tail_text(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}
