//! What the audit trail learns of each statement of a session, followed on the relay's path.
//!
//! Theory of operation. The unit of the trail is an *execution*: a simple Query message (every
//! statement of its string), an Execute of the extended protocol (the prepared statement its
//! portal was bound from, with the Bind parameters), a FunctionCall, and a Parse the control plane
//! denied. The relay calls `front` for each client message it forwards, in forwarding order, with
//! (a prefix of) its body and the verdict applied; executions join a queue. The server answers in
//! order, so `back` closes them: an Execute by its CommandComplete, EmptyQueryResponse,
//! PortalSuspended or ErrorResponse; a Query or FunctionCall by its ReadyForQuery (after summing its
//! CommandCompletes). An ErrorResponse belongs to the oldest open execution of the current *block*
//! (the messages up to and including a Sync, Query or FunctionCall, answered by one
//! ReadyForQuery): an error in a Parse or Bind is why that execution failed; later Executes of the
//! block were skipped by the server and are closed as `skipped` at its ReadyForQuery.
//!
//! Statement texts and parameters are kept to `max_text` bytes (the relay streams the rest of a long
//! statement without holding it). Prepared statements and portals are remembered by name within a
//! byte budget; a session that exceeds it ends with an error rather than leave executions unnamed
//! (fail closed). With `write_ahead` (the audit trail's sync mode) every execution is also reported
//! when it is forwarded (`Phase::Start`), so the caller can hold the bytes until that record is
//! durable; its outcome follows as `Phase::Result`. Otherwise one `Phase::Complete` entry carries
//! both. The caller provides the clock (`set_now`, microseconds).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::backend::{self, tag as btag, ErrorFields};
use super::codec::Reader;
use super::frontend::{self, cstr_or_rest, cut, tag as ftag};
use super::relay::Verdict;
use crate::WireError;

/// Bytes of statement texts, parameters and names a session's audit may remember for its prepared
/// statements and portals.
pub const PREPARED_BUDGET: usize = 4 << 20;
/// Executions waiting for their outcome (a pipeline longer than this ends the session).
pub const MAX_OPEN: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Decided and forwarded; the outcome follows (write-ahead only).
    Start,
    /// The outcome of an execution reported at its start.
    Result,
    /// The whole execution, reported once it ended.
    Complete,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::Result => "result",
            Phase::Complete => "complete",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not known yet (a `Start` entry).
    Pending,
    Ok,
    Error,
    /// Not run by the server: an earlier message of its block failed.
    Skipped,
    /// PortalSuspended: the row limit of the Execute was reached; the client may fetch more.
    Suspended,
    /// The session ended before the server answered.
    Incomplete,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Skipped => "skipped",
            Outcome::Suspended => "suspended",
            Outcome::Incomplete => "incomplete",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecKind {
    Query,
    Execute,
    FunctionCall,
    Parse,
}

impl ExecKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecKind::Query => "query",
            ExecKind::Execute => "execute",
            ExecKind::FunctionCall => "function_call",
            ExecKind::Parse => "parse",
        }
    }
}

/// One record's worth of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// Execution number within the session (from 1); a `Result` repeats its `Start`'s.
    pub seq: u64,
    pub phase: Phase,
    pub kind: ExecKind,
    /// Prepared statement name (Execute: the statement its portal was bound from).
    pub name: String,
    pub text: String,
    /// Whether `text` was cut at `max_text` bytes.
    pub truncated: bool,
    /// Bind parameters as text (binary values as `\x` hex), NULL as None; cut to `max_text` in all.
    pub params: Vec<Option<String>>,
    /// The gateway's denial (its SQLSTATE, message and rule), if denied.
    pub denied: Option<(String, String, String)>,
    pub started_us: u64,
    pub ended_us: u64,
    pub rows: u64,
    pub bytes: u64,
    /// The last command tag (for a Query of several statements, their count is in `commands`).
    pub tag: String,
    pub commands: u32,
    pub outcome: Outcome,
    pub error: Option<(String, String)>,
}

#[derive(Debug, Clone)]
struct Prepared {
    text: Arc<str>,
    truncated: bool,
    denied: Option<(String, String, String)>,
    /// Parameter type OIDs from the Parse (to show binary parameters as text).
    types: Arc<[u32]>,
}

#[derive(Debug, Clone)]
struct Portal {
    stmt: String,
    prepared: Option<Prepared>,
    params: Arc<[Option<String>]>,
}

#[derive(Debug)]
struct Open {
    entry: AuditEntry,
    block: u64,
}

#[derive(Debug)]
pub struct AuditTrack {
    max_text: usize,
    write_ahead: bool,
    now: u64,
    next_seq: u64,
    stmts: HashMap<String, Prepared>,
    portals: HashMap<String, Portal>,
    budget_used: usize,
    /// Blocks sent (Query, FunctionCall, Sync) and answered (ReadyForQuery).
    sent_blocks: u64,
    answered_blocks: u64,
    open: VecDeque<Open>,
    done: Vec<AuditEntry>,
    starts: usize,
}

/// What a simple-query text frees with SQL that the protocol's Close would otherwise free.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SqlFree {
    Statement(String),
    AllStatements,
    AllPortals,
    Everything,
}

/// The DEALLOCATE [PREPARE] name|ALL, DISCARD ALL and CLOSE ALL statements of `text`, read
/// word by word (a statement split by `;` inside a string or comment is misread at worst as
/// freeing something, which only forgets what the trail would have named).
fn sql_frees(text: &str) -> Vec<SqlFree> {
    let mut out = Vec::new();
    for stmt in text.split(';') {
        let words: Vec<&str> = stmt.split_ascii_whitespace().collect();
        let word = |i: usize| words.get(i).map(|w| w.to_ascii_lowercase());
        match word(0).as_deref() {
            Some("deallocate") => {
                let at = if word(1).as_deref() == Some("prepare") {
                    2
                } else {
                    1
                };
                match (word(at).as_deref(), words.get(at)) {
                    (Some("all"), _) => out.push(SqlFree::AllStatements),
                    (_, Some(raw)) => {
                        let name = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                            Some(quoted) => quoted.replace("\"\"", "\""),
                            None => raw.to_ascii_lowercase(),
                        };
                        out.push(SqlFree::Statement(name));
                    }
                    _ => {}
                }
            }
            Some("discard") if word(1).as_deref() == Some("all") => out.push(SqlFree::Everything),
            Some("close") if word(1).as_deref() == Some("all") => out.push(SqlFree::AllPortals),
            _ => {}
        }
    }
    out
}

fn params_size(params: &[Option<String>]) -> usize {
    params.iter().flatten().map(String::len).sum()
}

impl AuditTrack {
    pub fn new(max_text: usize, write_ahead: bool) -> Self {
        AuditTrack {
            max_text,
            write_ahead,
            now: 0,
            next_seq: 1,
            stmts: HashMap::new(),
            portals: HashMap::new(),
            budget_used: 0,
            sent_blocks: 0,
            answered_blocks: 0,
            open: VecDeque::new(),
            done: Vec::new(),
            starts: 0,
        }
    }

    /// How many body bytes of a client message with this tag the track needs (0: none).
    pub fn wants_front(&self, tag: u8) -> usize {
        match tag {
            ftag::QUERY | ftag::PARSE | ftag::BIND => self.max_text + 256,
            ftag::EXECUTE | ftag::CLOSE | ftag::FUNCTION_CALL => 1024,
            ftag::SYNC => 1,
            _ => 0,
        }
    }

    pub fn wants_back(tag: u8) -> bool {
        matches!(
            tag,
            btag::COMMAND_COMPLETE
                | btag::ERROR_RESPONSE
                | btag::READY_FOR_QUERY
                | btag::EMPTY_QUERY_RESPONSE
                | btag::PORTAL_SUSPENDED
        )
    }

    pub fn set_now(&mut self, now_us: u64) {
        self.now = now_us;
    }

    pub fn write_ahead(&self) -> bool {
        self.write_ahead
    }

    /// `Start` entries produced since the last `take` (write-ahead: the caller must hold what it
    /// forwards until they are durable).
    pub fn starts(&self) -> usize {
        self.starts
    }

    pub fn has_entries(&self) -> bool {
        !self.done.is_empty()
    }

    pub fn take(&mut self) -> Vec<AuditEntry> {
        self.starts = 0;
        std::mem::take(&mut self.done)
    }

    fn release(&mut self, n: usize) {
        self.budget_used = self.budget_used.saturating_sub(n);
    }

    fn charge(&mut self, n: usize) -> Result<(), WireError> {
        self.budget_used += n;
        if self.budget_used > PREPARED_BUDGET {
            return Err(WireError::TooLarge {
                what: "prepared statements and portals the audit trail follows",
                length: self.budget_used,
                limit: PREPARED_BUDGET,
            });
        }
        Ok(())
    }

    fn entry(&mut self, kind: ExecKind, name: String, p: &Prepared) -> AuditEntry {
        let seq = self.next_seq;
        self.next_seq += 1;
        AuditEntry {
            seq,
            phase: Phase::Complete,
            kind,
            name,
            text: p.text.to_string(),
            truncated: p.truncated,
            params: Vec::new(),
            denied: p.denied.clone(),
            started_us: self.now,
            ended_us: 0,
            rows: 0,
            bytes: 0,
            tag: String::new(),
            commands: 0,
            outcome: Outcome::Pending,
            error: None,
        }
    }

    fn open_entry(&mut self, entry: AuditEntry) -> Result<(), WireError> {
        if self.open.len() >= MAX_OPEN {
            return Err(WireError::TooMany {
                what: "statements sent ahead of the server's answers (audited sessions)",
                count: self.open.len() + 1,
                limit: MAX_OPEN,
            });
        }
        if self.write_ahead {
            let mut start = entry.clone();
            start.phase = Phase::Start;
            self.done.push(start);
            self.starts += 1;
        }
        self.open.push_back(Open {
            entry,
            block: self.sent_blocks,
        });
        Ok(())
    }

    /// A client message forwarded upstream: `body` is its body or a prefix of it; `verdict` is the
    /// control plane's verdict for Query, Parse and FunctionCall when the session is gated.
    pub fn front(
        &mut self,
        tag: u8,
        body: &[u8],
        verdict: Option<&Verdict>,
    ) -> Result<(), WireError> {
        let denied = match verdict {
            Some(Verdict::Deny {
                code,
                message,
                rule,
            }) => Some((code.clone(), message.clone(), rule.clone())),
            _ => None,
        };
        let mut r = Reader::new(body, "client message");
        match tag {
            ftag::QUERY => {
                let (text, truncated) = cut(cstr_or_rest(&mut r), self.max_text);
                let p = Prepared {
                    text: text.into(),
                    truncated,
                    denied,
                    types: Arc::from(Vec::new()),
                };
                for freed in sql_frees(&p.text) {
                    self.free(freed);
                }
                let e = self.entry(ExecKind::Query, String::new(), &p);
                self.open_entry(e)?;
                self.sent_blocks += 1;
            }
            ftag::FUNCTION_CALL => {
                let (oid, args) = frontend::function_call_fields(body, self.max_text);
                let p = Prepared {
                    text: format!("function {oid}").into(),
                    truncated: false,
                    denied,
                    types: Arc::from(Vec::new()),
                };
                let mut e = self.entry(ExecKind::FunctionCall, String::new(), &p);
                e.params = args;
                self.open_entry(e)?;
                self.sent_blocks += 1;
            }
            ftag::PARSE => {
                let (name, text, truncated, types) = frontend::parse_fields(body, self.max_text);
                let p = Prepared {
                    text: text.into(),
                    truncated,
                    denied,
                    types: types.into(),
                };
                if p.denied.is_some() {
                    let e = self.entry(ExecKind::Parse, name.clone(), &p);
                    self.open_entry(e)?;
                }
                self.charge(name.len() + p.text.len())?;
                if let Some(old) = self.stmts.remove(&name) {
                    self.release(name.len() + old.text.len());
                }
                self.stmts.insert(name, p);
            }
            ftag::BIND => {
                let types = self
                    .stmts
                    .get(&frontend::bind_fields(body, 0, &[]).1)
                    .map(|p| Arc::clone(&p.types))
                    .unwrap_or_else(|| Arc::from(Vec::new()));
                let (portal, stmt, params) = frontend::bind_fields(body, self.max_text, &types);
                let size = portal.len() + stmt.len() + params_size(&params);
                self.charge(size)?;
                if let Some(old) = self.portals.remove(&portal) {
                    self.release(portal.len() + old.stmt.len() + params_size(&old.params));
                }
                let prepared = self.stmts.get(&stmt).cloned();
                self.portals.insert(
                    portal,
                    Portal {
                        stmt,
                        prepared,
                        params: params.into(),
                    },
                );
            }
            ftag::EXECUTE => {
                let portal = String::from_utf8_lossy(cstr_or_rest(&mut r)).into_owned();
                let (name, p, params) = match self.portals.get(&portal) {
                    Some(pt) => (
                        pt.stmt.clone(),
                        pt.prepared.clone().unwrap_or_else(|| Prepared {
                            text: format!("<prepared statement {:?}: not seen>", pt.stmt).into(),
                            truncated: false,
                            denied: None,
                            types: Arc::from(Vec::new()),
                        }),
                        pt.params.to_vec(),
                    ),
                    None => (
                        String::new(),
                        Prepared {
                            text: format!("<portal {portal:?}: not seen>").into(),
                            truncated: false,
                            denied: None,
                            types: Arc::from(Vec::new()),
                        },
                        Vec::new(),
                    ),
                };
                let mut e = self.entry(ExecKind::Execute, name, &p);
                e.params = params;
                if denied.is_some() {
                    e.denied = denied;
                }
                self.open_entry(e)?;
            }
            ftag::CLOSE => {
                let portal = r.u8().unwrap_or(b'S') == b'P';
                let name = String::from_utf8_lossy(cstr_or_rest(&mut r)).into_owned();
                if portal {
                    if let Some(old) = self.portals.remove(&name) {
                        self.release(name.len() + old.stmt.len() + params_size(&old.params));
                    }
                } else if let Some(old) = self.stmts.remove(&name) {
                    self.release(name.len() + old.text.len());
                }
            }
            ftag::SYNC => self.sent_blocks += 1,
            _ => {}
        }
        Ok(())
    }

    /// Forgets what SQL freed (DEALLOCATE, DISCARD ALL, CLOSE ALL), as Close does for the
    /// protocol's own messages: its budget is released.
    fn free(&mut self, freed: SqlFree) {
        let stmts: Vec<String> = match &freed {
            SqlFree::Statement(name) => vec![name.clone()],
            SqlFree::AllStatements | SqlFree::Everything => self.stmts.keys().cloned().collect(),
            SqlFree::AllPortals => Vec::new(),
        };
        for name in stmts {
            if let Some(old) = self.stmts.remove(&name) {
                self.release(name.len() + old.text.len());
            }
        }
        if matches!(freed, SqlFree::AllPortals | SqlFree::Everything) {
            for (name, old) in std::mem::take(&mut self.portals) {
                self.release(name.len() + old.stmt.len() + params_size(&old.params));
            }
        }
    }

    fn close(&mut self, mut open: Open, outcome: Outcome) {
        open.entry.outcome = outcome;
        open.entry.ended_us = self.now;
        if self.write_ahead {
            open.entry.phase = Phase::Result;
        }
        self.done.push(open.entry);
    }

    fn head_in_block(&mut self) -> Option<&mut Open> {
        let block = self.answered_blocks;
        self.open.front_mut().filter(|o| o.block == block)
    }

    /// A server message the relay captured (`body` whole); `rows` and `bytes` are what the relay
    /// counted since the previous CommandComplete or ReadyForQuery.
    pub fn back(&mut self, tag: u8, body: &[u8], rows: u64, bytes: u64) -> Result<(), WireError> {
        match tag {
            btag::COMMAND_COMPLETE => {
                let ctag = backend::decode_command_complete(body)?;
                if let Some(head) = self.head_in_block() {
                    head.entry.rows += rows;
                    head.entry.bytes += bytes;
                    head.entry.tag = ctag;
                    head.entry.commands += 1;
                    if head.entry.kind == ExecKind::Execute {
                        let o = self.open.pop_front().expect("head");
                        self.close(o, Outcome::Ok);
                    }
                }
            }
            btag::EMPTY_QUERY_RESPONSE | btag::PORTAL_SUSPENDED => {
                if let Some(head) = self.head_in_block() {
                    head.entry.rows += rows;
                    head.entry.bytes += bytes;
                    if head.entry.kind == ExecKind::Execute {
                        let o = self.open.pop_front().expect("head");
                        let outcome = if tag == btag::PORTAL_SUSPENDED {
                            Outcome::Suspended
                        } else {
                            Outcome::Ok
                        };
                        self.close(o, outcome);
                    }
                }
            }
            btag::ERROR_RESPONSE => {
                let f = ErrorFields::decode(body)?;
                let err = (
                    f.code().unwrap_or("").to_owned(),
                    f.message().unwrap_or("").to_owned(),
                );
                if let Some(head) = self.head_in_block() {
                    head.entry.rows += rows;
                    head.entry.bytes += bytes;
                    if head.entry.error.is_none() {
                        head.entry.error = Some(err);
                    }
                    if matches!(head.entry.kind, ExecKind::Execute | ExecKind::Parse) {
                        let o = self.open.pop_front().expect("head");
                        self.close(o, Outcome::Error);
                    }
                }
            }
            btag::READY_FOR_QUERY => {
                let block = self.answered_blocks;
                while self.open.front().is_some_and(|o| o.block == block) {
                    let mut o = self.open.pop_front().expect("front");
                    let outcome = match o.entry.kind {
                        ExecKind::Query | ExecKind::FunctionCall => {
                            o.entry.rows += rows;
                            if o.entry.error.is_some() {
                                Outcome::Error
                            } else {
                                Outcome::Ok
                            }
                        }
                        _ => Outcome::Skipped,
                    };
                    self.close(o, outcome);
                }
                self.answered_blocks += 1;
            }
            _ => {}
        }
        Ok(())
    }

    /// The session ended: executions still open are reported as incomplete.
    pub fn finish(&mut self) {
        while let Some(o) = self.open.pop_front() {
            self.close(o, Outcome::Incomplete);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::frontend;

    fn body(msg: &[u8]) -> &[u8] {
        &msg[5..]
    }

    fn cc(tag: &str) -> Vec<u8> {
        let mut b = tag.as_bytes().to_vec();
        b.push(0);
        b
    }

    fn err(code: &str, msg: &str) -> Vec<u8> {
        ErrorFields::new("ERROR", code, msg).encode_error()[5..].to_vec()
    }

    fn bind(portal: &str, stmt: &str, params: &[Option<&[u8]>], binary: bool) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(portal.as_bytes());
        b.push(0);
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        if binary {
            b.extend_from_slice(&1i16.to_be_bytes());
            b.extend_from_slice(&1i16.to_be_bytes());
        } else {
            b.extend_from_slice(&0i16.to_be_bytes());
        }
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            match p {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    }

    fn execute(portal: &str) -> Vec<u8> {
        let mut b = portal.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(&0i32.to_be_bytes());
        b
    }

    #[test]
    fn simple_query_sums_statements_until_ready() {
        let mut t = AuditTrack::new(4096, false);
        t.set_now(10);
        t.front(
            ftag::QUERY,
            body(&frontend::query("select 1; select 2")),
            None,
        )
        .unwrap();
        assert!(!t.has_entries());
        t.back(btag::COMMAND_COMPLETE, &cc("SELECT 1"), 1, 30)
            .unwrap();
        t.back(btag::COMMAND_COMPLETE, &cc("SELECT 1"), 1, 30)
            .unwrap();
        t.set_now(25);
        t.back(btag::READY_FOR_QUERY, b"I", 0, 6).unwrap();
        let e = t.take();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].text, "select 1; select 2");
        assert_eq!((e[0].rows, e[0].commands), (2, 2));
        assert_eq!((e[0].started_us, e[0].ended_us), (10, 25));
        assert_eq!(e[0].outcome, Outcome::Ok);
    }

    #[test]
    fn extended_pipeline_matches_outcomes_and_skips_after_an_error() {
        let mut t = AuditTrack::new(4096, false);
        let parse = frontend::parse("s1", "select $1::int", &[]);
        t.front(ftag::PARSE, body(&parse), None).unwrap();
        t.front(
            ftag::BIND,
            &bind("", "s1", &[Some(b"42"), None], false),
            None,
        )
        .unwrap();
        t.front(ftag::EXECUTE, &execute(""), None).unwrap();
        t.front(ftag::BIND, &bind("", "s1", &[Some(b"x")], false), None)
            .unwrap();
        t.front(ftag::EXECUTE, &execute(""), None).unwrap();
        t.front(ftag::BIND, &bind("", "s1", &[Some(b"7")], false), None)
            .unwrap();
        t.front(ftag::EXECUTE, &execute(""), None).unwrap();
        t.front(ftag::SYNC, b"", None).unwrap();
        t.back(btag::COMMAND_COMPLETE, &cc("SELECT 1"), 1, 20)
            .unwrap();
        t.back(
            btag::ERROR_RESPONSE,
            &err("22P02", "invalid input syntax"),
            0,
            0,
        )
        .unwrap();
        t.back(btag::READY_FOR_QUERY, b"I", 0, 0).unwrap();
        let e = t.take();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].params, vec![Some("42".into()), None]);
        assert_eq!(e[0].outcome, Outcome::Ok);
        assert_eq!(e[0].name, "s1");
        assert_eq!(e[1].outcome, Outcome::Error);
        assert_eq!(e[1].error.as_ref().unwrap().0, "22P02");
        assert_eq!(e[2].outcome, Outcome::Skipped);
        assert_eq!(e[2].params, vec![Some("7".into())]);
    }

    #[test]
    fn a_function_call_is_recorded_with_its_arguments() {
        // set_config (oid 2078) by the fast path: the trail shows what it was called with.
        let mut call = 2078u32.to_be_bytes().to_vec();
        call.extend(1i16.to_be_bytes());
        call.extend(0i16.to_be_bytes());
        call.extend(3i16.to_be_bytes());
        for arg in [&b"role"[..], b"admin", b"false"] {
            call.extend((arg.len() as i32).to_be_bytes());
            call.extend(arg);
        }
        call.extend(0i16.to_be_bytes());
        let mut t = AuditTrack::new(4096, false);
        t.front(ftag::FUNCTION_CALL, &call, None).unwrap();
        t.back(btag::READY_FOR_QUERY, b"I", 0, 0).unwrap();
        let e = t.take();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].text, "function 2078");
        assert_eq!(
            e[0].params,
            vec![
                Some("role".into()),
                Some("admin".into()),
                Some("false".into())
            ]
        );
    }

    #[test]
    fn errors_wait_for_their_own_block() {
        // Parse + Sync answered by an error, while the Execute of the next block is already sent.
        let mut t = AuditTrack::new(4096, false);
        t.front(ftag::PARSE, body(&frontend::parse("", "bad", &[])), None)
            .unwrap();
        t.front(ftag::SYNC, b"", None).unwrap();
        t.front(
            ftag::PARSE,
            body(&frontend::parse("", "select 1", &[])),
            None,
        )
        .unwrap();
        t.front(ftag::BIND, &bind("", "", &[], false), None)
            .unwrap();
        t.front(ftag::EXECUTE, &execute(""), None).unwrap();
        t.front(ftag::SYNC, b"", None).unwrap();
        t.back(btag::ERROR_RESPONSE, &err("42601", "syntax"), 0, 0)
            .unwrap();
        t.back(btag::READY_FOR_QUERY, b"I", 0, 0).unwrap();
        assert!(!t.has_entries());
        t.back(btag::COMMAND_COMPLETE, &cc("SELECT 1"), 1, 9)
            .unwrap();
        t.back(btag::READY_FOR_QUERY, b"I", 0, 0).unwrap();
        let e = t.take();
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].text.as_str(), e[0].outcome),
            ("select 1", Outcome::Ok)
        );
    }

    #[test]
    fn denied_parse_is_an_entry_and_write_ahead_reports_starts() {
        let mut t = AuditTrack::new(4096, true);
        let deny = Verdict::Deny {
            code: "42501".into(),
            message: "no".into(),
            rule: "no-ddl".into(),
        };
        t.front(
            ftag::PARSE,
            body(&frontend::parse("", "drop table t", &[])),
            Some(&deny),
        )
        .unwrap();
        assert_eq!(t.starts(), 1);
        t.front(ftag::SYNC, b"", None).unwrap();
        t.back(btag::ERROR_RESPONSE, &err("42501", "no"), 0, 0)
            .unwrap();
        t.back(btag::READY_FOR_QUERY, b"I", 0, 0).unwrap();
        let e = t.take();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].phase, e[1].phase), (Phase::Start, Phase::Result));
        assert_eq!(e[1].denied.as_ref().unwrap().2, "no-ddl");
        assert_eq!(e[1].outcome, Outcome::Error);
        assert_eq!(t.starts(), 0);
    }

    #[test]
    fn long_texts_and_params_are_cut_and_binary_params_hexed() {
        let mut t = AuditTrack::new(64, false);
        let long = "select '".to_owned() + &"é".repeat(100) + "'";
        t.front(ftag::QUERY, body(&frontend::query(&long)), None)
            .unwrap();
        t.front(
            ftag::PARSE,
            body(&frontend::parse("p", "select $1", &[])),
            None,
        )
        .unwrap();
        t.front(ftag::BIND, &bind("", "p", &[Some(&[1, 255])], true), None)
            .unwrap();
        t.front(ftag::EXECUTE, &execute(""), None).unwrap();
        t.finish();
        let e = t.take();
        assert!(e[0].truncated && e[0].text.len() <= 64);
        assert_eq!(e[0].outcome, Outcome::Incomplete);
        assert_eq!(e[1].params, vec![Some("\u{FFFD}binary:\\x01ff".into())]);
    }

    #[test]
    fn binary_params_of_known_types_are_shown_as_text() {
        let mut t = AuditTrack::new(4096, false);
        let parse = frontend::parse("q", "select $1, $2, $3", &[23, 16, 2950]);
        t.front(ftag::PARSE, body(&parse), None).unwrap();
        let mut b = Vec::new();
        b.extend_from_slice(b"\0q\0");
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&3i16.to_be_bytes());
        for v in [&42i32.to_be_bytes()[..], &[1u8][..], &[0x12u8; 16][..]] {
            b.extend_from_slice(&(v.len() as i32).to_be_bytes());
            b.extend_from_slice(v);
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        t.front(ftag::BIND, &b, None).unwrap();
        t.front(ftag::EXECUTE, &execute(""), None).unwrap();
        t.finish();
        let e = t.take();
        assert_eq!(
            e[0].params,
            vec![
                Some("42".to_owned()),
                Some("true".to_owned()),
                Some("12121212-1212-1212-1212-121212121212".to_owned())
            ]
        );
    }

    #[test]
    fn prepared_budget_is_bounded() {
        let mut t = AuditTrack::new(4096, false);
        let text = "x".repeat(4000);
        let mut failed = false;
        for i in 0..2000 {
            let m = frontend::parse(&format!("s{i}"), &text, &[]);
            if t.front(ftag::PARSE, body(&m), None).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }

    #[test]
    fn replaced_and_closed_statements_give_their_budget_back() {
        let mut t = AuditTrack::new(4096, false);
        let text = "x".repeat(4000);
        for i in 0..5000 {
            let m = frontend::parse("", &text, &[]);
            t.front(ftag::PARSE, body(&m), None).unwrap();
            t.front(ftag::BIND, &bind("", "", &[Some(b"1")], false), None)
                .unwrap();
            let named = format!("n{i}");
            let m = frontend::parse(&named, &text, &[]);
            t.front(ftag::PARSE, body(&m), None).unwrap();
            let mut close = vec![b'S'];
            close.extend_from_slice(named.as_bytes());
            close.push(0);
            t.front(ftag::CLOSE, &close, None).unwrap();
        }
        assert!(t.budget_used < 10_000);
    }

    #[test]
    fn statements_freed_with_sql_give_their_budget_back() {
        // Drivers that prepare with Parse and free with SQL (DEALLOCATE), and poolers' DISCARD
        // ALL: the budget must not fill with statements PostgreSQL no longer holds.
        let mut t = AuditTrack::new(4096, false);
        let text = "x".repeat(4000);
        for i in 0..5000 {
            let named = format!("S_{i}");
            t.front(
                ftag::PARSE,
                body(&frontend::parse(&named, &text, &[])),
                None,
            )
            .unwrap();
            t.front(ftag::BIND, &bind("", &named, &[Some(b"1")], false), None)
                .unwrap();
            let free = match i % 4 {
                0 => format!("DEALLOCATE \"{named}\""),
                1 => format!("deallocate prepare \"{named}\"; select 1"),
                2 => "DEALLOCATE ALL".to_owned(),
                _ => "discard all".to_owned(),
            };
            t.front(ftag::QUERY, body(&frontend::query(&free)), None)
                .unwrap();
        }
        assert!(t.budget_used < 10_000, "{}", t.budget_used);
        assert_eq!(
            sql_frees("deallocate s1; DEALLOCATE PREPARE \"Ab\"; close all; select 1"),
            [
                SqlFree::Statement("s1".into()),
                SqlFree::Statement("Ab".into()),
                SqlFree::AllPortals
            ]
        );
    }

    #[test]
    fn truncated_bodies_never_panic() {
        let mut t = AuditTrack::new(64, false);
        for tag in [
            ftag::QUERY,
            ftag::PARSE,
            ftag::BIND,
            ftag::EXECUTE,
            ftag::CLOSE,
            ftag::FUNCTION_CALL,
        ] {
            for n in 0..12 {
                let b = bind("p", "s", &[Some(b"abc")], false);
                let _ = t.front(tag, &b[..n.min(b.len())], None);
            }
        }
    }
}
