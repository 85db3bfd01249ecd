//! The one error type of the wire crate. Each variant names what the peer did wrong; the caller
//! maps all of them to a protocol violation (SQLSTATE 08P01) except where noted.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("message length {length} is invalid (must be at least {min})")]
    LengthTooSmall { length: i64, min: usize },
    #[error("{count} {what} exceed the limit of {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("{what} of {length} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        length: usize,
        limit: usize,
    },
    /// A StartupMessage of a protocol other than 3.x (PostgreSQL's 0A000, with its wording).
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    /// A StartupMessage without a `user` (PostgreSQL's 28000, with its wording).
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("unexpected message type {tag:?} during {phase}")]
    Unexpected { tag: char, phase: &'static str },
    #[error("authentication with the upstream failed: {0}")]
    Auth(String),
    /// The session broke a condition the gateway's decisions depend on; it must end.
    #[error("{0}")]
    Refused(String),
}

impl WireError {
    /// The SQLSTATE PostgreSQL sends for this error, where it is not a protocol violation.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            WireError::UnsupportedVersion { .. } => "0A000",
            WireError::NoUser => "28000",
            _ => crate::pg::sqlstate::PROTOCOL_VIOLATION,
        }
    }

    pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        WireError::Malformed {
            what,
            detail: detail.into(),
        }
    }
}
