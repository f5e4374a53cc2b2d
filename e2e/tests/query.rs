//! SQL reads (`/query` and ClickHouse's `/?query=`) on real sidecars over a real
//! ZooKeeper: answers compared with DuckDB reading the same part files, one snapshot
//! per query while inserts and merges go on, the memory limit, refusals, and
//! ClickHouse's HTTP shape for INSERT and SELECT.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::{CONVERGE, python, rows};
use rtable_e2e::client::{json_lines, metric_value};
use rtable_e2e::{Cluster, ClusterOptions, serial};
use serde_json::{Value, json};

async fn cluster(opts: ClusterOptions) -> Cluster {
    Cluster::start(opts).await.expect("cluster starts")
}

/// A table with a column of every type the sidecar supports.
fn all_types_manifest(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("alltypes.yaml");
    std::fs::write(
        &path,
        r#"apiVersion: rtable.io/v1alpha1
kind: ReplicatedTable
metadata:
  name: alltypes
  namespace: default
spec:
  zookeeper:
    nodes: ["zk-0.zk.default.svc:2181"]
    sessionTimeoutSeconds: 30
  shard: "01"
  columns:
    - {name: ts, type: DateTime}
    - {name: id, type: UInt64}
    - {name: u8, type: UInt8}
    - {name: u16, type: UInt16}
    - {name: u32, type: UInt32}
    - {name: i8, type: Int8}
    - {name: i16, type: Int16}
    - {name: i32, type: Int32}
    - {name: i64, type: Int64}
    - {name: f32, type: Float32}
    - {name: f64, type: Float64}
    - {name: s, type: String}
    - {name: b, type: Bool}
    - {name: d, type: Date}
    - {name: maybe_s, type: "Nullable(String)"}
    - {name: maybe_i, type: "Nullable(Int32)"}
    - {name: maybe_ts, type: "Nullable(DateTime)"}
  orderBy: [id]
  partitionBy: "toYYYYMM(ts)"
  replicas: 2
  insertQuorum: 1
"#,
    )
    .expect("write the manifest");
    path
}

fn all_types_rows(first: u64, n: u64) -> Vec<Value> {
    (first..first + n)
        .map(|id| {
            let i = id as i64;
            json!({
                "ts": format!("2025-0{}-{:02} {:02}:{:02}:00", 1 + id % 2, 1 + id % 28, id % 24, id % 60),
                "id": id,
                "u8": id % 256,
                "u16": id * 7 % 65_536,
                "u32": id * 1000,
                "i8": i % 256 - 128,
                "i16": -i,
                "i32": i * 3 - 5000,
                "i64": i * -1_000_000_007,
                "f32": id as f64 / 8.0,
                "f64": id as f64 / 3.0,
                "s": format!("name-{}", id % 13),
                "b": id % 2 == 0,
                "d": format!("2025-01-{:02}", 1 + id % 28),
                "maybe_s": if id % 4 == 0 { Value::Null } else { json!(format!("m{}", id % 5)) },
                "maybe_i": if id % 3 == 0 { Value::Null } else { json!(i % 100 - 50) },
                "maybe_ts": if id % 5 == 0 { Value::Null } else { json!(format!("2025-03-01 00:00:{:02}", id % 60)) },
            })
        })
        .collect()
}

/// (rtable's SQL, DuckDB's SQL when it differs, whether the row order is part of the answer)
const CASES: &[(&str, Option<&str>, bool)] = &[
    // The ORDER BY key: a point and a range.
    (
        "SELECT count(), sum(i64), min(s) FROM alltypes WHERE id = 777",
        Some("SELECT count(*), sum(i64), min(s) FROM alltypes WHERE id = 777"),
        true,
    ),
    (
        "SELECT count(*), sum(u32), max(f64) FROM alltypes WHERE id >= 100 AND id < 900",
        None,
        true,
    ),
    // Other columns.
    (
        "SELECT count(*), sum(i32) FROM alltypes WHERE s = 'name-3'",
        None,
        true,
    ),
    (
        "SELECT count(*), avg(u16) FROM alltypes WHERE f32 BETWEEN 10 AND 20",
        None,
        true,
    ),
    (
        "SELECT count(*), min(ts), max(d) FROM alltypes WHERE d >= '2025-01-10' AND ts < '2025-02-15 00:00:00'",
        None,
        true,
    ),
    // GROUP BY, with ClickHouse's functions.
    (
        "SELECT toYYYYMMDD(ts) AS day, count(), sum(u8), min(i8), max(i16), avg(f64) FROM alltypes GROUP BY day ORDER BY day",
        Some(
            "SELECT CAST(strftime(ts, '%Y%m%d') AS INTEGER) AS day, count(*), sum(u8), min(i8), max(i16), avg(f64) FROM alltypes GROUP BY day ORDER BY day",
        ),
        true,
    ),
    (
        "SELECT toYYYYMM(ts) AS m, toDate(max(ts)) AS last, count() FROM alltypes GROUP BY m ORDER BY m",
        Some(
            "SELECT year(ts) * 100 + month(ts) AS m, CAST(max(ts) AS DATE) AS last, count(*) FROM alltypes GROUP BY m ORDER BY m",
        ),
        true,
    ),
    (
        "SELECT toStartOfHour(ts) AS h, count() FROM alltypes GROUP BY h ORDER BY h LIMIT 5",
        Some(
            "SELECT date_trunc('hour', ts) AS h, count(*) FROM alltypes GROUP BY h ORDER BY h LIMIT 5",
        ),
        true,
    ),
    (
        "SELECT uniqExact(s), uniqExact(maybe_s), uniqExact(u8) FROM alltypes",
        Some("SELECT count(DISTINCT s), count(DISTINCT maybe_s), count(DISTINCT u8) FROM alltypes"),
        true,
    ),
    (
        "SELECT b, count(*), sum(i64) FROM alltypes GROUP BY b ORDER BY b",
        None,
        true,
    ),
    (
        "SELECT s, count(*) AS n FROM alltypes GROUP BY s HAVING count(*) > 150 ORDER BY n DESC, s",
        None,
        true,
    ),
    // ORDER BY ... LIMIT (a top 10).
    (
        "SELECT id, s, f64 FROM alltypes ORDER BY f64 DESC, id LIMIT 10",
        None,
        true,
    ),
    // NULLs.
    (
        "SELECT count(*), count(maybe_s), count(maybe_i), sum(maybe_i), count(maybe_ts), min(maybe_ts) FROM alltypes",
        None,
        true,
    ),
    (
        "SELECT maybe_s, count(*) FROM alltypes GROUP BY maybe_s ORDER BY maybe_s NULLS FIRST",
        None,
        true,
    ),
    (
        "SELECT id FROM alltypes WHERE maybe_i IS NULL AND maybe_ts IS NOT NULL AND id < 100",
        None,
        false,
    ),
    // Every column's values as they come out.
    (
        "SELECT * FROM alltypes WHERE id IN (0, 1, 2, 3, 4, 5, 1999) ORDER BY id",
        None,
        true,
    ),
];

/// Compares each case's JSONEachRow answer with DuckDB's answer over `files`; prints
/// `ok <n>` or the cases that differ.
const COMPARE: &str = r#"
import datetime, decimal, json, sys
import duckdb
files, cases = json.load(open(sys.argv[1]))
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
con.execute("CREATE VIEW alltypes AS SELECT * FROM read_parquet(%s)" % json.dumps(files).replace('"', "'"))
def norm(v):
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, (float, decimal.Decimal)):
        return float('%.9g' % float(v))
    if isinstance(v, datetime.datetime):
        return v.astimezone(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')
    if isinstance(v, datetime.date):
        return v.isoformat()
    return repr(v)
bad = []
for ours_sql, duck_sql, ordered, answer in cases:
    theirs = [[norm(x) for x in row] for row in con.execute(duck_sql or ours_sql).fetchall()]
    ours = [[norm(x) for x in json.loads(line).values()] for line in answer.splitlines() if line]
    if not ordered:
        theirs.sort(key=repr)
        ours.sort(key=repr)
    if theirs != ours:
        bad.append({'sql': ours_sql, 'rtable': ours, 'duckdb': theirs})
print(json.dumps(bad, indent=1) if bad else 'ok %d' % len(cases))
"#;

#[tokio::test]
async fn queries_match_duckdb_reading_the_same_parts() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(ClusterOptions {
        replicas: 2,
        manifest: all_types_manifest(dir.path()),
        ..ClusterOptions::default()
    })
    .await;
    // Four inserts of 500 rows over two months: eight parts, fewer than a merge takes, so
    // the part files stay the same for both engines.
    for k in 0..4u64 {
        c.client(k as usize % 2)
            .insert_json(&all_types_rows(k * 500, 500))
            .await
            .expect("insert");
    }
    c.wait_converged_rows(2000, CONVERGE)
        .await
        .expect("converged");

    let mut cases = Vec::new();
    for (sql, duck, ordered) in CASES {
        let answer = c.client(1).query(sql, "JSONEachRow").await.expect("query");
        assert_eq!(answer.status, 200, "{sql}: {}", answer.text());
        cases.push(json!([sql, duck, ordered, answer.text()]));
    }
    let parts = c.client(1).status().await.expect("status").parts;
    assert_eq!(parts.len(), 8, "{parts:?}");
    let files: Vec<String> = parts
        .iter()
        .map(|p| {
            c.replicas[1]
                .data_dir()
                .join("parts")
                .join(p)
                .join("data.parquet")
                .display()
                .to_string()
        })
        .collect();
    let input = dir.path().join("cases.json");
    std::fs::write(&input, json!([files, cases]).to_string()).expect("write the cases");
    let script = dir.path().join("compare.py");
    std::fs::write(&script, COMPARE).expect("write the script");
    let out = python(&format!(
        "import runpy, sys; sys.argv = ['compare', '{}']; runpy.run_path('{}', run_name='__main__')",
        input.display(),
        script.display()
    ));
    assert_eq!(out, format!("ok {}", CASES.len()));

    // The parts are declared sorted by the key: a point lookup on it skips the row groups
    // that cannot hold it by their statistics, the same lookup on other columns reads them.
    // (Parts this small are mostly footer, which both read: the ratio is the bench's.)
    let mut scanned = Vec::new();
    for sql in [
        "SELECT count(*), sum(i64) FROM alltypes WHERE id = 777",
        "SELECT count(*), sum(i64) FROM alltypes WHERE s = 'name-10' AND u8 = 9",
    ] {
        let before = c
            .client(1)
            .metric("rtable_query_bytes_scanned_total")
            .await
            .expect("metrics");
        let answer = c.client(1).query(sql, "CSV").await.expect("query");
        assert_eq!(answer.text(), "1,-777000005439\n", "{sql}");
        let after = c
            .client(1)
            .metric("rtable_query_bytes_scanned_total")
            .await
            .expect("metrics");
        scanned.push(after.unwrap_or(0.0) - before.unwrap_or(0.0));
    }
    eprintln!(
        "bytes read from parts: key point lookup {}, non-key lookup {}",
        scanned[0], scanned[1]
    );
    assert!(
        scanned[0] > 0.0 && scanned[0] < scanned[1],
        "bytes read: key {} vs non-key {}",
        scanned[0],
        scanned[1]
    );

    // The other formats of the same answer.
    let csv = c
        .client(0)
        .query(
            "SELECT id, s, maybe_s, ts, d, b FROM alltypes WHERE id < 2 ORDER BY id",
            "CSVWithNames",
        )
        .await
        .expect("CSVWithNames");
    assert_eq!(
        csv.text(),
        "id,s,maybe_s,ts,d,b\n0,name-0,\\N,2025-01-01 00:00:00,2025-01-01,true\n1,name-1,m1,2025-02-02 01:01:00,2025-01-02,false\n"
    );
    let parquet = c
        .client(0)
        .query(
            "SELECT id, ts, maybe_ts FROM alltypes WHERE id < 10",
            "Parquet",
        )
        .await
        .expect("Parquet");
    assert_eq!(parquet.status, 200);
    let file = dir.path().join("answer.parquet");
    std::fs::write(&file, &parquet.body).expect("write the answer");
    let out = python(&format!(
        "import duckdb; duckdb.execute(\"SET TimeZone = 'UTC'\"); print(duckdb.sql(\"SELECT count(*), sum(id), strftime(min(ts), '%Y-%m-%d %H:%M:%S'), count(maybe_ts) FROM read_parquet('{}')\").fetchall()[0])",
        file.display()
    ));
    assert_eq!(out, "(10, 45, '2025-01-01 00:00:00', 8)");

    // Refused statements and bad queries: 400 with what is wrong and where.
    for (sql, expected) in [
        ("DROP TABLE alltypes", "DROP TABLE is not allowed"),
        (
            "INSERT INTO alltypes SELECT * FROM alltypes",
            "INSERT is not allowed here: send rows to POST /insert",
        ),
        (
            "SELECT * FROM events",
            "only table `alltypes` can be read here: `events` is not it",
        ),
        (
            "SELECT * FROM read_parquet('/etc/passwd')",
            "`read_parquet` is not it",
        ),
        ("COPY (SELECT 1) TO '/tmp/out.csv'", "COPY is not allowed"),
        ("SET max_threads = 1", "SET is not allowed"),
        ("SELECT 1; DROP TABLE alltypes", "exactly one SELECT"),
        ("SELECT nope FROM alltypes", "line 1, column 8"),
        ("SELECT count( FROM alltypes", "Line: 1, Column"),
        ("SELECT * FROM alltypes FORMAT TSV", "unknown format `TSV`"),
    ] {
        let answer = c.client(0).query(sql, "JSONEachRow").await.expect("query");
        assert_eq!(answer.status, 400, "{sql}: {}", answer.text());
        let error = answer.json().expect("a JSON error")["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(error.contains(expected), "{sql}: {error}");
    }
    let get = c
        .client(0)
        .get("/query?sql=SELECT%20count(*)%20AS%20n%20FROM%20alltypes%20FORMAT%20CSV")
        .await
        .expect("GET /query");
    assert_eq!((get.status, get.text()), (200, "2000\n".to_string()));

    // ClickHouse's HTTP interface: INSERT with the rows as the body, SELECT, errors.
    let body = json_lines(&all_types_rows(5000, 3));
    let insert = c
        .client(0)
        .clickhouse("INSERT INTO alltypes FORMAT JSONEachRow", body)
        .await
        .expect("ClickHouse INSERT");
    assert_eq!(insert.status, 200, "{}", insert.text());
    let count = c
        .client(0)
        .clickhouse(
            "SELECT count() FROM alltypes WHERE id >= 5000 FORMAT CSV",
            "",
        )
        .await
        .expect("ClickHouse SELECT");
    assert_eq!((count.status, count.text()), (200, "3\n".to_string()));
    let inline = c
        .client(1)
        .clickhouse(
            "INSERT INTO alltypes FORMAT CSV",
            "2025-01-03 00:00:00,6000,1,2,3,-4,-5,-6,-7,0.5,0.25,csv,true,2025-01-03,\\N,\\N,\\N\n",
        )
        .await
        .expect("ClickHouse CSV INSERT");
    assert_eq!(inline.status, 200, "{}", inline.text());
    for (query, expected) in [
        (
            "DROP TABLE alltypes",
            "Code: 164. DB::Exception: DROP TABLE is not allowed",
        ),
        (
            "INSERT INTO events FORMAT CSV",
            "Code: 60. DB::Exception: Table events does not exist",
        ),
        (
            "INSERT INTO alltypes VALUES (1)",
            "Code: 62. DB::Exception: INSERT ... VALUES is not supported",
        ),
        ("SELECT nope FROM alltypes", "Code: 47. DB::Exception:"),
    ] {
        let answer = c.client(1).clickhouse(query, "").await.expect("ClickHouse");
        assert!(
            answer.text().starts_with(expected),
            "{query}: {} {}",
            answer.status,
            answer.text()
        );
    }
    let ping = c.client(1).get("/").await.expect("GET /");
    assert_eq!((ping.status, ping.text()), (200, "Ok.\n".to_string()));
    c.wait_converged_rows(2004, CONVERGE)
        .await
        .expect("the ClickHouse-shaped inserts replicate");

    let metrics = c.client(0).metrics().await.expect("metrics");
    let failed = metrics
        .lines()
        .find(|l| l.starts_with("rtable_queries_failed_total{") && l.contains("kind=\"refused\""))
        .unwrap_or_default()
        .to_string();
    assert!(failed.ends_with(" 8"), "{failed}");
    assert!(
        metric_value(&metrics, "rtable_queries_succeeded_total").unwrap_or(0.0) >= 4.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_query_sees_one_snapshot_while_inserts_and_merges_go_on() {
    let _serial = serial();
    let c = cluster(ClusterOptions {
        replicas: 2,
        ..ClusterOptions::default()
    })
    .await;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let client = c.client(0).clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            // 60 inserts of 10 rows each over two partitions: parts merge as they come.
            for k in 0..60u64 {
                client.insert_json(&rows(k * 10, 10)).await.expect("insert");
                acked.store((k + 1) * 10, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let mut checked = 0;
    let mut last = 0;
    while !writer.is_finished() || checked < 5 {
        let before = acked.load(std::sync::atomic::Ordering::SeqCst);
        let answer = c
            .client(0)
            .query(
                "SELECT count(*) AS n, count(DISTINCT user_id) AS ids, sum(user_id) AS s, max(user_id) AS top FROM events",
                "JSONEachRow",
            )
            .await
            .expect("query");
        assert_eq!(answer.status, 200, "{}", answer.text());
        let row: Value = serde_json::from_str(answer.text().trim()).expect("one row");
        let n = row["n"].as_u64().unwrap_or(0);
        let ids = row["ids"].as_u64().unwrap_or(0);
        // One snapshot: every row once (a merged part never next to its sources), whole
        // inserts only, nothing acknowledged before the query missing, and the ids are
        // exactly 0..n (inserts are acknowledged in order by one writer).
        assert_eq!(n, ids, "{row}");
        assert_eq!(n % 10, 0, "{row}");
        assert!(n >= before, "{row}: {before} acknowledged before the query");
        if n > 0 {
            assert_eq!(row["s"].as_u64(), Some(n * (n - 1) / 2), "{row}");
            assert_eq!(row["top"].as_u64(), Some(n - 1), "{row}");
        }
        assert!(
            n >= last,
            "{row}: fewer rows than the query before ({last})"
        );
        last = n;
        checked += 1;
    }
    writer.await.expect("writer");
    let merges = c
        .client(0)
        .metric("rtable_merges_total")
        .await
        .expect("metrics");
    assert!(
        merges.unwrap_or(0.0) >= 1.0,
        "no merge ran during the queries"
    );
    // Sequential consistency shows what /select shows with it: quorum-confirmed parts.
    let sequential = c
        .client(1)
        .get("/query?sql=SELECT%20count(*)%20FROM%20events%20FORMAT%20CSV&sequential_consistency=1")
        .await
        .expect("sequential");
    let select = c
        .client(1)
        .get("/select?format=CSV&sequential_consistency=1")
        .await
        .expect("sequential select");
    assert_eq!(sequential.status, select.status, "{}", sequential.text());
    if select.status == 200 {
        assert_eq!(
            sequential.text(),
            format!("{}\n", select.text().lines().count())
        );
    }
    eprintln!("{checked} queries checked during the inserts");
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test]
async fn a_query_over_the_memory_limit_fails_and_the_replica_keeps_serving() {
    let _serial = serial();
    let limit: u64 = 4 << 20;
    let c = cluster(ClusterOptions {
        replicas: 1,
        env: vec![("RTABLE_QUERY_MEMORY_LIMIT_BYTES".into(), limit.to_string())],
        ..ClusterOptions::default()
    })
    .await;
    for k in 0..4u64 {
        c.client(0)
            .insert_json(&rows(k * 50_000, 50_000))
            .await
            .expect("insert");
    }
    let pid = c.replicas[0].pid().expect("pid");
    let before = peak_rss_bytes(pid);
    let started = Instant::now();
    // Sorting every row by a non-key column holds them all: more than 4 MiB.
    let answer = c
        .client(0)
        .query(
            "SELECT user_id, event, value FROM events ORDER BY event DESC, value, ts",
            "JSONEachRow",
        )
        .await
        .expect("query");
    assert_eq!(answer.status, 503, "{}", answer.text());
    let error = answer.json().expect("JSON error")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("memory limit") && error.contains("--query-memory-limit-bytes"),
        "{error}"
    );
    let after = peak_rss_bytes(pid);
    eprintln!(
        "memory limit {limit} B: peak RSS {before} B before the query, {after} B after ({} ms)",
        started.elapsed().as_millis()
    );
    // The replica goes on serving: queries, inserts, readiness.
    let count = c
        .client(0)
        .query("SELECT count(*) AS n FROM events", "JSONEachRow")
        .await
        .expect("query");
    assert_eq!(count.text(), "{\"n\":200000}\n");
    c.client(0)
        .insert_json(&rows(900_000, 5))
        .await
        .expect("insert after");
    let (status, _) = c.client(0).readyz().await.expect("readyz");
    assert_eq!(status, 200);
    let metrics = c.client(0).metrics().await.expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rtable_queries_failed_total{")
                && l.ends_with("kind=\"memory_limit\"} 1")),
        "{metrics}"
    );
}
