//! The tables the insert and handoff targets decode against: between them every column type,
//! nullable and not, and every kind of partition key.

use arrow::datatypes::SchemaRef;
use rtable_protocol::schema::{Column, TableSchema};

/// `spec.columns` as (name, type), ORDER BY, PARTITION BY.
type Definition = (
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
    &'static str,
);

const TABLES: [Definition; 3] = [
    // examples/events.yaml
    (
        &[
            ("ts", "DateTime"),
            ("user_id", "UInt64"),
            ("event", "String"),
            ("value", "Float64"),
        ],
        &["ts", "user_id"],
        "toYYYYMM(ts)",
    ),
    // Every type once.
    (
        &[
            ("k", "UInt64"),
            ("u8", "UInt8"),
            ("u16", "UInt16"),
            ("u32", "UInt32"),
            ("i8", "Int8"),
            ("i16", "Int16"),
            ("i32", "Int32"),
            ("i64", "Int64"),
            ("f32", "Float32"),
            ("f64", "Nullable(Float64)"),
            ("s", "Nullable(String)"),
            ("b", "Bool"),
            ("d", "Date"),
            ("dt", "Nullable(DateTime)"),
        ],
        &["k"],
        "toYYYYMMDD(d)",
    ),
    // Partitioned by a String column's value, no sort key.
    (
        &[
            ("id", "Int32"),
            ("name", "String"),
            ("flag", "Nullable(Bool)"),
        ],
        &[],
        "name",
    ),
];

/// The table a target input's first byte selects.
pub fn pick(selector: u8) -> TableSchema {
    let (columns, order_by, partition_by) = TABLES[usize::from(selector) % TABLES.len()];
    let columns = columns
        .iter()
        .map(|(name, ty)| Column {
            name: (*name).to_string(),
            ty: ty.parse().expect("the test tables use valid types"),
        })
        .collect();
    let partition_by = partition_by.parse().expect("valid partition key");
    TableSchema::new(
        columns,
        order_by.iter().map(|c| (*c).to_string()).collect(),
        partition_by,
    )
    .expect("the test tables are valid")
}

/// How many tables [`pick`] chooses from.
pub fn count() -> u8 {
    TABLES.len() as u8
}

pub fn arrow(schema: TableSchema) -> SchemaRef {
    rtable_sidecar::rows::arrow_schema(&schema)
}
