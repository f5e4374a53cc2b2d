//! The table definition: columns with ClickHouse type names, the sort key and the partition key.
//!
//! This is the part of a `ReplicatedTable` spec that every replica must agree on; it is
//! rendered into the tree's `metadata` and `columns` nodes and compared on activation.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemaError {
    #[error(
        "unknown column type `{0}`: use one of UInt8, UInt16, UInt32, UInt64, Int8, Int16, Int32, Int64, Float32, Float64, String, Bool, Date, DateTime or Nullable(T)"
    )]
    UnknownType(String),
    #[error("Nullable(Nullable(..)) is not allowed in column type `{0}`: use Nullable(T) once")]
    NestedNullable(String),
    #[error("the table has no columns: add at least one entry to spec.columns")]
    NoColumns,
    #[error("column name `{0}` is invalid: use letters, digits and `_`, not starting with a digit")]
    BadColumnName(String),
    #[error("column `{0}` is declared twice in spec.columns: rename or remove one")]
    DuplicateColumn(String),
    #[error("spec.orderBy names `{0}`, which is not a column: use one of {1}")]
    UnknownOrderByColumn(String, String),
    #[error("spec.orderBy column `{0}` is Nullable: sort keys must be non-nullable")]
    NullableOrderBy(String),
    #[error("spec.partitionBy names `{0}`, which is not a column: use one of {1}")]
    UnknownPartitionColumn(String, String),
    #[error(
        "spec.partitionBy `{expr}` needs a Date or DateTime column, but `{column}` is {ty}: partition by the column itself or change its type"
    )]
    PartitionNeedsDate {
        expr: String,
        column: String,
        ty: String,
    },
    #[error(
        "spec.partitionBy column `{column}` is {ty}: partition by a non-nullable integer, String, Bool, Date or DateTime column"
    )]
    UnsupportedPartitionColumn { column: String, ty: String },
    #[error(
        "spec.partitionBy `{0}` is not supported: use \"\" (one partition `all`), a column name, toYYYYMM(col) or toYYYYMMDD(col)"
    )]
    UnsupportedPartitionBy(String),
}

/// A column type, spelled as ClickHouse spells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ColumnType {
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Int8,
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    String,
    Bool,
    /// Days since 1970-01-01, rendered `YYYY-MM-DD`.
    Date,
    /// Seconds since the epoch (UTC), rendered `YYYY-MM-DD hh:mm:ss`.
    DateTime,
    Nullable(Box<ColumnType>),
}

impl ColumnType {
    pub fn is_nullable(&self) -> bool {
        matches!(self, ColumnType::Nullable(_))
    }

    /// The type without its `Nullable` wrapper.
    pub fn inner(&self) -> &ColumnType {
        match self {
            ColumnType::Nullable(t) => t,
            t => t,
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ColumnType::UInt8 => "UInt8",
            ColumnType::UInt16 => "UInt16",
            ColumnType::UInt32 => "UInt32",
            ColumnType::UInt64 => "UInt64",
            ColumnType::Int8 => "Int8",
            ColumnType::Int16 => "Int16",
            ColumnType::Int32 => "Int32",
            ColumnType::Int64 => "Int64",
            ColumnType::Float32 => "Float32",
            ColumnType::Float64 => "Float64",
            ColumnType::String => "String",
            ColumnType::Bool => "Bool",
            ColumnType::Date => "Date",
            ColumnType::DateTime => "DateTime",
            ColumnType::Nullable(inner) => return write!(f, "Nullable({inner})"),
        };
        f.write_str(name)
    }
}

impl FromStr for ColumnType {
    type Err = SchemaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Some(rest) = t
            .strip_prefix("Nullable(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let inner: ColumnType = rest
                .parse()
                .map_err(|_| SchemaError::UnknownType(s.to_string()))?;
            if inner.is_nullable() {
                return Err(SchemaError::NestedNullable(s.to_string()));
            }
            return Ok(ColumnType::Nullable(Box::new(inner)));
        }
        Ok(match t {
            "UInt8" => ColumnType::UInt8,
            "UInt16" => ColumnType::UInt16,
            "UInt32" => ColumnType::UInt32,
            "UInt64" => ColumnType::UInt64,
            "Int8" => ColumnType::Int8,
            "Int16" => ColumnType::Int16,
            "Int32" => ColumnType::Int32,
            "Int64" => ColumnType::Int64,
            "Float32" => ColumnType::Float32,
            "Float64" => ColumnType::Float64,
            "String" => ColumnType::String,
            "Bool" => ColumnType::Bool,
            "Date" => ColumnType::Date,
            "DateTime" => ColumnType::DateTime,
            _ => return Err(SchemaError::UnknownType(s.to_string())),
        })
    }
}

impl Serialize for ColumnType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ColumnType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for ColumnType {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ColumnType".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "ClickHouse type name: UInt8..UInt64, Int8..Int64, Float32, Float64, String, Bool, Date, DateTime or Nullable(T)",
            "pattern": "^(U?Int(8|16|32|64)|Float(32|64)|String|Bool|Date|DateTime|Nullable\\((U?Int(8|16|32|64)|Float(32|64)|String|Bool|Date|DateTime)\\))$"
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ColumnType,
}

/// How rows map to partitions. The partition id is part of every part name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionKey {
    /// One partition, id `all`.
    None,
    /// The column's value is the partition id (dates as `YYYYMMDD`, like ClickHouse).
    Column(String),
    /// `toYYYYMM(col)` of a Date or DateTime column.
    ToYyyyMm(String),
    /// `toYYYYMMDD(col)` of a Date or DateTime column.
    ToYyyyMmDd(String),
}

impl PartitionKey {
    pub fn column(&self) -> Option<&str> {
        match self {
            PartitionKey::None => None,
            PartitionKey::Column(c) | PartitionKey::ToYyyyMm(c) | PartitionKey::ToYyyyMmDd(c) => {
                Some(c)
            }
        }
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionKey::None => Ok(()),
            PartitionKey::Column(c) => f.write_str(c),
            PartitionKey::ToYyyyMm(c) => write!(f, "toYYYYMM({c})"),
            PartitionKey::ToYyyyMmDd(c) => write!(f, "toYYYYMMDD({c})"),
        }
    }
}

impl FromStr for PartitionKey {
    type Err = SchemaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() || t == "tuple()" || t == "all" {
            return Ok(PartitionKey::None);
        }
        let func = |prefix: &str| {
            t.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(')'))
                .map(|c| c.trim().to_string())
        };
        if let Some(c) = func("toYYYYMMDD(") {
            return Ok(PartitionKey::ToYyyyMmDd(c));
        }
        if let Some(c) = func("toYYYYMM(") {
            return Ok(PartitionKey::ToYyyyMm(c));
        }
        if is_identifier(t) {
            return Ok(PartitionKey::Column(t.to_string()));
        }
        Err(SchemaError::UnsupportedPartitionBy(s.to_string()))
    }
}

impl Serialize for PartitionKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PartitionKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The CEL rule that accepts exactly what `PartitionKey::from_str` accepts.
pub const PARTITION_BY_RULE: &str = r"self.matches('^\\s*(|tuple\\(\\)|all|[A-Za-z_][A-Za-z0-9_]*|toYYYYMM(DD)?\\(\\s*[A-Za-z_][A-Za-z0-9_]*\\s*\\))\\s*$')";

impl JsonSchema for PartitionKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PartitionKey".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Partition expression: empty (one partition `all`), a column name, toYYYYMM(col) or toYYYYMMDD(col)",
            "maxLength": 160,
            // The API server refuses what `FromStr` would refuse, so a bad key never reaches
            // the operator's watch.
            "x-kubernetes-validations": [{
                "rule": PARTITION_BY_RULE,
                "message": "spec.partitionBy must be empty, a column name, toYYYYMM(column) or toYYYYMMDD(column)"
            }]
        })
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The replicated part of a table definition, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    pub columns: Vec<Column>,
    pub order_by: Vec<String>,
    pub partition_by: PartitionKey,
}

impl TableSchema {
    /// Checks the rules a table must follow before any node is written for it.
    pub fn new(
        columns: Vec<Column>,
        order_by: Vec<String>,
        partition_by: PartitionKey,
    ) -> Result<Self, SchemaError> {
        if columns.is_empty() {
            return Err(SchemaError::NoColumns);
        }
        let mut seen = std::collections::HashSet::new();
        for c in &columns {
            if !is_identifier(&c.name) {
                return Err(SchemaError::BadColumnName(c.name.clone()));
            }
            if !seen.insert(c.name.as_str()) {
                return Err(SchemaError::DuplicateColumn(c.name.clone()));
            }
        }
        let names = || {
            columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for key in &order_by {
            let col = columns
                .iter()
                .find(|c| &c.name == key)
                .ok_or_else(|| SchemaError::UnknownOrderByColumn(key.clone(), names()))?;
            if col.ty.is_nullable() {
                return Err(SchemaError::NullableOrderBy(key.clone()));
            }
        }
        if let Some(pc) = partition_by.column() {
            let col = columns
                .iter()
                .find(|c| c.name == pc)
                .ok_or_else(|| SchemaError::UnknownPartitionColumn(pc.to_string(), names()))?;
            match (&partition_by, &col.ty) {
                (
                    PartitionKey::ToYyyyMm(_) | PartitionKey::ToYyyyMmDd(_),
                    ColumnType::Date | ColumnType::DateTime,
                ) => {}
                (PartitionKey::ToYyyyMm(_) | PartitionKey::ToYyyyMmDd(_), ty) => {
                    return Err(SchemaError::PartitionNeedsDate {
                        expr: partition_by.to_string(),
                        column: pc.to_string(),
                        ty: ty.to_string(),
                    });
                }
                (_, ColumnType::Nullable(_) | ColumnType::Float32 | ColumnType::Float64) => {
                    return Err(SchemaError::UnsupportedPartitionColumn {
                        column: pc.to_string(),
                        ty: col.ty.to_string(),
                    });
                }
                _ => {}
            }
        }
        Ok(TableSchema {
            columns,
            order_by,
            partition_by,
        })
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// The ORDER BY as ClickHouse writes it in `metadata` (`a, b`; `tuple()` when empty).
    pub fn order_by_expr(&self) -> String {
        if self.order_by.is_empty() {
            "tuple()".to_string()
        } else {
            self.order_by.join(", ")
        }
    }

    /// Comma-separated column names, for error messages.
    pub fn column_names(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            ty: ty.parse().expect("valid type"),
        }
    }

    #[test]
    fn every_type_round_trips_through_its_clickhouse_name() {
        for name in [
            "UInt8",
            "UInt16",
            "UInt32",
            "UInt64",
            "Int8",
            "Int16",
            "Int32",
            "Int64",
            "Float32",
            "Float64",
            "String",
            "Bool",
            "Date",
            "DateTime",
            "Nullable(String)",
            "Nullable(DateTime)",
        ] {
            let t: ColumnType = name.parse().expect(name);
            assert_eq!(t.to_string(), name);
        }
    }

    #[test]
    fn unknown_and_nested_types_are_refused_with_the_fix() {
        let err = "Varchar".parse::<ColumnType>().unwrap_err();
        assert!(err.to_string().contains("Varchar") && err.to_string().contains("UInt8"));
        assert_eq!(
            "Nullable(Nullable(Int8))".parse::<ColumnType>(),
            Err(SchemaError::NestedNullable(
                "Nullable(Nullable(Int8))".into()
            ))
        );
        assert!("Nullable(Foo)".parse::<ColumnType>().is_err());
    }

    #[test]
    fn partition_expressions_parse_and_render() {
        assert_eq!("".parse::<PartitionKey>(), Ok(PartitionKey::None));
        assert_eq!("tuple()".parse::<PartitionKey>(), Ok(PartitionKey::None));
        assert_eq!(
            "kind".parse::<PartitionKey>(),
            Ok(PartitionKey::Column("kind".into()))
        );
        assert_eq!(
            "toYYYYMM(ts)".parse::<PartitionKey>(),
            Ok(PartitionKey::ToYyyyMm("ts".into()))
        );
        assert_eq!(
            "toYYYYMMDD( ts )".parse::<PartitionKey>(),
            Ok(PartitionKey::ToYyyyMmDd("ts".into()))
        );
        assert_eq!(
            PartitionKey::ToYyyyMmDd("ts".into()).to_string(),
            "toYYYYMMDD(ts)"
        );
        assert!("intDiv(x, 2)".parse::<PartitionKey>().is_err());
    }

    #[test]
    fn schema_rules_name_the_bad_input() {
        let cols = vec![
            col("ts", "DateTime"),
            col("id", "UInt64"),
            col("v", "Nullable(Float64)"),
        ];
        assert!(
            TableSchema::new(
                cols.clone(),
                vec!["id".into()],
                "toYYYYMM(ts)".parse().unwrap()
            )
            .is_ok()
        );
        let e =
            TableSchema::new(cols.clone(), vec!["nope".into()], PartitionKey::None).unwrap_err();
        assert_eq!(
            e,
            SchemaError::UnknownOrderByColumn("nope".into(), "ts, id, v".into())
        );
        let e = TableSchema::new(cols.clone(), vec!["v".into()], PartitionKey::None).unwrap_err();
        assert_eq!(e, SchemaError::NullableOrderBy("v".into()));
        let e = TableSchema::new(cols.clone(), vec![], PartitionKey::ToYyyyMm("id".into()))
            .unwrap_err();
        assert!(matches!(e, SchemaError::PartitionNeedsDate { .. }));
        let e =
            TableSchema::new(cols.clone(), vec![], PartitionKey::Column("v".into())).unwrap_err();
        assert!(matches!(e, SchemaError::UnsupportedPartitionColumn { .. }));
        let mut dup = cols.clone();
        dup.push(col("id", "String"));
        assert_eq!(
            TableSchema::new(dup, vec![], PartitionKey::None).unwrap_err(),
            SchemaError::DuplicateColumn("id".into())
        );
        assert_eq!(
            TableSchema::new(vec![], vec![], PartitionKey::None).unwrap_err(),
            SchemaError::NoColumns
        );
    }
}
