//! The engine over real Parquet files written the way the sidecar writes parts.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayRef, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures::StreamExt;
use parquet::arrow::ArrowWriter;

use crate::{Engine, Format, Limits, QueryError, TableSnapshot};

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("user_id", DataType::UInt64, false),
        Field::new("event", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
    ]))
}

/// One part: rows `first..first+n`, one per hour from 2025-01-31 00:00 UTC.
fn write_part(dir: &std::path::Path, name: &str, first: u64, n: u64) -> std::path::PathBuf {
    let base = 1_738_281_600_000i64;
    let ids: Vec<u64> = (first..first + n).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMillisecondArray::from(
                ids.iter()
                    .map(|i| base + *i as i64 * 3_600_000)
                    .collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(UInt64Array::from(ids.clone())),
        Arc::new(StringArray::from(
            ids.iter()
                .map(|i| if i % 2 == 0 { "click" } else { "view" })
                .collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            ids.iter()
                .map(|i| (i % 3 != 0).then_some(*i as f64 / 2.0))
                .collect::<Vec<_>>(),
        )),
    ];
    let batch = RecordBatch::try_new(schema(), columns).expect("batch");
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create");
    let mut writer = ArrowWriter::try_new(file, schema(), None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    path
}

fn limits(memory_bytes: usize) -> Limits {
    Limits {
        memory_bytes,
        timeout: Duration::from_secs(30),
        max_concurrent: 2,
        threads: 2,
    }
}

async fn answer(engine: &Engine, table: &TableSnapshot, sql: &str) -> Result<String, QueryError> {
    let answer = engine
        .run(sql, Format::JsonEachRow, table.clone(), ())
        .await?;
    let mut out = Vec::new();
    let mut body = answer.body;
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(String::from_utf8(out).expect("utf-8"))
}

fn table(dir: &std::path::Path) -> TableSnapshot {
    TableSnapshot {
        name: "events".into(),
        schema: schema(),
        order_by: vec!["user_id".into()],
        files: vec![
            write_part(dir, "a.parquet", 0, 48),
            write_part(dir, "b.parquet", 48, 24),
        ],
    }
}

#[tokio::test]
async fn aggregates_and_clickhouse_functions_over_two_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table(dir.path());
    let engine = Engine::new(limits(64 << 20)).expect("engine");
    let out = answer(
        &engine,
        &table,
        "SELECT toYYYYMM(ts) AS m, count() AS n, uniqExact(event) AS kinds, sum(user_id) AS s \
         FROM events GROUP BY m ORDER BY m",
    )
    .await
    .expect("query");
    assert_eq!(
        out,
        "{\"m\":202501,\"n\":24,\"kinds\":2,\"s\":276}\n{\"m\":202502,\"n\":48,\"kinds\":2,\"s\":2280}\n"
    );
    let out = answer(
        &engine,
        &table,
        "SELECT toStartOfHour(ts) AS h, toDate(ts) AS d, toYYYYMMDD(ts) AS day, value \
         FROM events WHERE user_id = 50 FORMAT CSVWithNames",
    )
    .await
    .expect("query");
    assert_eq!(
        out,
        "h,d,day,value\n2025-02-02 02:00:00,2025-02-02,20250202,25.0\n"
    );
    let out = answer(
        &engine,
        &table,
        "SELECT count(*) AS n FROM events WHERE value IS NULL",
    )
    .await
    .expect("query");
    assert_eq!(out, "{\"n\":24}\n");
}

#[tokio::test]
async fn refusals_and_engine_errors_name_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table(dir.path());
    let engine = Engine::new(limits(64 << 20)).expect("engine");
    let e = answer(&engine, &table, "SELECT nope FROM events")
        .await
        .expect_err("unknown column");
    assert_eq!(e.status(), 400);
    assert!(e.to_string().contains("nope"), "{e}");
    assert!(e.to_string().contains("line 1, column 8"), "{e}");
    let e = answer(&engine, &table, "DROP TABLE events")
        .await
        .expect_err("DDL");
    assert!(e.to_string().contains("DROP TABLE is not allowed"), "{e}");
    let e = answer(&engine, &table, "SELECT * FROM events FORMAT TSV")
        .await
        .expect_err("format");
    assert!(e.to_string().contains("unknown format `TSV`"), "{e}");
}

#[tokio::test]
async fn a_query_over_its_memory_limit_fails_and_the_next_one_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table(dir.path());
    let engine = Engine::new(limits(4 << 10)).expect("engine");
    let e = answer(
        &engine,
        &table,
        "SELECT user_id, event, count() FROM events GROUP BY user_id, event ORDER BY event, user_id DESC",
    )
    .await
    .expect_err("over the limit");
    assert!(matches!(e, QueryError::MemoryLimit { .. }), "{e}");
    let out = answer(&engine, &table, "SELECT count() AS n FROM events")
        .await
        .expect("a small query after it");
    assert_eq!(out, "{\"n\":72}\n");
}

#[tokio::test]
async fn the_queries_docs_query_md_shows_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = table(dir.path());
    let engine = Engine::new(limits(64 << 20)).expect("engine");
    for sql in [
        "SELECT toDate(ts) AS day, count() AS n, uniqExact(user_id) AS users FROM events GROUP BY day ORDER BY day",
        "SELECT * FROM events WHERE user_id = 42 ORDER BY ts",
        "SELECT count() FROM events WHERE ts >= today() - INTERVAL 1 DAY AND ts < today()",
        "SELECT event, count() AS n, sum(value) AS total FROM events GROUP BY event ORDER BY n DESC LIMIT 10",
        "SELECT toYYYYMM(ts) AS month, count(), avg(value) FROM events GROUP BY month ORDER BY month",
        "SELECT count(*), count(value), sum(CASE WHEN value IS NULL THEN 1 ELSE 0 END) FROM events",
    ] {
        let out = answer(&engine, &table, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert!(!out.is_empty(), "{sql}");
    }
    let e = answer(
        &engine,
        &table,
        "SELECT count(), countIf(value IS NULL) FROM events",
    )
    .await
    .expect_err("countIf is ClickHouse's, not DataFusion's");
    assert!(e.to_string().contains("Invalid function 'countif'"), "{e}");
}
