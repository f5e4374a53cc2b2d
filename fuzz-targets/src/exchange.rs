//! Targets for the part exchange, the bytes a peer sends: the header of a fetch and the
//! whole body of a handoff (header, files, `checksums.txt`, `count.txt`, the Parquet footer).

use bytes::Bytes;
use rtable_sidecar::exchange;
use rtable_sidecar::store::received::verify_received;

use crate::tables;

/// The header as the fetcher reads it: up to its empty line, UTF-8, then parsed. A header
/// that parses renders back to one that parses to the same files.
pub fn exchange_header(data: &[u8]) {
    let Some((len, _start)) = exchange::header_end(data) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(&data[..len]) else {
        return;
    };
    let Ok(files) = exchange::parse_header(text) else {
        return;
    };
    let rendered = exchange::render_header(&files);
    let (again_len, again_start) =
        exchange::header_end(rendered.as_bytes()).expect("a rendered header ends in an empty line");
    assert_eq!(again_start, rendered.len());
    let again = exchange::parse_header(&rendered[..again_len])
        .unwrap_or_else(|e| panic!("{text:?} parsed, its rendering {rendered:?} does not: {e}"));
    assert_eq!(again, files);
}

/// A handoff body as a peer receives it, checked against the first test table. A body that
/// is accepted must list and carry exactly the files it hands over.
pub fn received_part(data: &[u8]) {
    let table = tables::arrow(tables::pick(data.first().copied().unwrap_or(0)));
    let Ok(part) = verify_received(
        Bytes::copy_from_slice(data.get(1..).unwrap_or_default()),
        &table,
    ) else {
        return;
    };
    for (name, listed) in &part.checksums.files {
        let sent = part
            .files
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("`{name}` is listed but was not kept"));
        assert_eq!(sent.1.len() as u64, listed.size, "`{name}` size");
    }
}
