//! Frontend (client to server) typed messages that the gateway decodes or writes itself. Bulk
//! messages (CopyData, Bind parameters) are not decoded: the relay streams them.

use super::codec::{Builder, Reader};
use crate::WireError;

pub mod tag {
    pub const BIND: u8 = b'B';
    pub const CLOSE: u8 = b'C';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const FLUSH: u8 = b'H';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PARSE: u8 = b'P';
    /// PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse all use 'p'.
    pub const PASSWORD: u8 = b'p';
    pub const QUERY: u8 = b'Q';
    pub const SYNC: u8 = b'S';
    pub const TERMINATE: u8 = b'X';
}

/// A PasswordMessage from a client answering AuthenticationCleartextPassword.
pub fn decode_password(body: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut r = Reader::new(body, "PasswordMessage");
    let pw = r.cstr()?.to_vec();
    if !r.is_empty() {
        return Err(WireError::malformed(
            "PasswordMessage",
            "trailing bytes after the password",
        ));
    }
    Ok(pw)
}

pub fn password(pw: &[u8]) -> Vec<u8> {
    Builder::new(tag::PASSWORD).cstr(pw).finish()
}

pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    Builder::new(tag::PASSWORD)
        .cstr(mechanism.as_bytes())
        .i32(data.len() as i32)
        .bytes(data)
        .finish()
}

pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    Builder::new(tag::PASSWORD).bytes(data).finish()
}

pub fn query(sql: &str) -> Vec<u8> {
    Builder::new(tag::QUERY).cstr(sql.as_bytes()).finish()
}

pub fn decode_query(body: &[u8]) -> Result<&[u8], WireError> {
    Reader::new(body, "Query").cstr()
}

/// Parse: (prepared statement name, query text, parameter type OIDs).
pub type ParseFields<'a> = (&'a [u8], &'a [u8], Vec<u32>);

pub fn decode_parse(body: &[u8]) -> Result<ParseFields<'_>, WireError> {
    let mut r = Reader::new(body, "Parse");
    let name = r.cstr()?;
    let sql = r.cstr()?;
    let n = r.i16()?;
    if n < 0 {
        return Err(WireError::malformed("Parse", "negative parameter count"));
    }
    let mut types = Vec::with_capacity(n as usize);
    for _ in 0..n {
        types.push(r.u32()?);
    }
    Ok((name, sql, types))
}

pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = Builder::new(tag::PARSE)
        .cstr(name.as_bytes())
        .cstr(sql.as_bytes())
        .i16(types.len() as i16);
    for t in types {
        b = b.i32(*t as i32);
    }
    b.finish()
}

/// FunctionCall: the function's OID (arguments are not decoded).
pub fn decode_function_call(body: &[u8]) -> Result<u32, WireError> {
    Reader::new(body, "FunctionCall").u32()
}

pub fn sync() -> Vec<u8> {
    Builder::new(tag::SYNC).finish()
}

pub fn terminate() -> Vec<u8> {
    Builder::new(tag::TERMINATE).finish()
}
