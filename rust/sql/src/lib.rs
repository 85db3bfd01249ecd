//! Statement analysis for Ostiary's policy decisions. Pure functions over statement text: no I/O,
//! no Python. `analyze` judges statements with PostgreSQL's own parser; `read_only` is a cheap
//! text check the data path runs on every statement of a read-only session; `shape` keys the data
//! path's verdict cache.

pub mod analyze;
mod ffi;
mod lex;
pub mod read_only;
pub mod shape;
