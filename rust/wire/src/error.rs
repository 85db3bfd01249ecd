//! The one error type of the wire crate. Each variant names what the peer did wrong; the caller
//! maps all of them to a protocol violation (SQLSTATE 08P01) except where noted.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("message length {length} is invalid (must be at least {min})")]
    LengthTooSmall { length: i64, min: usize },
    #[error("{what} of {length} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        length: usize,
        limit: usize,
    },
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { major: u16, minor: u16 },
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
    pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        WireError::Malformed {
            what,
            detail: detail.into(),
        }
    }
}
