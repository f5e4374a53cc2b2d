//! Images without a registry: a YAML file maps image names to what stands in for the image
//! on this machine.
//!
//! ```yaml
//! images:
//!   # ghcr.io/rtable/rtable-sidecar:0.1.0, ghcr.io/rtable/rtable-sidecar@sha256:...
//!   - prefix: ghcr.io/rtable/rtable-sidecar
//!     # Host directories visible read-only at the same path in the container, and put in
//!     # front of its PATH: the image's own binaries.
//!     path: [/work/main/target/debug]
//!     entrypoint: [rtable-sidecar]   # the image's ENTRYPOINT
//!     cmd: []                        # the image's CMD
//!     env: {RUST_BACKTRACE: "1"}     # the image's ENV
//!     workingDir: /
//!   # python:3.12-slim, docker.io/library/python:3
//!   - prefix: python
//!     entrypoint: [python3]
//!   # zookeeper:3.8: the official image's entrypoint, played by scripts of ours
//!   - prefix: zookeeper
//!     files: {/docker-entrypoint.sh: zookeeper/docker-entrypoint.sh}
//!     dirs: {/conf: "1000:1000"}        # directories the image has, and their owner
//!     entrypoint: [/docker-entrypoint.sh]
//! ```
//!
//! Relative host paths are relative to the map file's directory.
//!
//! Every container's root filesystem is the host's operating-system directories (see
//! `rootfs`), or, with `root: DIR`, an unpacked image root. Names are matched after
//! dropping the tag or digest and Docker Hub's implicit `docker.io/` and `library/`; the
//! longest matching prefix wins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The PATH an image gets when its entry sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading the image map {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the image map {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error(
        "image `{image}` has no local stand-in: add an entry whose prefix matches `{normalized}` to {map}"
    )]
    Unmapped {
        image: String,
        normalized: String,
        map: PathBuf,
    },
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageEntry {
    pub prefix: String,
    #[serde(default)]
    pub root: Option<PathBuf>,
    #[serde(default)]
    pub path: Vec<PathBuf>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Host files (or directories) visible read-only at a path of the container: the
    /// image's own scripts.
    #[serde(default)]
    pub files: BTreeMap<String, PathBuf>,
    /// Directories the image has, with their owner `uid:gid` (a non-root image's data or
    /// configuration directory).
    #[serde(default)]
    pub dirs: BTreeMap<String, String>,
}

impl ImageEntry {
    /// The owner of each of `dirs`.
    pub fn owned_dirs(&self) -> Result<Vec<(String, u32, u32)>, String> {
        self.dirs
            .iter()
            .map(|(path, owner)| {
                let (uid, gid) = owner.split_once(':').unwrap_or((owner, owner));
                match (uid.trim().parse(), gid.trim().parse()) {
                    (Ok(uid), Ok(gid)) => Ok((path.clone(), uid, gid)),
                    _ => Err(format!(
                        "image {}: the owner of {path} must be `uid:gid`, not `{owner}`",
                        self.prefix
                    )),
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageMapFile {
    images: Vec<ImageEntry>,
}

/// What a container of an image runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The reference as the pod spec wrote it.
    pub reference: String,
    /// What `imageID` reports: the entry that matched.
    pub id: String,
    pub entry: ImageEntry,
}

impl Image {
    /// The image's environment with its PATH: the entry's directories first.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .entry
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let base = self
            .entry
            .env
            .get("PATH")
            .cloned()
            .unwrap_or_else(|| DEFAULT_PATH.to_string());
        let path = self
            .entry
            .path
            .iter()
            .map(|p| p.display().to_string())
            .chain(std::iter::once(base))
            .collect::<Vec<_>>()
            .join(":");
        env.retain(|(k, _)| k != "PATH");
        env.insert(0, ("PATH".to_string(), path));
        env
    }
}

#[derive(Debug, Clone)]
pub struct ImageMap {
    file: PathBuf,
    entries: Vec<ImageEntry>,
}

impl ImageMap {
    pub fn load(path: &Path) -> Result<ImageMap, ImageError> {
        let text = std::fs::read_to_string(path).map_err(|source| ImageError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<ImageMap, ImageError> {
        let mut file: ImageMapFile =
            serde_yaml::from_str(text).map_err(|source| ImageError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        let base = path.parent().unwrap_or(Path::new("/"));
        // Lexically normal (no `..`): the path is looked up inside containers, where the
        // map's own directory may not exist.
        let absolute = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normal(&base.join(&*p));
            }
        };
        for entry in &mut file.images {
            entry.path.iter_mut().for_each(absolute);
            entry.files.values_mut().for_each(absolute);
            entry.root.iter_mut().for_each(absolute);
        }
        Ok(ImageMap {
            file: path.to_path_buf(),
            entries: file.images,
        })
    }

    pub fn resolve(&self, image: &str) -> Result<Image, ImageError> {
        let normalized = normalize(image);
        self.entries
            .iter()
            .map(|e| (normalize(&e.prefix), e))
            .filter(|(prefix, _)| normalized.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, e)| e)
            .map(|entry| Image {
                reference: image.to_string(),
                id: format!("{}://{}", super::RUNTIME_NAME, entry.prefix),
                entry: entry.clone(),
            })
            .ok_or_else(|| ImageError::Unmapped {
                image: image.to_string(),
                normalized,
                map: self.file.clone(),
            })
    }
}

/// `path` without `.` and `..` components (resolved lexically).
fn normal(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The repository of an image reference: no tag, no digest, no implicit Docker Hub parts.
pub fn normalize(reference: &str) -> String {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    // A tag is a `:` after the last `/` (a `:` before it is a registry's port).
    let last_slash = without_digest.rfind('/').map_or(0, |i| i + 1);
    let repository = match without_digest[last_slash..].find(':') {
        Some(colon) => &without_digest[..last_slash + colon],
        None => without_digest,
    };
    let repository = repository
        .strip_prefix("docker.io/")
        .or_else(|| repository.strip_prefix("index.docker.io/"))
        .unwrap_or(repository);
    repository
        .strip_prefix("library/")
        .unwrap_or(repository)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "
images:
  - prefix: ghcr.io/rtable/rtable-sidecar
    path: [../opt/rtable/bin]
    entrypoint: [rtable-sidecar]
  - prefix: python
    entrypoint: [python3]
    env: {PYTHONUNBUFFERED: '1'}
  - prefix: zookeeper
    files: {/docker-entrypoint.sh: zk/entry.sh}
    dirs: {/conf: '1000:1000'}
";

    #[test]
    fn references_normalize() {
        assert_eq!(normalize("python:3.12-slim"), "python");
        assert_eq!(normalize("docker.io/library/python:3"), "python");
        assert_eq!(normalize("localhost:5000/a/b:1"), "localhost:5000/a/b");
        assert_eq!(
            normalize("ghcr.io/rtable/rtable-sidecar@sha256:abc"),
            "ghcr.io/rtable/rtable-sidecar"
        );
    }

    #[test]
    fn the_longest_prefix_wins_and_path_comes_first() {
        let map = ImageMap::parse(Path::new("/maps/map.yaml"), MAP).expect("map");
        let sidecar = map
            .resolve("ghcr.io/rtable/rtable-sidecar:0.1.0")
            .expect("sidecar");
        assert_eq!(sidecar.entry.entrypoint, ["rtable-sidecar"]);
        assert_eq!(
            sidecar.env()[0],
            (
                "PATH".to_string(),
                format!("/opt/rtable/bin:{DEFAULT_PATH}")
            ),
            "relative to the map's directory, without `..`"
        );
        let python = map.resolve("python:3.12-slim").expect("python");
        assert_eq!(python.entry.entrypoint, ["python3"]);
        assert!(
            python
                .env()
                .contains(&("PYTHONUNBUFFERED".into(), "1".into()))
        );
        let zk = map.resolve("zookeeper:3.8").expect("zookeeper");
        assert_eq!(
            zk.entry.files.get("/docker-entrypoint.sh"),
            Some(&PathBuf::from("/maps/zk/entry.sh")),
            "relative to the map file"
        );
        assert_eq!(
            zk.entry.owned_dirs(),
            Ok(vec![("/conf".to_string(), 1000, 1000)])
        );
        let err = map.resolve("nginx:1").expect_err("unmapped");
        assert!(err.to_string().contains("`nginx`"), "{err}");
    }
}
