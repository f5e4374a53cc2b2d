//! Where the blocks of a text insert body end (ClickHouse's `max_insert_block_size`): a
//! block closes at the first row end at which it holds `max_rows` rows or `max_bytes`
//! bytes. The cut depends on the body's bytes and the two limits alone, never on how the
//! body arrived in pieces, so a retried body is cut the same way and deduplicates block
//! by block.
//!
//! A row ends at a newline outside a quoted CSV field (JSONEachRow strings hold no raw
//! newline). Quotes follow the CSV reader's rule: a `"` opens a quoted field only at the
//! start of a field, `""` inside one is a quote, and any other `"` is data.

/// How a row end is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSyntax {
    /// Every newline ends a row (JSONEachRow).
    Lines,
    /// A newline outside a quoted field ends a row (CSV, CSVWithNames).
    Csv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Start,
    Unquoted,
    Quoted,
    /// A `"` inside a quoted field: the field's end, or the first half of `""`.
    QuoteInQuoted,
}

/// Scans a body block by block. Feed [`BlockSplitter::next_cut`] the bytes of the current
/// block so far (growing as the body arrives); it remembers what it already scanned.
#[derive(Debug, Clone)]
pub struct BlockSplitter {
    syntax: RowSyntax,
    max_rows: usize,
    max_bytes: usize,
    field: Field,
    /// Bytes of the current block already scanned.
    scanned: usize,
    /// Rows ended in the current block so far.
    rows: usize,
    /// Newlines in the scanned bytes (quoted ones included: they count as lines in errors).
    newlines: usize,
}

/// One block's extent within the bytes handed to [`BlockSplitter::next_cut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The block's length in bytes, its last row's newline included.
    pub len: usize,
    /// Newlines inside the block: the next block starts that many lines further down.
    pub lines: usize,
}

impl BlockSplitter {
    pub fn new(syntax: RowSyntax, max_rows: usize, max_bytes: usize) -> BlockSplitter {
        BlockSplitter {
            syntax,
            max_rows: max_rows.max(1),
            max_bytes: max_bytes.max(1),
            field: Field::Start,
            scanned: 0,
            rows: 0,
            newlines: 0,
        }
    }

    /// The end of the current block, if `pending` (the current block's bytes so far, a
    /// longer prefix of the same bytes on every call) holds it. After a cut the next block
    /// starts right after it: call again with the bytes from there.
    pub fn next_cut(&mut self, pending: &[u8]) -> Option<Cut> {
        let from = self.scanned.min(pending.len());
        for (offset, &byte) in pending[from..].iter().enumerate() {
            let row_end = self.step(byte);
            if byte == b'\n' {
                self.newlines += 1;
            }
            if !row_end {
                continue;
            }
            self.rows += 1;
            let len = from + offset + 1;
            if self.rows >= self.max_rows || len >= self.max_bytes {
                let cut = Cut {
                    len,
                    lines: self.newlines,
                };
                self.field = Field::Start;
                self.scanned = 0;
                self.rows = 0;
                self.newlines = 0;
                return Some(cut);
            }
        }
        self.scanned = pending.len();
        None
    }

    /// Advances the field state by one byte; true when it ends a row.
    fn step(&mut self, byte: u8) -> bool {
        if self.syntax == RowSyntax::Lines {
            return byte == b'\n';
        }
        let (next, row_end) = match (self.field, byte) {
            (Field::Quoted, b'"') => (Field::QuoteInQuoted, false),
            (Field::Quoted, _) => (Field::Quoted, false),
            (Field::QuoteInQuoted, b'"') => (Field::Quoted, false),
            (_, b'\n') => (Field::Start, true),
            (_, b',') => (Field::Start, false),
            (Field::Start, b'"') => (Field::Quoted, false),
            _ => (Field::Unquoted, false),
        };
        self.field = next;
        row_end
    }
}

/// Every block of a whole body: `(start, len, first_line)` with 1-based lines.
pub fn blocks_of(
    body: &[u8],
    syntax: RowSyntax,
    max_rows: usize,
    max_bytes: usize,
) -> Vec<(usize, usize, usize)> {
    let mut splitter = BlockSplitter::new(syntax, max_rows, max_bytes);
    let mut out = Vec::new();
    let (mut start, mut line) = (0, 1);
    while let Some(cut) = splitter.next_cut(&body[start..]) {
        out.push((start, cut.len, line));
        start += cut.len;
        line += cut.lines;
    }
    if start < body.len() {
        out.push((start, body.len() - start, line));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(body: &[u8], syntax: RowSyntax, rows: usize, bytes: usize) -> Vec<&[u8]> {
        blocks_of(body, syntax, rows, bytes)
            .into_iter()
            .map(|(s, l, _)| &body[s..s + l])
            .collect()
    }

    #[test]
    fn blocks_close_at_the_row_limit_or_the_first_row_end_past_the_byte_limit() {
        let body = b"a\nbb\nccc\ndddd\ne";
        assert_eq!(
            pieces(body, RowSyntax::Lines, 2, 1000),
            vec![&b"a\nbb\n"[..], b"ccc\ndddd\n", b"e"]
        );
        assert_eq!(
            pieces(body, RowSyntax::Lines, 1000, 4),
            vec![&b"a\nbb\n"[..], b"ccc\n", b"dddd\n", b"e"]
        );
    }

    #[test]
    fn quoted_newlines_and_escaped_quotes_stay_inside_their_row() {
        let body = b"1,\"x\ny\"\n2,\"a\"\"\nb\"\n3,ab\"c\n4,z\n";
        let blocks = blocks_of(body, RowSyntax::Csv, 1, 1000);
        let texts: Vec<&[u8]> = blocks.iter().map(|&(s, l, _)| &body[s..s + l]).collect();
        assert_eq!(
            texts,
            vec![
                &b"1,\"x\ny\"\n"[..],
                b"2,\"a\"\"\nb\"\n",
                b"3,ab\"c\n",
                b"4,z\n"
            ]
        );
        // Lines count quoted newlines too, as the CSV reader's positions do.
        let lines: Vec<usize> = blocks.iter().map(|b| b.2).collect();
        assert_eq!(lines, vec![1, 3, 5, 6]);
    }

    #[test]
    fn the_cut_does_not_depend_on_how_the_body_arrives() {
        let body: Vec<u8> = (0..500)
            .map(|i| format!("{i},\"v{i}\n\"\n"))
            .collect::<String>()
            .into_bytes();
        let whole = blocks_of(&body, RowSyntax::Csv, 37, 300);
        for piece in [1, 7, 64, 1000] {
            let mut splitter = BlockSplitter::new(RowSyntax::Csv, 37, 300);
            let (mut start, mut line, mut end) = (0, 1, 0);
            let mut got = Vec::new();
            while end < body.len() {
                end = (end + piece).min(body.len());
                while let Some(cut) = splitter.next_cut(&body[start..end]) {
                    got.push((start, cut.len, line));
                    start += cut.len;
                    line += cut.lines;
                }
            }
            if start < body.len() {
                got.push((start, body.len() - start, line));
            }
            assert_eq!(got, whole, "arriving in pieces of {piece}");
        }
    }
}
