//! Quorum bookkeeping nodes: `quorum/status` / `quorum/parallel/<part>` (which replicas
//! hold a quorum insert's part so far) and `quorum/last_part` (per partition, the newest
//! part that reached its quorum in sequential mode).

use std::collections::{BTreeMap, BTreeSet};

use crate::codec::{CodecError, Lines};
use crate::part_name::PartName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumEntry {
    pub part_name: String,
    pub required: u32,
    pub replicas: BTreeSet<String>,
}

impl QuorumEntry {
    pub fn new(part_name: &str, required: u32, first_replica: &str) -> QuorumEntry {
        QuorumEntry {
            part_name: part_name.to_string(),
            required,
            replicas: BTreeSet::from([first_replica.to_string()]),
        }
    }

    pub fn is_reached(&self) -> bool {
        self.replicas.len() as u32 >= self.required
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "version: 1\npart_name: {}\nrequired_number_of_replicas: {}\nactual_number_of_replicas: {}\nreplicas:\n",
            self.part_name,
            self.required,
            self.replicas.len()
        );
        for r in &self.replicas {
            out.push_str(r);
            out.push('\n');
        }
        out
    }

    pub fn parse(text: &str) -> Result<QuorumEntry, CodecError> {
        let mut lines = Lines::new("quorum entry", text);
        let version = lines.field("version: ")?;
        if version != "1" {
            return Err(lines.error(format!("unsupported quorum entry version `{version}`")));
        }
        let part_name = lines.field("part_name: ")?.to_string();
        let required = lines.number("required_number_of_replicas: ")?;
        let actual: usize = lines.number("actual_number_of_replicas: ")?;
        let header = lines.next_line("`replicas:`")?;
        if header != "replicas:" {
            return Err(lines.error(format!("expected `replicas:`, got `{header}`")));
        }
        let mut replicas = BTreeSet::new();
        for _ in 0..actual {
            let name = lines.next_line("a replica name")?;
            if name.is_empty() {
                return Err(lines.error("empty replica name"));
            }
            replicas.insert(name.to_string());
        }
        Ok(QuorumEntry {
            part_name,
            required,
            replicas,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LastPart {
    /// Partition id -> part name.
    pub parts: BTreeMap<String, String>,
}

impl LastPart {
    pub fn render(&self) -> String {
        let mut out = format!("version: 2\nparts count: {}\n", self.parts.len());
        for (partition, part) in &self.parts {
            out.push_str(&format!("{partition}\t{part}\n"));
        }
        out
    }

    /// Also reads version 1, which was a bare part name (its partition is the name's prefix).
    pub fn parse(text: &str) -> Result<LastPart, CodecError> {
        if text.is_empty() {
            return Ok(LastPart::default());
        }
        if !text.starts_with("version: ") {
            let name = text.trim_end_matches('\n');
            let part = PartName::parse(name).map_err(|e| {
                CodecError::new(
                    "quorum last_part",
                    1,
                    format!("version 1 holds one part name, but `{name}` is not one: {e}"),
                )
            })?;
            return Ok(LastPart {
                parts: BTreeMap::from([(part.partition_id, name.to_string())]),
            });
        }
        let mut lines = Lines::new("quorum last_part", text);
        let version = lines.field("version: ")?;
        if version != "2" {
            return Err(lines.error(format!("unsupported last_part version `{version}`")));
        }
        let count: usize = lines.number("parts count: ")?;
        let mut parts = BTreeMap::new();
        for _ in 0..count {
            let line = lines.next_line("`<partition>\\t<part>`")?;
            let (partition, part) = line.split_once('\t').ok_or_else(|| {
                lines.error(format!("expected `<partition>\\t<part>`, got `{line}`"))
            })?;
            parts.insert(partition.to_string(), part.to_string());
        }
        Ok(LastPart { parts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_entry_round_trips() {
        let mut q = QuorumEntry::new("202405_17_17_0", 2, "r1");
        assert!(!q.is_reached());
        q.replicas.insert("r2".into());
        assert!(q.is_reached());
        let text = q.render();
        assert_eq!(
            text,
            "version: 1\npart_name: 202405_17_17_0\nrequired_number_of_replicas: 2\nactual_number_of_replicas: 2\nreplicas:\nr1\nr2\n"
        );
        assert_eq!(QuorumEntry::parse(&text).expect("parses"), q);
    }

    #[test]
    fn last_part_round_trips_and_reads_version_1() {
        let lp = LastPart {
            parts: BTreeMap::from([
                ("202404".to_string(), "202404_3_3_0".to_string()),
                ("202405".to_string(), "202405_17_17_0".to_string()),
            ]),
        };
        let text = lp.render();
        assert_eq!(
            text,
            "version: 2\nparts count: 2\n202404\t202404_3_3_0\n202405\t202405_17_17_0\n"
        );
        assert_eq!(LastPart::parse(&text).expect("parses"), lp);
        let old = LastPart::parse("202405_17_17_0").expect("v1");
        assert_eq!(
            old.parts.get("202405").map(String::as_str),
            Some("202405_17_17_0")
        );
        assert_eq!(LastPart::parse("").expect("empty"), LastPart::default());
    }

    #[test]
    fn rejects_malformed() {
        assert!(QuorumEntry::parse("version: 2\n").is_err());
        assert!(
            QuorumEntry::parse("version: 1\npart_name: p\nrequired_number_of_replicas: x\n")
                .is_err()
        );
        assert!(QuorumEntry::parse("version: 1\npart_name: p\nrequired_number_of_replicas: 2\nactual_number_of_replicas: 2\nreplicas:\nr1\n").is_err());
        assert!(LastPart::parse("version: 2\nparts count: 1\nno-tab\n").is_err());
        assert!(LastPart::parse("version: 3\n").is_err());
        assert!(LastPart::parse("not a part").is_err());
        assert!(LastPart::parse("version: 2\nparts count: 2\na\ta_1_1_0\n").is_err());
    }
}
