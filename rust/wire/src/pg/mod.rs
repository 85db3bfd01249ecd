//! PostgreSQL protocol v3.0 (frontend/backend protocol of PostgreSQL 7.4 and later).
//!
//! Layout: `codec` holds the byte-level readers and the message builder; `startup`, `frontend` and
//! `backend` hold the messages of each phase and direction, named as the protocol documentation
//! names them; `scram` is the SCRAM-SHA-256 client; `handshake` the two startup machines (the
//! client-facing one and the upstream one); `relay` the streaming scanner of established sessions;
//! `recording` the session recorder (what the client sent and received, capped, as frames).

pub mod audit;
pub mod backend;
pub mod binary;
pub mod codec;
pub mod frontend;
pub mod handshake;
pub mod masking;
pub mod query;
pub mod recording;
pub mod relay;
pub mod scram;
pub mod startup;

/// SQLSTATE codes the gateway itself emits.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const QUERY_CANCELED: &str = "57014";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const SYNTAX_ERROR: &str = "42601";
}

/// Whether `name` is one of PostgreSQL's client-only multibyte encodings (SJIS, BIG5, GBK, UHC,
/// GB18030, JOHAB and their aliases), whose second bytes can be `\` and so on: PostgreSQL converts
/// such text before lexing it, so a byte the gateway's analysis reads as a backslash can be part of
/// a character for the server (`E'<lead>\'; drop ...`). Sessions whose statements are judged refuse
/// them. Names are compared as PostgreSQL does (`clean_encoding_name`: letters and digits only,
/// lower case). `ostiary_sql` uses it for `SET client_encoding`.
pub fn client_encoding_splits_bytes(name: &str) -> bool {
    let clean: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    matches!(
        clean.as_str(),
        "sjis"
            | "shiftjis"
            | "mskanji"
            | "win932"
            | "windows932"
            | "shiftjis2004"
            | "big5"
            | "win950"
            | "windows950"
            | "gbk"
            | "win936"
            | "windows936"
            | "uhc"
            | "win949"
            | "windows949"
            | "gb18030"
            | "johab"
    )
}
