//! The seed corpus: real values rendered by the codecs themselves (log entries as the
//! sidecar writes them, a real part's checksums and exchange body, insert bodies of every
//! format for every test table), so the fuzzers start from inputs that reach deep.
//! `scripts/fuzz.sh seed` writes them to `fuzz/corpus/<target>/seed-<name>`.

use std::collections::BTreeMap;

use anyhow::Context;
use rtable_protocol::columns;
use rtable_protocol::hash::Hash128;
use rtable_protocol::host::HostInfo;
use rtable_protocol::log_entry::{LogEntry, LogEntryKind};
use rtable_protocol::metadata::TableMetadata;
use rtable_protocol::part_header::PartHeader;
use rtable_protocol::quorum::{LastPart, QuorumEntry};
use rtable_protocol::status::ReplicaStatus;
use rtable_sidecar::rows::{self, InputFormat, OutputFormat, ParquetOutput};
use rtable_sidecar::store::{self, PartStore};

use crate::tables;

/// One seed file: the target it feeds, a file name, the bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn seed(target: &'static str, name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Seed {
    Seed {
        target,
        name: name.into(),
        bytes: bytes.into(),
    }
}

/// Rows of each test table, as JSONEachRow.
const ROWS: [&str; 3] = [
    concat!(
        "{\"ts\":\"2025-01-15 12:00:00\",\"user_id\":42,\"event\":\"click\",\"value\":1.5}\n",
        "{\"ts\":1736942400,\"user_id\":7,\"event\":\"view \\\"home\\\"\",\"value\":-0.25}\n",
        "{\"ts\":\"2025-02-01T00:00:00Z\",\"user_id\":18446744073709551615,\"event\":\"\",\"value\":1e300}\n",
    ),
    concat!(
        "{\"k\":1,\"u8\":255,\"u16\":65535,\"u32\":4294967295,\"i8\":-128,\"i16\":-32768,\"i32\":-2147483648,\"i64\":-9223372036854775808,\"f32\":3.5,\"f64\":null,\"s\":\"a,b\",\"b\":true,\"d\":\"2149-06-06\",\"dt\":\"2106-02-07 06:28:15\"}\n",
        "{\"k\":2,\"u8\":0,\"u16\":0,\"u32\":0,\"i8\":127,\"i16\":32767,\"i32\":2147483647,\"i64\":9223372036854775807,\"f32\":\"nan\",\"f64\":\"-inf\",\"b\":0,\"d\":\"1970-01-01\"}\n",
    ),
    concat!(
        "{\"id\":1,\"name\":\"eu-west\",\"flag\":true}\n",
        "{\"id\":-5,\"name\":\"ünïcode/../x\",\"flag\":null}\n",
        "{\"id\":3,\"name\":\"eu-west\"}\n",
    ),
];

fn table_seeds(out: &mut Vec<Seed>, store: &PartStore) -> anyhow::Result<()> {
    for selector in 0..tables::count() {
        let schema = tables::pick(selector);
        let json = ROWS[usize::from(selector)];
        let batch = rows::decode(InputFormat::JsonEachRow, json.as_bytes(), &schema)
            .with_context(|| format!("seed rows of table {selector}"))?;
        let with_selector = |body: &[u8]| [&[selector][..], body].concat();
        out.push(seed(
            "insert_json",
            format!("table{selector}"),
            with_selector(json.as_bytes()),
        ));
        for (target, format) in [
            ("insert_csv", OutputFormat::Csv),
            ("insert_csv_with_names", OutputFormat::CsvWithNames),
        ] {
            let mut body = Vec::new();
            rows::encode_text(format, &batch, &mut body, true)?;
            out.push(seed(
                target,
                format!("table{selector}"),
                with_selector(&body),
            ));
        }
        let mut parquet = ParquetOutput::new(Vec::new(), batch.schema())?;
        parquet.write(&batch)?;
        out.push(seed(
            "insert_parquet",
            format!("table{selector}"),
            with_selector(&parquet.finish()?),
        ));
        // The part an insert of these rows makes, as a handoff sends it.
        let part = store::encode(store, &batch, &schema)?;
        let body = rtable_sidecar::exchange::body_of(&part.files());
        out.push(seed(
            "received_part",
            format!("table{selector}"),
            with_selector(&body),
        ));
        out.push(seed(
            "exchange_header",
            format!("table{selector}"),
            body.to_vec(),
        ));
        out.push(seed(
            "checksums",
            format!("table{selector}"),
            part.checksums.render(),
        ));
        let columns_text = columns::render(&schema.columns);
        let header = PartHeader::new(&columns_text, part.rows, &part.checksums);
        out.push(seed(
            "part_header",
            format!("table{selector}"),
            header.render(),
        ));
        out.push(seed(
            "columns",
            format!("table{selector}"),
            columns_text.clone(),
        ));
        let metadata = TableMetadata::from_schema(&schema).render();
        out.push(seed(
            "metadata",
            format!("table{selector}"),
            metadata.clone(),
        ));
        out.push(seed(
            "definition",
            format!("table{selector}"),
            format!("{metadata}\0{columns_text}"),
        ));
    }
    Ok(())
}

fn log_entries() -> Vec<(String, String)> {
    let mut entries = vec![
        LogEntry::get(
            "events-0",
            "202501_4811843427362810870_12736421098634214512",
            "202501_17_17_0",
            2,
            1_736_942_400,
        ),
        LogEntry::merge(
            "events-1",
            vec![
                "202501_15_15_0".into(),
                "202501_16_16_0".into(),
                "202501_17_17_0".into(),
            ],
            "202501_15_17_1",
            1_736_942_405,
        ),
        LogEntry::drop_range("events-2", "202501_0_17_999999999_999999999", 1_736_942_410),
    ];
    let mut attach = LogEntry::get("events-0", "", "all_1_1_0", 0, 0);
    attach.kind = LogEntryKind::Attach {
        part: "all_1_1_0".into(),
        checksum: Hash128(0x1234).to_hex(),
    };
    entries.push(attach);
    let mut v7 = LogEntry::get("events-0", "all_1", "all_1_1_0", 0, 1_736_942_400);
    v7.format_version = 7;
    v7.log_entry_id = Some("events-0_0000000042".into());
    entries.push(v7);
    let mut other = LogEntry::drop_range("events-0", "", 0);
    other.kind = LogEntryKind::Other {
        type_line: "mutate".into(),
        body: vec!["all_1_1_0".into(), "to".into(), "all_1_1_0_2".into()],
    };
    entries.push(other);
    let mut rendered: Vec<(String, String)> = entries
        .iter()
        .map(|e| (e.type_name().to_ascii_lowercase(), e.render()))
        .collect();
    for (i, (name, _)) in rendered.iter_mut().enumerate() {
        *name = format!("{i}-{name}");
    }
    // ClickHouse's own text (format version 4), with the optional merge lines it may add.
    rendered.push((
        "clickhouse-merge".into(),
        "format version: 4\ncreate_time: 2024-05-01 12:00:05\nsource replica: r2\nblock_id: \nmerge\n202405_15_15_0\n202405_16_16_0\ninto\n202405_15_16_1\ndeduplicate: 0\nmerge_type: 1\ninto_uuid: 00000000-0000-0000-0000-000000000000\n".into(),
    ));
    rendered
}

/// Every seed, for every target.
pub fn seeds() -> anyhow::Result<Vec<Seed>> {
    let mut out = Vec::new();
    let tmp = tempfile::tempdir().context("a temporary part store for the seed parts")?;
    let (store, _) = PartStore::open(tmp.path())?;
    table_seeds(&mut out, &store)?;
    for (name, text) in log_entries() {
        out.push(seed("log_entry", name, text));
    }
    let mut quorum = QuorumEntry::new("202501_17_17_0", 2, "events-0");
    quorum.replicas.insert("events-1".into());
    out.push(seed("quorum_entry", "two-of-two", quorum.render()));
    let last = LastPart {
        parts: BTreeMap::from([
            ("202412".to_string(), "202412_3_3_0".to_string()),
            ("202501".to_string(), "202501_17_17_0".to_string()),
        ]),
    };
    out.push(seed("quorum_last_part", "v2", last.render()));
    out.push(seed("quorum_last_part", "v1", "202501_17_17_0"));
    let host = HostInfo {
        host: "events-0.events.default.svc.cluster.local".into(),
        port: 9009,
        tcp_port: 9000,
        database: "default".into(),
        table: "events".into(),
        scheme: "http".into(),
    };
    out.push(seed("host", "events-0", host.render()));
    out.push(seed(
        "host",
        "old-layout",
        "host: ::1\nport: 9009\ntcp_port: 9000\ndatabase: d\ntable: t\n",
    ));
    for name in [
        "all_0_0_0",
        "202501_15_17_1",
        "20250115_1_9_2_11",
        "202501_0_17_999999999_999999999",
    ] {
        out.push(seed("part_name", name, name));
    }
    let status = ReplicaStatus {
        replica_name: "events-0".into(),
        table_path: "/clickhouse/tables/01/events".into(),
        log_max_index: Some(12),
        log_pointer: Some(13),
        total_replicas: Some(3),
        parts: vec!["202501_1_1_0".into()],
        ..ReplicaStatus::default()
    };
    out.push(seed(
        "replica_status",
        "events-0",
        serde_json::to_vec_pretty(&status)?,
    ));
    out.push(seed(
        "manifest",
        "events",
        include_str!("../../examples/events.yaml"),
    ));
    Ok(out)
}
