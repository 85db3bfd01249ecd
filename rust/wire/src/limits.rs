//! Bounds applied to everything a peer can make the gateway buffer.

/// Size bounds passed to every machine's constructor.
///
/// `max_startup` bounds the StartupMessage (PostgreSQL itself uses 10,000 bytes).
/// `max_message` bounds the length prefix of every message in an established session; messages
/// are streamed through in chunks, so this bounds what a peer may announce, not memory.
/// `max_statement` bounds the messages the gateway must hold whole to inspect them (Query, Parse,
/// FunctionCall text; CommandComplete and ErrorResponse from the server): that is the memory bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_startup: usize,
    pub max_message: usize,
    pub max_statement: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // PostgreSQL's own ceiling for a message is 1 GiB - 1 (PQ_LARGE_MESSAGE_LIMIT).
        Limits {
            max_startup: 10_000,
            max_message: (1 << 30) - 1,
            max_statement: 16 * 1024 * 1024,
        }
    }
}
