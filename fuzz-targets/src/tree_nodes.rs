//! Targets for the text codecs of ZooKeeper nodes and part names: whatever the tree holds
//! may have been written by any client of the ensemble. Each target parses the input; when
//! it parses, rendering the value and parsing that again must give the same value
//! (parse-render-parse), and the rendered text must render unchanged (a fixed point).

use rtable_protocol::columns;
use rtable_protocol::definition;
use rtable_protocol::host::HostInfo;
use rtable_protocol::log_entry::LogEntry;
use rtable_protocol::metadata::TableMetadata;
use rtable_protocol::part_header::{Checksums, PartHeader};
use rtable_protocol::part_name::PartName;
use rtable_protocol::quorum::{LastPart, QuorumEntry};

/// ZooKeeper node data reaches every codec as `&str` after a UTF-8 check, as in the
/// sidecar (`std::str::from_utf8(&data)`), so non-UTF-8 input ends there.
fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// The round trip every text codec keeps: `parse(render(parse(x))) == parse(x)`, and
/// rendering is stable.
fn round_trip<T, E>(
    input: &str,
    parse: impl Fn(&str) -> Result<T, E>,
    render: impl Fn(&T) -> String,
) where
    T: PartialEq + std::fmt::Debug,
    E: std::fmt::Display,
{
    let Ok(value) = parse(input) else {
        return;
    };
    let rendered = render(&value);
    let again = match parse(&rendered) {
        Ok(again) => again,
        Err(e) => panic!("{input:?} parsed, but its rendering {rendered:?} does not: {e}"),
    };
    assert_eq!(again, value, "{input:?} rendered as {rendered:?}");
    assert_eq!(render(&again), rendered, "rendering is not stable");
}

pub fn log_entry(data: &[u8]) {
    if let Some(t) = text(data) {
        round_trip(t, LogEntry::parse, LogEntry::render);
        if let Ok(entry) = LogEntry::parse(t) {
            // What the queue asks of every entry it reads.
            let _ = (
                entry.type_name(),
                entry.new_part_name(),
                entry.source_parts(),
            );
        }
    }
}

pub fn part_header(data: &[u8]) {
    if let Some(t) = text(data) {
        round_trip(t, PartHeader::parse, PartHeader::render);
    }
}

pub fn checksums(data: &[u8]) {
    if let Some(t) = text(data) {
        round_trip(t, Checksums::parse, Checksums::render);
        if let Ok(c) = Checksums::parse(t) {
            let _ = (c.total_hash(), c.total_bytes());
        }
    }
}

pub fn columns(data: &[u8]) {
    if let Some(t) = text(data) {
        round_trip(t, columns::parse, |c| columns::render(c));
    }
}

pub fn metadata(data: &[u8]) {
    if let Some(t) = text(data) {
        round_trip(t, TableMetadata::parse, TableMetadata::render);
    }
}

/// `metadata` and `columns` from the tree against the same pair split from the input at
/// its first NUL, as a replica classifies a definition change on activation.
pub fn definition(data: &[u8]) {
    let Some(t) = text(data) else {
        return;
    };
    let (metadata, columns) = t.split_once('\0').unwrap_or((t, ""));
    let change = definition::classify(metadata, columns, metadata, columns);
    assert_eq!(
        change,
        definition::DefinitionChange::Same,
        "a definition is itself"
    );
    let local_metadata = "metadata format version: 1\ndate column: \nsampling expression: \nindex granularity: 8192\nmode: 0\nsign column: \nprimary key: id\ndata format version: 1\npartition key: \n";
    let local_columns = "columns format version: 1\n1 columns:\n`id` UInt64\n";
    let _ = definition::classify(local_metadata, local_columns, metadata, columns);
}

pub fn quorum_entry(data: &[u8]) {
    if let Some(t) = text(data) {
        round_trip(t, QuorumEntry::parse, QuorumEntry::render);
        if let Ok(q) = QuorumEntry::parse(t) {
            let _ = q.is_reached();
        }
    }
}

pub fn quorum_last_part(data: &[u8]) {
    if let Some(t) = text(data) {
        round_trip(t, LastPart::parse, LastPart::render);
    }
}

pub fn host(data: &[u8]) {
    if let Some(t) = text(data) {
        round_trip(t, HostInfo::parse, HostInfo::render);
        if let Ok(h) = HostInfo::parse(t) {
            let _ = h.address();
        }
    }
}

/// Part names come from clients (`/drop_partition`, `/handoff/<part>`), peers and every
/// node of the tree; a name that parses must render to itself when canonical, and the
/// covering rules must hold between a part and itself.
pub fn part_name(data: &[u8]) {
    let Some(t) = text(data) else {
        return;
    };
    round_trip(t, PartName::parse, PartName::to_string);
    if let Ok(p) = PartName::parse(t) {
        assert!(p.contains(&p), "{p} does not contain itself");
        assert!(!p.is_disjoint(&p), "{p} is disjoint from itself");
        let drop = PartName::drop_range(&p.partition_id, p.max_block.saturating_add(1));
        if !p.is_drop_range()
            && p.max_block < u64::MAX
            && p.mutation.unwrap_or(0) <= drop.mutation.unwrap_or(0)
        {
            assert!(drop.contains(&p), "{drop} does not cover {p}");
        }
    }
}
