//! Bulk inserts through real sidecars and a real ZooKeeper: a body larger than the old
//! 256 MiB cap is streamed in (generated on the fly, never held by the test), lands on
//! every replica row for row, and the inserting process's peak memory stays bounded; a
//! bad row in the last block commits nothing; a retried body deduplicates block by block.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;

use common::{CONVERGE, january_rows, tree_snapshot};
use rtable_e2e::client::json_lines;
use rtable_e2e::{Cluster, ClusterOptions, serial};

/// Rows of the big body; each line is about 1 KiB, so the body is about 293 MiB.
const BIG_ROWS: u64 = 300_000;
const OLD_CAP: u64 = 256 << 20;
/// Peak RSS allowed to the inserting sidecar (and to the peers fetching its parts).
const RSS_BOUND: u64 = 200 << 20;

async fn cluster_with(args: &[&str]) -> Cluster {
    let mut c = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    for r in &mut c.replicas {
        r.set_extra_args(args.iter().map(|a| a.to_string()).collect());
        r.restart().expect("restart with flags");
    }
    for r in &mut c.replicas {
        r.wait_ready(CONVERGE).await.expect("ready with the flags");
    }
    c
}

/// The fields of row `id` of the big body: all in January 2025 (one partition), a 1 KiB
/// event string that differs per row.
fn big_row(id: u64) -> (String, u64, String, f64) {
    let ts = format!(
        "2025-01-{:02} {:02}:{:02}:{:02}",
        1 + id % 28,
        (id / 60) % 24,
        id % 60,
        (id / 7) % 60
    );
    let seed = format!("{:016x}", id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let event = seed.repeat(64);
    (ts, id, event, (id % 1000) as f64 / 4.0)
}

fn csv_line(id: u64) -> String {
    let (ts, id, event, value) = big_row(id);
    format!("{ts},{id},{event},{value}\n")
}

/// What a set of rows must add up to on every replica: count, sum of keys and a sum of
/// per-row hashes (order-free).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct RowsSum {
    rows: u64,
    keys: u64,
    hashes: u64,
}

impl RowsSum {
    fn add(&mut self, ts: &str, id: u64, event: &str, value: f64) {
        let mut h = DefaultHasher::new();
        (ts, id, event, value.to_bits()).hash(&mut h);
        self.rows += 1;
        self.keys = self.keys.wrapping_add(id);
        self.hashes = self.hashes.wrapping_add(h.finish());
    }
}

/// The big body as a stream of ~1 MiB pieces, generated as it is sent.
fn big_body() -> reqwest::Body {
    let pieces = futures::stream::unfold(0u64, |next| async move {
        if next >= BIG_ROWS {
            return None;
        }
        let end = (next + 1000).min(BIG_ROWS);
        let piece: String = (next..end).map(csv_line).collect();
        Some((Ok::<Bytes, std::io::Error>(Bytes::from(piece)), end))
    });
    reqwest::Body::wrap_stream(pieces)
}

/// Counts and checksums every row of `/select?format=CSV` as it streams.
async fn select_sum(base: &str) -> RowsSum {
    let http = reqwest::Client::new();
    let response = http
        .get(format!("{base}/select?format=CSV"))
        .send()
        .await
        .expect("select");
    assert_eq!(response.status().as_u16(), 200, "select on {base}");
    let mut stream = response.bytes_stream();
    let mut sum = RowsSum::default();
    let mut rest: Vec<u8> = Vec::new();
    while let Some(piece) = stream.next().await {
        rest.extend_from_slice(&piece.expect("select body"));
        let Some(last) = rest.iter().rposition(|&b| b == b'\n') else {
            continue;
        };
        let text = std::str::from_utf8(&rest[..=last]).expect("CSV is UTF-8");
        for line in text.lines() {
            let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
            assert_eq!(fields.len(), 4, "a row of 4 fields: {line}");
            let id: u64 = fields[1].parse().expect("user_id");
            let value: f64 = fields[3].parse().expect("value");
            sum.add(fields[0], id, fields[2], value);
        }
        rest.drain(..=last);
    }
    assert!(rest.is_empty(), "select ends with a whole line");
    sum
}

/// VmHWM (peak resident set) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

#[tokio::test]
async fn a_body_over_the_old_cap_streams_in_with_bounded_memory_onto_every_replica() {
    let _serial = serial();
    // No merges: the parts of the insert are what the peers fetch.
    let c = cluster_with(&["--merge-max-bytes", "1"]).await;
    let mut expected = RowsSum::default();
    let mut body_bytes = 0u64;
    for id in 0..BIG_ROWS {
        let (ts, id, event, value) = big_row(id);
        expected.add(&ts, id, &event, value);
        body_bytes += csv_line(id).len() as u64;
    }
    assert!(
        body_bytes > OLD_CAP,
        "the body ({body_bytes} bytes) exceeds 256 MiB"
    );

    let started = std::time::Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/insert?format=CSV", c.client(0).base()))
        .body(big_body())
        .send()
        .await
        .expect("insert answered");
    let status = response.status().as_u16();
    let answer: Value = response.json().await.expect("JSON answer");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rows"].as_u64(), Some(BIG_ROWS), "{answer}");
    let parts = answer["parts"].as_array().expect("parts").len();
    assert!(
        parts > 1,
        "a body of many blocks makes many parts: {answer}"
    );
    eprintln!(
        "inserted {body_bytes} bytes in {:.1}s as {parts} parts",
        started.elapsed().as_secs_f64()
    );
    let inserter = c.replicas[0].pid().expect("inserter runs");
    let inserter_peak = peak_rss(inserter);

    for i in 0..c.replicas.len() {
        let base = c.client(i).base().to_string();
        let deadline = std::time::Instant::now() + CONVERGE;
        loop {
            let got = select_sum(&base).await;
            if got == expected {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline && got.rows <= expected.rows,
                "replica {i} holds {got:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let peaks: Vec<u64> = c
        .replicas
        .iter()
        .map(|r| peak_rss(r.pid().expect("replica runs")))
        .collect();
    eprintln!(
        "peak RSS: inserter {} MiB at its acknowledgement; all after replication and selects {:?} MiB",
        inserter_peak >> 20,
        peaks.iter().map(|p| p >> 20).collect::<Vec<_>>()
    );
    assert!(
        inserter_peak < RSS_BOUND,
        "inserting a {} MiB body peaked at {} MiB RSS (bound {} MiB)",
        body_bytes >> 20,
        inserter_peak >> 20,
        RSS_BOUND >> 20
    );
    for (i, peak) in peaks.iter().enumerate() {
        assert!(
            *peak < RSS_BOUND,
            "replica {i} peaked at {} MiB RSS (bound {} MiB)",
            peak >> 20,
            RSS_BOUND >> 20
        );
    }
}

/// Temporary directories left in a replica's `parts/`.
fn leftovers(c: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for r in &c.replicas {
        let dir = r.data_dir().join("parts");
        for entry in std::fs::read_dir(&dir).expect("parts dir") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .to_string();
            if name.starts_with("tmp_") && !name.starts_with("tmp_spare") {
                out.push(format!("{}/{name}", r.name()));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_bad_row_in_the_last_block_commits_nothing_and_a_retry_deduplicates_block_by_block() {
    let _serial = serial();
    // Blocks of 1000 rows (about 90 KB, under the byte limit): a 20,000-row body (1.8 MB,
    // streamed since it is bigger than one block's bytes) is 20 blocks.
    let mut c = cluster_with(&[
        "--max-insert-block-rows",
        "1000",
        "--max-insert-block-bytes",
        "524288",
    ])
    .await;
    let zk = c.zk_client().await.expect("zk");
    let tree_before = tree_snapshot(&zk, &c.table_path).await;
    let rows = january_rows(0, 20_000);
    let good = json_lines(&rows);
    let mut lines: Vec<&str> = good.lines().collect();
    let bad_last = lines[19_999].replace("\"user_id\":19999", "\"user_id\":\"oops\"");
    assert_ne!(bad_last, lines[19_999], "the last row was changed");
    lines[19_999] = &bad_last;
    let bad = lines.join("\n") + "\n";

    let r = c
        .client(0)
        .insert_raw("JSONEachRow", bad, None)
        .await
        .expect("answered");
    assert_eq!(r.status, 400, "{}", r.text());
    let json = r.json().expect("JSON error");
    assert_eq!(json["line"].as_u64(), Some(20_000), "{json}");
    assert_eq!(json["column"].as_str(), Some("user_id"), "{json}");
    // Nothing in ZooKeeper, no rows, no temporary part left behind.
    assert_eq!(tree_snapshot(&zk, &c.table_path).await, tree_before);
    for i in 0..3 {
        assert_eq!(select_count(&c, i).await, 0, "replica {i} holds no row");
    }
    assert_eq!(leftovers(&c), Vec::<String>::new());

    // The good body: many parts, one per block.
    let first = insert_json(&c, &good).await;
    let parts = first["parts"].as_array().expect("parts").clone();
    assert_eq!(parts.len(), 20, "one part per block: {first}");
    assert_eq!(first["deduplicated"], Value::Bool(false), "{first}");
    // The same body again: every block is a duplicate of the same part.
    let again = insert_json(&c, &good).await;
    assert_eq!(again["deduplicated"], Value::Bool(true), "{again}");
    assert_eq!(again["parts"].as_array(), Some(&parts), "{again}");
    // A body sharing only its first half (10 whole blocks): those blocks are duplicates
    // of the same parts, the other 10 commit.
    let mut half: Vec<serde_json::Value> = rows[..10_000].to_vec();
    half.extend(january_rows(100_000, 10_000));
    let partly = insert_json(&c, &json_lines(&half)).await;
    let duplicates = partly["deduplicated_parts"]
        .as_array()
        .expect("deduplicated_parts")
        .len();
    let total = partly["parts"].as_array().expect("parts").len();
    assert_eq!((duplicates, total), (10, 20), "{partly}");
    assert_eq!(
        partly["parts"].as_array().map(|p| p[..10].to_vec()),
        Some(parts[..10].to_vec()),
        "{partly}"
    );
    c.wait_converged_rows(30_000, CONVERGE)
        .await
        .expect("every replica holds every row once");
}

async fn insert_json(c: &Cluster, body: &str) -> Value {
    let r = c
        .client(0)
        .insert_raw("JSONEachRow", body.to_string(), None)
        .await
        .expect("answered");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().expect("JSON answer")
}

async fn select_count(c: &Cluster, i: usize) -> usize {
    let body = c.client(i).select("JSONEachRow").await.expect("select");
    body.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .count()
}
