//! Sans-IO wire protocol machines for Ostiary.
//!
//! Rules of this crate: it never touches a socket, a clock, a thread or a config file. Callers feed
//! it bytes and it returns events and bytes to send. Every length prefix read from a peer is checked
//! against [`Limits`] before anything is allocated for it, and every failure is a typed
//! [`WireError`] that the caller turns into the protocol's own goodbye (for PostgreSQL a FATAL
//! ErrorResponse with SQLSTATE 08P01). Nothing here panics on peer input.

pub mod error;
pub mod limits;
pub mod pg;

pub use error::WireError;
pub use limits::Limits;
