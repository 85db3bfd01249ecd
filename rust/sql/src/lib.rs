//! Statement analysis for Ostiary's policy decisions. Pure functions over statement text: no I/O,
//! no Python. `analyze` judges statements with PostgreSQL's own parser; `read_only` is a cheap
//! text check the data path runs on every statement of a read-only session; `shape` keys the data
//! path's verdict cache.

pub mod analyze;
pub mod columns;
mod ffi;
mod lex;
pub mod read_only;
pub mod shape;

/// Whether the text could hold a COPY statement: the letters "copy" in any case, anywhere
/// (comments and strings included). Conservative: a false hit only costs a decision.
pub fn mentions_copy(sql: &str) -> bool {
    sql.as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"copy"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn mentions_copy() {
        assert!(super::mentions_copy("CoPy t to stdout"));
        assert!(super::mentions_copy("select 1; /* */ copy"));
        assert!(!super::mentions_copy("select cop, y from t"));
    }
}
