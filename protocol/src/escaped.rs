//! ClickHouse's "escaped" text form of a string (`writeEscapedString`/`readEscapedString`):
//! a value that must stay on one line of a node, such as a mutation's command list.
//! Control characters, the backslash and the single quote are written with a backslash.

/// The escaped form of `text`, as ClickHouse writes it.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out
}

/// The string an escaped text stands for. ClickHouse reads an unknown escape as the
/// character itself (`\q` is `q`), so this does too; a lone trailing backslash is refused
/// because ClickHouse would read past the end of the field.
pub fn unescape(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some(e) = chars.next() else {
            return Err("a lone `\\` ends the escaped text".to_string());
        };
        out.push(match e {
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            '0' => '\0',
            'a' => '\u{7}',
            'v' => '\u{b}',
            other => other,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_clickhouse_escapes_and_reads_it_back() {
        let text = "DELETE WHERE s = 'a\\b'\n\tx\0";
        let escaped = escape(text);
        assert_eq!(escaped, "DELETE WHERE s = \\'a\\\\b\\'\\n\\tx\\0");
        assert!(!escaped.contains('\n') && !escaped.contains('\t'));
        assert_eq!(unescape(&escaped).expect("reads"), text);
    }

    #[test]
    fn unknown_escapes_are_the_character_and_a_trailing_backslash_is_refused() {
        assert_eq!(unescape("\\q\\\"").expect("reads"), "q\"");
        assert!(unescape("abc\\").expect_err("lone").contains("lone"));
    }
}
