//! Where the control plane's binaries are: built once per machine from their Go module
//! sources by `scripts/kube-binaries.sh`, which prints its cache directory last.
//! `RTABLE_KUBE_BIN` names a directory to use instead (the script is then not run).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Every binary the harness runs, all in one directory.
pub const NAMES: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "helm",
];

#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    #[error(
        "cannot run {script}: {source}; it builds the Kubernetes control plane from Go module sources (needs Go >= 1.24 and the Go module proxy)"
    )]
    Spawn {
        script: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{script} failed ({status}); what it said:\n{stderr}")]
    Build {
        script: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "{name} is missing from {dir}; rebuild with scripts/kube-binaries.sh, or unset RTABLE_KUBE_BIN if it points at an incomplete directory"
    )]
    Missing { name: String, dir: PathBuf },
}

/// The directory holding [`NAMES`].
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// `RTABLE_KUBE_BIN`, or the cache `scripts/kube-binaries.sh` fills (building on the
    /// first call on a machine, which takes many minutes; later calls return at once).
    pub fn locate() -> Result<Binaries, BinariesError> {
        let dir = match std::env::var_os("RTABLE_KUBE_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => build()?,
        };
        Self::in_dir(&dir)
    }

    /// Checks that `dir` holds every binary.
    pub fn in_dir(dir: &Path) -> Result<Binaries, BinariesError> {
        for name in NAMES {
            if !dir.join(name).is_file() {
                return Err(BinariesError::Missing {
                    name: name.to_string(),
                    dir: dir.to_path_buf(),
                });
            }
        }
        Ok(Binaries {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn build() -> Result<PathBuf, BinariesError> {
    let script = crate::repo_root().join("scripts").join("kube-binaries.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|source| BinariesError::Spawn {
            script: script.clone(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(last) if out.status.success() => Ok(PathBuf::from(last.trim())),
        _ => Err(BinariesError::Build {
            script,
            status: out.status,
            stderr: crate::tail_text(&String::from_utf8_lossy(&out.stderr), 40),
        }),
    }
}
