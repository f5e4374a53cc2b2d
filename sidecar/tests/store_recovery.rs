//! The part store on a real directory: write, commit, reopen, corruption, junk, fetch
//! installs, deferred deletion, and external readers (pyarrow, DuckDB) reading a part.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use arrow::array::RecordBatch;
use rtable_protocol::part_header::{Checksums, FileChecksum};
use rtable_protocol::part_name::PartName;
use rtable_protocol::schema::{Column, TableSchema};
use rtable_sidecar::rows::{self, InputFormat};
use rtable_sidecar::store::received::verify_received;
use rtable_sidecar::store::{
    self, CHECKSUMS_FILE, COUNT_FILE, DATA_FILE, PartStore, StoreError, read_part, write_temp,
};

fn table() -> TableSchema {
    let col = |name: &str, ty: &str| Column {
        name: name.into(),
        ty: ty.parse().expect("type"),
    };
    TableSchema::new(
        vec![
            col("ts", "DateTime"),
            col("id", "UInt64"),
            col("msg", "Nullable(String)"),
        ],
        vec!["id".into()],
        "toYYYYMM(ts)".parse().expect("partition key"),
    )
    .expect("schema")
}

fn rows(n: u64, offset: u64) -> RecordBatch {
    // Descending ids so the writer has to sort.
    let body: String = (0..n)
        .rev()
        .map(|i| {
            format!(
                "{{\"ts\": \"2024-05-01 00:00:00\", \"id\": {}, \"msg\": \"m{i}\"}}\n",
                i + offset
            )
        })
        .collect();
    rows::decode(InputFormat::JsonEachRow, body.as_bytes(), &table()).expect("rows")
}

fn name(s: &str) -> PartName {
    s.parse().expect("part name")
}

fn open(dir: &Path) -> (PartStore, Vec<store::DetachedReport>) {
    PartStore::open(dir).expect("open")
}

fn commit(store: &PartStore, batch: &RecordBatch, part: &str) -> PathBuf {
    let temp = write_temp(store, batch, &table()).expect("write");
    store
        .commit_temp(temp, &name(part))
        .expect("commit")
        .dir
        .clone()
}

fn detached(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join("detached"))
        .expect("detached dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn write_commit_reopen_verifies_and_reads_back_sorted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, reports) = open(tmp.path());
    assert!(reports.is_empty());
    let part_dir = commit(&store, &rows(100, 0), "202405_1_1_0");
    for f in [DATA_FILE, CHECKSUMS_FILE, COUNT_FILE] {
        assert!(part_dir.join(f).is_file(), "{f}");
    }
    assert_eq!(
        fs::read_to_string(part_dir.join(COUNT_FILE)).expect("count"),
        "100\n"
    );
    let checksums =
        Checksums::parse(&fs::read_to_string(part_dir.join(CHECKSUMS_FILE)).expect("checksums"))
            .expect("parses");
    assert_eq!(checksums.files.len(), 1);
    drop(store);

    let (store, reports) = open(tmp.path());
    assert!(reports.is_empty(), "{reports:?}");
    let parts = store.parts();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].rows, 100);
    assert_eq!(parts[0].checksums, checksums);
    assert_eq!(store.total_rows(), 100);
    assert_eq!(store.total_bytes(), checksums.total_bytes());
    let batches = read_part(&parts[0], &rows::arrow_schema(&table())).expect("read");
    let back =
        arrow::compute::concat_batches(&rows::arrow_schema(&table()), &batches).expect("concat");
    let sorted = rows::sort_by_key(&rows(100, 0), &["id".to_string()]).expect("sort");
    assert_eq!(back, sorted);
}

#[test]
fn a_flipped_byte_detaches_the_part_as_broken_and_keeps_its_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(tmp.path());
    let part_dir = commit(&store, &rows(50, 0), "202405_3_3_0");
    commit(&store, &rows(5, 100), "202405_4_4_0");
    drop(store);
    let data = part_dir.join(DATA_FILE);
    let mut bytes = fs::read(&data).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&data, &bytes).expect("write");

    let (store, reports) = open(tmp.path());
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].reason, "broken");
    assert_eq!(reports[0].name, "202405_3_3_0");
    assert!(reports[0].detail.contains("hash"), "{}", reports[0].detail);
    assert_eq!(detached(tmp.path()), ["broken_202405_3_3_0"]);
    let kept = fs::read(
        tmp.path()
            .join("detached/broken_202405_3_3_0")
            .join(DATA_FILE),
    )
    .expect("still there");
    assert_eq!(kept, bytes);
    assert!(!store.contains(&name("202405_3_3_0")));
    assert!(store.contains(&name("202405_4_4_0")));
}

#[test]
fn wrong_count_and_missing_checksums_are_broken_too() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(tmp.path());
    let a = commit(&store, &rows(3, 0), "202405_1_1_0");
    let b = commit(&store, &rows(3, 10), "202405_2_2_0");
    let c = commit(&store, &rows(3, 20), "202405_3_3_0");
    drop(store);
    fs::write(a.join(COUNT_FILE), "4\n").expect("write");
    fs::remove_file(b.join(CHECKSUMS_FILE)).expect("rm");
    fs::write(c.join("extra.bin"), "x").expect("write");
    let (store, reports) = open(tmp.path());
    assert!(store.parts().is_empty());
    let reasons: Vec<(&str, &str)> = reports
        .iter()
        .map(|r| (r.name.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("202405_1_1_0", "broken"),
            ("202405_2_2_0", "broken"),
            ("202405_3_3_0", "broken")
        ]
    );
    assert!(
        reports[0].detail.contains("count.txt says 4"),
        "{:?}",
        reports[0]
    );
    assert!(reports[2].detail.contains("extra.bin"), "{:?}", reports[2]);
}

#[test]
fn junk_and_temporary_directories_are_detached_with_a_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let parts = tmp.path().join("parts");
    for d in [
        "foo",
        "all_1_1",
        "all_01_1_0",
        "..x",
        "tmp_insert_abc",
        "tmp-fetch_all_1_1_0",
        "deleting_all_2_2_0",
        "all_0_9_999999999_999999999",
    ] {
        fs::create_dir_all(parts.join(d)).expect("mkdir");
        fs::write(parts.join(d).join("keep"), d).expect("write");
    }
    fs::write(parts.join("stray.txt"), "x").expect("write");
    // Same name detached before: the new one gets `_try1`.
    fs::create_dir_all(tmp.path().join("detached/unknown_foo")).expect("mkdir");

    let (store, reports) = open(tmp.path());
    assert!(store.parts().is_empty());
    let mut got: Vec<(String, String)> = reports
        .iter()
        .map(|r| (r.name.clone(), r.reason.clone()))
        .collect();
    got.sort();
    let want = [
        ("..x", "unknown"),
        ("all_01_1_0", "unknown"),
        ("all_0_9_999999999_999999999", "unknown"),
        ("all_1_1", "unknown"),
        ("deleting_all_2_2_0", "deleting"),
        ("foo", "unknown"),
        ("stray.txt", "unknown"),
        ("tmp-fetch_all_1_1_0", "tmp"),
        ("tmp_insert_abc", "tmp"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
    );
    assert_eq!(
        detached(tmp.path()),
        [
            "deleting_deleting_all_2_2_0",
            "tmp_tmp-fetch_all_1_1_0",
            "tmp_tmp_insert_abc",
            "unknown_..x",
            "unknown_all_01_1_0",
            "unknown_all_0_9_999999999_999999999",
            "unknown_all_1_1",
            "unknown_foo",
            "unknown_foo_try1",
            "unknown_stray.txt",
        ]
    );
    assert_eq!(
        fs::read_to_string(tmp.path().join("detached/unknown_foo_try1/keep")).expect("kept"),
        "foo"
    );
    assert_eq!(fs::read_dir(&parts).expect("parts").count(), 0);
}

/// Copies a committed part's files into a fresh fetch directory, as a download would.
fn download(store: &PartStore, from: &Path, part: &str, files: &[&str]) -> PathBuf {
    let dir = store.fetch_dir(&name(part)).expect("fetch dir");
    for f in files {
        fs::copy(from.join(f), dir.join(f)).expect("copy");
    }
    dir
}

#[test]
fn fetched_parts_are_verified_before_install() {
    let src = tempfile::tempdir().expect("tempdir");
    let (origin, _) = open(src.path());
    let part_dir = commit(&origin, &rows(20, 0), "202405_7_7_0");
    let expected = origin
        .get(&name("202405_7_7_0"))
        .expect("part")
        .checksums
        .clone();

    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(tmp.path());

    // A tampered download: refused, nothing installed, download gone.
    let dir = download(&store, &part_dir, "202405_7_7_0", &[DATA_FILE]);
    let mut bytes = fs::read(dir.join(DATA_FILE)).expect("read");
    bytes[10] ^= 0xff;
    fs::write(dir.join(DATA_FILE), &bytes).expect("write");
    let err = store
        .install_fetched(&dir, &name("202405_7_7_0"), &expected)
        .expect_err("tampered");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("data.parquet"), "{err}");
    assert!(!store.contains(&name("202405_7_7_0")));
    assert!(!dir.exists());
    assert!(!tmp.path().join("parts/202405_7_7_0").exists());

    // An extra file: refused.
    let dir = download(&store, &part_dir, "202405_7_7_0", &[DATA_FILE]);
    fs::write(dir.join("evil.sh"), "x").expect("write");
    let err = store
        .install_fetched(&dir, &name("202405_7_7_0"), &expected)
        .expect_err("extra file");
    assert!(err.to_string().contains("evil.sh"), "{err}");

    // Checksums that do not match what was sent: refused.
    let dir = download(&store, &part_dir, "202405_7_7_0", &[DATA_FILE]);
    let mut wrong = expected.clone();
    wrong.files.insert(
        DATA_FILE.to_string(),
        FileChecksum {
            size: 1,
            hash: rtable_protocol::hash::file_hash(b"x"),
        },
    );
    assert!(
        store
            .install_fetched(&dir, &name("202405_7_7_0"), &wrong)
            .is_err()
    );

    // Data only: checksums.txt and count.txt are written.
    let dir = download(&store, &part_dir, "202405_7_7_0", &[DATA_FILE]);
    let part = store
        .install_fetched(&dir, &name("202405_7_7_0"), &expected)
        .expect("installs");
    assert_eq!(part.rows, 20);
    assert_eq!(part.checksums, expected);
    assert_eq!(
        fs::read_to_string(part.dir.join(COUNT_FILE)).expect("count"),
        "20\n"
    );
    assert!(!dir.exists());

    // All three files, installed again under another name (a copy): verified and accepted.
    let dir = download(
        &store,
        &part_dir,
        "202405_8_8_0",
        &[DATA_FILE, CHECKSUMS_FILE, COUNT_FILE],
    );
    store
        .install_fetched(&dir, &name("202405_8_8_0"), &expected)
        .expect("installs");
    drop(store);
    let (store, reports) = open(tmp.path());
    assert!(reports.is_empty(), "{reports:?}");
    assert_eq!(store.parts().len(), 2);
}

#[test]
fn identical_rows_give_identical_data_hashes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(tmp.path());
    let a = write_temp(&store, &rows(1000, 0), &table()).expect("write");
    let b = write_temp(&store, &rows(1000, 0), &table()).expect("write");
    let c = write_temp(&store, &rows(1000, 1), &table()).expect("write");
    assert_ne!(a.dir, b.dir);
    assert_eq!(a.data_hash(), b.data_hash());
    assert_eq!(
        fs::read(a.dir.join(DATA_FILE)).expect("a"),
        fs::read(b.dir.join(DATA_FILE)).expect("b")
    );
    assert_ne!(a.data_hash(), c.data_hash());
    assert_eq!(a.rows, 1000);
    let dir = c.dir.clone();
    c.discard().expect("discard");
    assert!(!dir.exists());
}

#[test]
fn commits_refuse_taken_names_and_drop_range_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(tmp.path());
    commit(&store, &rows(2, 0), "202405_1_1_0");
    let temp = write_temp(&store, &rows(2, 0), &table()).expect("write");
    let dir = temp.dir.clone();
    let err = store
        .commit_temp(temp, &name("202405_1_1_0"))
        .expect_err("taken");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert!(dir.exists(), "the temporary part is left for the caller");
    let temp = write_temp(&store, &rows(2, 0), &table()).expect("write");
    assert!(
        store
            .commit_temp(temp, &PartName::drop_range("202405", 5))
            .is_err()
    );
}

#[test]
fn covered_parts_are_deleted_only_after_the_last_snapshot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(tmp.path());
    let one = commit(&store, &rows(2, 0), "202405_1_1_0");
    let two = commit(&store, &rows(2, 10), "202405_2_2_0");
    let err = store
        .remove_part(&name("202405_1_1_0"))
        .expect_err("not covered");
    assert!(err.to_string().contains("covers"), "{err}");

    let before = store.snapshot();
    assert_eq!(before.names(), ["202405_1_1_0", "202405_2_2_0"]);
    let merged =
        arrow::compute::concat_batches(&rows::arrow_schema(&table()), &[rows(2, 0), rows(2, 10)])
            .expect("concat");
    commit(&store, &merged, "202405_1_2_1");
    assert_eq!(store.snapshot().names(), ["202405_1_2_1"]);
    assert_eq!(store.parts().len(), 3);
    assert_eq!(store.total_rows(), 4);
    assert_eq!(
        store.covering(&name("202405_2_2_0")),
        Some(name("202405_1_2_1"))
    );
    assert_eq!(store.covering(&name("202405_3_3_0")), None);

    let removed = store.remove_covered().expect("remove");
    assert_eq!(removed, [name("202405_1_1_0"), name("202405_2_2_0")]);
    assert_eq!(store.parts().len(), 1);
    // A reader still holds them: the files stay.
    assert!(one.join(DATA_FILE).exists() && two.join(DATA_FILE).exists());
    assert_eq!(store.pending_count(), 2);
    assert_eq!(
        read_part(&before.parts()[0], &rows::arrow_schema(&table())).expect("readable")[0]
            .num_rows(),
        2
    );
    drop(before);
    assert_eq!(store.collect_garbage().expect("gc"), 2);
    assert!(!one.exists() && !two.exists());
    assert_eq!(store.pending_count(), 0);
    let leftovers: Vec<_> = fs::read_dir(tmp.path().join("parts"))
        .expect("parts")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers, ["202405_1_2_1"]);
}

#[test]
fn detach_moves_an_active_part_and_drop_range_deletes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(tmp.path());
    commit(&store, &rows(2, 0), "202405_1_1_0");
    commit(&store, &rows(2, 0), "202405_2_2_0");
    commit(&store, &rows(2, 0), "202406_3_3_0");
    let to = store
        .detach(&name("202405_1_1_0"), "broken-on-check")
        .expect("detach");
    assert_eq!(to, tmp.path().join("detached/broken-on-check_202405_1_1_0"));
    assert!(to.join(DATA_FILE).exists());
    assert!(store.detach(&name("202405_1_1_0"), "x").is_err());
    assert!(store.detach(&name("202405_2_2_0"), "bad_reason").is_err());
    let dropped = store
        .drop_range(&PartName::drop_range("202405", 3))
        .expect("drop");
    assert_eq!(dropped, [name("202405_2_2_0")]);
    assert_eq!(store.snapshot().names(), ["202406_3_3_0"]);
}

fn python() -> String {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let ok = Command::new(&python)
        .args(["-c", "import pyarrow, duckdb"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{python} with pyarrow and duckdb is required to check that parts are plain Parquet: run scripts/setup.sh"
    );
    python
}

#[test]
fn pyarrow_and_duckdb_read_a_part() {
    let python = python();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(tmp.path());
    let dir = commit(&store, &rows(1234, 0), "202405_1_1_0");
    let path = dir.join(DATA_FILE);
    let script = "import sys, pyarrow.parquet as pq, duckdb\n\
                  t = pq.read_table(sys.argv[1])\n\
                  print(t.num_rows)\n\
                  print(t.schema.field('ts').type, t.schema.field('id').type, t.schema.field('id').nullable)\n\
                  print(duckdb.connect().execute(\"select count(*), min(id), max(id), typeof(min(ts)), epoch(min(ts))::bigint from read_parquet(?)\", [sys.argv[1]]).fetchone())\n";
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(&path)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1234");
    // DateTime is stored as milliseconds so external readers see timestamps, not integers.
    assert_eq!(lines[1], "timestamp[ms, tz=UTC] uint64 False");
    assert_eq!(
        lines[2],
        "(1234, 0, 1233, 'TIMESTAMP WITH TIME ZONE', 1714521600)"
    );
}

/// The exchange body a peer sends for a part directory (what a handoff carries).
fn exchange_body(dir: &Path, checksums: &Checksums) -> Vec<u8> {
    let mut outgoing = rtable_sidecar::exchange::OutgoingPart::open(dir, checksums).expect("open");
    let mut body = Vec::new();
    while let Some(chunk) = outgoing.next_chunk(1 << 20).expect("read") {
        body.extend_from_slice(&chunk);
    }
    body
}

/// A handed-off copy: verified in memory, written to its own directory, invisible to
/// reads, left alone by a reopen (recovery decides its fate), then activated or discarded.
#[test]
fn handed_off_copies_stay_inactive_until_activated() {
    let src = tempfile::tempdir().expect("tempdir");
    let (origin, _) = open(src.path());
    let part_dir = commit(&origin, &rows(20, 0), "202405_7_7_0");
    let expected = origin
        .get(&name("202405_7_7_0"))
        .expect("part")
        .checksums
        .clone();
    let body = exchange_body(&part_dir, &expected);
    let arrow_table = rows::arrow_schema(&table());
    let verify = |body: Vec<u8>| verify_received(bytes::Bytes::from(body), &arrow_table);

    // Tampered: refused, naming the file, before anything is written.
    let mut tampered = body.clone();
    let at = tampered.len() - 200;
    tampered[at] ^= 0xff;
    let err = verify(tampered).expect_err("tampered");
    assert!(err.to_string().contains("hash mismatch"), "{err}");

    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(tmp.path());
    let received = verify(body.clone()).expect("verifies");
    assert_eq!(received.rows, 20);
    assert_eq!(received.checksums, expected);
    let (copy, unsynced) = store
        .write_handoff(&name("202405_7_7_0"), &received)
        .expect("writes");
    unsynced.sync().expect("fsyncs");
    assert_eq!(copy.rows, 20);
    assert!(!store.contains(&name("202405_7_7_0")), "not visible yet");
    assert!(store.handoff_names().contains("202405_7_7_0"));
    // A second copy of the same part while one is here is refused.
    assert!(
        store
            .write_handoff(&name("202405_7_7_0"), &received)
            .is_err()
    );
    // A copy cut short by a crash: only its data file was written.
    let unfinished = tmp.path().join("parts/handoff_202405_8_8_0");
    fs::create_dir(&unfinished).expect("mkdir");
    fs::copy(part_dir.join(DATA_FILE), unfinished.join(DATA_FILE)).expect("copy");

    // A reopen neither activates nor detaches it; the copy is found again, verified.
    drop(store);
    let (store, detached) = open(tmp.path());
    assert!(detached.is_empty(), "{detached:?}");
    assert!(!store.contains(&name("202405_7_7_0")));
    let found = store.handoffs_on_disk();
    // The unfinished one of the other part is broken and set aside.
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(!unfinished.exists());
    let copy = found.into_iter().next().expect("copy");
    assert_eq!(copy.checksums, expected);

    let active = store.activate_handoff(copy).expect("activates");
    assert_eq!(active.rows, 20);
    assert!(store.contains(&name("202405_7_7_0")));
    assert!(store.handoff_names().is_empty());

    // A second copy of a part already held cannot be activated; discarding removes it.
    let (copy, _unsynced) = store
        .write_handoff(&name("202405_7_7_0"), &received)
        .expect("writes");
    let dir = copy.dir.clone();
    assert!(store.activate_handoff(copy.clone()).is_err());
    store.discard_handoff(&copy);
    assert!(!dir.exists());
}
