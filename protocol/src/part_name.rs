//! Part names `<partition_id>_<min_block>_<max_block>_<level>[_<mutation>]` and the
//! covering and disjoint rules that decide which parts supersede which.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// ClickHouse's MAX_LEVEL and MAX_BLOCK_NUMBER.
pub const MAX_LEVEL: u32 = 999_999_999;
pub const MAX_BLOCK_NUMBER: u64 = 999_999_999;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "`{name}` is not a valid part name ({reason}): expected <partition>_<min>_<max>_<level>[_<mutation>]"
)]
pub struct PartNameError {
    pub name: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartName {
    pub partition_id: String,
    pub min_block: u64,
    pub max_block: u64,
    pub level: u32,
    pub mutation: Option<u64>,
}

/// A partition id as it appears in part names, `block_numbers/` and `blocks/`: letters,
/// digits and `-`, never `_` (the part-name separator), `/` or `.`.
pub fn is_valid_partition_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl PartName {
    /// Strict parse; refuses anything that is not exactly a part name (so `..`, `/` and
    /// absolute paths never pass).
    pub fn parse(name: &str) -> Result<Self, PartNameError> {
        name.parse()
    }

    /// A freshly inserted part: one block, level 0.
    pub fn new_insert(partition_id: &str, block: u64) -> Self {
        PartName {
            partition_id: partition_id.to_string(),
            min_block: block,
            max_block: block,
            level: 0,
            mutation: None,
        }
    }

    /// The fake part a DROP_RANGE uses to cover every block of a partition below `next_block`.
    pub fn drop_range(partition_id: &str, next_block: u64) -> Self {
        PartName {
            partition_id: partition_id.to_string(),
            min_block: 0,
            max_block: next_block.saturating_sub(1),
            level: MAX_LEVEL,
            mutation: Some(MAX_BLOCK_NUMBER),
        }
    }

    fn mutation_or_zero(&self) -> u64 {
        self.mutation.unwrap_or(0)
    }

    /// True when `self` supersedes `other`: same partition, a range that includes it, and a
    /// higher (or equal, for the same range) level and mutation.
    pub fn contains(&self, other: &PartName) -> bool {
        self.partition_id == other.partition_id
            && self.min_block <= other.min_block
            && self.max_block >= other.max_block
            && self.level >= other.level
            && self.mutation_or_zero() >= other.mutation_or_zero()
            && ((self.min_block == other.min_block && self.max_block == other.max_block)
                || self.level > other.level
                || self.level == MAX_LEVEL)
    }

    /// True when the two parts share no block (different partitions are always disjoint).
    pub fn is_disjoint(&self, other: &PartName) -> bool {
        self.partition_id != other.partition_id
            || self.max_block < other.min_block
            || other.max_block < self.min_block
    }

    /// True for the fake parts of DROP_RANGE, which never exist on disk.
    pub fn is_drop_range(&self) -> bool {
        self.level == MAX_LEVEL
    }
}

impl Ord for PartName {
    /// Partition first, then block range, then level: the order ClickHouse lists parts in.
    fn cmp(&self, other: &Self) -> Ordering {
        self.partition_id
            .cmp(&other.partition_id)
            .then(self.min_block.cmp(&other.min_block))
            .then(self.max_block.cmp(&other.max_block))
            .then(self.level.cmp(&other.level))
            .then(self.mutation_or_zero().cmp(&other.mutation_or_zero()))
    }
}

impl PartialOrd for PartName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for PartName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}_{}_{}_{}",
            self.partition_id, self.min_block, self.max_block, self.level
        )?;
        if let Some(m) = self.mutation {
            write!(f, "_{m}")?;
        }
        Ok(())
    }
}

impl FromStr for PartName {
    type Err = PartNameError;

    /// Strict parsing doubles as the path-safety check: a name that parses has no `/`,
    /// `..` or other characters that could leave the parts directory.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let err = |reason| PartNameError {
            name: name.to_string(),
            reason,
        };
        let fields: Vec<&str> = name.split('_').collect();
        if fields.len() != 4 && fields.len() != 5 {
            return Err(err("wrong number of `_`-separated fields"));
        }
        if !is_valid_partition_id(fields[0]) {
            return Err(err("partition id may only hold letters, digits and `-`"));
        }
        let number = |s: &str| -> Result<u64, PartNameError> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 19 {
                return Err(err(
                    "block numbers, level and mutation must be decimal numbers",
                ));
            }
            s.parse::<u64>().map_err(|_| err("number out of range"))
        };
        let min_block = number(fields[1])?;
        let max_block = number(fields[2])?;
        let level = number(fields[3])?;
        if min_block > max_block {
            return Err(err("min block is greater than max block"));
        }
        if level > u64::from(MAX_LEVEL) {
            return Err(err("level is above 999999999"));
        }
        let mutation = match fields.get(4) {
            Some(m) => Some(number(m)?),
            None => None,
        };
        Ok(PartName {
            partition_id: fields[0].to_string(),
            min_block,
            max_block,
            level: level as u32,
            mutation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PartName {
        s.parse().expect(s)
    }

    #[test]
    fn names_round_trip() {
        for s in [
            "all_0_0_0",
            "202405_17_17_0",
            "202405_15_17_1",
            "20240501_1_9_2_11",
            "-3_1_1_0",
        ] {
            assert_eq!(p(s).to_string(), s);
        }
        assert_eq!(
            PartName::new_insert("202405", 17).to_string(),
            "202405_17_17_0"
        );
        assert_eq!(
            PartName::drop_range("202405", 18).to_string(),
            "202405_0_17_999999999_999999999"
        );
    }

    #[test]
    fn unsafe_and_malformed_names_are_refused() {
        for s in [
            "",
            "..",
            "../all_1_1_0",
            "all_1_1_0/..",
            "/etc/passwd",
            "all_1_1",
            "all_1_1_0_0_0",
            "all_2_1_0",
            "a.b_1_1_0",
            "all_x_1_0",
            "all_1_1_1000000000",
            "all_+1_1_0",
            "all_1_1_0\n",
        ] {
            assert!(s.parse::<PartName>().is_err(), "{s:?} should be refused");
        }
    }

    #[test]
    fn covering_follows_clickhouse_rules() {
        // A merge covers its sources.
        assert!(p("202405_15_17_1").contains(&p("202405_16_16_0")));
        assert!(p("202405_15_17_1").contains(&p("202405_15_17_1")));
        // The same level over a wider range does not (it would be an overlapping insert).
        assert!(!p("202405_15_17_0").contains(&p("202405_16_16_0")));
        // Other partitions never.
        assert!(!p("202406_15_17_1").contains(&p("202405_16_16_0")));
        // Lower level never covers a higher one.
        assert!(!p("202405_15_17_1").contains(&p("202405_16_17_2")));
        // A mutation covers the part it was made from, not the other way round.
        assert!(p("202405_15_17_1_20").contains(&p("202405_15_17_1")));
        assert!(!p("202405_15_17_1").contains(&p("202405_15_17_1_20")));
        // The drop-range fake part covers everything below it.
        let drop = PartName::drop_range("202405", 18);
        assert!(drop.is_drop_range());
        assert!(drop.contains(&p("202405_0_17_5")));
        assert!(drop.contains(&p("202405_3_3_0_7")));
        assert!(!drop.contains(&p("202405_18_18_0")));
    }

    #[test]
    fn disjointness() {
        assert!(p("all_1_1_0").is_disjoint(&p("all_2_2_0")));
        assert!(!p("all_1_3_1").is_disjoint(&p("all_3_5_1")));
        assert!(p("a_1_3_1").is_disjoint(&p("b_1_3_1")));
    }

    #[test]
    fn ordering_is_partition_then_range() {
        let mut v = [p("b_1_1_0"), p("a_5_5_0"), p("a_1_4_1"), p("a_1_1_0")];
        v.sort();
        let names: Vec<String> = v.iter().map(|x| x.to_string()).collect();
        assert_eq!(names, ["a_1_1_0", "a_1_4_1", "a_5_5_0", "b_1_1_0"]);
    }
}
