//! What a replica has applied of the table's evolution, one small node each:
//! `replicas/<r>/metadata_version` (the alter version of the `alter` entry it applied last,
//! decimal, `0` for a new table) and `replicas/<r>/mutation_pointer` (the name of the
//! newest mutation node it has finished, empty before its first).

use crate::codec::CodecError;

/// `replicas/<r>/metadata_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MetadataVersion(pub i32);

impl MetadataVersion {
    pub fn render(&self) -> String {
        self.0.to_string()
    }

    pub fn parse(text: &str) -> Result<MetadataVersion, CodecError> {
        text.parse().map(MetadataVersion).map_err(|_| {
            CodecError::new(
                "metadata_version",
                1,
                format!("expected a decimal metadata version, got `{text}`"),
            )
        })
    }
}

/// `replicas/<r>/mutation_pointer`: `None` until the replica finishes its first mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MutationPointer(pub Option<String>);

impl MutationPointer {
    pub fn render(&self) -> String {
        self.0.clone().unwrap_or_default()
    }

    /// Mutation node names are ZooKeeper sequence numbers (ten digits).
    pub fn parse(text: &str) -> Result<MutationPointer, CodecError> {
        if text.is_empty() {
            return Ok(MutationPointer(None));
        }
        if text.len() != 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CodecError::new(
                "mutation_pointer",
                1,
                format!("expected a mutation node name like `0000000004` or nothing, got `{text}`"),
            ));
        }
        Ok(MutationPointer(Some(text.to_string())))
    }

    /// Whether the replica has finished mutation node `id`.
    pub fn has_passed(&self, id: &str) -> bool {
        self.0.as_deref().is_some_and(|p| p >= id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_version_is_a_decimal() {
        assert_eq!(MetadataVersion::parse("0").expect("0"), MetadataVersion(0));
        assert_eq!(MetadataVersion(12).render(), "12");
        let e = MetadataVersion::parse("v1").expect_err("v1");
        assert!(e.to_string().contains("`v1`"), "{e}");
    }

    #[test]
    fn mutation_pointer_is_empty_or_a_node_name() {
        let none = MutationPointer::parse("").expect("empty");
        assert_eq!(none, MutationPointer(None));
        assert_eq!(none.render(), "");
        assert!(!none.has_passed("0000000000"));
        let p = MutationPointer::parse("0000000004").expect("name");
        assert_eq!(p.render(), "0000000004");
        assert!(p.has_passed("0000000004") && !p.has_passed("0000000005"));
        for bad in ["4", "mutation-1", "00000000040"] {
            let e = MutationPointer::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
    }
}
