//! The part store: immutable part directories under `<data-dir>/parts/`, each one zstd
//! Parquet file sorted by the ORDER BY plus `count.txt` and `checksums.txt` (size and
//! 128-bit hash of every other file).
//!
//! Directory names say what a directory is:
//! - `parts/<part>`: an active part;
//! - `parts/tmp_insert_<n>`: an insert being written (never survives a restart);
//! - `parts/tmp_commit_<part>`: an insert written and named, waiting for its ZooKeeper
//!   commit; at start it is activated or discarded by whether the commit happened;
//! - `parts/tmp-fetch_<part>`: a download in progress;
//! - `detached/<reason>_<name>`: anything set aside (corrupt, unknown, unexpected); never
//!   deleted by rtable.

pub mod part_reader;
pub mod part_writer;
pub mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tracing::{info, warn};

use rtable_protocol::PartName;
use rtable_protocol::part_header::Checksums;

pub use part_writer::TempPart;

pub const DATA_FILE: &str = "data.parquet";
pub const COUNT_FILE: &str = "count.txt";
pub const CHECKSUMS_FILE: &str = "checksums.txt";
const TMP_INSERT: &str = "tmp_insert_";
const TMP_COMMIT: &str = "tmp_commit_";
const TMP_FETCH: &str = "tmp-fetch_";
const DELETING: &str = "deleting_";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("part {path} is broken: {message}")]
    Broken { path: PathBuf, message: String },
    #[error("writing Parquet {path}: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("part {0} already exists")]
    Exists(String),
    #[error("store invariant violated: {0}")]
    Invariant(String),
}

pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// An active part. Cloning is cheap; while any clone lives (a read snapshot, a fetch in
/// progress) the part's files stay on disk even after the part is replaced.
pub type ActivePart = Arc<PartData>;

#[derive(Debug)]
pub struct PartData {
    pub name: PartName,
    pub dir: PathBuf,
    pub rows: u64,
    pub bytes: u64,
    pub checksums: Checksums,
}

/// A written insert under its final name, not yet visible to reads.
#[derive(Debug)]
pub struct StagedPart {
    pub name: PartName,
    pub dir: PathBuf,
    pub rows: u64,
    pub checksums: Checksums,
}

/// What `open` set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedReport {
    pub name: String,
    pub reason: String,
    pub to: PathBuf,
}

/// The parts a read sees, pinned for as long as the snapshot lives.
pub struct Snapshot {
    parts: Vec<ActivePart>,
}

impl Snapshot {
    pub fn parts(&self) -> impl Iterator<Item = &ActivePart> {
        self.parts.iter()
    }
}

struct Inner {
    parts_dir: PathBuf,
    detached_dir: PathBuf,
    active: Mutex<BTreeMap<String, ActivePart>>,
    /// Replaced parts whose files wait for the last reader to let go.
    graveyard: Mutex<Vec<ActivePart>>,
    counter: AtomicU64,
}

#[derive(Clone)]
pub struct PartStore {
    inner: Arc<Inner>,
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync", dir))
}

impl PartStore {
    /// Opens (creating) the store and verifies every part. Anything that is not a valid
    /// part goes to `detached/` with the reason in its name; nothing is deleted.
    pub fn open(data_dir: &Path) -> Result<(PartStore, Vec<DetachedReport>), StoreError> {
        let parts_dir = data_dir.join("parts");
        let detached_dir = data_dir.join("detached");
        std::fs::create_dir_all(&parts_dir).map_err(io("create", &parts_dir))?;
        std::fs::create_dir_all(&detached_dir).map_err(io("create", &detached_dir))?;
        let store = PartStore {
            inner: Arc::new(Inner {
                parts_dir: parts_dir.clone(),
                detached_dir,
                active: Mutex::new(BTreeMap::new()),
                graveyard: Mutex::new(Vec::new()),
                counter: AtomicU64::new(0),
            }),
        };
        let mut reports = Vec::new();
        let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(&parts_dir)
            .map_err(io("list", &parts_dir))?
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        entries.sort();
        for (name, path) in entries {
            if name.starts_with(TMP_COMMIT) {
                continue; // resolved by recovery against ZooKeeper
            }
            if let Some(rest) = name.strip_prefix(DELETING) {
                // A removal interrupted by a crash: the part was already replaced.
                let _ = rest;
                std::fs::remove_dir_all(&path).map_err(io("remove", &path))?;
                continue;
            }
            let reason = if name.starts_with(TMP_INSERT) || name.starts_with(TMP_FETCH) {
                Some("tmp".to_string())
            } else if !path.is_dir() {
                Some("unknown".to_string())
            } else {
                match PartName::parse(&name) {
                    Err(_) => Some("unknown".to_string()),
                    Ok(part) => match verify::verify_dir(&path) {
                        Ok((rows, checksums)) => {
                            store.insert_active(part, path.clone(), rows, checksums);
                            None
                        }
                        Err(e) => {
                            warn!(part = %name, error = %e, "part failed verification");
                            Some("broken".to_string())
                        }
                    },
                }
            };
            if let Some(reason) = reason {
                let to = store.detach_path(&path, &name, &reason)?;
                reports.push(DetachedReport { name, reason, to });
            }
        }
        Ok((store, reports))
    }

    fn insert_active(
        &self,
        name: PartName,
        dir: PathBuf,
        rows: u64,
        checksums: Checksums,
    ) -> ActivePart {
        let part = Arc::new(PartData {
            bytes: checksums.total_bytes(),
            name,
            dir,
            rows,
            checksums,
        });
        self.inner
            .active
            .lock()
            .insert(part.name.to_string(), part.clone());
        part
    }

    /// Moves a directory to `detached/<reason>_<name>[_<n>]`, never overwriting.
    fn detach_path(&self, path: &Path, name: &str, reason: &str) -> Result<PathBuf, StoreError> {
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut to = self.inner.detached_dir.join(format!("{reason}_{safe}"));
        let mut n = 1;
        while to.exists() {
            to = self.inner.detached_dir.join(format!("{reason}_{safe}_{n}"));
            n += 1;
        }
        std::fs::rename(path, &to).map_err(io("detach", path))?;
        fsync_dir(&self.inner.parts_dir)?;
        info!(from = %path.display(), to = %to.display(), "detached");
        Ok(to)
    }

    pub fn parts_dir(&self) -> &Path {
        &self.inner.parts_dir
    }

    pub fn parts(&self) -> Vec<ActivePart> {
        self.inner.active.lock().values().cloned().collect()
    }

    pub fn get(&self, name: &PartName) -> Option<ActivePart> {
        self.inner.active.lock().get(&name.to_string()).cloned()
    }

    pub fn contains(&self, name: &PartName) -> bool {
        self.get(name).is_some()
    }

    /// An active part that is or covers `name`.
    pub fn covering(&self, name: &PartName) -> Option<PartName> {
        self.inner
            .active
            .lock()
            .values()
            .find(|p| p.name.contains(name))
            .map(|p| p.name.clone())
    }

    /// Active parts not covered by another active part, in name order.
    pub fn snapshot(&self) -> Snapshot {
        let active = self.inner.active.lock();
        let all: Vec<&ActivePart> = active.values().collect();
        let parts = all
            .iter()
            .filter(|p| {
                !all.iter()
                    .any(|o| o.name != p.name && o.name.contains(&p.name))
            })
            .map(|p| (*p).clone())
            .collect();
        Snapshot { parts }
    }

    pub fn snapshot_names(&self) -> Vec<String> {
        self.snapshot()
            .parts()
            .map(|p| p.name.to_string())
            .collect()
    }

    /// Rows and bytes of the visible parts.
    pub fn totals(&self) -> (u64, u64) {
        let s = self.snapshot();
        s.parts()
            .fold((0, 0), |(r, b), p| (r + p.rows, b + p.bytes))
    }

    pub(crate) fn new_tmp_insert_dir(&self) -> Result<PathBuf, StoreError> {
        let n = self.inner.counter.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .inner
            .parts_dir
            .join(format!("{TMP_INSERT}{}_{n}", std::process::id()));
        std::fs::create_dir(&dir).map_err(io("create", &dir))?;
        Ok(dir)
    }

    /// Drops an insert that will never be committed.
    pub fn discard_temp(&self, temp: TempPart) {
        temp.discard();
    }

    /// Names a written insert (renames it to `tmp_commit_<part>`), not yet visible.
    pub fn stage(&self, temp: TempPart, name: &PartName) -> Result<StagedPart, StoreError> {
        let dir = self.inner.parts_dir.join(format!("{TMP_COMMIT}{name}"));
        let (from, rows, checksums) = temp.into_parts();
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&from);
            return Err(StoreError::Exists(dir.display().to_string()));
        }
        if let Err(e) = std::fs::rename(&from, &dir) {
            let _ = std::fs::remove_dir_all(&from);
            return Err(io("rename", &from)(e));
        }
        fsync_dir(&self.inner.parts_dir)?;
        Ok(StagedPart {
            name: name.clone(),
            dir,
            rows,
            checksums,
        })
    }

    /// Renames a staged insert that must be committed under a new block number.
    pub fn restage(&self, staged: StagedPart, name: &PartName) -> Result<StagedPart, StoreError> {
        let dir = self.inner.parts_dir.join(format!("{TMP_COMMIT}{name}"));
        std::fs::rename(&staged.dir, &dir).map_err(io("rename", &staged.dir))?;
        fsync_dir(&self.inner.parts_dir)?;
        Ok(StagedPart {
            name: name.clone(),
            dir,
            ..staged
        })
    }

    /// Makes a committed insert visible under its part name.
    pub fn activate_staged(&self, staged: StagedPart) -> Result<ActivePart, StoreError> {
        let dir = self.inner.parts_dir.join(staged.name.to_string());
        if self.contains(&staged.name) || dir.exists() {
            return Err(StoreError::Exists(staged.name.to_string()));
        }
        std::fs::rename(&staged.dir, &dir).map_err(io("rename", &staged.dir))?;
        fsync_dir(&self.inner.parts_dir)?;
        Ok(self.insert_active(staged.name, dir, staged.rows, staged.checksums))
    }

    /// Drops a staged insert whose commit did not happen (it was never acknowledged).
    pub fn discard_staged(&self, staged: StagedPart) {
        if let Err(e) = std::fs::remove_dir_all(&staged.dir) {
            warn!(dir = %staged.dir.display(), error = %e, "cannot remove a discarded insert");
        }
    }

    /// Staged inserts left by a previous process, verified; broken ones are detached.
    pub fn staged_on_disk(&self) -> Vec<StagedPart> {
        let Ok(entries) = std::fs::read_dir(&self.inner.parts_dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.filter_map(|e| e.ok()) {
            let file_name = e.file_name().to_string_lossy().into_owned();
            let Some(part) = file_name.strip_prefix(TMP_COMMIT) else {
                continue;
            };
            let path = e.path();
            match (PartName::parse(part), verify::verify_dir(&path)) {
                (Ok(name), Ok((rows, checksums))) => out.push(StagedPart {
                    name,
                    dir: path,
                    rows,
                    checksums,
                }),
                _ => {
                    let _ = self.detach_path(&path, &file_name, "broken");
                }
            }
        }
        out
    }

    /// A clean directory for downloading `name`.
    pub fn fetch_dir(&self, name: &PartName) -> Result<PathBuf, StoreError> {
        let dir = self.inner.parts_dir.join(format!("{TMP_FETCH}{name}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))?;
        }
        std::fs::create_dir(&dir).map_err(io("create", &dir))?;
        Ok(dir)
    }

    /// Verifies a downloaded part against `expected` and activates it.
    pub fn install_fetched(
        &self,
        tmp: &Path,
        name: &PartName,
        expected: &Checksums,
    ) -> Result<ActivePart, StoreError> {
        let (rows, checksums) = verify::verify_dir(tmp)?;
        if &checksums != expected {
            return Err(StoreError::Broken {
                path: tmp.to_path_buf(),
                message: "checksums differ from the ones announced".to_string(),
            });
        }
        let dir = self.inner.parts_dir.join(name.to_string());
        if self.contains(name) || dir.exists() {
            return Err(StoreError::Exists(name.to_string()));
        }
        std::fs::rename(tmp, &dir).map_err(io("rename", tmp))?;
        fsync_dir(&self.inner.parts_dir)?;
        Ok(self.insert_active(name.clone(), dir, rows, checksums))
    }

    /// Moves an active part to `detached/`; its files are kept.
    pub fn detach(&self, name: &PartName, reason: &str) -> Result<PathBuf, StoreError> {
        let part = self
            .inner
            .active
            .lock()
            .remove(&name.to_string())
            .ok_or_else(|| StoreError::Invariant(format!("part {name} is not active")))?;
        self.detach_path(&part.dir, &name.to_string(), reason)
    }

    /// Retires a part that another active part covers; its files go once no reader holds it.
    pub fn retire(&self, name: &PartName) -> bool {
        let removed = self.inner.active.lock().remove(&name.to_string());
        match removed {
            Some(part) => {
                self.inner.graveyard.lock().push(part);
                self.collect_garbage();
                true
            }
            None => false,
        }
    }

    /// Deletes the files of retired parts nobody reads any more.
    pub fn collect_garbage(&self) {
        let mut graveyard = self.inner.graveyard.lock();
        graveyard.retain(|part| {
            if Arc::strong_count(part) > 1 {
                return true;
            }
            let doomed = self
                .inner
                .parts_dir
                .join(format!("{DELETING}{}", part.name));
            if std::fs::rename(&part.dir, &doomed).is_ok() {
                let _ = std::fs::remove_dir_all(&doomed);
            }
            false
        });
    }
}
