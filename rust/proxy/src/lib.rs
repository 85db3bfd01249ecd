//! Ostiary's data path, without Python.
//!
//! The control plane (Trio, in Python) accepts a connection, runs the startup and authentication
//! exchange through the sans-IO machines of `ostiary-wire`, connects and authenticates upstream, and
//! then hands both sockets (with their TLS state and any bytes already read) to the [`Engine`]. From
//! then on the session's bytes are moved by an engine worker thread; the control plane hears of the
//! session only through batched [`Event`]s (a statement to decide, a report, the session's end) and
//! speaks to it through [`Command`]s (a verdict, drain, terminate).

pub mod engine;
mod rt;
pub mod tls;

pub use engine::{Command, Engine, EngineConfig, Event, SessionSpec};
pub use tls::{TlsError, TlsLayer};
