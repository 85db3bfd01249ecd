//! The one call into libpg_query's C API that the pg_query crate does not expose: the parse tree
//! as JSON (`pg_query_parse`). The crate's own `parse` decodes protobuf and walks the tree to
//! collect tables, which costs about three times as much for what `analyze` needs.
//!
//! The library itself is built and linked by the pg_query crate (a static library); these
//! declarations must match `pg_query.h` of the version it vendors (checked by the tests).

use std::ffi::{c_char, c_int, CStr, CString};

// Keeps the pg_query crate (and so the static libpg_query it links) in the build.
use pg_query as _;

#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

#[repr(C)]
struct PgQueryParseResult {
    parse_tree: *mut c_char,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

unsafe extern "C" {
    fn pg_query_parse(input: *const c_char) -> PgQueryParseResult;
    fn pg_query_free_parse_result(result: PgQueryParseResult);
}

/// The parse tree of `sql` as libpg_query's JSON, or the parser's error message.
pub fn parse_json(sql: &str) -> Result<String, String> {
    let input = CString::new(sql).map_err(|_| "the statement contains a NUL byte".to_owned())?;
    // SAFETY: `input` is a valid NUL-terminated string that outlives the call. libpg_query keeps
    // its state in thread-local memory contexts, so calls from several threads do not interfere.
    let result = unsafe { pg_query_parse(input.as_ptr()) };
    // SAFETY: on error, `error` points to a PgQueryError whose `message` is a NUL-terminated
    // string; on success `parse_tree` is one. Both stay valid until the result is freed below,
    // and are copied into owned Strings before that.
    let out = unsafe {
        if !result.error.is_null() {
            let message = (*result.error).message;
            Err(if message.is_null() {
                "the statement does not parse".to_owned()
            } else {
                CStr::from_ptr(message).to_string_lossy().into_owned()
            })
        } else if result.parse_tree.is_null() {
            Err("the parser returned no tree".to_owned())
        } else {
            Ok(CStr::from_ptr(result.parse_tree)
                .to_string_lossy()
                .into_owned())
        }
    };
    // SAFETY: `result` came from pg_query_parse and is freed exactly once.
    unsafe { pg_query_free_parse_result(result) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_errors() {
        let json = parse_json("select 1").unwrap();
        assert!(json.contains("\"SelectStmt\""), "{json}");
        let err = parse_json("selec 1").unwrap_err();
        assert!(err.contains("syntax error"), "{err}");
        assert!(parse_json("select '\0'").is_err());
    }

    #[test]
    fn concurrent_calls() {
        let threads: Vec<_> = (0..4)
            .map(|i| {
                std::thread::spawn(move || {
                    for j in 0..200 {
                        let sql = format!("select {i} + {j} from t{i}");
                        assert!(parse_json(&sql).unwrap().contains(&format!("\"t{i}\"")));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
