//! A container's root filesystem, built by the init shim inside the container's new mount
//! namespace and entered with `pivot_root`; nothing here is visible from the host, and
//! nothing is written to the host's directories.
//!
//! Layout, in a tmpfs mounted over the container's scratch directory (its "writable
//! layer", gone with the mount namespace):
//! - the host's operating-system directories (`/usr`, `/etc`, `/var`, `/opt`), each behind
//!   an overlay whose upper layer is in the tmpfs, and the host's top-level symlinks
//!   (`/bin -> usr/bin`...); or, for an image with an unpacked root, one overlay of it;
//! - empty `/root`, `/home`, `/mnt`, `/srv`, `/media`, `/run` and `/tmp` (the host's are
//!   the machine's data, not the image's);
//! - a fresh `/proc`, a read-only `/sys` of the pod's network namespace, and a minimal
//!   `/dev` (null, zero, full, random, urandom, tty, a private devpts and `/dev/shm`);
//! - the image's host directories read-only at their own paths, then the volumes and the
//!   pod's `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname` bind-mounted at exactly their
//!   mount paths, parents first. A mount path that does not exist is created inside the
//!   overlay or the tmpfs, never on the host;
//! - with `readOnlyRootFilesystem`, every mount but the volumes and `/dev` made read-only.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _, symlink};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use serde::{Deserialize, Serialize};

/// Host directories that make up the default image.
const HOST_IMAGE_DIRS: [&str; 4] = ["usr", "etc", "var", "opt"];
/// Directories every root has, empty.
const EMPTY_DIRS: [(&str, u32); 10] = [
    ("root", 0o700),
    ("home", 0o755),
    ("mnt", 0o755),
    ("srv", 0o755),
    ("media", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
];
/// Device nodes bound from the host's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootfsSpec {
    /// An empty host directory; a tmpfs is mounted over it in the container's namespace.
    pub scratch: PathBuf,
    /// Size of that tmpfs: the container's writable layer.
    pub scratch_bytes: u64,
    /// An unpacked image root to use instead of the host's directories.
    pub image_root: Option<PathBuf>,
    /// Host paths visible read-only at the same path (the image's binaries).
    pub image_paths: Vec<PathBuf>,
    /// Host files visible read-only at other paths (the image's scripts).
    #[serde(default)]
    pub image_files: Vec<MountSpec>,
    /// Directories the image has: path, uid, gid.
    #[serde(default)]
    pub image_dirs: Vec<(String, u32, u32)>,
    pub read_only: bool,
    /// Host paths covered by an empty, read-only tmpfs if the image shows them (the agent's
    /// own state directory, which holds every pod's secrets).
    pub hide: Vec<PathBuf>,
}

/// A bind mount of a host path (directory or file) at a path of the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountSpec {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{what} {path}: {source}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("too many levels of symbolic links resolving {0} inside the container")]
    SymlinkLoop(String),
    #[error(
        "{0} contains `,` or `:`, which an overlay mount cannot take; choose a state directory without them"
    )]
    OverlayPath(PathBuf),
}

fn sys(what: &'static str, path: &Path, r: nix::Result<()>) -> Result<(), RootfsError> {
    r.map_err(|source| RootfsError::Mount {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn io<T>(what: &'static str, path: &Path, r: std::io::Result<T>) -> Result<T, RootfsError> {
    r.map_err(|source| RootfsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path, mode: u32) -> Result<(), RootfsError> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return io("creating directory", path, Err(e)),
    }
    // The umask must not narrow a mode such as /tmp's 1777.
    io(
        "setting the mode of",
        path,
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)),
    )
}

fn mkdir_all(path: &Path) -> Result<(), RootfsError> {
    io(
        "creating directory",
        path,
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path),
    )
}

fn touch(path: &Path) -> Result<(), RootfsError> {
    if let Some(parent) = path.parent() {
        mkdir_all(parent)?;
    }
    io(
        "creating mount point",
        path,
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(drop),
    )
}

fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), RootfsError> {
    sys(
        "bind-mounting onto",
        target,
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
    )?;
    if read_only {
        remount_read_only(target)?;
    }
    Ok(())
}

/// Makes one mount read-only (the mount, not its filesystem: the same volume stays
/// writable elsewhere).
fn remount_read_only(target: &Path) -> Result<(), RootfsError> {
    sys(
        "remounting read-only",
        target,
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        ),
    )
}

fn tmpfs(target: &Path, options: &str, flags: MsFlags) -> Result<(), RootfsError> {
    sys(
        "mounting a tmpfs on",
        target,
        mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(options)),
    )
}

fn overlay(lower: &Path, layer: &Path, target: &Path) -> Result<(), RootfsError> {
    let upper = layer.join("upper");
    let work = layer.join("work");
    for dir in [&upper, &work] {
        mkdir_all(dir)?;
    }
    for path in [lower, &upper, &work] {
        let text = path.to_string_lossy();
        if text.contains(',') || text.contains(':') {
            return Err(RootfsError::OverlayPath(path.to_path_buf()));
        }
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    sys(
        "mounting an overlay on",
        target,
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        ),
    )
}

/// `path` (absolute, as the container sees it) as a host path under `root`, following
/// symbolic links the way the container will: an absolute link target starts again at
/// `root`, so no link can lead out of it. Missing components are kept as written.
pub fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf, RootfsError> {
    let mut pending: VecDeque<OsString> = Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved
            .iter()
            .fold(root.to_path_buf(), |p, c| p.join(c))
            .join(&part);
        let is_link = std::fs::symlink_metadata(&candidate)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        if !is_link {
            resolved.push(part);
            continue;
        }
        links += 1;
        if links > 40 {
            return Err(RootfsError::SymlinkLoop(path.to_string()));
        }
        let target = io("reading link", &candidate, std::fs::read_link(&candidate))?;
        if target.is_absolute() {
            resolved.clear();
        }
        for c in target.components().rev() {
            match c {
                Component::Normal(n) => pending.push_front(n.to_os_string()),
                Component::ParentDir => pending.push_front("..".into()),
                _ => {}
            }
        }
    }
    Ok(resolved.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// The depth of a container path: parents are mounted before their children.
fn depth(path: &str) -> usize {
    Path::new(path)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count()
}

fn minimal_dev(dev: &Path) -> Result<(), RootfsError> {
    tmpfs(
        dev,
        "mode=755,size=65536k",
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
    )?;
    for name in DEVICES {
        let node = dev.join(name);
        touch(&node)?;
        bind(&Path::new("/dev").join(name), &node, false)?;
    }
    let pts = dev.join("pts");
    mkdir(&pts, 0o755)?;
    // A private devpts instance; a container without a terminal works without it.
    if mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .is_ok()
    {
        io(
            "linking",
            &dev.join("ptmx"),
            symlink("pts/ptmx", dev.join("ptmx")),
        )?;
    }
    let shm = dev.join("shm");
    mkdir(&shm, 0o1777)?;
    tmpfs(
        &shm,
        "mode=1777,size=65536k",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        io("linking", &dev.join(name), symlink(target, dev.join(name)))?;
    }
    Ok(())
}

/// Builds the root described by `spec` with `mounts` on it, makes `cwd` exist, and
/// `pivot_root`s into it. Must run in a fresh mount namespace of a single-threaded process.
pub fn enter(spec: &RootfsSpec, mounts: &[MountSpec], cwd: &str) -> Result<(), RootfsError> {
    let slash = Path::new("/");
    // Nothing mounted from here on may propagate back to the host.
    sys(
        "making the mount tree private at",
        slash,
        mount(
            None::<&str>,
            slash,
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
    )?;
    tmpfs(
        &spec.scratch,
        &format!("mode=755,size={}", spec.scratch_bytes.max(1 << 20)),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    let root = spec.scratch.join("root");
    let layers = spec.scratch.join("layers");
    mkdir(&root, 0o755)?;
    mkdir(&layers, 0o755)?;
    // pivot_root needs the new root to be a mount point.
    bind(&root, &root, false)?;
    let mut overlays = Vec::new();
    match &spec.image_root {
        Some(image_root) => {
            overlay(image_root, &layers.join("image"), &root)?;
        }
        None => {
            for name in HOST_IMAGE_DIRS {
                let host = slash.join(name);
                let is_dir = std::fs::symlink_metadata(&host).is_ok_and(|m| m.is_dir());
                if is_dir {
                    let target = root.join(name);
                    mkdir(&target, 0o755)?;
                    overlay(&host, &layers.join(name), &target)?;
                    overlays.push(target);
                }
            }
            let entries = io("listing", slash, std::fs::read_dir(slash))?;
            for entry in entries.flatten() {
                let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
                if is_link && let Ok(target) = std::fs::read_link(entry.path()) {
                    let link = root.join(entry.file_name());
                    io("linking", &link, symlink(&target, &link))?;
                }
            }
        }
    }
    for (name, mode) in EMPTY_DIRS {
        mkdir(&root.join(name), mode)?;
    }
    let proc_dir = root.join("proc");
    if mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .is_err()
    {
        bind(slash.join("proc").as_path(), &proc_dir, false)?;
    }
    // sysfs mounted in the pod's network namespace shows the pod's interfaces.
    let sys_dir = root.join("sys");
    if mount(
        Some("sysfs"),
        &sys_dir,
        Some("sysfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .is_err()
    {
        bind(slash.join("sys").as_path(), &sys_dir, true)?;
    }
    minimal_dev(&root.join("dev"))?;

    for path in &spec.image_paths {
        let target = resolve_in_root(&root, &path.to_string_lossy())?;
        if path.is_dir() {
            mkdir_all(&target)?;
        } else {
            touch(&target)?;
        }
        bind(path, &target, true)?;
    }
    for file in &spec.image_files {
        let target = resolve_in_root(&root, &file.target)?;
        if file.source.is_dir() {
            mkdir_all(&target)?;
        } else {
            touch(&target)?;
        }
        bind(&file.source, &target, true)?;
    }
    for (path, uid, gid) in &spec.image_dirs {
        let target = resolve_in_root(&root, path)?;
        mkdir_all(&target)?;
        sys(
            "giving its owner to",
            &target,
            nix::unistd::chown(
                &target,
                Some(nix::unistd::Uid::from_raw(*uid)),
                Some(nix::unistd::Gid::from_raw(*gid)),
            ),
        )?;
    }
    let mut ordered: Vec<&MountSpec> = mounts.iter().collect();
    ordered.sort_by_key(|m| depth(&m.target));
    for m in ordered {
        let target = resolve_in_root(&root, &m.target)?;
        if m.source.is_dir() {
            mkdir_all(&target)?;
        } else {
            touch(&target)?;
        }
        bind(&m.source, &target, m.read_only)?;
    }
    for hidden in &spec.hide {
        let target = resolve_in_root(&root, &hidden.to_string_lossy())?;
        if target.is_dir() {
            tmpfs(
                &target,
                "size=4k,mode=000",
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            )?;
        }
    }
    mkdir_all(&resolve_in_root(&root, cwd)?)?;
    if spec.read_only {
        for target in overlays.iter().chain(std::iter::once(&root)) {
            remount_read_only(target)?;
        }
    }

    io("entering", &root, std::env::set_current_dir(&root))?;
    // pivot_root(".", "."): the old root is stacked under the new one and detached at once,
    // taking every host mount out of this namespace.
    sys("pivot_root into", &root, nix::unistd::pivot_root(".", "."))?;
    sys(
        "detaching the old root from",
        &root,
        umount2(".", MntFlags::MNT_DETACH),
    )?;
    io("entering", slash, std::env::set_current_dir(slash))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_inside_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("run")).expect("mkdir");
        std::fs::create_dir_all(root.join("var")).expect("mkdir");
        symlink("/run", root.join("var/run")).expect("link");
        symlink("../../../../etc", root.join("run/escape")).expect("link");
        assert_eq!(
            resolve_in_root(root, "/var/run/secrets/kubernetes.io").expect("resolve"),
            root.join("run/secrets/kubernetes.io")
        );
        // `..` never climbs above the root.
        assert_eq!(
            resolve_in_root(root, "/run/escape/passwd").expect("resolve"),
            root.join("etc/passwd")
        );
        symlink("loop", root.join("loop")).expect("link");
        assert!(resolve_in_root(root, "/loop/x").is_err());
    }

    #[test]
    fn parents_mount_first() {
        assert!(depth("/var/lib") < depth("/var/lib/rtable/x"));
        assert_eq!(depth("/"), 0);
    }
}
