//! Targets for insert bodies (`POST /insert?format=...`), run through what the insert path
//! does before it touches ZooKeeper: decode, split by partition, sort by ORDER BY, hash for
//! deduplication. The input's first byte picks the table ([`tables::pick`]).
//!
//! Round trip: rows that decode render as JSONEachRow (what `/select` answers) and decode
//! from that to the same rows.

use rtable_protocol::hash;
use rtable_sidecar::rows::{self, InputFormat, OutputFormat};

use crate::tables;

fn insert(format: InputFormat, data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let schema = tables::pick(selector);
    let Ok(batch) = rows::decode(format, body, &schema) else {
        return;
    };
    assert!(batch.num_rows() > 0, "an accepted body holds rows");
    let mut json = Vec::new();
    rows::encode_text(OutputFormat::JsonEachRow, &batch, &mut json, true)
        .expect("decoded rows render as JSONEachRow");
    let again = rows::decode(InputFormat::JsonEachRow, &json, &schema).unwrap_or_else(|e| {
        panic!(
            "rows decoded from {format} render as JSONEachRow that does not decode: {e}\n{}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(
        again, batch,
        "JSONEachRow round trip of rows decoded from {format}"
    );
    let partitions = match rows::partition_split(&batch, &schema) {
        Ok(p) => p,
        Err(_) => return,
    };
    let total: usize = partitions.iter().map(|(_, b)| b.num_rows()).sum();
    assert_eq!(
        total,
        batch.num_rows(),
        "the partition split keeps every row"
    );
    for (partition_id, part) in partitions {
        assert!(
            rtable_protocol::part_name::is_valid_partition_id(&partition_id),
            "partition id `{partition_id}` cannot name a part"
        );
        let sorted = rows::sort_by_key(&part, &schema.order_by).expect("rows sort by their key");
        let hash = rows::rows_hash(&sorted).expect("rows hash");
        let _ = hash::block_id(&partition_id, hash);
    }
}

pub fn insert_json(data: &[u8]) {
    insert(InputFormat::JsonEachRow, data);
}

pub fn insert_csv(data: &[u8]) {
    insert(InputFormat::Csv, data);
}

pub fn insert_csv_with_names(data: &[u8]) {
    insert(InputFormat::CsvWithNames, data);
}

pub fn insert_parquet(data: &[u8]) {
    insert(InputFormat::Parquet, data);
}
