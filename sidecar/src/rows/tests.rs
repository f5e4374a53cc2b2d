//! Decoder errors, partition ids, sorting and encoder round trips.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int32Array, Int64Array, RecordBatch, StringArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, UInt64Type};
use rtable_protocol::hash::sip128;
use rtable_protocol::schema::TableSchema;

use super::test_util::schema;
use super::*;

fn table() -> TableSchema {
    schema(
        &[
            ("id", "UInt64"),
            ("name", "String"),
            ("score", "Nullable(Float64)"),
            ("day", "Date"),
            ("ts", "DateTime"),
            ("ok", "Bool"),
            ("delta", "Int8"),
        ],
        &["id"],
        "",
    )
}

fn json(body: &str) -> Result<RecordBatch, InputError> {
    decode(InputFormat::JsonEachRow, body.as_bytes(), &table())
}

fn csv(body: &str) -> Result<RecordBatch, InputError> {
    decode(InputFormat::Csv, body.as_bytes(), &table())
}

const ROW1: &str = r#"{"id": 1, "name": "a", "score": 1.5, "day": "2024-05-01", "ts": "2024-05-01 10:00:00", "ok": true, "delta": -3}"#;
const ROW2: &str =
    r#"{"id": 2, "name": "b\"q", "day": "1970-01-01", "ts": 0, "ok": false, "delta": 127}"#;

fn err_json(body: &str) -> InputError {
    json(body).expect_err("should be refused")
}

#[test]
fn json_rows_decode_with_every_type() {
    let b = json(&format!("{ROW1}\n\n{ROW2}\r\n")).expect("valid");
    assert_eq!(b.num_rows(), 2);
    assert_eq!(b.schema(), arrow_schema(&table()));
    assert_eq!(b.column(0).as_primitive::<UInt64Type>().values(), &[1, 2]);
    let score = b.column(2);
    assert!(score.is_valid(0) && score.is_null(1));
    let days = b.column(3).as_primitive::<arrow::datatypes::Date32Type>();
    assert_eq!(days.value(0), 19_844);
    assert_eq!(days.value(1), 0);
    let ts = b
        .column(4)
        .as_primitive::<arrow::datatypes::TimestampSecondType>();
    assert_eq!(ts.value(0), 1_714_557_600);
    assert_eq!(ts.value(1), 0);
}

#[test]
fn json_unknown_key_names_key_line_and_columns() {
    let e = err_json(&format!("{ROW1}\n{ROW2}\n{{\"id\": 3, \"x\": 1}}"));
    assert_eq!(e.line, Some(3));
    assert_eq!(e.column.as_deref(), Some("x"));
    assert_eq!(
        e.message,
        "unknown column `x` on line 3; the table's columns are id, name, score, day, ts, ok, delta"
    );
}

#[test]
fn json_missing_and_null_non_nullable_columns_are_refused() {
    let e = err_json(r#"{"id": 1, "name": "a", "day": "2024-05-01", "ts": 0, "ok": true}"#);
    assert_eq!((e.line, e.column.as_deref()), (Some(1), Some("delta")));
    assert!(e.message.contains("missing column `delta`"), "{e}");
    let e = err_json(
        r#"{"id": null, "name": "a", "day": "2024-05-01", "ts": 0, "ok": true, "delta": 1}"#,
    );
    assert_eq!(e.column.as_deref(), Some("id"));
    assert!(e.message.contains("not Nullable"), "{e}");
}

fn with(key: &str, value: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(ROW1).expect("row");
    v[key] = serde_json::from_str(value).expect("value");
    v.to_string()
}

#[test]
fn json_wrong_values_name_line_column_and_value() {
    for (key, value, needle) in [
        ("id", r#""12""#, "got a string \"12\""),
        ("id", "-1", "negative value -1"),
        ("id", "18446744073709551616", "out of range"),
        ("id", "1.5", "not an integer"),
        ("delta", "128", "128 is out of range for Int8"),
        (
            "day",
            r#""2024-13-01""#,
            "\"2024-13-01\" is not a valid Date",
        ),
        ("day", r#""1969-12-31""#, "not a valid Date"),
        ("ts", r#""2024-05-01""#, "not a valid DateTime"),
        ("ts", "-5", "not a valid DateTime"),
        ("ok", r#""yes""#, "Bool"),
        ("name", "5", "expected a JSON string"),
        ("score", r#""x""#, "expected a JSON number"),
    ] {
        let body = format!("{ROW2}\n{}", with(key, value));
        let e = err_json(&body);
        assert_eq!(e.line, Some(2), "{key}={value}: {e}");
        assert_eq!(e.column.as_deref(), Some(key), "{key}={value}: {e}");
        assert!(e.message.contains(needle), "{key}={value}: {e}");
        assert!(e.message.contains("line 2"), "{e}");
    }
}

#[test]
fn json_accepts_datetime_as_seconds_and_iso() {
    let b = json(&with("ts", r#""2024-05-01T10:00:00Z""#)).expect("valid");
    let ts = b
        .column(4)
        .as_primitive::<arrow::datatypes::TimestampSecondType>();
    assert_eq!(ts.value(0), 1_714_557_600);
    let b = json(&with("ts", "1714557600")).expect("valid");
    assert_eq!(b.num_rows(), 1);
}

#[test]
fn malformed_json_duplicate_keys_and_non_objects_give_the_line() {
    let e = err_json(&format!("{ROW1}\n{{\"id\": 1,"));
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("malformed JSON on line 2"), "{e}");
    let e = err_json("[1, 2]");
    assert_eq!(e.line, Some(1));
    let e = err_json(&ROW1.replace("\"name\": \"a\"", "\"name\": \"a\", \"name\": \"b\""));
    assert!(e.message.contains("appears twice"), "{e}");
}

#[test]
fn empty_bodies_are_refused_in_every_format() {
    for f in [
        InputFormat::JsonEachRow,
        InputFormat::Csv,
        InputFormat::CsvWithNames,
        InputFormat::Parquet,
    ] {
        let e = decode(f, b" \n", &table()).expect_err("empty");
        assert_eq!(e.message, "empty body: send at least one row");
    }
    let header_only = "id,name,score,day,ts,ok,delta\n";
    let e = decode(InputFormat::CsvWithNames, header_only.as_bytes(), &table()).expect_err("e");
    assert_eq!(e.message, "empty body: send at least one row");
}

#[test]
fn csv_decodes_nulls_quotes_and_checks_field_counts() {
    let b = csv("1,\"a,b\",\\N,2024-05-01,2024-05-01 10:00:00,true,-1\n2,\"\",,1970-01-02,5,0,0\n")
        .expect("valid");
    assert_eq!(b.num_rows(), 2);
    assert_eq!(b.column(1).as_string::<i32>().value(0), "a,b");
    assert_eq!(b.column(1).as_string::<i32>().value(1), "");
    assert_eq!(b.column(2).null_count(), 2);
    let e = csv("1,a,1,2024-05-01,0,true,1\n2,b,1,2024-05-01,0,true\n").expect_err("short");
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("has 6 fields"), "{e}");
    let e = csv("1,a,1,2024-05-01,0,maybe,1\n").expect_err("bool");
    assert_eq!((e.line, e.column.as_deref()), (Some(1), Some("ok")));
    let e = csv("\\N,a,1,2024-05-01,0,true,1\n").expect_err("null id");
    assert_eq!(e.column.as_deref(), Some("id"));
    let e = csv(",a,1,2024-05-01,0,true,1\n").expect_err("empty id");
    assert!(e.message.contains("not a number"), "{e}");
    let e = csv("1,a,1,2024-05-01,0,true,-129\n").expect_err("range");
    assert!(e.message.contains("-129 is out of range for Int8"), "{e}");
}

#[test]
fn csv_with_names_maps_columns_by_header() {
    let body = "delta,ok,ts,day,score,name,id\n-1,1,0,2024-05-01,2.5,x,7\n";
    let b = decode(InputFormat::CsvWithNames, body.as_bytes(), &table()).expect("valid");
    assert_eq!(b.column(0).as_primitive::<UInt64Type>().value(0), 7);
    assert_eq!(b.column(1).as_string::<i32>().value(0), "x");
    let e = decode(
        InputFormat::CsvWithNames,
        b"id,name,score,day,ts,ok,delta,extra\n",
        &table(),
    )
    .expect_err("unknown");
    assert_eq!(e.column.as_deref(), Some("extra"));
    assert!(e.message.contains("unknown column `extra`"), "{e}");
    let e = decode(
        InputFormat::CsvWithNames,
        b"id,name,score,day,ts,ok\n1,a,1,2024-05-01,0,true\n",
        &table(),
    )
    .expect_err("missing");
    assert_eq!(e.column.as_deref(), Some("delta"));
    let e = decode(
        InputFormat::CsvWithNames,
        b"id,id,score,day,ts,ok,delta\n",
        &table(),
    )
    .expect_err("dup");
    assert!(e.message.contains("twice"), "{e}");
}

#[test]
fn format_names_parse_and_list_alternatives() {
    assert_eq!(
        InputFormat::parse("JSONEachRow"),
        Ok(InputFormat::JsonEachRow)
    );
    assert_eq!(
        InputFormat::parse("csvwithnames"),
        Ok(InputFormat::CsvWithNames)
    );
    assert_eq!(InputFormat::parse("Parquet"), Ok(InputFormat::Parquet));
    let e = InputFormat::parse("TSV").expect_err("unknown");
    assert!(
        e.message
            .contains("JSONEachRow, CSV, CSVWithNames, Parquet"),
        "{e}"
    );
    assert_eq!(OutputFormat::parse("CSV"), Ok(OutputFormat::Csv));
    assert!(OutputFormat::parse("XML").is_err());
    assert!(OutputFormat::Parquet.content_type().contains("parquet"));
    let json = serde_json::to_value(&e).expect("serializes");
    assert_eq!(json["line"], serde_json::Value::Null);
    assert!(json["error"].as_str().is_some_and(|m| m.contains("TSV")));
}

fn parquet_bytes(batch: &RecordBatch) -> Vec<u8> {
    let mut out = ParquetOutput::new(Vec::new(), batch.schema()).expect("writer");
    out.write(batch).expect("write");
    out.finish().expect("finish")
}

#[test]
fn parquet_round_trips_and_casts_by_name() {
    let original = json(&format!("{ROW1}\n{ROW2}")).expect("valid");
    let back = decode(InputFormat::Parquet, &parquet_bytes(&original), &table()).expect("valid");
    assert_eq!(back, original);

    let small = schema(&[("a", "UInt64"), ("b", "Nullable(String)")], &[], "");
    let file = RecordBatch::try_from_iter(vec![
        (
            "b",
            Arc::new(StringArray::from(vec![Some("x"), None])) as ArrayRef,
        ),
        ("a", Arc::new(Int32Array::from(vec![1, 2])) as ArrayRef),
    ])
    .expect("batch");
    let b = decode(InputFormat::Parquet, &parquet_bytes(&file), &small).expect("castable");
    assert_eq!(b.column(0).as_primitive::<UInt64Type>().values(), &[1, 2]);
    assert_eq!(b.schema(), arrow_schema(&small));
}

#[test]
fn parquet_errors_name_the_column() {
    let small = schema(&[("a", "UInt64"), ("b", "String")], &[], "");
    let file = |cols: Vec<(&str, ArrayRef)>| {
        parquet_bytes(&RecordBatch::try_from_iter(cols).expect("batch"))
    };
    let ints = |v: Vec<Option<i64>>| Arc::new(Int64Array::from(v)) as ArrayRef;
    let strs = || Arc::new(StringArray::from(vec!["x", "y"])) as ArrayRef;

    let e = decode(
        InputFormat::Parquet,
        &file(vec![
            ("a", ints(vec![Some(1), Some(2)])),
            ("b", strs()),
            ("c", strs()),
        ]),
        &small,
    )
    .expect_err("unknown");
    assert_eq!(e.column.as_deref(), Some("c"));
    let e = decode(InputFormat::Parquet, &file(vec![("b", strs())]), &small).expect_err("missing");
    assert_eq!(e.column.as_deref(), Some("a"));
    let e = decode(
        InputFormat::Parquet,
        &file(vec![("a", strs()), ("b", strs())]),
        &small,
    )
    .expect_err("type");
    assert_eq!(e.column.as_deref(), Some("a"));
    assert!(e.message.contains("cannot be stored as UInt64"), "{e}");
    let e = decode(
        InputFormat::Parquet,
        &file(vec![("a", ints(vec![Some(1), Some(-1)])), ("b", strs())]),
        &small,
    )
    .expect_err("negative");
    assert_eq!(e.column.as_deref(), Some("a"));
    let e = decode(
        InputFormat::Parquet,
        &file(vec![("a", ints(vec![Some(1), None])), ("b", strs())]),
        &small,
    )
    .expect_err("null");
    assert!(e.message.contains("null in row 2"), "{e}");
    let e = decode(InputFormat::Parquet, b"not parquet", &small).expect_err("junk");
    assert!(e.message.contains("not a readable Parquet file"), "{e}");
}

fn ids(parts: &[(String, RecordBatch)]) -> Vec<&str> {
    parts.iter().map(|(id, _)| id.as_str()).collect()
}

#[test]
fn partition_ids_follow_clickhouse() {
    let rows = format!("{ROW1}\n{ROW2}\n{}", with("delta", "-3"));
    let by = |key: &str| {
        let mut s = table();
        s.partition_by = key.parse().expect("key");
        let b = decode(InputFormat::JsonEachRow, rows.as_bytes(), &s).expect("valid");
        partition_split(&b, &s).expect("split")
    };
    let all = by("");
    assert_eq!(ids(&all), ["all"]);
    assert_eq!(all[0].1.num_rows(), 3);

    let p = by("delta");
    assert_eq!(ids(&p), ["-3", "127"]);
    // Rows keep input order inside a partition.
    let first = p[0].1.column(0).as_primitive::<UInt64Type>();
    assert_eq!(first.values(), &[1, 1]);

    assert_eq!(ids(&by("day")), ["19700101", "20240501"]);
    assert_eq!(ids(&by("toYYYYMM(ts)")), ["197001", "202405"]);
    assert_eq!(ids(&by("toYYYYMMDD(day)")), ["19700101", "20240501"]);
    assert_eq!(ids(&by("ts")), ["0", "1714557600"]);
    assert_eq!(ids(&by("ok")), ["0", "1"]);
    let names = by("name");
    let mut want = [sip128(b"a").to_hex(), sip128(b"b\"q").to_hex()];
    want.sort();
    assert_eq!(
        ids(&names),
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for (id, _) in names {
        assert!(rtable_protocol::part_name::is_valid_partition_id(&id));
    }
}

#[test]
fn null_partition_values_are_refused() {
    // The schema forbids a Nullable partition column; a hand-made batch still gets an error.
    let s = schema(&[("k", "Int64")], &[], "k");
    let field = Field::new("k", DataType::Int64, true);
    let b = RecordBatch::try_new(
        Arc::new(Schema::new(vec![field])),
        vec![Arc::new(Int64Array::from(vec![Some(1), None]))],
    )
    .expect("batch");
    let e = partition_split(&b, &s).expect_err("null");
    assert_eq!(e.column.as_deref(), Some("k"));
    assert!(e.message.contains("row 2"), "{e}");
}

#[test]
fn sort_is_stable_and_nulls_first() {
    let b = RecordBatch::try_from_iter(vec![
        (
            "k",
            Arc::new(Int64Array::from(vec![
                Some(2),
                None,
                Some(1),
                Some(2),
                Some(1),
            ])) as ArrayRef,
        ),
        (
            "v",
            Arc::new(UInt64Array::from(vec![0, 1, 2, 3, 4])) as ArrayRef,
        ),
    ])
    .expect("batch");
    let sorted = sort_by_key(&b, &["k".to_string()]).expect("sort");
    let v = sorted.column(1).as_primitive::<UInt64Type>();
    assert_eq!(v.values(), &[1, 2, 4, 0, 3]);
    let two = sort_by_key(&b, &["k".to_string(), "v".to_string()]).expect("sort");
    assert_eq!(
        two.column(1).as_primitive::<UInt64Type>().values(),
        &[1, 2, 4, 0, 3]
    );
    assert!(sort_by_key(&b, &["nope".to_string()]).is_err());
    assert_eq!(sort_by_key(&b, &[]).expect("noop"), b);
}

#[test]
fn json_output_is_clickhouse_shaped_and_round_trips() {
    let b = json(&format!("{ROW1}\n{ROW2}")).expect("valid");
    let mut out = Vec::new();
    encode_text(OutputFormat::JsonEachRow, &b, &mut out, true).expect("encode");
    let text = String::from_utf8(out.clone()).expect("utf8");
    assert_eq!(
        text,
        "{\"id\":1,\"name\":\"a\",\"score\":1.5,\"day\":\"2024-05-01\",\"ts\":\"2024-05-01 10:00:00\",\"ok\":true,\"delta\":-3}\n\
         {\"id\":2,\"name\":\"b\\\"q\",\"score\":null,\"day\":\"1970-01-01\",\"ts\":\"1970-01-01 00:00:00\",\"ok\":false,\"delta\":127}\n"
    );
    let back = decode(InputFormat::JsonEachRow, &out, &table()).expect("decodes");
    assert_eq!(back, b);
    let big = schema(&[("u", "UInt64")], &[], "");
    let b = json_for(&big, r#"{"u": 18446744073709551615}"#);
    let mut out = Vec::new();
    encode_text(OutputFormat::JsonEachRow, &b, &mut out, true).expect("encode");
    assert_eq!(out, b"{\"u\":18446744073709551615}\n");
}

fn json_for(s: &TableSchema, body: &str) -> RecordBatch {
    decode(InputFormat::JsonEachRow, body.as_bytes(), s).expect("valid")
}

#[test]
fn csv_output_round_trips_and_writes_the_header_once() {
    let b = json(&format!("{ROW1}\n{ROW2}")).expect("valid");
    let mut out = Vec::new();
    encode_text(OutputFormat::CsvWithNames, &b, &mut out, true).expect("encode");
    encode_text(OutputFormat::CsvWithNames, &b, &mut out, false).expect("encode");
    let text = String::from_utf8(out.clone()).expect("utf8");
    assert_eq!(text.matches("\"id\"").count(), 1);
    assert!(text.contains("2,\"b\"\"q\",\\N,\"1970-01-01\",\"1970-01-01 00:00:00\",false,127\n"));
    let back = decode(InputFormat::CsvWithNames, &out, &table()).expect("decodes");
    assert_eq!(back.num_rows(), 4);
    assert_eq!(back.slice(0, 2), b);

    let mut plain = Vec::new();
    encode_text(OutputFormat::Csv, &b, &mut plain, true).expect("encode");
    assert_eq!(
        decode(InputFormat::Csv, &plain, &table()).expect("decodes"),
        b
    );

    let mut header = Vec::new();
    let empty = RecordBatch::new_empty(arrow_schema(&table()));
    encode_text(OutputFormat::CsvWithNames, &empty, &mut header, true).expect("encode");
    assert_eq!(
        header,
        b"\"id\",\"name\",\"score\",\"day\",\"ts\",\"ok\",\"delta\"\n"
    );
    assert!(encode_text(OutputFormat::Parquet, &b, &mut header, true).is_err());
}

#[test]
fn parquet_output_streams_row_groups_and_is_deterministic() {
    let b = json(&format!("{ROW1}\n{ROW2}")).expect("valid");
    let mut out = ParquetOutput::new(Vec::new(), arrow_schema(&table())).expect("writer");
    let mut streamed = Vec::new();
    for _ in 0..3 {
        out.write(&b).expect("write");
        out.flush().expect("flush");
        streamed.extend(out.take_bytes());
    }
    streamed.extend(out.finish().expect("finish"));
    let back = decode(InputFormat::Parquet, &streamed, &table()).expect("readable");
    assert_eq!(back.num_rows(), 6);
    assert_eq!(parquet_bytes(&b), parquet_bytes(&b));
}

#[test]
fn parquet_files_store_datetime_as_milliseconds_and_read_back_as_seconds() {
    let b = json(ROW1).expect("valid");
    let bytes = parquet_bytes(&b);
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(bytes.clone()),
    )
    .expect("reader");
    assert_eq!(
        reader
            .schema()
            .field_with_name("ts")
            .expect("ts")
            .data_type(),
        &DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()))
    );
    let stored: Vec<RecordBatch> = reader
        .build()
        .expect("build")
        .collect::<Result<_, _>>()
        .expect("read");
    assert_eq!(from_storage(&stored[0]).expect("convert"), b);
    assert_eq!(to_storage(&b).expect("convert"), stored[0]);

    // Integer seconds in a client's Parquet file are accepted for DateTime.
    let s = schema(&[("ts", "DateTime")], &[], "");
    let file = RecordBatch::try_from_iter(vec![(
        "ts",
        Arc::new(UInt64Array::from(vec![86_400u64])) as ArrayRef,
    )])
    .expect("batch");
    let got = decode(InputFormat::Parquet, &parquet_bytes(&file), &s).expect("castable");
    let ts = got
        .column(0)
        .as_primitive::<arrow::datatypes::TimestampSecondType>();
    assert_eq!(ts.value(0), 86_400);
}
