//! Which parts to merge: a pure, size-tiered selection (in the spirit of ClickHouse's
//! SimpleMergeSelector). Inputs are one partition's parts in block order plus the block
//! numbers still being committed; the output is a run of adjacent parts or nothing.
//!
//! Rules:
//! - only adjacent parts (by block range) merge, and never across a block number that is
//!   still locked by an insert in flight, nor with a part that is being produced;
//! - a run has between `min_parts` and `max_parts` parts and at most `max_bytes` in total;
//! - a run's largest part may be at most `max_size_ratio` times the rest together, so a big
//!   part is not rewritten for every small one (bounded write amplification);
//! - among valid runs the one with most parts per byte wins: small parts go first, which
//!   keeps the part count low under a steady stream of small inserts.

use rtable_protocol::PartName;

#[derive(Debug, Clone, PartialEq)]
pub struct MergePolicy {
    pub min_parts: usize,
    pub max_parts: usize,
    pub max_bytes: u64,
    pub max_size_ratio: f64,
}

impl Default for MergePolicy {
    fn default() -> Self {
        MergePolicy {
            min_parts: 5,
            max_parts: 10,
            max_bytes: 1 << 30,
            max_size_ratio: 4.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: PartName,
    pub bytes: u64,
    /// Being produced or consumed by a queued entry: not mergeable now.
    pub busy: bool,
}

/// The merged part's name: the sources' full block range, one level above the highest.
pub fn merged_name(sources: &[PartName]) -> Option<PartName> {
    let first = sources.first()?;
    Some(PartName {
        partition_id: first.partition_id.clone(),
        min_block: sources.iter().map(|p| p.min_block).min()?,
        max_block: sources.iter().map(|p| p.max_block).max()?,
        level: sources.iter().map(|p| p.level).max()? + 1,
        mutation: None,
    })
}

/// Picks the best run to merge from one partition's parts, or `None`.
///
/// `barriers` are block ranges a merge must not span: numbers still locked by inserts in
/// flight, and parts this replica knows of (queued fetches and merges) but does not hold.
/// A gap between two chosen parts is only crossed when nothing known lies in it.
pub fn select(
    policy: &MergePolicy,
    parts: &[Candidate],
    barriers: &[(u64, u64)],
) -> Option<Vec<PartName>> {
    let mut sorted: Vec<&Candidate> = parts.iter().collect();
    sorted.sort_by_key(|c| (c.name.min_block, c.name.max_block));
    // (count, total bytes, start, end); more parts per byte wins, then more parts.
    let mut best: Option<(usize, u64, usize, usize)> = None;
    for start in 0..sorted.len() {
        let mut total = 0u64;
        let mut largest = 0u64;
        for end in start..sorted.len() {
            let c = sorted[end];
            if c.busy {
                break;
            }
            if end > start {
                let prev = sorted[end - 1];
                // Adjacent and disjoint, with no insert in flight in between.
                if c.name.min_block <= prev.name.max_block {
                    break;
                }
                let (gap_lo, gap_hi) = (prev.name.max_block + 1, c.name.min_block);
                if gap_lo < gap_hi
                    && barriers
                        .iter()
                        .any(|(lo, hi)| *lo < gap_hi && *hi >= gap_lo)
                {
                    break;
                }
            }
            total += c.bytes;
            largest = largest.max(c.bytes);
            let count = end - start + 1;
            if count > policy.max_parts || total > policy.max_bytes {
                break;
            }
            if count < policy.min_parts {
                continue;
            }
            let rest = total - largest;
            if (largest as f64) > policy.max_size_ratio * (rest.max(1) as f64) {
                continue;
            }
            let better = best.is_none_or(|(c, t, _, _)| {
                let ours = count as u128 * u128::from(t.max(1));
                let theirs = c as u128 * u128::from(total.max(1));
                ours > theirs || (ours == theirs && count > c)
            });
            if better {
                best = Some((count, total, start, end));
            }
        }
    }
    best.map(|(_, _, start, end)| sorted[start..=end].iter().map(|c| c.name.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(min: u64, max: u64, level: u32, bytes: u64) -> Candidate {
        Candidate {
            name: PartName {
                partition_id: "all".to_string(),
                min_block: min,
                max_block: max,
                level,
                mutation: None,
            },
            bytes,
            busy: false,
        }
    }

    /// The rules below are shown on runs of three; the default asks for five.
    fn min3() -> MergePolicy {
        MergePolicy {
            min_parts: 3,
            ..MergePolicy::default()
        }
    }

    fn names(v: &[PartName]) -> Vec<String> {
        v.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn merges_small_adjacent_parts() {
        let parts = vec![part(1, 1, 0, 100), part(2, 2, 0, 100), part(3, 3, 0, 100)];
        let run = select(&min3(), &parts, &[]).expect("a merge");
        assert_eq!(names(&run), ["all_1_1_0", "all_2_2_0", "all_3_3_0"]);
        assert_eq!(merged_name(&run).expect("name").to_string(), "all_1_3_1");
    }

    #[test]
    fn by_default_a_stream_of_tiny_parts_merges_five_at_a_time() {
        let four: Vec<Candidate> = (1..=4).map(|b| part(b, b, 0, 100)).collect();
        assert_eq!(select(&MergePolicy::default(), &four, &[]), None);
        let five: Vec<Candidate> = (1..=5).map(|b| part(b, b, 0, 100)).collect();
        let run = select(&MergePolicy::default(), &five, &[]).expect("a merge");
        assert_eq!(run.len(), 5);
    }

    #[test]
    fn too_few_parts_do_not_merge() {
        let parts = vec![part(1, 1, 0, 100), part(2, 2, 0, 100)];
        assert_eq!(select(&min3(), &parts, &[]), None);
    }

    #[test]
    fn never_spans_a_locked_block_number() {
        let parts = vec![
            part(1, 1, 0, 100),
            part(2, 2, 0, 100),
            part(4, 4, 0, 100),
            part(5, 5, 0, 100),
            part(6, 6, 0, 100),
        ];
        let run = select(&min3(), &parts, &[(3, 3)]).expect("a merge");
        assert_eq!(names(&run), ["all_4_4_0", "all_5_5_0", "all_6_6_0"]);
        // A part known but not held in the gap is a barrier too.
        let run = select(&min3(), &parts, &[(2, 3)]).expect("a merge");
        assert_eq!(names(&run), ["all_4_4_0", "all_5_5_0", "all_6_6_0"]);
        // A skipped (not locked, unknown) number is not a barrier.
        let run = select(&min3(), &parts, &[]).expect("a merge");
        assert_eq!(run.len(), 5);
    }

    #[test]
    fn busy_parts_break_runs() {
        let mut parts = vec![
            part(1, 1, 0, 100),
            part(2, 2, 0, 100),
            part(3, 3, 0, 100),
            part(4, 4, 0, 100),
        ];
        parts[1].busy = true;
        assert_eq!(select(&min3(), &parts, &[]), None);
    }

    #[test]
    fn big_part_is_not_rewritten_for_tiny_ones() {
        let parts = vec![
            part(1, 10, 1, 1_000_000),
            part(11, 11, 0, 100),
            part(12, 12, 0, 100),
        ];
        assert_eq!(select(&min3(), &parts, &[]), None);
        let parts = vec![
            part(1, 10, 1, 1_000_000),
            part(11, 11, 0, 100),
            part(12, 12, 0, 100),
            part(13, 13, 0, 100),
        ];
        let run = select(&min3(), &parts, &[]).expect("small ones merge");
        assert_eq!(names(&run), ["all_11_11_0", "all_12_12_0", "all_13_13_0"]);
    }

    #[test]
    fn respects_max_parts_and_bytes() {
        let parts: Vec<Candidate> = (1..=30).map(|b| part(b, b, 0, 100)).collect();
        let run = select(&min3(), &parts, &[]).expect("a merge");
        assert_eq!(run.len(), 10);
        let policy = MergePolicy {
            max_bytes: 350,
            ..min3()
        };
        assert_eq!(select(&policy, &parts, &[]).expect("a merge").len(), 3);
    }
}
