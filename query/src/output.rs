//! The answer's encodings, by their ClickHouse names: JSONEachRow, CSV, CSVWithNames
//! (arrow-json and arrow-csv) and Parquet (parquet's Arrow writer, zstd). Each batch is
//! encoded as it comes and handed out as bytes, so an answer streams.
//!
//! DateTime values are written as ClickHouse writes them, `YYYY-MM-DD hh:mm:ss` (UTC), in
//! the text formats; in Parquet they are `Timestamp(Millisecond, "UTC")` as in the parts
//! (Parquet has no seconds unit that pyarrow and DuckDB read as timestamps).

use std::io::Write;
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::util::display::FormatOptions;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{QueryError, code};

const DATETIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// The answer formats, by their ClickHouse names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    JsonEachRow,
    Csv,
    CsvWithNames,
    Parquet,
}

impl Format {
    /// Accepts the names `/select` takes (case-insensitive), JSONLines and NDJSON too.
    pub fn parse(name: &str) -> Result<Format, QueryError> {
        let n = name.trim();
        let is = |s: &str| n.eq_ignore_ascii_case(s);
        if is("JSONEachRow") || is("JSONLines") || is("NDJSON") {
            Ok(Format::JsonEachRow)
        } else if is("CSV") {
            Ok(Format::Csv)
        } else if is("CSVWithNames") {
            Ok(Format::CsvWithNames)
        } else if is("Parquet") {
            Ok(Format::Parquet)
        } else {
            Err(QueryError::refused(
                format!("unknown format `{n}`: use one of JSONEachRow, CSV, CSVWithNames, Parquet"),
                code::UNKNOWN_FORMAT,
            ))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::JsonEachRow => "JSONEachRow",
            Format::Csv => "CSV",
            Format::CsvWithNames => "CSVWithNames",
            Format::Parquet => "Parquet",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::JsonEachRow => "application/x-ndjson; charset=UTF-8",
            Format::Csv => "text/csv; charset=UTF-8; header=absent",
            Format::CsvWithNames => "text/csv; charset=UTF-8; header=present",
            Format::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// Bytes the Parquet writer wrote, taken out after each batch.
#[derive(Clone, Default)]
pub(crate) struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    fn take(&self) -> Bytes {
        match self.0.lock() {
            Ok(mut buf) => Bytes::from(std::mem::take(&mut *buf)),
            Err(poisoned) => Bytes::from(std::mem::take(&mut *poisoned.into_inner())),
        }
    }
}

impl Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buf = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("the Parquet buffer's lock is poisoned"))?;
        buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(crate) enum Encoder {
    Text {
        format: Format,
        first: bool,
    },
    Parquet {
        writer: Box<ArrowWriter<SharedBuf>>,
        buf: SharedBuf,
        schema: SchemaRef,
    },
}

fn failed(e: impl std::fmt::Display) -> QueryError {
    QueryError::Execution(format!("encoding the answer: {e}"))
}

/// `Timestamp(Second)` columns as milliseconds, for Parquet.
fn parquet_schema(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(TimeUnit::Second, tz) => Arc::new(
                    Field::clone(f)
                        .with_data_type(DataType::Timestamp(TimeUnit::Millisecond, tz.clone())),
                ),
                _ => f.clone(),
            })
            .collect::<Vec<_>>(),
    ))
}

/// The batch with its columns cast to `schema`'s types, or formatted as text where
/// `schema` says Utf8 and the batch holds timestamps.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, ArrowError> {
    let options = CastOptions {
        safe: false,
        format_options: FormatOptions::new()
            .with_timestamp_tz_format(Some(DATETIME_FORMAT))
            .with_timestamp_format(Some(DATETIME_FORMAT)),
    };
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(c.clone())
            } else {
                cast_with_options(c, f.data_type(), &options)
            }
        })
        .collect::<Result<Vec<ArrayRef>, _>>()?;
    RecordBatch::try_new(schema.clone(), columns)
}

/// Timestamps as text, for JSONEachRow (arrow-json writes them in RFC 3339).
fn text_schema(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(..) => Arc::new(Field::clone(f).with_data_type(DataType::Utf8)),
                _ => f.clone(),
            })
            .collect::<Vec<_>>(),
    ))
}

impl Encoder {
    pub(crate) fn new(format: Format, schema: &SchemaRef) -> Result<Encoder, QueryError> {
        Ok(match format {
            Format::Parquet => {
                let buf = SharedBuf::default();
                let schema = parquet_schema(schema);
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build();
                let writer = ArrowWriter::try_new(buf.clone(), schema.clone(), Some(props))
                    .map_err(failed)?;
                Encoder::Parquet {
                    writer: Box::new(writer),
                    buf,
                    schema,
                }
            }
            format => Encoder::Text {
                format,
                first: true,
            },
        })
    }

    /// The bytes of one batch (a Parquet writer may keep them until its row group fills).
    pub(crate) fn batch(&mut self, batch: &RecordBatch) -> Result<Bytes, QueryError> {
        match self {
            Encoder::Parquet {
                writer,
                buf,
                schema,
            } => {
                let batch = conform(batch, schema).map_err(failed)?;
                writer.write(&batch).map_err(failed)?;
                Ok(buf.take())
            }
            Encoder::Text { format, first } => {
                let header = *first && *format == Format::CsvWithNames;
                *first = false;
                encode_text(*format, batch, header)
            }
        }
    }

    /// What is left once every batch is in: the Parquet footer, or CSVWithNames' header
    /// when there were no rows.
    pub(crate) fn finish(self, schema: &SchemaRef) -> Result<Bytes, QueryError> {
        match self {
            Encoder::Parquet { writer, buf, .. } => {
                writer.close().map_err(failed)?;
                Ok(buf.take())
            }
            Encoder::Text { format, first } => {
                if first && format == Format::CsvWithNames {
                    encode_text(format, &RecordBatch::new_empty(schema.clone()), true)
                } else {
                    Ok(Bytes::new())
                }
            }
        }
    }
}

fn encode_text(format: Format, batch: &RecordBatch, header: bool) -> Result<Bytes, QueryError> {
    let mut out = Vec::new();
    match format {
        Format::JsonEachRow => {
            let batch = conform(batch, &text_schema(&batch.schema())).map_err(failed)?;
            let mut writer = arrow_json::WriterBuilder::new()
                .with_explicit_nulls(true)
                .build::<_, arrow_json::writer::LineDelimited>(&mut out);
            writer.write(&batch).map_err(failed)?;
            writer.finish().map_err(failed)?;
        }
        Format::Csv | Format::CsvWithNames | Format::Parquet => {
            let mut writer = arrow_csv::WriterBuilder::new()
                .with_header(header)
                .with_null("\\N".to_string())
                .with_timestamp_tz_format(DATETIME_FORMAT.to_string())
                .with_timestamp_format(DATETIME_FORMAT.to_string())
                .build(&mut out);
            writer.write(batch).map_err(failed)?;
        }
    }
    Ok(Bytes::from(out))
}

/// A DateTime literal as text, for tests of the encoders.
#[cfg(test)]
fn datetime_column(seconds: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(arrow::array::TimestampSecondArray::from(seconds).with_timezone("UTC"))
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::compute::cast;

    use super::*;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
            Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Second, Some("UTC".into())),
                true,
            ),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1, 2])),
                Arc::new(StringArray::from(vec![Some("a,b"), None])),
                datetime_column(vec![Some(1_736_942_400), None]),
            ],
        )
        .expect("batch")
    }

    fn text(format: Format, batches: &[RecordBatch]) -> String {
        let schema = batches[0].schema();
        let mut enc = Encoder::new(format, &schema).expect("encoder");
        let mut out = Vec::new();
        for b in batches {
            out.extend_from_slice(&enc.batch(b).expect("batch"));
        }
        out.extend_from_slice(&enc.finish(&schema).expect("finish"));
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn text_formats_write_clickhouse_datetimes_and_nulls() {
        let b = batch();
        assert_eq!(
            text(Format::JsonEachRow, std::slice::from_ref(&b)),
            "{\"n\":1,\"s\":\"a,b\",\"t\":\"2025-01-15 12:00:00\"}\n{\"n\":2,\"s\":null,\"t\":null}\n"
        );
        assert_eq!(
            text(Format::CsvWithNames, &[b.clone(), b.clone()]),
            "n,s,t\n1,\"a,b\",2025-01-15 12:00:00\n2,\\N,\\N\n1,\"a,b\",2025-01-15 12:00:00\n2,\\N,\\N\n"
        );
        let empty = RecordBatch::new_empty(b.schema());
        assert_eq!(text(Format::CsvWithNames, &[empty]), "n,s,t\n");
    }

    #[test]
    fn parquet_answers_read_back_with_millisecond_datetimes() {
        let b = batch();
        let mut enc = Encoder::new(Format::Parquet, &b.schema()).expect("encoder");
        let mut out = enc.batch(&b).expect("batch").to_vec();
        out.extend_from_slice(&enc.finish(&b.schema()).expect("finish"));
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            Bytes::from(out),
        )
        .expect("parquet")
        .build()
        .expect("reader");
        let batches = reader.collect::<Result<Vec<_>, _>>().expect("rows");
        let back = cast(
            batches[0].column(2),
            &DataType::Timestamp(TimeUnit::Second, Some("UTC".into())),
        )
        .expect("cast");
        assert_eq!(
            back.as_ref(),
            datetime_column(vec![Some(1_736_942_400), None]).as_ref()
        );
    }
}
