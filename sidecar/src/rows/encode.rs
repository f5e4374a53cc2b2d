//! Encoders of `/select`: JSONEachRow, CSV and CSVWithNames append to a buffer batch by
//! batch; Parquet goes through [`ParquetOutput`].

use std::fmt;
use std::io::Write;

use arrow::array::{
    Array, AsArray, BooleanArray, Date32Array, Float32Array, Float64Array, Int8Array, Int16Array,
    Int32Array, Int64Array, RecordBatch, StringArray, TimestampSecondArray, UInt8Array,
    UInt16Array, UInt32Array, UInt64Array,
};
use arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    SchemaRef, TimeUnit, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow::error::ArrowError;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;

use super::error::InputError;
use super::value::shorten;
use super::{format_date, format_datetime};

/// The read formats, by their ClickHouse names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    JsonEachRow,
    Csv,
    CsvWithNames,
    Parquet,
}

impl OutputFormat {
    /// Accepts the ClickHouse names (case-insensitive) and the aliases JSONLines and NDJSON.
    pub fn parse(name: &str) -> Result<OutputFormat, InputError> {
        let n = name.trim();
        let is = |s: &str| n.eq_ignore_ascii_case(s);
        if is("JSONEachRow") || is("JSONLines") || is("NDJSON") {
            Ok(OutputFormat::JsonEachRow)
        } else if is("CSV") {
            Ok(OutputFormat::Csv)
        } else if is("CSVWithNames") {
            Ok(OutputFormat::CsvWithNames)
        } else if is("Parquet") {
            Ok(OutputFormat::Parquet)
        } else {
            Err(InputError::new(format!(
                "unknown output format `{}`: use one of JSONEachRow, CSV, CSVWithNames, Parquet",
                shorten(name.to_string())
            )))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::JsonEachRow => "JSONEachRow",
            OutputFormat::Csv => "CSV",
            OutputFormat::CsvWithNames => "CSVWithNames",
            OutputFormat::Parquet => "Parquet",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::JsonEachRow => "application/x-ndjson; charset=UTF-8",
            OutputFormat::Csv => "text/csv; charset=UTF-8; header=absent",
            OutputFormat::CsvWithNames => "text/csv; charset=UTF-8; header=present",
            OutputFormat::Parquet => "application/vnd.apache.parquet",
        }
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A typed view of one column.
enum Col<'a> {
    U8(&'a UInt8Array),
    U16(&'a UInt16Array),
    U32(&'a UInt32Array),
    U64(&'a UInt64Array),
    I8(&'a Int8Array),
    I16(&'a Int16Array),
    I32(&'a Int32Array),
    I64(&'a Int64Array),
    F32(&'a Float32Array),
    F64(&'a Float64Array),
    Str(&'a StringArray),
    Bool(&'a BooleanArray),
    Date(&'a Date32Array),
    DateTime(&'a TimestampSecondArray),
}

fn typed(array: &dyn Array) -> Option<Col<'_>> {
    Some(match array.data_type() {
        DataType::UInt8 => Col::U8(array.as_primitive_opt::<UInt8Type>()?),
        DataType::UInt16 => Col::U16(array.as_primitive_opt::<UInt16Type>()?),
        DataType::UInt32 => Col::U32(array.as_primitive_opt::<UInt32Type>()?),
        DataType::UInt64 => Col::U64(array.as_primitive_opt::<UInt64Type>()?),
        DataType::Int8 => Col::I8(array.as_primitive_opt::<Int8Type>()?),
        DataType::Int16 => Col::I16(array.as_primitive_opt::<Int16Type>()?),
        DataType::Int32 => Col::I32(array.as_primitive_opt::<Int32Type>()?),
        DataType::Int64 => Col::I64(array.as_primitive_opt::<Int64Type>()?),
        DataType::Float32 => Col::F32(array.as_primitive_opt::<Float32Type>()?),
        DataType::Float64 => Col::F64(array.as_primitive_opt::<Float64Type>()?),
        DataType::Utf8 => Col::Str(array.as_string_opt::<i32>()?),
        DataType::Boolean => Col::Bool(array.as_boolean_opt()?),
        DataType::Date32 => Col::Date(array.as_primitive_opt::<Date32Type>()?),
        DataType::Timestamp(TimeUnit::Second, _) => {
            Col::DateTime(array.as_primitive_opt::<TimestampSecondType>()?)
        }
        _ => return None,
    })
}

fn write_float(out: &mut Vec<u8>, f: f64, json: bool) -> Result<(), ArrowError> {
    if f.is_nan() {
        out.extend_from_slice(if json { b"\"nan\"" } else { b"nan" });
    } else if f.is_infinite() {
        let s: &[u8] = match (f > 0.0, json) {
            (true, true) => b"\"inf\"",
            (true, false) => b"inf",
            (false, true) => b"\"-inf\"",
            (false, false) => b"-inf",
        };
        out.extend_from_slice(s);
    } else {
        write!(out, "{f:?}")?;
    }
    Ok(())
}

fn write_f32(out: &mut Vec<u8>, f: f32, json: bool) -> Result<(), ArrowError> {
    if f.is_finite() {
        write!(out, "{f:?}")?;
        Ok(())
    } else {
        write_float(out, f64::from(f), json)
    }
}

fn write_csv_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for b in s.bytes() {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
}

fn bad_value(what: &str, v: i64) -> ArrowError {
    ArrowError::InvalidArgumentError(format!("{what} {v} cannot be rendered"))
}

/// Writes one non-null cell.
fn write_cell(out: &mut Vec<u8>, col: &Col<'_>, row: usize, json: bool) -> Result<(), ArrowError> {
    match col {
        Col::U8(a) => write!(out, "{}", a.value(row))?,
        Col::U16(a) => write!(out, "{}", a.value(row))?,
        Col::U32(a) => write!(out, "{}", a.value(row))?,
        Col::U64(a) => write!(out, "{}", a.value(row))?,
        Col::I8(a) => write!(out, "{}", a.value(row))?,
        Col::I16(a) => write!(out, "{}", a.value(row))?,
        Col::I32(a) => write!(out, "{}", a.value(row))?,
        Col::I64(a) => write!(out, "{}", a.value(row))?,
        Col::F32(a) => write_f32(out, a.value(row), json)?,
        Col::F64(a) => write_float(out, a.value(row), json)?,
        Col::Bool(a) => out.extend_from_slice(if a.value(row) { b"true" } else { b"false" }),
        Col::Str(a) => {
            if json {
                serde_json::to_writer(&mut *out, a.value(row))
                    .map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
            } else {
                write_csv_string(out, a.value(row));
            }
        }
        Col::Date(a) => {
            let d = a.value(row);
            let s = format_date(d).ok_or_else(|| bad_value("date", i64::from(d)))?;
            write!(out, "\"{s}\"")?;
        }
        Col::DateTime(a) => {
            let t = a.value(row);
            let s = format_datetime(t).ok_or_else(|| bad_value("time", t))?;
            write!(out, "\"{s}\"")?;
        }
    }
    Ok(())
}

/// Appends the rows of `batch` to `out`. JSONEachRow writes one object per line (integers,
/// UInt64 included, as numbers; Date as "YYYY-MM-DD"; DateTime as "YYYY-MM-DD hh:mm:ss";
/// null as null; NaN/inf as "nan"/"inf"/"-inf"). CSV quotes strings, dates and times,
/// writes `\N` for null and `true`/`false` for Bool. CSVWithNames writes the header when
/// `first` is true, even for an empty batch. Parquet is refused: use [`ParquetOutput`].
pub fn encode_text(
    format: OutputFormat,
    batch: &RecordBatch,
    out: &mut Vec<u8>,
    first: bool,
) -> Result<(), ArrowError> {
    let schema = batch.schema();
    let cols = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(a, f)| {
            typed(a.as_ref()).ok_or_else(|| {
                ArrowError::InvalidArgumentError(format!(
                    "column `{}` has unsupported Arrow type {}",
                    f.name(),
                    a.data_type()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let arrays = batch.columns();
    match format {
        OutputFormat::Parquet => Err(ArrowError::InvalidArgumentError(
            "encode_text does not write Parquet: use rows::ParquetOutput".into(),
        )),
        OutputFormat::JsonEachRow => {
            let keys = schema
                .fields()
                .iter()
                .map(|f| serde_json::to_string(f.name()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
            for row in 0..batch.num_rows() {
                out.push(b'{');
                for (i, (col, key)) in cols.iter().zip(&keys).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(key.as_bytes());
                    out.push(b':');
                    if arrays[i].is_null(row) {
                        out.extend_from_slice(b"null");
                    } else {
                        write_cell(out, col, row, true)?;
                    }
                }
                out.extend_from_slice(b"}\n");
            }
            Ok(())
        }
        OutputFormat::Csv | OutputFormat::CsvWithNames => {
            if first && format == OutputFormat::CsvWithNames {
                for (i, f) in schema.fields().iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_csv_string(out, f.name());
                }
                out.push(b'\n');
            }
            for row in 0..batch.num_rows() {
                for (i, col) in cols.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    if arrays[i].is_null(row) {
                        out.extend_from_slice(b"\\N");
                    } else {
                        write_cell(out, col, row, false)?;
                    }
                }
                out.push(b'\n');
            }
            Ok(())
        }
    }
}

/// The Parquet writer settings of parts and of `/select`: zstd, a fixed `created_by` and no
/// timestamps, so identical rows always give identical bytes.
pub fn parquet_writer_properties() -> WriterProperties {
    properties(Compression::ZSTD(ZstdLevel::default()))
}

/// Rows holding at most this many bytes of values are written uncompressed.
pub const UNCOMPRESSED_MAX_BYTES: usize = 8 << 10;

/// The settings for a part written from `batch` in one go (an insert's): uncompressed
/// when its values take at most [`UNCOMPRESSED_MAX_BYTES`], where zstd saves next to
/// nothing (a page of a few values) and its setup per column was most of the time it
/// took to encode a one-row insert (88 us of 109, measured). Merges write zstd, so small
/// parts are compressed once they are merged. The choice depends on the values only (not
/// on buffer capacities), so the same rows give the same bytes.
pub fn parquet_writer_properties_for(batch: &RecordBatch) -> WriterProperties {
    let bytes = batch.columns().iter().fold(0usize, |sum, column| {
        let size = column
            .to_data()
            .get_slice_memory_size()
            .unwrap_or(usize::MAX);
        sum.saturating_add(size)
    });
    if bytes <= UNCOMPRESSED_MAX_BYTES {
        properties(Compression::UNCOMPRESSED)
    } else {
        parquet_writer_properties()
    }
}

fn properties(compression: Compression) -> WriterProperties {
    WriterProperties::builder()
        .set_compression(compression)
        .set_created_by("rtable".to_string())
        .build()
}

/// A streaming Parquet encoder. Write batches, call [`ParquetOutput::flush`] to close a row
/// group, and with a `Vec<u8>` sink hand out what is written so far with
/// [`ParquetOutput::take_bytes`]; [`ParquetOutput::finish`] writes the footer.
pub struct ParquetOutput<W: Write + Send> {
    writer: ArrowWriter<W>,
}

impl<W: Write + Send> ParquetOutput<W> {
    /// `schema` is the in-memory schema (e.g. `arrow_schema(table)`); the file stores
    /// DateTime as milliseconds (see [`super::to_storage`]).
    pub fn new(sink: W, schema: SchemaRef) -> Result<Self, ParquetError> {
        Self::with_properties(sink, schema, parquet_writer_properties())
    }

    /// [`ParquetOutput::new`] with other settings (see [`parquet_writer_properties_for`]).
    pub fn with_properties(
        sink: W,
        schema: SchemaRef,
        properties: WriterProperties,
    ) -> Result<Self, ParquetError> {
        Ok(ParquetOutput {
            writer: ArrowWriter::try_new(sink, super::storage_schema(&schema), Some(properties))?,
        })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), ParquetError> {
        self.writer.write(&super::to_storage(batch)?)
    }

    /// Ends the current row group so its bytes reach the sink.
    pub fn flush(&mut self) -> Result<(), ParquetError> {
        self.writer.flush()
    }

    /// Writes the footer and returns the sink.
    pub fn finish(self) -> Result<W, ParquetError> {
        self.writer.into_inner()
    }
}

impl ParquetOutput<Vec<u8>> {
    /// The bytes written since the last call (the writer tracks offsets itself, so draining
    /// the buffer is safe).
    pub fn take_bytes(&mut self) -> Vec<u8> {
        std::mem::take(self.writer.inner_mut())
    }
}
