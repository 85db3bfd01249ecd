//! The shape of a statement: its text with every literal replaced by `?`, comments removed,
//! whitespace collapsed and unquoted words lowercased, as PostgreSQL's lexer (with
//! `standard_conforming_strings` on) sees the tokens. Texts of one shape parse to trees that differ
//! only in constant values, so a verdict that does not depend on constants (the analysis says
//! which do: `Statement::literal_sensitive`) holds for every text of the shape. The data path keys
//! its verdict cache by shape: `... WHERE aid = 48213` and `... WHERE aid = 77301` are decided once.
//!
//! Literals: `'...'` (doubled quotes inside), `E'...'` (backslash escapes), `B'...'`, `X'...'`,
//! `N'...'`, `U&'...'`, dollar-quoted strings (`$$...$$`, `$tag$...$tag$`) and numbers. Quoted
//! identifiers (`"..."`, `U&"..."`) and parameters (`$1`) are kept as they are.

use crate::lex::{dollar_quote_end, is_ident_char, skip_block_comment, skip_quoted};

/// The shape of `sql` (see the module documentation).
pub fn shape(sql: &str) -> String {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut space = false;
    let mut i = 0;
    let emit = |out: &mut String, space: &mut bool, s: &str| {
        if *space && !out.is_empty() {
            out.push(' ');
        }
        *space = false;
        out.push_str(s);
    };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c.is_ascii_whitespace() {
            space = true;
            i += 1;
        } else if c == b'-' && next == Some(b'-') {
            while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                i += 1;
            }
            space = true;
        } else if c == b'/' && next == Some(b'*') {
            i = skip_block_comment(b, i);
            space = true;
        } else if c == b'\'' {
            i = skip_quoted(b, i, false);
            emit(&mut out, &mut space, "?");
        } else if c == b'"' {
            let end = skip_quoted(b, i, false);
            emit(&mut out, &mut space, &sql[i..end]);
            i = end;
        } else if c == b'$' && next.is_some_and(|d| d.is_ascii_digit()) {
            let mut j = i + 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            emit(&mut out, &mut space, &sql[i..j]);
            i = j;
        } else if c == b'$' {
            match dollar_quote_end(b, i) {
                Some(end) => {
                    i = end;
                    emit(&mut out, &mut space, "?");
                }
                None => {
                    emit(&mut out, &mut space, "$");
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == b'.' && next.is_some_and(|d| d.is_ascii_digit())) {
            i = skip_number(b, i);
            emit(&mut out, &mut space, "?");
        } else if is_ident_start(c) {
            let mut j = i + 1;
            while j < b.len() && is_ident_char(b[j]) {
                j += 1;
            }
            let word = sql[i..j].to_ascii_lowercase();
            let after = b.get(j).copied();
            if matches!(word.as_str(), "e" | "b" | "x" | "n") && after == Some(b'\'') {
                i = skip_quoted(b, j, word == "e");
                emit(&mut out, &mut space, "?");
            } else if word == "u" && after == Some(b'&') && b.get(j + 1) == Some(&b'\'') {
                i = skip_quoted(b, j + 1, false);
                emit(&mut out, &mut space, "?");
            } else if word == "u" && after == Some(b'&') && b.get(j + 1) == Some(&b'"') {
                let end = skip_quoted(b, j + 1, false);
                emit(&mut out, &mut space, &format!("u&{}", &sql[j + 1..end]));
                i = end;
            } else {
                emit(&mut out, &mut space, &word);
                i = j;
            }
        } else {
            let ch = sql[i..].chars().next().expect("in bounds");
            let mut buf = [0u8; 4];
            emit(&mut out, &mut space, ch.encode_utf8(&mut buf));
            i += ch.len_utf8();
        }
    }
    out
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

/// Index after the numeric literal at `i` (digits, `_` separators, a fraction, an exponent, hex,
/// octal and binary forms).
fn skip_number(b: &[u8], mut i: usize) -> usize {
    let digit = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'.';
    while i < b.len() && digit(b[i]) {
        if (b[i] == b'e' || b[i] == b'E') && matches!(b.get(i + 1), Some(b'+' | b'-')) {
            i += 1;
        }
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_placeholders() {
        assert_eq!(
            shape("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"),
            "select abalance from pgbench_accounts where aid = ?;"
        );
        assert_eq!(
            shape("select 'it''s', E'a\\'b', B'01', X'ff', N'x', U&'\\0041', $$x$$, $q$ y $q$, 1.5e-3, .5"),
            "select ?, ?, ?, ?, ?, ?, ?, ?, ?, ?"
        );
        assert_eq!(shape("select 0x1F, 1_000, 3"), "select ?, ?, ?");
    }

    #[test]
    fn same_shape_for_different_values_only() {
        let a = shape("update t set v = 'x' where id = 1");
        assert_eq!(
            a,
            shape("UPDATE  t\n SET v = 'something else' /* c */ WHERE id = 99 -- d")
        );
        assert_ne!(a, shape("update t set v = 'x' where id = 1 or true"));
        assert_ne!(shape("copy t to stdout"), shape("copy t to '/tmp/x'"));
        assert_ne!(shape("set x = on"), shape("set x = 'on'"));
    }

    #[test]
    fn identifiers_and_parameters_stay() {
        assert_eq!(
            shape(r#"select "Col" from "My Table" where a = $1"#),
            r#"select "Col" from "My Table" where a = $1"#
        );
        assert_eq!(
            shape(r#"select U&"\0041" from t1"#),
            r#"select u&"\0041" from t1"#
        );
        assert_eq!(shape("select a$b$ from t$1"), "select a$b$ from t$1");
        assert_eq!(shape("select x::text"), "select x::text");
    }

    #[test]
    fn strings_hide_no_code_and_comments_hide_none() {
        // A comment opener inside a string is part of the string.
        assert_eq!(
            shape("select '/*', 1; drop table t -- '"),
            "select ?, ?; drop table t"
        );
        // The E-string's escaped quote does not end it.
        assert_eq!(shape(r"select E'\'; drop table t; --'"), "select ?");
        assert_eq!(shape("select 1 /* a /* b */ c */ + 2"), "select ? + ?");
    }
}
