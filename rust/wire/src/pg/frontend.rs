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
    let n = r.count16()?;
    let mut types = Vec::with_capacity(n.min(r.remaining().len() / 4));
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

/// Cuts `s` to at most `max` bytes (on a UTF-8 character boundary), lossily decoded; says whether
/// it was cut.
pub fn cut(s: &[u8], max: usize) -> (String, bool) {
    if s.len() <= max {
        return (String::from_utf8_lossy(s).into_owned(), false);
    }
    let mut end = max;
    // Cut on a character boundary when the text is UTF-8.
    while end > 0 && (s[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    (String::from_utf8_lossy(&s[..end]).into_owned(), true)
}

/// A NUL-terminated string at the start of `r`, or everything left when the prefix was cut inside it.
pub fn cstr_or_rest<'a>(r: &mut Reader<'a>) -> &'a [u8] {
    let rest = r.remaining();
    match rest.iter().position(|&b| b == 0) {
        Some(i) => {
            let _ = r.bytes(i + 1);
            &rest[..i]
        }
        None => {
            let _ = r.bytes(rest.len());
            rest
        }
    }
}

/// Bind, read leniently (a prefix of the body is fine; nothing here fails): the portal, the
/// prepared statement and the parameters as text, NULL as None, at most `max_text` bytes of them in
/// all (what does not fit is dropped and marked with a last `"…"`). Binary parameters of the types
/// `types` (the Parse's parameter type OIDs) names are shown as their text (integers, numeric,
/// bool, floats, uuid, inet); others as `\x` hex.
pub fn bind_fields(
    body: &[u8],
    max_text: usize,
    types: &[u32],
) -> (String, String, Vec<Option<String>>) {
    let mut r = Reader::new(body, "Bind");
    let portal = String::from_utf8_lossy(cstr_or_rest(&mut r)).into_owned();
    let stmt = String::from_utf8_lossy(cstr_or_rest(&mut r)).into_owned();
    let rest = r.remaining();
    let (mut params, cut) = bind_params(&mut r, max_text, types);
    if cut {
        // Cut: two executions that differ only past the cut must not read the same (an approval
        // binds the parameters it was asked for): the digest of all of them follows the mark.
        use sha2::Digest;
        let digest = sha2::Sha256::digest(rest);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        if let Some(Some(last)) = params.last_mut() {
            last.push_str(&format!(" [parameters cut; sha256 {hex}]"));
        }
    }
    (portal, stmt, params)
}

/// FunctionCall, read leniently: the function's OID and its arguments as text (laid out as a
/// Bind's parameters: format codes, then values; binary ones marked and shown in hex), within
/// `max_text` bytes in all.
pub fn function_call_fields(body: &[u8], max_text: usize) -> (u32, Vec<Option<String>>) {
    let mut r = Reader::new(body, "FunctionCall");
    let oid = r.u32().unwrap_or(0);
    let (args, _) = bind_params(&mut r, max_text, &[]);
    (oid, args)
}

/// Parse, read leniently: the statement name, its text (cut at `max_text`, and whether it was)
/// and the parameter type OIDs that fit in `body` (a prefix is fine).
pub fn parse_fields(body: &[u8], max_text: usize) -> (String, String, bool, Vec<u32>) {
    let mut r = Reader::new(body, "Parse");
    let name = String::from_utf8_lossy(cstr_or_rest(&mut r)).into_owned();
    let (text, truncated) = cut(cstr_or_rest(&mut r), max_text);
    let mut types = Vec::new();
    if let Ok(n) = r.count16() {
        for _ in 0..n {
            match r.u32() {
                Ok(t) => types.push(t),
                Err(_) => break,
            }
        }
    }
    (name, text, truncated, types)
}

/// How a binary Bind parameter the gateway cannot render starts (then `\x` and its bytes in hex).
pub const BINARY_MARK: &str = "\u{FFFD}binary:";

/// Bind parameters as text, within `max_text` bytes in all (what does not fit is dropped and
/// marked with a last `"…"`), and whether any was.
fn bind_params(r: &mut Reader<'_>, max_text: usize, types: &[u32]) -> (Vec<Option<String>>, bool) {
    let mut out = Vec::new();
    let Ok(nf) = r.count16() else {
        return (out, false);
    };
    let mut formats = Vec::new();
    for _ in 0..nf {
        match r.i16() {
            Ok(f) => formats.push(f),
            Err(_) => return (out, false),
        }
    }
    let Ok(np) = r.count16() else {
        return (out, false);
    };
    let mut room = max_text;
    for i in 0..np {
        let Ok(len) = r.i32() else {
            out.push(Some("…".into()));
            return (out, true);
        };
        if len < 0 {
            out.push(None);
            continue;
        }
        let avail = r.remaining();
        let len = len as usize;
        let have = avail.len().min(len);
        let raw = &avail[..have];
        let _ = r.bytes(have);
        let binary = match formats.len() {
            0 => false,
            1 => formats[0] == 1,
            _ => formats.get(i).copied() == Some(1),
        };
        let mut rendered = Vec::new();
        let known = binary
            && have == len
            && super::binary::render_param(types.get(i).copied().unwrap_or(0), raw, &mut rendered);
        let mut text = if known {
            String::from_utf8_lossy(&rendered).into_owned()
        } else if binary {
            // A binary value of a type not rendered here (or not declared: the server resolves
            // it from the statement) reads differently from a text parameter of the same hex:
            // marked with U+FFFD, which text parameters shown to approvers never hold (held
            // statements with it are refused), so the two cannot be taken for each other.
            let mut s = BINARY_MARK.to_owned();
            super::binary::bytea_hex(raw, &mut s);
            s
        } else {
            String::from_utf8_lossy(raw).into_owned()
        };
        if have < len || text.len() > room {
            let (t, _) = cut(text.as_bytes(), room.min(text.len()));
            text = t + "…";
            out.push(Some(text));
            return (out, true);
        }
        room -= text.len();
        out.push(Some(text));
    }
    (out, false)
}
