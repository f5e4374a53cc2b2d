//! The part store: immutable part directories under `<data_dir>/parts/`.
//!
//! Layout:
//! - `parts/<part>/`: an active part: `data.parquet` (zstd unless tiny, rows sorted by ORDER BY),
//!   `checksums.txt` (size and XXH3-128 of `data.parquet`, rendered by
//!   `rtable_protocol::part_header::Checksums`) and `count.txt` (row count, decimal);
//! - `parts/tmp_<kind>_<id>/`, `parts/tmp_spare_<id>/`: a part being written (insert, merge);
//!   an unused spare holds the three files empty (see `spare`);
//! - `parts/tmp-fetch_<part>/`: a download in progress;
//! - `parts/staged_<part>/`: an insert of this replica named before its commit;
//! - `parts/handoff_<part>/`: a peer's quorum insert copied here before its commit;
//! - `parts/deleting_<part>/`: a covered part being deleted;
//! - `detached/<reason>_<name>[_tryN]`: anything set aside. rtable never deletes there.
//!
//! Only parts covered by another active part (or by a DROP_RANGE) are ever deleted, and only
//! once no [`Snapshot`] or other holder of the part's `Arc` remains, so a reader never sees
//! a file vanish. Call [`PartStore::collect_garbage`] from the cleanup loop to finish such
//! deferred deletions. All methods do blocking I/O: call them from `spawn_blocking`.

pub mod handoff;
pub mod part_reader;
pub mod part_writer;
pub mod received;
mod spare;
pub mod verify;

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arrow::error::ArrowError;
use parquet::errors::ParquetError;
use rtable_protocol::part_header::Checksums;
use rtable_protocol::part_name::PartName;
use verify::Unsynced;

pub use part_reader::{PartBatches, columns_in, part_columns, read_part, read_part_batches};
pub use part_writer::{
    EncodedPart, PartWriter, TempPart, conform, encode, write_encoded_staged, write_shared,
    write_shared_staged, write_temp, write_temp_unsynced,
};

pub const DATA_FILE: &str = "data.parquet";
pub const CHECKSUMS_FILE: &str = "checksums.txt";
pub const COUNT_FILE: &str = "count.txt";
pub const TMP_PREFIX: &str = "tmp";
pub const TMP_FETCH_PREFIX: &str = "tmp-fetch_";
pub const DELETING_PREFIX: &str = "deleting_";
/// An insert written under its final name whose ZooKeeper commit is in flight or unknown.
/// `open` leaves these alone: recovery activates or discards them by asking ZooKeeper.
pub const STAGED_PREFIX: &str = "staged_";
/// A peer's copy of a quorum insert taken before its commit (see `handoff`).
pub const HANDOFF_PREFIX: &str = "handoff_";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {}: {source}", path.display())]
    Parquet {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: ParquetError,
    },
    #[error("{op} {}: {source}", path.display())]
    Arrow {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: ArrowError,
    },
    #[error("part directory {} failed verification: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("part {name} already exists at {}", path.display())]
    AlreadyExists { name: String, path: PathBuf },
    #[error("part {name} is not active")]
    NotActive { name: String },
    #[error("{op}: {reason}")]
    Refused { op: &'static str, reason: String },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn parquet(op: &'static str, path: &Path, source: ParquetError) -> Self {
        StoreError::Parquet {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn arrow(op: &'static str, path: &Path, source: ArrowError) -> Self {
        StoreError::Arrow {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The file or directory the error is about, when it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            StoreError::Io { path, .. }
            | StoreError::Parquet { path, .. }
            | StoreError::Arrow { path, .. }
            | StoreError::Corrupt { path, .. }
            | StoreError::AlreadyExists { path, .. } => Some(path),
            StoreError::NotActive { .. } | StoreError::Refused { .. } => None,
        }
    }

    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// An active part. Shared as `Arc<ActivePart>`; its files stay until every `Arc` is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivePart {
    pub name: PartName,
    pub dir: PathBuf,
    pub rows: u64,
    pub bytes: u64,
    pub checksums: Checksums,
}

impl ActivePart {
    pub fn data_path(&self) -> PathBuf {
        self.dir.join(DATA_FILE)
    }
}

/// Something [`PartStore::open`] (or a detach) set aside, for the caller to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedReport {
    /// The directory name it had under `parts/`.
    pub name: String,
    /// `broken`, `unknown`, `tmp`, `deleting`, or the reason given to `detach`.
    pub reason: String,
    /// Why, in words (e.g. which checksum failed).
    pub detail: String,
    /// Where it is now.
    pub to: PathBuf,
}

/// A consistent read view: the active parts not covered by another active part, sorted by
/// name. Holding it keeps those parts' files on disk.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub parts: Vec<Arc<ActivePart>>,
}

impl Snapshot {
    pub fn parts(&self) -> &[Arc<ActivePart>] {
        &self.parts
    }

    pub fn rows(&self) -> u64 {
        self.parts.iter().map(|p| p.rows).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }

    pub fn names(&self) -> Vec<String> {
        self.parts.iter().map(|p| p.name.to_string()).collect()
    }
}

#[derive(Debug)]
enum PendingAction {
    Delete,
    Detach(PathBuf),
}

#[derive(Debug)]
struct Pending {
    part: Arc<ActivePart>,
    action: PendingAction,
}

#[derive(Debug, Default)]
struct State {
    active: BTreeMap<PartName, Arc<ActivePart>>,
    /// Parts out of the active set whose directories wait for their last reader.
    pending: Vec<Pending>,
}

#[derive(Debug)]
struct Inner {
    data_dir: PathBuf,
    parts_dir: PathBuf,
    detached_dir: PathBuf,
    state: Mutex<State>,
    tmp_counter: AtomicU64,
    /// Directories made ahead for new parts (see `spare`), once `start_spares` ran.
    spares: std::sync::OnceLock<spare::Spares>,
}

/// The set of active parts of one replica and the directories behind them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PartStore {
    inner: Arc<Inner>,
}

fn is_visible(part: &PartName, active: &BTreeMap<PartName, Arc<ActivePart>>) -> bool {
    !active
        .keys()
        .any(|other| other != part && other.contains(part))
}

/// The active parts no other active part covers, in name order. One sweep per partition
/// (widest range first at each start block) instead of a pairwise check: a table with
/// thousands of small parts takes a snapshot on every read and merge decision.
fn visible_parts(active: &BTreeMap<PartName, Arc<ActivePart>>) -> Vec<Arc<ActivePart>> {
    let mut sweep: Vec<&Arc<ActivePart>> = active.values().collect();
    sweep.sort_by(|a, b| {
        let (a, b) = (&a.name, &b.name);
        a.partition_id
            .cmp(&b.partition_id)
            .then(a.min_block.cmp(&b.min_block))
            .then(b.max_block.cmp(&a.max_block))
            .then(b.level.cmp(&a.level))
            .then(b.mutation.unwrap_or(0).cmp(&a.mutation.unwrap_or(0)))
    });
    let mut widest: Option<&PartName> = None;
    let mut out = Vec::with_capacity(sweep.len());
    for part in sweep {
        let name = &part.name;
        if widest.is_some_and(|w| w.partition_id != name.partition_id) {
            widest = None;
        }
        let covered = match widest {
            // Only a part reaching at least as far can cover this one; the widest usually
            // does, and the rare exception (level rules) falls back to the full check.
            Some(w) if w.max_block >= name.max_block => {
                w.contains(name) || !is_visible(name, active)
            }
            _ => false,
        };
        if !covered {
            out.push(part.clone());
        }
        if widest.is_none_or(|w| name.max_block > w.max_block) {
            widest = Some(name);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn os_name(name: &OsString) -> String {
    name.to_string_lossy().into_owned()
}

impl PartStore {
    /// Opens (creating) `<data_dir>/parts` and `<data_dir>/detached`, verifies every part and
    /// moves whatever is not a healthy part to `detached/`: unparsable names as `unknown_`,
    /// temporary directories as `tmp_`, interrupted deletions as `deleting_`, parts failing
    /// verification as `broken_`. Nothing is deleted. Returns what was moved.
    pub fn open(data_dir: &Path) -> Result<(PartStore, Vec<DetachedReport>), StoreError> {
        let parts_dir = data_dir.join("parts");
        let detached_dir = data_dir.join("detached");
        for d in [&parts_dir, &detached_dir] {
            fs::create_dir_all(d).map_err(|e| StoreError::io("creating", d, e))?;
        }
        let store = PartStore {
            inner: Arc::new(Inner {
                data_dir: data_dir.to_path_buf(),
                parts_dir: parts_dir.clone(),
                detached_dir,
                state: Mutex::new(State::default()),
                tmp_counter: AtomicU64::new(0),
                spares: std::sync::OnceLock::new(),
            }),
        };
        let mut names = Vec::new();
        for entry in
            fs::read_dir(&parts_dir).map_err(|e| StoreError::io("listing", &parts_dir, e))?
        {
            let entry = entry.map_err(|e| StoreError::io("listing", &parts_dir, e))?;
            names.push(entry.file_name());
        }
        names.sort();
        let mut reports = Vec::new();
        let mut active = BTreeMap::new();
        for os in names {
            let path = parts_dir.join(&os);
            let text = os.to_str();
            let is_dir = fs::symlink_metadata(&path)
                .map_err(|e| StoreError::io("inspecting", &path, e))?
                .is_dir();
            let verdict: Result<ActivePart, (&str, String)> = match text {
                None => Err(("unknown", "the name is not UTF-8".to_string())),
                Some(_) if !is_dir => Err(("unknown", "not a directory".to_string())),
                Some(t) if t.starts_with(spare::SPARE_PREFIX) && spare::is_unused_spare(&path) => {
                    // Made ahead and never used: it holds no data.
                    fs::remove_dir_all(&path)
                        .map_err(|e| StoreError::io("removing an unused spare", &path, e))?;
                    continue;
                }
                Some(t) if t.starts_with(TMP_PREFIX) => {
                    Err(("tmp", "temporary directory left by a stop".to_string()))
                }
                Some(t) if t.starts_with(STAGED_PREFIX) || t.starts_with(HANDOFF_PREFIX) => {
                    continue;
                }
                Some(t) if t.starts_with(DELETING_PREFIX) => {
                    Err(("deleting", "deletion interrupted by a stop".to_string()))
                }
                Some(t) => match t.parse::<PartName>() {
                    Err(e) => Err(("unknown", e.to_string())),
                    Ok(n) if n.is_drop_range() => Err((
                        "unknown",
                        "a DROP_RANGE name is never a real part".to_string(),
                    )),
                    Ok(n) if n.to_string() != t => {
                        Err(("unknown", format!("not the canonical spelling `{n}`")))
                    }
                    Ok(n) => match verify::verify_part_dir(&path) {
                        Ok((checksums, rows)) => Ok(ActivePart {
                            bytes: checksums.total_bytes(),
                            name: n,
                            dir: path.clone(),
                            rows,
                            checksums,
                        }),
                        Err(e @ StoreError::Corrupt { .. }) => Err(("broken", e.to_string())),
                        Err(e @ StoreError::Parquet { .. }) => Err(("broken", e.to_string())),
                        Err(e) => return Err(e),
                    },
                },
            };
            match verdict {
                Ok(part) => {
                    active.insert(part.name.clone(), Arc::new(part));
                }
                Err((reason, detail)) => {
                    let mut state = store.lock();
                    let to = store.move_to_detached(&mut state, &os, reason)?;
                    reports.push(DetachedReport {
                        name: os_name(&os),
                        reason: reason.to_string(),
                        detail,
                        to,
                    });
                }
            }
        }
        store.lock().active = active;
        Ok((store, reports))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    pub fn parts_dir(&self) -> &Path {
        &self.inner.parts_dir
    }

    pub fn detached_dir(&self) -> &Path {
        &self.inner.detached_dir
    }

    /// Keeps a few part directories made ahead (see `spare`), so that writing a part does
    /// not wait for the filesystem's journal to create its directory and files. Only for
    /// directories whose writer writes exactly `data.parquet`, `checksums.txt` and
    /// `count.txt`. Call once, after `open`.
    pub fn start_spares(&self) {
        let _ = self
            .inner
            .spares
            .set(spare::Spares::start(&self.inner.parts_dir));
    }

    /// A spare directory, when one is ready.
    fn take_spare(&self) -> Option<PathBuf> {
        self.inner.spares.get().and_then(spare::Spares::take)
    }

    /// Puts a spare directory at `target`; `None` when none was ready. An existing
    /// `target` is refused (`AlreadyExists`).
    fn place_spare(&self, target: &Path) -> Option<std::io::Result<()>> {
        let spare = self.take_spare()?;
        let placed = spare::place(&spare, target);
        if placed.is_err() {
            let _ignored = fs::remove_dir_all(&spare);
        }
        Some(placed)
    }

    /// A fresh `parts/tmp_<kind>_<unique>/` directory, or a spare `parts/tmp_spare_<id>/`
    /// holding the part files empty when one is ready (the part writer writes all three).
    pub fn new_tmp_dir(&self, kind: &str) -> Result<PathBuf, StoreError> {
        if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(StoreError::Refused {
                op: "creating a temporary part directory",
                reason: format!("kind `{kind}` may only hold letters, digits and `-`"),
            });
        }
        // A spare is a temporary directory already: used under its own name, it costs no
        // rename either (the name's kind only helps a human reading `parts/`).
        if let Some(spare) = self.take_spare() {
            return Ok(spare);
        }
        loop {
            let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
            let id: u64 = rand::random();
            let dir = self
                .inner
                .parts_dir
                .join(format!("{TMP_PREFIX}_{kind}_{id:016x}{n:x}"));
            match fs::create_dir(&dir) {
                Ok(()) => return Ok(dir),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(StoreError::io("creating", &dir, e)),
            }
        }
    }

    /// Every active part, covered ones included, sorted by name.
    pub fn parts(&self) -> Vec<Arc<ActivePart>> {
        self.lock().active.values().cloned().collect()
    }

    pub fn get(&self, name: &PartName) -> Option<Arc<ActivePart>> {
        self.lock().active.get(name).cloned()
    }

    pub fn contains(&self, name: &PartName) -> bool {
        self.lock().active.contains_key(name)
    }

    /// The active part that contains `name` (itself when active); the widest when several do.
    pub fn covering(&self, name: &PartName) -> Option<PartName> {
        self.lock()
            .active
            .keys()
            .filter(|p| p.contains(name))
            .max_by_key(|p| (p.max_block - p.min_block, p.level, p.mutation.unwrap_or(0)))
            .cloned()
    }

    /// The parts a read should see: active and not covered by another active part.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        Snapshot {
            parts: visible_parts(&state.active),
        }
    }

    /// Rows a read returns now (covered parts excluded).
    pub fn total_rows(&self) -> u64 {
        self.snapshot().rows()
    }

    /// Bytes of every active part on disk (covered parts included).
    pub fn total_bytes(&self) -> u64 {
        self.lock().active.values().map(|p| p.bytes).sum()
    }

    fn check_name(name: &PartName, op: &'static str) -> Result<(), StoreError> {
        if name.is_drop_range() {
            return Err(StoreError::Refused {
                op,
                reason: format!("`{name}` is a DROP_RANGE name, never a real part"),
            });
        }
        Ok(())
    }

    fn check_in_parts_dir(&self, dir: &Path, op: &'static str) -> Result<(), StoreError> {
        if dir.parent() != Some(self.inner.parts_dir.as_path()) {
            return Err(StoreError::Refused {
                op,
                reason: format!(
                    "{} is not a directory of {}",
                    dir.display(),
                    self.inner.parts_dir.display()
                ),
            });
        }
        Ok(())
    }

    /// Renames a verified directory to `parts/<name>` and makes it active; with
    /// `Durability::Synced` the rename is fsynced before this returns. The fsync runs
    /// outside the store's lock: reads and other installs need not wait for the disk.
    fn activate(
        &self,
        dir: &Path,
        name: &PartName,
        checksums: Checksums,
        rows: u64,
        durability: Durability,
    ) -> Result<Arc<ActivePart>, StoreError> {
        let target = self.inner.parts_dir.join(name.to_string());
        let part = {
            let mut state = self.lock();
            if state.active.contains_key(name) || target.exists() {
                return Err(StoreError::AlreadyExists {
                    name: name.to_string(),
                    path: target,
                });
            }
            fs::rename(dir, &target)
                .map_err(|e| StoreError::io("renaming to its part name", dir, e))?;
            let part = Arc::new(ActivePart {
                name: name.clone(),
                dir: target,
                rows,
                bytes: checksums.total_bytes(),
                checksums,
            });
            state.active.insert(name.clone(), part.clone());
            part
        };
        if durability == Durability::Synced {
            verify::sync_path(&self.inner.parts_dir)?;
        }
        Ok(part)
    }

    /// Makes a written temporary part active as `name`. Fails when the name is taken.
    pub fn commit_temp(
        &self,
        temp: TempPart,
        name: &PartName,
    ) -> Result<Arc<ActivePart>, StoreError> {
        Self::check_name(name, "committing a part")?;
        self.check_in_parts_dir(&temp.dir, "committing a part")?;
        self.activate(
            &temp.dir,
            name,
            temp.checksums,
            temp.rows,
            Durability::Synced,
        )
    }

    /// A clean, empty `parts/tmp-fetch_<name>/` for a download (a stale one is removed).
    pub fn fetch_dir(&self, name: &PartName) -> Result<PathBuf, StoreError> {
        Self::check_name(name, "preparing a fetch")?;
        let dir = self
            .inner
            .parts_dir
            .join(format!("{TMP_FETCH_PREFIX}{name}"));
        if fs::symlink_metadata(&dir).is_ok() {
            fs::remove_dir_all(&dir)
                .map_err(|e| StoreError::io("removing stale download", &dir, e))?;
        }
        fs::create_dir(&dir).map_err(|e| StoreError::io("creating", &dir, e))?;
        Ok(dir)
    }

    /// Verifies a download against the checksums its owner published (every listed file's
    /// size and hash, no other file than `checksums.txt` and `count.txt`), completes those
    /// two files when absent, and makes the part active. On a failed check the download is
    /// removed (it was never acknowledged by anyone) and nothing is installed.
    pub fn install_fetched(
        &self,
        tmp_dir: &Path,
        name: &PartName,
        expected: &Checksums,
    ) -> Result<Arc<ActivePart>, StoreError> {
        self.install_fetched_streamed(tmp_dir, name, expected, &Checksums::default())
    }

    /// `install_fetched` for a download that hashed its files as it wrote them
    /// (`streamed`): those files are checked against `expected` without reading them back.
    pub fn install_fetched_streamed(
        &self,
        tmp_dir: &Path,
        name: &PartName,
        expected: &Checksums,
        streamed: &Checksums,
    ) -> Result<Arc<ActivePart>, StoreError> {
        Self::check_name(name, "installing a fetched part")?;
        self.check_in_parts_dir(tmp_dir, "installing a fetched part")?;
        let verified = verify::verify_fetched_dir(tmp_dir, expected, streamed)
            .and_then(|rows| Ok((rows, verify::open_for_sync(tmp_dir, expected)?)));
        let (rows, unsynced) = match verified {
            Ok(v) => v,
            Err(e) => {
                let _ignored = fs::remove_dir_all(tmp_dir);
                return Err(e);
            }
        };
        // Visible first, durable right after, on descriptors opened before the rename.
        // The caller records the part in ZooKeeper only once this returns, so no replica
        // ever counts on a copy that is not on disk; were the machine to fail in between,
        // the startup check finds the part broken or missing, and as it was never
        // recorded, its entry fetches it again.
        let part = self.activate(tmp_dir, name, expected.clone(), rows, Durability::Deferred)?;
        tracing::debug!(part = %name, "fetched part visible");
        if let Err(e) = unsynced
            .sync()
            .and_then(|()| verify::sync_path(&self.inner.parts_dir))
        {
            let _ignored = self.detach(name, "unsynced");
            return Err(e);
        }
        Ok(part)
    }

    /// `detached/<reason>_<name>`, with `_tryN` appended when taken (or reserved).
    fn detached_target(&self, state: &State, reason: &str, name: &OsString) -> PathBuf {
        let reserved: HashSet<&Path> = state
            .pending
            .iter()
            .filter_map(|p| match &p.action {
                PendingAction::Detach(to) => Some(to.as_path()),
                PendingAction::Delete => None,
            })
            .collect();
        let mut base = OsString::from(format!("{reason}_"));
        base.push(name);
        let mut candidate = self.inner.detached_dir.join(&base);
        let mut n = 1;
        while fs::symlink_metadata(&candidate).is_ok() || reserved.contains(candidate.as_path()) {
            let mut tried = base.clone();
            tried.push(format!("_try{n}"));
            candidate = self.inner.detached_dir.join(tried);
            n += 1;
        }
        candidate
    }

    fn move_to_detached(
        &self,
        state: &mut State,
        name: &OsString,
        reason: &str,
    ) -> Result<PathBuf, StoreError> {
        let from = self.inner.parts_dir.join(name);
        let to = self.detached_target(state, reason, name);
        fs::rename(&from, &to).map_err(|e| StoreError::io("detaching", &from, e))?;
        verify::sync_path(&self.inner.parts_dir)?;
        verify::sync_path(&self.inner.detached_dir)?;
        Ok(to)
    }

    /// Takes an active part out of the active set and moves it to `detached/<reason>_<name>`
    /// (now, or as soon as no snapshot holds it). Returns its detached path. Never deletes.
    pub fn detach(&self, name: &PartName, reason: &str) -> Result<PathBuf, StoreError> {
        if reason.is_empty()
            || !reason
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(StoreError::Refused {
                op: "detaching a part",
                reason: format!("reason `{reason}` may only hold letters, digits and `-`"),
            });
        }
        let to = {
            let mut state = self.lock();
            let part = state
                .active
                .remove(name)
                .ok_or_else(|| StoreError::NotActive {
                    name: name.to_string(),
                })?;
            let to = self.detached_target(&state, reason, &OsString::from(name.to_string()));
            state.pending.push(Pending {
                part,
                action: PendingAction::Detach(to.clone()),
            });
            to
        };
        self.collect_garbage()?;
        Ok(to)
    }

    fn retire(&self, state: &mut State, name: &PartName) -> bool {
        match state.active.remove(name) {
            Some(part) => {
                state.pending.push(Pending {
                    part,
                    action: PendingAction::Delete,
                });
                true
            }
            None => false,
        }
    }

    /// Deletes an active part that another active part covers (a merge's source). Refuses a
    /// part nothing covers: that would lose data.
    pub fn remove_part(&self, name: &PartName) -> Result<(), StoreError> {
        {
            let mut state = self.lock();
            if !state.active.contains_key(name) {
                return Err(StoreError::NotActive {
                    name: name.to_string(),
                });
            }
            if is_visible(name, &state.active) {
                return Err(StoreError::Refused {
                    op: "removing a part",
                    reason: format!("no other active part covers {name}; detach it instead"),
                });
            }
            self.retire(&mut state, name);
        }
        self.collect_garbage().map(|_| ())
    }

    /// Deletes every active part covered by another active part; returns their names.
    pub fn remove_covered(&self) -> Result<Vec<PartName>, StoreError> {
        let removed = {
            let mut state = self.lock();
            let covered: Vec<PartName> = state
                .active
                .keys()
                .filter(|p| !is_visible(p, &state.active))
                .cloned()
                .collect();
            for name in &covered {
                self.retire(&mut state, name);
            }
            covered
        };
        self.collect_garbage()?;
        Ok(removed)
    }

    /// DROP_RANGE: deletes every active part the (fake) `range` part contains.
    pub fn drop_range(&self, range: &PartName) -> Result<Vec<PartName>, StoreError> {
        let removed = {
            let mut state = self.lock();
            let hit: Vec<PartName> = state
                .active
                .keys()
                .filter(|p| range.contains(p))
                .cloned()
                .collect();
            for name in &hit {
                self.retire(&mut state, name);
            }
            hit
        };
        self.collect_garbage()?;
        Ok(removed)
    }

    /// How many removed or detached parts still wait for their last reader.
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Finishes the deletions and detaches whose parts no reader holds any more. Called by
    /// every removal; call it from the cleanup loop too. Returns how many were finished.
    pub fn collect_garbage(&self) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        let mut done = 0;
        let mut first_error = None;
        {
            let mut state = self.lock();
            let pending = std::mem::take(&mut state.pending);
            for p in pending {
                if Arc::strong_count(&p.part) > 1 {
                    state.pending.push(p);
                    continue;
                }
                let result = match &p.action {
                    PendingAction::Detach(to) => fs::rename(&p.part.dir, to)
                        .map_err(|e| StoreError::io("detaching", &p.part.dir, e))
                        .and_then(|()| verify::sync_path(&self.inner.detached_dir))
                        .map(|()| None),
                    PendingAction::Delete => {
                        let to = self
                            .inner
                            .parts_dir
                            .join(format!("{DELETING_PREFIX}{}", p.part.name));
                        fs::rename(&p.part.dir, &to)
                            .map_err(|e| StoreError::io("renaming for deletion", &p.part.dir, e))
                            .map(|()| Some(to))
                    }
                };
                match result {
                    Ok(to_delete) => {
                        done += 1;
                        doomed.extend(to_delete);
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                        state.pending.push(p);
                    }
                }
            }
            if done > 0
                && let Err(e) = verify::sync_path(&self.inner.parts_dir)
            {
                first_error.get_or_insert(e);
            }
        }
        for dir in doomed {
            if let Err(e) = fs::remove_dir_all(&dir) {
                first_error.get_or_insert(StoreError::io("deleting", &dir, e));
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }
}

/// Whether activating a part fsyncs its rename before returning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    Synced,
    /// The caller makes the rename durable itself, or a restart can redo it.
    Deferred,
}

/// An insert renamed to its part name (as `staged_<part>`), not yet visible to reads.
#[derive(Debug)]
pub struct StagedPart {
    pub name: PartName,
    pub dir: PathBuf,
    pub rows: u64,
    pub checksums: Checksums,
}

/// Staging: the insert path names a part before its ZooKeeper commit (so a crash leaves a
/// directory whose fate recovery can decide) and makes it visible only after.
impl PartStore {
    /// Drops an insert that will never be committed.
    pub fn discard_temp(&self, temp: TempPart) {
        let dir = temp.dir.clone();
        if let Err(e) = temp.discard() {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a discarded insert");
        }
    }

    fn staged_dir(&self, name: &PartName) -> PathBuf {
        self.inner.parts_dir.join(format!("{STAGED_PREFIX}{name}"))
    }

    /// A fresh, empty `staged_<name>/` for an insert whose block number is known before
    /// its part is written (a reserved number): written there, it needs no rename.
    pub fn new_staged_dir(&self, name: &PartName) -> Result<PathBuf, StoreError> {
        Self::check_name(name, "staging a part")?;
        self.create_fresh_dir(self.staged_dir(name), name, true)
    }

    /// Creates `dir` for part `name`; an existing one is refused, never reused. With
    /// `spare`, a spare directory (the three part files, empty) may be put there instead.
    fn create_fresh_dir(
        &self,
        dir: PathBuf,
        name: &PartName,
        spare: bool,
    ) -> Result<PathBuf, StoreError> {
        let placed = spare.then(|| self.place_spare(&dir)).flatten();
        match placed.unwrap_or_else(|| fs::create_dir(&dir)) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StoreError::AlreadyExists {
                    name: name.to_string(),
                    path: dir,
                })
            }
            Err(e) => Err(StoreError::io("creating", &dir, e)),
        }
    }

    /// Renames a written insert to `staged_<name>`.
    pub fn stage(&self, temp: TempPart, name: &PartName) -> Result<StagedPart, StoreError> {
        let (staged, unsynced) = self.stage_unsynced(temp, name)?;
        unsynced.sync()?;
        Ok(staged)
    }

    /// [`PartStore::stage`] with the rename's fsync (of the parts directory) left to the
    /// caller.
    pub fn stage_unsynced(
        &self,
        temp: TempPart,
        name: &PartName,
    ) -> Result<(StagedPart, Unsynced), StoreError> {
        Self::check_name(name, "staging a part")?;
        self.check_in_parts_dir(&temp.dir, "staging a part")?;
        let dir = self.staged_dir(name);
        if fs::symlink_metadata(&dir).is_ok() {
            return Err(StoreError::AlreadyExists {
                name: name.to_string(),
                path: dir,
            });
        }
        let parts_dir = &self.inner.parts_dir;
        let parent =
            fs::File::open(parts_dir).map_err(|e| StoreError::io("opening", parts_dir, e))?;
        fs::rename(&temp.dir, &dir).map_err(|e| StoreError::io("staging", &temp.dir, e))?;
        Ok((
            StagedPart {
                name: name.clone(),
                dir,
                rows: temp.rows,
                checksums: temp.checksums,
            },
            Unsynced::new(vec![(parts_dir.clone(), parent)]),
        ))
    }

    /// Renames a staged insert that must be committed under a new block number.
    pub fn restage(&self, staged: StagedPart, name: &PartName) -> Result<StagedPart, StoreError> {
        let dir = self.staged_dir(name);
        fs::rename(&staged.dir, &dir).map_err(|e| StoreError::io("restaging", &staged.dir, e))?;
        verify::sync_path(&self.inner.parts_dir)?;
        Ok(StagedPart {
            name: name.clone(),
            dir,
            ..staged
        })
    }

    /// Makes a committed insert visible under its part name. The rename is not fsynced:
    /// the staged directory already is, and a start that finds it staged again resolves
    /// its commit and activates it.
    pub fn activate_staged(&self, staged: StagedPart) -> Result<Arc<ActivePart>, StoreError> {
        self.activate(
            &staged.dir,
            &staged.name,
            staged.checksums,
            staged.rows,
            Durability::Deferred,
        )
    }

    /// A staged insert's directory and checksums, for a peer that asks for the part in
    /// the instant between its commit and its activation (it learned the name from the
    /// committed log entry, so the commit happened). `None` when there is no such part.
    pub fn staged_for_sending(&self, name: &PartName) -> Option<(PathBuf, Checksums)> {
        let dir = self.staged_dir(name);
        let text = fs::read_to_string(dir.join(CHECKSUMS_FILE)).ok()?;
        let checksums = Checksums::parse(&text).ok()?;
        Some((dir, checksums))
    }

    /// Removes a staged insert whose commit did not happen (it was never acknowledged).
    pub fn discard_staged(&self, staged: StagedPart) {
        if let Err(e) = fs::remove_dir_all(&staged.dir) {
            tracing::warn!(dir = %staged.dir.display(), error = %e, "cannot remove a discarded insert");
        }
    }

    /// Names of the staged parts on disk right now: commits in flight, or waiting for
    /// their outcome to be resolved. Listing only, no verification.
    pub fn staged_names(&self) -> std::collections::BTreeSet<String> {
        self.staged_entries()
            .into_iter()
            .map(|(_, part, _)| part)
            .collect()
    }

    /// `staged_<part>` directories: (directory name, part name, path).
    fn staged_entries(&self) -> Vec<(std::ffi::OsString, String, PathBuf)> {
        self.prefixed_entries(STAGED_PREFIX)
    }

    /// `<prefix><part>` directories: (directory name, part name, path).
    fn prefixed_entries(&self, prefix: &str) -> Vec<(std::ffi::OsString, String, PathBuf)> {
        let Ok(entries) = fs::read_dir(&self.inner.parts_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let os = e.file_name();
                let part = os.to_str()?.strip_prefix(prefix)?.to_string();
                Some((os, part, e.path()))
            })
            .collect()
    }

    /// The `<prefix><part>` directories that verify, as (name, dir, checksums, rows);
    /// broken ones go to `detached/`.
    fn verified_with_prefix(&self, prefix: &str) -> Vec<(PartName, PathBuf, Checksums, u64)> {
        let mut out = Vec::new();
        for (os, part, path) in self.prefixed_entries(prefix) {
            match (part.parse::<PartName>(), verify::verify_part_dir(&path)) {
                (Ok(name), Ok((checksums, rows))) => out.push((name, path, checksums, rows)),
                _ => {
                    let mut state = self.lock();
                    if let Err(e) = self.move_to_detached(&mut state, &os, "broken") {
                        tracing::warn!(dir = %path.display(), error = %e, "cannot detach a broken part directory");
                    }
                }
            }
        }
        out
    }

    /// Staged inserts a previous process left, verified; broken ones go to `detached/`.
    pub fn staged_on_disk(&self) -> Vec<StagedPart> {
        self.verified_with_prefix(STAGED_PREFIX)
            .into_iter()
            .map(|(name, dir, checksums, rows)| StagedPart {
                name,
                dir,
                rows,
                checksums,
            })
            .collect()
    }

    /// Retires a part that another active part covers (after a merge or a fetch of a
    /// covering part); its files go once no reader holds it. False when refused.
    pub fn retire_covered(&self, name: &PartName) -> bool {
        match self.remove_part(name) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(part = %name, error = %e, "cannot retire part");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PartName {
        s.parse().expect("part name")
    }

    #[test]
    fn store_and_snapshots_are_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PartStore>();
        assert_send_sync::<Snapshot>();
        assert_send_sync::<TempPart>();
    }

    #[test]
    fn visibility_hides_covered_parts_only() {
        let mut active = BTreeMap::new();
        for n in ["a_1_1_0", "a_2_2_0", "a_1_2_1", "a_3_3_0", "b_1_1_0"] {
            active.insert(
                p(n),
                Arc::new(ActivePart {
                    name: p(n),
                    dir: PathBuf::from(n),
                    rows: 1,
                    bytes: 1,
                    checksums: Checksums::default(),
                }),
            );
        }
        let visible: Vec<String> = active
            .keys()
            .filter(|n| is_visible(n, &active))
            .map(|n| n.to_string())
            .collect();
        assert_eq!(visible, ["a_1_2_1", "a_3_3_0", "b_1_1_0"]);
        let swept: Vec<String> = visible_parts(&active)
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        assert_eq!(swept, visible);
    }

    #[test]
    fn the_sweep_agrees_with_the_pairwise_check() {
        // Deterministic pseudo-random sets of parts, merged and not, in two partitions.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let mut active = BTreeMap::new();
            for _ in 0..next(12) + 1 {
                let min = next(20);
                let max = min + next(6);
                let level = if min == max { next(2) } else { 1 + next(4) };
                let partition = if next(3) == 0 { "b" } else { "a" };
                let name = p(&format!("{partition}_{min}_{max}_{level}"));
                active.insert(
                    name.clone(),
                    Arc::new(ActivePart {
                        name,
                        dir: PathBuf::new(),
                        rows: 1,
                        bytes: 1,
                        checksums: Checksums::default(),
                    }),
                );
            }
            let pairwise: Vec<String> = active
                .keys()
                .filter(|n| is_visible(n, &active))
                .map(|n| n.to_string())
                .collect();
            let swept: Vec<String> = visible_parts(&active)
                .iter()
                .map(|p| p.name.to_string())
                .collect();
            assert_eq!(swept, pairwise, "{:?}", active.keys().collect::<Vec<_>>());
        }
    }

    #[test]
    fn temporary_directories_and_reasons_are_checked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (store, _) = PartStore::open(tmp.path()).expect("open");
        assert!(store.new_tmp_dir("../x").is_err());
        assert!(store.new_tmp_dir("a_b").is_err());
        let a = store.new_tmp_dir("insert").expect("tmp");
        let b = store.new_tmp_dir("insert").expect("tmp");
        assert_ne!(a, b);
        assert!(
            a.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tmp_insert_"))
        );
        assert!(matches!(
            store.detach(&p("all_1_1_0"), "../x"),
            Err(StoreError::Refused { .. })
        ));
        assert!(matches!(
            store.detach(&p("all_1_1_0"), "broken"),
            Err(StoreError::NotActive { .. })
        ));
        let err = store
            .install_fetched(Path::new("/etc"), &p("all_1_1_0"), &Checksums::default())
            .expect_err("outside parts/");
        assert!(err.to_string().contains("/etc"), "{err}");
        let dir = store.fetch_dir(&p("all_1_1_0")).expect("fetch dir");
        fs::write(dir.join("junk"), "x").expect("write");
        let again = store.fetch_dir(&p("all_1_1_0")).expect("fetch dir");
        assert_eq!(dir, again);
        assert_eq!(fs::read_dir(&again).expect("list").count(), 0);
    }
}
