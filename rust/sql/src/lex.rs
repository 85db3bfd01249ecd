//! Pieces of PostgreSQL's lexical rules shared by the text scanners of this crate (`read_only`,
//! `shape`): block comments nest, quoted tokens double their quote (and, in `E'...'` or with
//! `standard_conforming_strings` off, a backslash escapes), a dollar quote is `$tag$...$tag$`.

/// A byte that continues an identifier (`$` included, as after the first character in PostgreSQL).
pub(crate) fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Index after the block comment starting at `i` (nested comments counted; unterminated: the end).
pub(crate) fn skip_block_comment(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    i
}

/// Index after the quoted token opening at `i` (its quote byte); a doubled quote is one quote, and
/// with `backslash` a backslash escapes the next byte. Unterminated: the end.
pub(crate) fn skip_quoted(b: &[u8], i: usize, backslash: bool) -> usize {
    let quote = b[i];
    let mut j = i + 1;
    while j < b.len() {
        if backslash && b[j] == b'\\' {
            j += 2;
        } else if b[j] == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

/// When the `$` at `i` opens a dollar-quoted string (`$$` or `$tag$`, not `$1`, not inside an
/// identifier such as `a$b`): the index after its closing tag (unterminated: the end).
pub(crate) fn dollar_quote_end(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && is_ident_char(b[i - 1]) {
        return None;
    }
    let mut j = i + 1;
    if j < b.len() && b[j].is_ascii_digit() {
        return None;
    }
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    if j >= b.len() || b[j] != b'$' {
        return None;
    }
    let tag = &b[i..=j];
    Some(
        b[j + 1..]
            .windows(tag.len())
            .position(|w| w == tag)
            .map(|p| j + 1 + p + tag.len())
            .unwrap_or(b.len()),
    )
}
