//! Handed-off parts: a peer's copy of a quorum insert, taken before the inserter's commit
//! (see `crate::handoff`). It lives as `parts/handoff_<part>/`, verified, then fsynced, but
//! is not active: it turns into `parts/<part>` only once the commit is known to have
//! recorded it (its log entry, or `replicas/<me>/parts/<part>` after a restart).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rtable_protocol::part_header::Checksums;
use rtable_protocol::part_name::PartName;

use super::verify::Unsynced;
use super::{ActivePart, Durability, HANDOFF_PREFIX, PartStore, StoreError, verify};

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

    /// A fresh `handoff_<name>/` to receive a copy into. Written in place (no rename): a
    /// start that finds one incomplete fails its verification and detaches it.
    pub fn new_handoff_dir(&self, name: &PartName) -> Result<PathBuf, StoreError> {
        Self::check_name(name, "receiving a handed-off part")?;
        Self::create_fresh_dir(self.handoff_dir(name), name)
    }

    /// Verifies a copy received into [`PartStore::new_handoff_dir`] as a fetch is
    /// verified, and opens its files, its directory and the parts directory for the fsync
    /// that makes it durable. The copy may only be used (answered as durable, or activated)
    /// once that [`Unsynced::sync`] succeeded; a copy whose fsync failed is discarded. On a
    /// failed verification the directory is removed.
    pub fn install_handoff(
        &self,
        dir: &Path,
        name: &PartName,
        expected: &Checksums,
        streamed: &Checksums,
    ) -> Result<(HandoffPart, Unsynced), StoreError> {
        Self::check_name(name, "installing a handed-off part")?;
        self.check_in_parts_dir(dir, "installing a handed-off part")?;
        if dir != self.handoff_dir(name) {
            return Err(StoreError::Refused {
                op: "installing a handed-off part",
                reason: format!("{} is not its handoff directory", dir.display()),
            });
        }
        let parts_dir = &self.inner.parts_dir;
        let result = verify::verify_fetched_dir(dir, expected, streamed).and_then(|rows| {
            let parent =
                fs::File::open(parts_dir).map_err(|e| StoreError::io("opening", parts_dir, e))?;
            let unsynced = verify::open_for_sync(dir, expected)?.with(parts_dir.clone(), parent);
            Ok((rows, unsynced))
        });
        match result {
            Ok((rows, unsynced)) => Ok((
                HandoffPart {
                    name: name.clone(),
                    dir: dir.to_path_buf(),
                    rows,
                    checksums: expected.clone(),
                },
                unsynced,
            )),
            Err(e) => {
                let _ignored = fs::remove_dir_all(dir);
                Err(e)
            }
        }
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

    /// The copy of `name` on disk, verified (for the entry that activates it).
    pub fn handoff_on_disk(&self, name: &PartName) -> Option<HandoffPart> {
        let dir = self.handoff_dir(name);
        let (checksums, rows) = verify::verify_part_dir(&dir).ok()?;
        Some(HandoffPart {
            name: name.clone(),
            dir,
            rows,
            checksums,
        })
    }
}
