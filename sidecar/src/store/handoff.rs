//! Handed-off parts: a peer's copy of a quorum insert, taken before the inserter's commit
//! (see `crate::handoff`). It lives as `parts/handoff_<part>/`, verified, then fsynced, but
//! is not active: it turns into `parts/<part>` only once the commit is known to have
//! recorded it (its log entry, or `replicas/<me>/parts/<part>` after a restart).

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rtable_protocol::part_header::Checksums;
use rtable_protocol::part_name::PartName;

use super::received::ReceivedPart;
use super::verify::Unsynced;
use super::{ActivePart, COUNT_FILE, Durability, HANDOFF_PREFIX, PartStore, StoreError, spare};

/// A verified, durable copy waiting for its commit's outcome.
#[derive(Debug, Clone)]
pub struct HandoffPart {
    pub name: PartName,
    pub dir: PathBuf,
    pub rows: u64,
    pub checksums: Checksums,
}

impl PartStore {
    fn handoff_dir(&self, name: &PartName) -> PathBuf {
        self.inner.parts_dir.join(format!("{HANDOFF_PREFIX}{name}"))
    }

    /// Writes a copy verified in memory (see [`super::received`]) into a fresh
    /// `handoff_<name>/`, and opens its files, its directory and the parts directory for
    /// the fsync that makes it durable. Written in place (no rename): a start that finds one
    /// incomplete fails its verification and detaches it. The copy may only be used
    /// (answered as durable, or activated) once that [`Unsynced::sync`] succeeded; a copy
    /// whose fsync failed is discarded. On a failed write the directory is removed.
    pub fn write_handoff(
        &self,
        name: &PartName,
        received: &ReceivedPart,
    ) -> Result<(HandoffPart, Unsynced), StoreError> {
        Self::check_name(name, "writing a handed-off part")?;
        let names = received.files.iter().map(|(n, _)| n.as_str());
        let written = names.chain(received.count_file.as_ref().map(|_| COUNT_FILE));
        let dir = self.create_fresh_dir(self.handoff_dir(name), name, spare::fits(written))?;
        let written = Self::write_files(&dir, received).and_then(|mut handles| {
            let parts_dir = &self.inner.parts_dir;
            for path in [dir.clone(), parts_dir.clone()] {
                let file =
                    fs::File::open(&path).map_err(|e| StoreError::io("opening", &path, e))?;
                handles.push((path, file));
            }
            Ok(Unsynced::new(handles))
        });
        match written {
            Ok(unsynced) => Ok((
                HandoffPart {
                    name: name.clone(),
                    dir,
                    rows: received.rows,
                    checksums: received.checksums.clone(),
                },
                unsynced,
            )),
            Err(e) => {
                let _ignored = fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn write_files(
        dir: &Path,
        received: &ReceivedPart,
    ) -> Result<Vec<(PathBuf, fs::File)>, StoreError> {
        let count = received
            .count_file
            .as_ref()
            .map(|text| (COUNT_FILE, text.as_bytes()));
        let files = received
            .files
            .iter()
            .map(|(name, bytes)| (name.as_str(), bytes.as_ref()))
            .chain(count);
        let mut handles = Vec::with_capacity(received.files.len() + 3);
        for (name, bytes) in files {
            let path = dir.join(name);
            let mut file =
                fs::File::create(&path).map_err(|e| StoreError::io("creating", &path, e))?;
            file.write_all(bytes)
                .map_err(|e| StoreError::io("writing", &path, e))?;
            handles.push((path, file));
        }
        Ok(handles)
    }

    /// Makes a handed-off copy active, once its commit recorded it. Like a staged insert's
    /// activation the rename is not fsynced: a restart finds the copy again and activates
    /// it by the same rule.
    pub fn activate_handoff(&self, part: HandoffPart) -> Result<Arc<ActivePart>, StoreError> {
        self.activate(
            &part.dir,
            &part.name,
            part.checksums,
            part.rows,
            Durability::Deferred,
        )
    }

    /// Removes a copy whose commit never recorded it.
    pub fn discard_handoff(&self, part: &HandoffPart) {
        if let Err(e) = fs::remove_dir_all(&part.dir) {
            tracing::warn!(dir = %part.dir.display(), error = %e, "cannot remove a discarded handed-off part");
        }
    }

    /// Names of the handed-off copies on disk. Listing only, no verification.
    pub fn handoff_names(&self) -> BTreeSet<String> {
        self.prefixed_entries(HANDOFF_PREFIX)
            .into_iter()
            .map(|(_, part, _)| part)
            .collect()
    }

    /// The handed-off copies on disk, verified; broken ones go to `detached/`.
    pub fn handoffs_on_disk(&self) -> Vec<HandoffPart> {
        self.verified_with_prefix(HANDOFF_PREFIX)
            .into_iter()
            .map(|(name, dir, checksums, rows)| HandoffPart {
                name,
                dir,
                rows,
                checksums,
            })
            .collect()
    }
}
