//! How a table definition relates to the one in the tree: the same, an append of columns
//! (the only schema change rtable applies to a live table, like ClickHouse's
//! `ALTER TABLE .. ADD COLUMN` at the end), an older definition a replica still runs
//! while its pod has not been restarted, or anything else (a schema mismatch). Pure.

use crate::columns;
use crate::metadata::TableMetadata;
use crate::schema::Column;

/// The relation of a local definition (`metadata` and `columns` texts rendered from a
/// manifest) to the tree's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefinitionChange {
    /// The same table: byte-identical `columns`, and `metadata` equal but for the lines a
    /// newer ClickHouse adds (see `TableMetadata::same_table`).
    Same,
    /// The tree's columns are a strict prefix of the local ones (same names and types, in
    /// order) and the `metadata` is the same table's: the local definition appends `added`.
    Append { added: Vec<Column> },
    /// The local columns are a strict prefix of the tree's and the `metadata` is the same
    /// table's: the tree already has `missing` appended (an older definition, e.g. a pod not
    /// restarted yet since a column was appended).
    Behind { missing: Vec<Column> },
    /// Anything else: a differing `metadata`, a column renamed, retyped, removed or
    /// inserted before the end, or a tree `columns` node that does not parse (or is not in
    /// the canonical text). Reported, never applied.
    Incompatible,
}

/// Classifies the local definition against the tree's. Texts are compared as rtable
/// renders them (`metadata::TableMetadata::render`, `columns::render`).
pub fn classify(
    local_metadata: &str,
    local_columns: &str,
    tree_metadata: &str,
    tree_columns: &str,
) -> DefinitionChange {
    if local_metadata != tree_metadata {
        let (Ok(local), Ok(tree)) = (
            TableMetadata::parse(local_metadata),
            TableMetadata::parse(tree_metadata),
        ) else {
            return DefinitionChange::Incompatible;
        };
        if !local.same_table(&tree) {
            return DefinitionChange::Incompatible;
        }
    }
    if local_columns == tree_columns {
        return DefinitionChange::Same;
    }
    let (Ok(local), Ok(tree)) = (columns::parse(local_columns), columns::parse(tree_columns))
    else {
        return DefinitionChange::Incompatible;
    };
    // A tree node in another spelling of the same columns is not something rtable wrote:
    // keep reporting it rather than rewrite it.
    if columns::render(&tree) != tree_columns || columns::render(&local) != local_columns {
        return DefinitionChange::Incompatible;
    }
    classify_columns(&local, &tree)
}

/// The column part of [`classify`], for parsed column lists.
pub fn classify_columns(local: &[Column], tree: &[Column]) -> DefinitionChange {
    if local == tree {
        DefinitionChange::Same
    } else if local.len() > tree.len() && local[..tree.len()] == *tree {
        DefinitionChange::Append {
            added: local[tree.len()..].to_vec(),
        }
    } else if tree.len() > local.len() && tree[..local.len()] == *local {
        DefinitionChange::Behind {
            missing: tree[local.len()..].to_vec(),
        }
    } else {
        DefinitionChange::Incompatible
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{PartitionKey, TableSchema};

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            ty: ty.parse().expect("type"),
        }
    }

    fn base() -> Vec<Column> {
        vec![
            col("ts", "DateTime"),
            col("user_id", "UInt64"),
            col("event", "String"),
        ]
    }

    fn texts(columns: Vec<Column>, order_by: &[&str], partition_by: &str) -> (String, String) {
        let schema = TableSchema::new(
            columns,
            order_by.iter().map(|s| s.to_string()).collect(),
            partition_by.parse::<PartitionKey>().expect("partition key"),
        )
        .expect("valid schema");
        (
            TableMetadata::from_schema(&schema).render(),
            columns::render(&schema.columns),
        )
    }

    fn relation(local: (String, String), tree: (String, String)) -> DefinitionChange {
        classify(&local.0, &local.1, &tree.0, &tree.1)
    }

    #[test]
    fn same_definition_is_same() {
        let t = texts(base(), &["user_id"], "toYYYYMM(ts)");
        assert_eq!(relation(t.clone(), t), DefinitionChange::Same);
    }

    #[test]
    fn a_tree_a_newer_clickhouse_wrote_is_the_same_table() {
        let local = texts(base(), &["user_id"], "toYYYYMM(ts)");
        let mut tree = local.clone();
        tree.0.push_str("granularity bytes: 10485760\n");
        assert_eq!(relation(local.clone(), tree), DefinitionChange::Same);
        let mut resorted = local.clone();
        resorted.0.push_str("sorting key: user_id, ts\n");
        assert_eq!(relation(local, resorted), DefinitionChange::Incompatible);
    }

    #[test]
    fn appended_columns_are_an_append_and_the_reverse_is_behind() {
        let old = texts(base(), &["user_id", "ts"], "toYYYYMM(ts)");
        let mut wider = base();
        wider.push(col("note", "Nullable(String)"));
        wider.push(col("score", "UInt32"));
        let new = texts(wider, &["user_id", "ts"], "toYYYYMM(ts)");
        assert_eq!(
            relation(new.clone(), old.clone()),
            DefinitionChange::Append {
                added: vec![col("note", "Nullable(String)"), col("score", "UInt32")]
            }
        );
        assert_eq!(
            relation(old, new),
            DefinitionChange::Behind {
                missing: vec![col("note", "Nullable(String)"), col("score", "UInt32")]
            }
        );
    }

    #[test]
    fn anything_but_an_append_is_incompatible() {
        let tree = texts(base(), &["user_id"], "toYYYYMM(ts)");
        let mut cases: Vec<(&str, Vec<Column>, &[&str], &str)> = Vec::new();
        let mut retyped = base();
        retyped[2] = col("event", "Nullable(String)");
        cases.push(("retyped", retyped, &["user_id"], "toYYYYMM(ts)"));
        let mut renamed = base();
        renamed[2] = col("kind", "String");
        cases.push(("renamed", renamed, &["user_id"], "toYYYYMM(ts)"));
        let mut inserted = base();
        inserted.insert(1, col("extra", "UInt8"));
        cases.push((
            "inserted in the middle",
            inserted,
            &["user_id"],
            "toYYYYMM(ts)",
        ));
        let mut removed_and_added = base();
        removed_and_added.pop();
        removed_and_added.push(col("other", "String"));
        cases.push((
            "removed and added",
            removed_and_added,
            &["user_id"],
            "toYYYYMM(ts)",
        ));
        let mut appended = base();
        appended.push(col("note", "String"));
        cases.push((
            "appended with another ORDER BY",
            appended.clone(),
            &["user_id", "ts"],
            "toYYYYMM(ts)",
        ));
        cases.push((
            "appended with another PARTITION BY",
            appended,
            &["user_id"],
            "toYYYYMMDD(ts)",
        ));
        cases.push((
            "same columns, another ORDER BY",
            base(),
            &["ts"],
            "toYYYYMM(ts)",
        ));
        for (what, columns, order_by, partition_by) in cases {
            let local = texts(columns, order_by, partition_by);
            assert_eq!(
                relation(local.clone(), tree.clone()),
                DefinitionChange::Incompatible,
                "{what}"
            );
            assert_eq!(
                relation(tree.clone(), local),
                DefinitionChange::Incompatible,
                "{what} (reversed)"
            );
        }
    }

    #[test]
    fn an_unreadable_or_unusual_tree_columns_node_is_incompatible() {
        let (metadata, local) = texts(base(), &["user_id"], "toYYYYMM(ts)");
        for tree in [
            "",
            "columns format version: 2\n0 columns:\n",
            "columns format version: 1\n1 columns:\n`ts`   DateTime\n",
            // A prefix, but not in rtable's canonical text (no trailing newline).
            "columns format version: 1\n1 columns:\n`ts` DateTime",
        ] {
            assert_eq!(
                classify(&metadata, &local, &metadata, tree),
                DefinitionChange::Incompatible,
                "{tree:?}"
            );
        }
    }
}
