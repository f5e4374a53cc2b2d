//! Removing everything an agent left on the machine: its pods' network namespaces and
//! addresses, every mount under its state directory (volume filesystems, memory
//! emptyDirs) with their loop devices, and optionally the bridge. The agent does this for
//! pods it finds orphaned when it starts; `rtable-node cleanup` and the test harness do it
//! after the agent is gone, also when a test failed.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, umount2};

use super::network;

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(#[source] std::io::Error),
    #[error("unmounting {path}: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `\040`-style escapes of mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(digits) = std::str::from_utf8(&bytes[i + 1..i + 4])
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount point of this process's mount namespace.
pub fn mount_points() -> Result<Vec<PathBuf>, CleanupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(CleanupError::MountInfo)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|f| PathBuf::from(unescape(f)))
        .collect())
}

/// Unmounts every mount at or under `dir`, deepest first; returns how many. Loop devices
/// of volume images are released with their last mount (`mount -o loop` sets autoclear).
pub fn unmount_under(dir: &Path) -> Result<usize, CleanupError> {
    let mut points: Vec<PathBuf> = mount_points()?
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    let mut count = 0;
    for p in points {
        // A lazy unmount: a process that still holds the filesystem (a container that
        // outlived its agent) cannot keep the directory from being removed.
        match umount2(&p, MntFlags::MNT_DETACH) {
            Ok(()) => count += 1,
            Err(nix::Error::EINVAL | nix::Error::ENOENT) => {}
            Err(source) => return Err(CleanupError::Unmount { path: p, source }),
        }
    }
    Ok(count)
}

/// What a cleanup removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub namespaces: usize,
    pub mounts: usize,
    pub bridge: bool,
}

/// Removes the network namespaces of the pods recorded in `state_dir` (its address
/// allocations and pod directories), unmounts everything under it, and deletes `bridge` if
/// given. The directory itself is left to its owner.
pub fn clean_state(state_dir: &Path, bridge: Option<&str>) -> Result<Report, CleanupError> {
    let mut report = Report::default();
    let mut uids: Vec<String> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(state_dir.join("ipam")) {
        uids.extend(
            entries
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path()).ok()),
        );
    }
    if let Ok(entries) = std::fs::read_dir(state_dir.join("pods")) {
        uids.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned()),
        );
    }
    uids.sort();
    uids.dedup();
    for uid in uids {
        let name = network::netns_name(&uid);
        if Path::new("/run/netns").join(&name).exists() {
            network::ip_blocking(&["netns", "del", &name])?;
            report.namespaces += 1;
        }
    }
    report.mounts = unmount_under(state_dir)?;
    if let Some(bridge) = bridge
        && network::ip_blocking(&["link", "show", "dev", bridge]).is_ok()
    {
        network::delete_bridge(bridge)?;
        report.bridge = true;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert!(
            mount_points()
                .expect("mountinfo")
                .iter()
                .any(|p| p == Path::new("/"))
        );
    }
}
