//! Statement analysis for Ostiary's policy decisions. Pure functions over statement text: no I/O,
//! no Python. For now one interim check (`read_only`); the SQL guardrails add real parsing here.

pub mod read_only;
