//! Fuzz targets for every decoder that reads bytes from clients, peers or ZooKeeper, as
//! plain functions over `&[u8]`. The cargo-fuzz package in `fuzz/` (outside the workspace,
//! run by `scripts/fuzz.sh`) has one binary per target calling these; the tests here
//! replay every file of the committed corpus `fuzz/corpus/<target>/` through its target on
//! stable Rust, so a crash once found stays fixed.
//!
//! A target panics only when a decoder does (or breaks a round trip it promises): no
//! target catches panics.

pub mod documents;
pub mod exchange;
pub mod inserts;
pub mod seeds;
pub mod tables;
pub mod tree_nodes;

/// A target's name (its corpus directory and cargo-fuzz binary) and function.
pub type Target = (&'static str, fn(&[u8]));

pub const TARGETS: &[Target] = &[
    ("log_entry", tree_nodes::log_entry),
    ("part_header", tree_nodes::part_header),
    ("checksums", tree_nodes::checksums),
    ("columns", tree_nodes::columns),
    ("metadata", tree_nodes::metadata),
    ("definition", tree_nodes::definition),
    ("quorum_entry", tree_nodes::quorum_entry),
    ("quorum_last_part", tree_nodes::quorum_last_part),
    ("host", tree_nodes::host),
    ("part_name", tree_nodes::part_name),
    ("exchange_header", exchange::exchange_header),
    ("received_part", exchange::received_part),
    ("insert_json", inserts::insert_json),
    ("insert_csv", inserts::insert_csv),
    ("insert_csv_with_names", inserts::insert_csv_with_names),
    ("insert_parquet", inserts::insert_parquet),
    ("replica_status", documents::replica_status),
    ("manifest", documents::manifest),
];

/// `fuzz/corpus` of this repository.
pub fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every committed corpus file through its target: a crash the fuzzer found (its input
    /// is committed next to the seeds) fails here until its decoder is fixed.
    #[test]
    fn the_committed_corpus_replays_without_a_crash() {
        let mut total = 0;
        for (name, target) in TARGETS {
            let dir = corpus_dir().join(name);
            let entries = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}; run `scripts/fuzz.sh seed`", dir.display()));
            let mut files = 0;
            for entry in entries {
                let path = entry.expect("a corpus entry").path();
                let data =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                eprintln!("replaying {}", path.display());
                target(&data);
                files += 1;
            }
            assert!(
                files > 0,
                "{} is empty: run `scripts/fuzz.sh seed`",
                dir.display()
            );
            total += files;
        }
        eprintln!(
            "replayed {total} corpus files through {} targets",
            TARGETS.len()
        );
    }

    /// The seeds as the codecs render them today (a changed format shows up here before
    /// the committed corpus is regenerated) pass their targets, and every seed names one.
    #[test]
    fn the_seeds_pass_their_targets() {
        let seeds = seeds::seeds().expect("seeds render");
        for s in &seeds {
            let (_, target) = TARGETS
                .iter()
                .find(|(name, _)| *name == s.target)
                .unwrap_or_else(|| panic!("seed {} names no target `{}`", s.name, s.target));
            target(&s.bytes);
        }
        for (name, _) in TARGETS {
            assert!(
                seeds.iter().any(|s| s.target == *name),
                "no seed for {name}"
            );
        }
    }
}
