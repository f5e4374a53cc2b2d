//! Insert bodies -> one RecordBatch with the table's Arrow schema.

use std::collections::HashMap;
use std::fmt;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{CastOptions, cast_with_options, concat_batches};
use arrow::datatypes::{DataType, Date32Type, TimestampSecondType};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rtable_protocol::schema::{ColumnType, TableSchema};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::error::InputError;
use super::value::{ColumnBuilder, Raw, check_date, check_datetime, shorten};
use super::{arrow_schema, arrow_type};

/// The insert formats, by their ClickHouse names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    JsonEachRow,
    Csv,
    CsvWithNames,
    Parquet,
}

const INPUT_FORMATS: &str = "JSONEachRow, CSV, CSVWithNames, Parquet";

impl InputFormat {
    /// Accepts the ClickHouse names (case-insensitive) and the aliases JSONLines and NDJSON.
    pub fn parse(name: &str) -> Result<InputFormat, InputError> {
        let n = name.trim();
        let is = |s: &str| n.eq_ignore_ascii_case(s);
        if is("JSONEachRow") || is("JSONLines") || is("NDJSON") {
            Ok(InputFormat::JsonEachRow)
        } else if is("CSV") {
            Ok(InputFormat::Csv)
        } else if is("CSVWithNames") {
            Ok(InputFormat::CsvWithNames)
        } else if is("Parquet") {
            Ok(InputFormat::Parquet)
        } else {
            Err(InputError::new(format!(
                "unknown input format `{}`: use one of {INPUT_FORMATS}",
                shorten(name.to_string())
            )))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            InputFormat::JsonEachRow => "JSONEachRow",
            InputFormat::Csv => "CSV",
            InputFormat::CsvWithNames => "CSVWithNames",
            InputFormat::Parquet => "Parquet",
        }
    }
}

impl fmt::Display for InputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes and validates a whole body. The batch has `arrow_schema(schema)` and at least one
/// row; every value is inside ClickHouse's range for its type.
pub fn decode(
    format: InputFormat,
    body: &[u8],
    schema: &TableSchema,
) -> Result<RecordBatch, InputError> {
    decode_block(format, body, schema, 0)
}

/// [`decode`] of one block of a longer body that starts `shift` lines (Parquet: rows)
/// into it: errors name the line or row of the whole body.
pub fn decode_block(
    format: InputFormat,
    body: &[u8],
    schema: &TableSchema,
    shift: usize,
) -> Result<RecordBatch, InputError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(InputError::empty_body());
    }
    let batch = match format {
        InputFormat::JsonEachRow => decode_json(body, schema, shift)?,
        InputFormat::Csv => decode_csv(body, schema, false, shift)?,
        InputFormat::CsvWithNames => decode_csv(body, schema, true, shift)?,
        InputFormat::Parquet => decode_parquet(body, schema, shift)?,
    };
    if batch.num_rows() == 0 {
        return Err(InputError::empty_body());
    }
    Ok(batch)
}

fn finish(builders: Vec<ColumnBuilder>, schema: &TableSchema) -> Result<RecordBatch, InputError> {
    let columns: Vec<ArrayRef> = builders.into_iter().map(ColumnBuilder::finish).collect();
    RecordBatch::try_new(arrow_schema(schema), columns)
        .map_err(|e| InputError::new(format!("internal error assembling the rows: {e}")))
}

/// A JSON object's entries in order, duplicates kept (so they can be refused).
struct RowObject(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for RowObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RowObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object with one key per column")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RowObject, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(RowObject(entries))
            }
        }
        d.deserialize_map(V)
    }
}

fn decode_json(body: &[u8], schema: &TableSchema, shift: usize) -> Result<RecordBatch, InputError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        let line = body[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
            + shift;
        InputError::at(
            Some(line),
            None,
            format!("line {line} is not valid UTF-8: send JSONEachRow as UTF-8 text"),
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let index: HashMap<&str, usize> = schema
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.as_str(), i))
        .collect();
    let mut builders: Vec<ColumnBuilder> = schema.columns.iter().map(ColumnBuilder::new).collect();
    let n = schema.columns.len();
    for (i, line) in text.split('\n').enumerate() {
        let line_no = i + 1 + shift;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let row: RowObject = serde_json::from_str(line).map_err(|e| {
            InputError::at(
                Some(line_no),
                None,
                format!(
                    "malformed JSON on line {line_no}: {e}; JSONEachRow needs one JSON object per line"
                ),
            )
        })?;
        let mut slots: Vec<Option<&Value>> = vec![None; n];
        for (key, value) in &row.0 {
            let Some(&idx) = index.get(key.as_str()) else {
                return Err(InputError::at(
                    Some(line_no),
                    Some(key),
                    format!(
                        "unknown column `{}` on line {line_no}; the table's columns are {}",
                        shorten(key.clone()),
                        schema.column_names()
                    ),
                ));
            };
            if slots[idx].replace(value).is_some() {
                return Err(InputError::at(
                    Some(line_no),
                    Some(key),
                    format!("column `{key}` appears twice on line {line_no}"),
                ));
            }
        }
        for ((col, slot), builder) in schema.columns.iter().zip(slots).zip(&mut builders) {
            match slot {
                None | Some(Value::Null) if col.ty.is_nullable() => builder.push_null(),
                None => {
                    return Err(InputError::at(
                        Some(line_no),
                        Some(&col.name),
                        format!(
                            "missing column `{}` ({}) on line {line_no}: every row needs it because it is not Nullable",
                            col.name, col.ty
                        ),
                    ));
                }
                Some(Value::Null) => {
                    return Err(InputError::at(
                        Some(line_no),
                        Some(&col.name),
                        format!(
                            "null on line {line_no} in column `{}`, which is {} and not Nullable",
                            col.name, col.ty
                        ),
                    ));
                }
                Some(v) => builder.push(Raw::Json(v)).map_err(|detail| {
                    InputError::at(
                        Some(line_no),
                        Some(&col.name),
                        format!("line {line_no}, column `{}`: {detail}", col.name),
                    )
                })?,
            }
        }
    }
    finish(builders, schema)
}

fn csv_error(e: csv::Error, shift: usize) -> InputError {
    let line = e.position().map(|p| p.line() as usize + shift);
    let at = line.map(|l| format!(" on line {l}")).unwrap_or_default();
    let detail = match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "invalid UTF-8: send CSV as UTF-8 text".to_string(),
        _ => e.to_string(),
    };
    InputError::at(line, None, format!("malformed CSV{at}: {detail}"))
}

fn decode_csv(
    body: &[u8],
    schema: &TableSchema,
    with_names: bool,
    shift: usize,
) -> Result<RecordBatch, InputError> {
    let body = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(body);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(body);
    let n = schema.columns.len();
    let mut records = reader.records();
    // order[i] = table column index of field i.
    let order: Vec<usize> = if with_names {
        let header = match records.next() {
            None => return Err(InputError::empty_body()),
            Some(r) => r.map_err(|e| csv_error(e, shift))?,
        };
        let line = header.position().map(|p| p.line() as usize + shift);
        let mut order = Vec::with_capacity(header.len());
        for name in header.iter() {
            let name = name.trim();
            let idx = schema.column_index(name).ok_or_else(|| {
                InputError::at(
                    line,
                    Some(name),
                    format!(
                        "unknown column `{}` in the CSV header; the table's columns are {}",
                        shorten(name.to_string()),
                        schema.column_names()
                    ),
                )
            })?;
            if order.contains(&idx) {
                return Err(InputError::at(
                    line,
                    Some(name),
                    format!("column `{name}` appears twice in the CSV header"),
                ));
            }
            order.push(idx);
        }
        if let Some(missing) = (0..n).find(|i| !order.contains(i)) {
            let name = &schema.columns[missing].name;
            return Err(InputError::at(
                line,
                Some(name),
                format!(
                    "the CSV header lacks column `{name}`; name every column of the table: {}",
                    schema.column_names()
                ),
            ));
        }
        order
    } else {
        (0..n).collect()
    };
    let mut builders: Vec<ColumnBuilder> = schema.columns.iter().map(ColumnBuilder::new).collect();
    for record in records {
        let record = record.map_err(|e| csv_error(e, shift))?;
        let line_no = record.position().map(|p| p.line() as usize).unwrap_or(0) + shift;
        if record.len() != n {
            return Err(InputError::at(
                Some(line_no),
                None,
                format!(
                    "line {line_no} has {} fields, but the table has {n} columns ({})",
                    record.len(),
                    schema.column_names()
                ),
            ));
        }
        for (field, &idx) in record.iter().zip(&order) {
            let col = &schema.columns[idx];
            let builder = &mut builders[idx];
            let is_null = field == "\\N" || (field.is_empty() && col.ty.is_nullable());
            if is_null {
                if col.ty.is_nullable() {
                    builder.push_null();
                    continue;
                }
                return Err(InputError::at(
                    Some(line_no),
                    Some(&col.name),
                    format!(
                        "null (\\N) on line {line_no} in column `{}`, which is {} and not Nullable",
                        col.name, col.ty
                    ),
                ));
            }
            builder.push(Raw::Text(field)).map_err(|detail| {
                InputError::at(
                    Some(line_no),
                    Some(&col.name),
                    format!("line {line_no}, column `{}`: {detail}", col.name),
                )
            })?;
        }
    }
    finish(builders, schema)
}

/// True when a Parquet column of type `from` converts to `to` without guessing: integers
/// and floats widen or are range-checked, strings stay strings, dates stay dates.
fn castable(from: &DataType, to: &ColumnType) -> bool {
    use DataType as D;
    if let D::Dictionary(_, value) = from {
        return castable(value, to);
    }
    let int = from.is_integer();
    match to.inner() {
        ColumnType::UInt8
        | ColumnType::UInt16
        | ColumnType::UInt32
        | ColumnType::UInt64
        | ColumnType::Int8
        | ColumnType::Int16
        | ColumnType::Int32
        | ColumnType::Int64 => int,
        ColumnType::Float32 | ColumnType::Float64 => int || from.is_floating(),
        ColumnType::String => matches!(from, D::Utf8 | D::LargeUtf8 | D::Utf8View),
        ColumnType::Bool => matches!(from, D::Boolean),
        ColumnType::Date => matches!(from, D::Date32 | D::Date64),
        // Integers are unix seconds, as in JSONEachRow and CSV.
        ColumnType::DateTime => int || matches!(from, D::Timestamp(_, _) | D::Date32 | D::Date64),
        ColumnType::Nullable(_) => false,
    }
}

fn decode_parquet(
    body: &[u8],
    schema: &TableSchema,
    shift: usize,
) -> Result<RecordBatch, InputError> {
    let bytes = bytes::Bytes::copy_from_slice(body);
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| not_parquet(&e))?;
    let file_schema = builder.schema().clone();
    let sources = parquet_sources(&file_schema, schema)?;
    let reader = builder.build().map_err(|e| not_parquet(&e))?;
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_parquet(&e))?;
    let whole = concat_batches(&file_schema, &batches).map_err(|e| not_parquet(&e))?;
    parquet_rows(&whole, &sources, schema, shift)
}

pub(super) fn not_parquet(e: &dyn fmt::Display) -> InputError {
    InputError::new(format!("the body is not a readable Parquet file: {e}"))
}

/// For each table column, the index of the Parquet file's column holding it; refuses
/// unknown, missing and unconvertible columns.
pub(super) fn parquet_sources(
    file_schema: &arrow::datatypes::Schema,
    schema: &TableSchema,
) -> Result<Vec<usize>, InputError> {
    for field in file_schema.fields() {
        if schema.column(field.name()).is_none() {
            return Err(InputError::at(
                None,
                Some(field.name()),
                format!(
                    "unknown column `{}` in the Parquet file; the table's columns are {}",
                    shorten(field.name().clone()),
                    schema.column_names()
                ),
            ));
        }
    }
    let mut sources = Vec::with_capacity(schema.columns.len());
    for col in &schema.columns {
        let idx = file_schema.index_of(&col.name).map_err(|_| {
            InputError::at(
                None,
                Some(&col.name),
                format!(
                    "the Parquet file lacks column `{}` ({}); send every column of the table: {}",
                    col.name,
                    col.ty,
                    schema.column_names()
                ),
            )
        })?;
        let from = file_schema.field(idx).data_type();
        if !castable(from, &col.ty) {
            return Err(InputError::at(
                None,
                Some(&col.name),
                format!(
                    "column `{}` has Parquet/Arrow type {from}, which cannot be stored as {}",
                    col.name, col.ty
                ),
            ));
        }
        sources.push(idx);
    }
    Ok(sources)
}

/// Rows read from a Parquet body, converted to the table's Arrow schema and checked;
/// `shift` rows of the body came before them.
pub(super) fn parquet_rows(
    whole: &RecordBatch,
    sources: &[usize],
    schema: &TableSchema,
    shift: usize,
) -> Result<RecordBatch, InputError> {
    let options = CastOptions {
        safe: false,
        ..Default::default()
    };
    let mut columns = Vec::with_capacity(schema.columns.len());
    for (col, &idx) in schema.columns.iter().zip(sources) {
        let source = whole.column(idx);
        let cast = cast_with_options(source, &arrow_type(&col.ty), &options).map_err(|e| {
            InputError::at(
                None,
                Some(&col.name),
                format!("column `{}` does not fit {}: {e}", col.name, col.ty),
            )
        })?;
        check_parquet_column(&cast, &col.name, &col.ty, shift)?;
        columns.push(cast);
    }
    RecordBatch::try_new(arrow_schema(schema), columns)
        .map_err(|e| InputError::new(format!("internal error assembling the rows: {e}")))
}

fn check_parquet_column(
    array: &ArrayRef,
    name: &str,
    ty: &ColumnType,
    shift: usize,
) -> Result<(), InputError> {
    if !ty.is_nullable() && array.null_count() > 0 {
        let row = (0..array.len()).find(|&i| array.is_null(i)).unwrap_or(0) + 1 + shift;
        return Err(InputError::at(
            None,
            Some(name),
            format!("null in row {row} of column `{name}`, which is {ty} and not Nullable"),
        ));
    }
    let out_of_range = |row: usize, what: &str| {
        InputError::at(
            None,
            Some(name),
            format!("row {} of column `{name}`: {what}", row + 1 + shift),
        )
    };
    match ty.inner() {
        ColumnType::Date => {
            if let Some(a) = array.as_primitive_opt::<Date32Type>()
                && let Some((row, _)) = a
                    .iter()
                    .enumerate()
                    .find(|(_, v)| v.is_some_and(|d| !check_date(d)))
            {
                return Err(out_of_range(
                    row,
                    "date outside Date's range 1970-01-01 to 2149-06-06",
                ));
            }
        }
        ColumnType::DateTime => {
            if let Some(a) = array.as_primitive_opt::<TimestampSecondType>()
                && let Some((row, _)) = a
                    .iter()
                    .enumerate()
                    .find(|(_, v)| v.is_some_and(|s| !check_datetime(s)))
            {
                return Err(out_of_range(
                    row,
                    "time outside DateTime's range 1970-01-01 00:00:00 to 2106-02-07 06:28:15",
                ));
            }
        }
        _ => {}
    }
    Ok(())
}
