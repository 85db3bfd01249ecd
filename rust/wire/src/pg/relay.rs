//! The relay of an established session: a streaming scanner for each direction.
//!
//! Theory of operation. Bytes arrive in chunks of any size; messages may span chunks. Each
//! direction keeps a `Framer` that reads the five header bytes of a message, checks the length
//! against `Limits::max_message`, and then either *streams* the body (copying it to the output as
//! it arrives, never holding a whole message) or *captures* it (holding it, bounded by
//! `Limits::max_statement`) when the gateway must read it: statement text in the frontend direction
//! when the gate consults the control plane, and CommandComplete, ReadyForQuery and ErrorResponse in
//! the backend direction. Bulk messages (DataRow, CopyData) are always streamed, so memory does not
//! grow with result size and the cost is one pass per chunk.
//!
//! Statement gate. With `Gate::AllowAll` statements are forwarded as they stream. With
//! `Gate::Consult`, each Query, Parse and FunctionCall is captured whole and looked up in the
//! session's verdict cache by its text (`Gate::ConsultIf` first asks a predicate, and forwards the
//! statements it does not flag at once); on a miss `feed_frontend` stops and returns the statement
//! (`FrontendStop::Hold`): the caller stops reading from the client until the control plane answers
//! through `resolve`. A denied statement is not dropped: it is replaced by a statement that fails
//! upstream with a unique marker, so PostgreSQL itself produces the error, aborts a transaction block
//! and skips the extended-protocol messages up to Sync exactly as it would for a real error; the
//! backend scanner then swaps that error for the gateway's ErrorResponse. The protocol stays
//! consistent without the gateway modelling PostgreSQL's state.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::audit::AuditTrack;
use super::backend::{self, tag as btag, ErrorFields};
use super::frontend::{self, tag as ftag};
use super::masking::{MaskPlan, MaskState};
use super::sqlstate;
use crate::{Limits, WireError};

/// How a session's statements are gated.
#[derive(Debug, Clone, Copy)]
pub enum Gate {
    AllowAll,
    Consult,
    /// Consult only for statements whose text the predicate flags, and for every FunctionCall
    /// (an oid, no text to flag); allow the others at once.
    ConsultIf(fn(&str) -> bool),
    /// Consult like `Consult`, but remember verdicts under the key the function computes from the
    /// text (a statement's shape: the same statement with other constants hits the cache).
    ConsultBy(fn(&str) -> String),
}

/// What a TooLarge error names for a client message a masked session (or one whose executions
/// are held) must hold whole to follow it: a Bind with large parameters, say. Not a protocol
/// violation: the gateway's own limit (`Limits::max_statement`).
pub const FOLLOWED_MESSAGE: &str = "client message the session holds whole to follow it";

/// PostgreSQL's limit for client messages other than those that carry statements, parameters,
/// function arguments or COPY data (`PQ_SMALL_MESSAGE_LIMIT`, in bytes after the length word).
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;

/// The verdict cache of a session is cleared when it would hold more than this many statements
/// or bytes of statement text (statements with literals differ each time; the cache must not grow
/// with them).
pub const VERDICT_CACHE_ENTRIES: usize = 1024;
pub const VERDICT_CACHE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementKind {
    Query,
    Parse,
    FunctionCall,
    /// An Execute of a portal bound from a prepared statement whose executions are held
    /// (`Verdict::AllowHoldingExecutions`); `text` is the statement's, `params` the Bind's.
    Execute,
}

impl StatementKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Query => "query",
            StatementKind::Parse => "parse",
            StatementKind::FunctionCall => "function_call",
            StatementKind::Execute => "execute",
        }
    }
}

/// A statement held for a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub seq: u64,
    pub kind: StatementKind,
    /// Prepared statement name for Parse (empty for the unnamed one and other kinds).
    pub name: String,
    /// Statement text (lossy UTF-8); for FunctionCall, "function <oid>".
    pub text: String,
    /// Execute: the Bind parameters (text; binary as `\x` hex; at most `EXEC_PARAMS_TEXT` bytes).
    pub params: Vec<Option<String>>,
}

/// Bytes of parameters an Execute held for a verdict carries to the control plane.
pub const EXEC_PARAMS_TEXT: usize = 64 * 1024;
/// Bytes of statement text a session may keep for prepared statements whose executions are held.
pub const EXEC_GATED_BYTES: usize = 4 << 20;
/// Portals bound from prepared statements whose executions are held, at most (each keeps its
/// parameters, up to `EXEC_PARAMS_TEXT`): past this the session ends.
pub const GATED_PORTALS: usize = 1024;

/// Whether a verdict is remembered in the session, and for which statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remember {
    /// Ask again next time.
    No,
    /// For every statement with the same gate key (the text, or the shape under `ConsultBy`).
    Key,
    /// For the same text only (under `ConsultBy`: a verdict that depends on the constants).
    Text,
}

impl From<bool> for Remember {
    fn from(b: bool) -> Self {
        if b {
            Remember::Key
        } else {
            Remember::No
        }
    }
}

/// The control plane's answer for a held statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// For a Parse: let it through, and hold every Execute of a portal bound from it for a verdict
    /// of its own (with the Bind parameters): an approval of that one execution.
    AllowHoldingExecutions,
    /// Refused with a SQLSTATE and message; `rule` names what refused it (for the audit trail).
    Deny {
        code: String,
        message: String,
        rule: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendStop {
    /// All input was consumed.
    Consumed,
    /// Input up to `consumed` was used; the statement waits for `resolve`.
    Hold {
        consumed: usize,
        statement: Statement,
    },
}

/// What the backend direction reports, when reporting is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEvent {
    CommandComplete {
        tag: String,
        rows: u64,
        bytes: u64,
    },
    Error {
        code: String,
        message: String,
        denied: bool,
    },
    ReadyForQuery {
        status: u8,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub frontend_bytes: u64,
    pub backend_bytes: u64,
    pub statements: u64,
    pub rows: u64,
    pub denied: u64,
}

#[derive(Debug)]
enum Body {
    Stream,
    Capture(Vec<u8>),
    /// Streamed, keeping the first `.1` bytes (for the audit trail).
    Prefix(Vec<u8>, usize),
}

/// A message body the framer finished.
enum Done {
    /// Streamed to the output (with the prefix kept, if one was asked for).
    Streamed(Option<Vec<u8>>),
    /// Held whole; the caller decides what goes out.
    Captured(Vec<u8>),
}

/// Message framing of one direction; see the module comment.
#[derive(Debug)]
struct Framer {
    hdr: [u8; 5],
    hdr_len: usize,
    remaining: usize,
    body: Option<Body>,
}

impl Framer {
    fn new() -> Self {
        Framer {
            hdr: [0; 5],
            hdr_len: 0,
            remaining: 0,
            body: None,
        }
    }

    fn tag(&self) -> u8 {
        self.hdr[0]
    }

    /// Length of the body announced by a complete header, checked against the limit.
    fn body_len(&self, limit: usize, direction: &'static str) -> Result<usize, WireError> {
        let len = i32::from_be_bytes([self.hdr[1], self.hdr[2], self.hdr[3], self.hdr[4]]) as i64;
        if len < 4 {
            return Err(WireError::LengthTooSmall {
                length: len,
                min: 4,
            });
        }
        let body = (len - 4) as usize;
        if body > limit {
            return Err(WireError::TooLarge {
                what: direction,
                length: body,
                limit,
            });
        }
        Ok(body)
    }

    /// Takes header bytes from `input[*pos..]`; once all five are in, returns the tag and the body
    /// length, checked against `limit` before anything is buffered for the body.
    fn read_header(
        &mut self,
        input: &[u8],
        pos: &mut usize,
        limit: usize,
        what: &'static str,
    ) -> Result<Option<(u8, usize)>, WireError> {
        let take = (5 - self.hdr_len).min(input.len() - *pos);
        self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&input[*pos..*pos + take]);
        self.hdr_len += take;
        *pos += take;
        if self.hdr_len < 5 {
            return Ok(None);
        }
        Ok(Some((self.tag(), self.body_len(limit, what)?)))
    }

    /// Starts the body: streamed (the header goes to `out` now, and with `prefix > 0` that many
    /// bytes of the body are also kept) or captured.
    fn begin_body(&mut self, len: usize, capture: bool, prefix: usize, out: &mut Vec<u8>) {
        if capture {
            self.body = Some(Body::Capture(Vec::with_capacity(len)));
        } else {
            out.extend_from_slice(&self.hdr);
            self.body = Some(if prefix > 0 {
                Body::Prefix(Vec::with_capacity(prefix.min(len)), prefix)
            } else {
                Body::Stream
            });
        }
        self.remaining = len;
    }

    /// Moves body bytes from `input[*pos..]` to `out` or the capture. When the message is complete,
    /// returns `Some(captured body or None)` and resets for the next header.
    fn read_body(&mut self, input: &[u8], pos: &mut usize, out: &mut Vec<u8>) -> Option<Done> {
        let take = self.remaining.min(input.len() - *pos);
        let chunk = &input[*pos..*pos + take];
        match self.body.as_mut().expect("in a body") {
            Body::Stream => out.extend_from_slice(chunk),
            Body::Capture(buf) => buf.extend_from_slice(chunk),
            Body::Prefix(buf, cap) => {
                out.extend_from_slice(chunk);
                let keep = (*cap - buf.len()).min(chunk.len());
                buf.extend_from_slice(&chunk[..keep]);
            }
        }
        *pos += take;
        self.remaining -= take;
        if self.remaining > 0 {
            return None;
        }
        self.hdr_len = 0;
        match self.body.take() {
            Some(Body::Capture(buf)) => Some(Done::Captured(buf)),
            Some(Body::Prefix(buf, _)) => Some(Done::Streamed(Some(buf))),
            _ => Some(Done::Streamed(None)),
        }
    }

    fn raw(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(body.len() + 5);
        v.push(tag);
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }
}

/// The state of one established session's relay (both directions).
pub struct SessionRelay {
    limits: Limits,
    gate: Gate,
    report: bool,
    front: Framer,
    back: Framer,
    /// The statement waiting for a verdict, its raw message, and its verdict-cache key.
    held: Option<(Statement, Vec<u8>, VerdictKey)>,
    verdicts: HashMap<VerdictKey, Verdict>,
    verdict_bytes: usize,
    next_seq: u64,
    /// Markers of denied statements in flight, with the error to show instead of theirs and the
    /// number of the ReadyForQuery that ends their Query or Sync block (see `ready_seen`).
    denials: VecDeque<(String, Vec<u8>, u64)>,
    /// ReadyForQuery messages seen that answered a Query, FunctionCall or Sync (`in_flight`'s).
    ready_seen: u64,
    rows_since_complete: u64,
    bytes_since_complete: u64,
    terminated: bool,
    unsynced: bool,
    marker_nonce: u64,
    /// Messages sent upstream that each end in a ReadyForQuery (Query, FunctionCall, Sync), minus
    /// the ReadyForQuery messages seen: zero when the server owes the client nothing.
    in_flight: u64,
    last_status: u8,
    mask: Option<MaskState>,
    audit: Option<AuditTrack>,
    /// While set, every statement is refused with this SQLSTATE and message (the audit trail
    /// cannot record it).
    refusal: Option<(String, String)>,
    /// Prepared statements whose executions are held (name -> text, parameter types), and the
    /// portals bound from them (portal -> statement name, its text, parameters). A portal keeps
    /// the text it was bound with: in PostgreSQL it outlives its statement being closed or the
    /// name being parsed again, and its Execute must still be held.
    exec_gated: HashMap<String, (Arc<str>, Vec<u32>)>,
    exec_gated_bytes: usize,
    gated_portals: HashMap<String, GatedPortal>,
    gated_portals_overflow: bool,
    pub stats: RelayStats,
}

const DENY_MARKER: &str = "ostiary_denied_";

/// A portal bound from a prepared statement whose executions are held: the statement's name, its
/// text and the Bind's parameters.
type GatedPortal = (String, Arc<str>, Vec<Option<String>>);

/// A verdict-cache key: the kind, whether the string is the exact text (rather than the gate's key,
/// a shape under `ConsultBy`), and the string.
type VerdictKey = (StatementKind, bool, String);

impl SessionRelay {
    pub fn new(limits: Limits, gate: Gate, report: bool) -> Self {
        SessionRelay {
            limits,
            gate,
            report,
            front: Framer::new(),
            back: Framer::new(),
            held: None,
            verdicts: HashMap::new(),
            verdict_bytes: 0,
            next_seq: 0,
            denials: VecDeque::new(),
            ready_seen: 0,
            rows_since_complete: 0,
            bytes_since_complete: 0,
            terminated: false,
            unsynced: false,
            marker_nonce: {
                let mut b = [0u8; 8];
                // (Without the OS's randomness the nonce is zero: denials still work; only the
                // guard against a client imitating a marker is lost.)
                let _ = getrandom::getrandom(&mut b);
                u64::from_le_bytes(b)
            },
            in_flight: 0,
            last_status: b'I',
            mask: None,
            audit: None,
            refusal: None,
            exec_gated: HashMap::new(),
            exec_gated_bytes: 0,
            gated_portals: HashMap::new(),
            gated_portals_overflow: false,
            stats: RelayStats::default(),
        }
    }

    /// Follows statements for the audit trail from now on (call before the first byte is fed).
    pub fn set_audit(&mut self, track: AuditTrack) {
        self.audit = Some(track);
    }

    pub fn audit(&self) -> Option<&AuditTrack> {
        self.audit.as_ref()
    }

    pub fn audit_mut(&mut self) -> Option<&mut AuditTrack> {
        self.audit.as_mut()
    }

    /// The clock of the audit trail's entries, in microseconds (set before each feed).
    pub fn set_now(&mut self, now_us: u64) {
        if let Some(a) = self.audit.as_mut() {
            a.set_now(now_us);
        }
    }

    /// Refuses every statement from now on with this error (None: stop refusing). Statements are
    /// then captured whole, so the session's gate applies `limits.max_statement` to them.
    pub fn set_refusal(&mut self, refusal: Option<(String, String)>) {
        self.refusal = refusal;
    }

    /// Masks what the server sends from now on (call before the first byte is fed).
    pub fn set_masking(&mut self, plan: MaskPlan) {
        self.mask = Some(MaskState::new(plan));
    }

    /// Values masked so far, per rule (empty when the session is not masked).
    pub fn masked_counts(&self) -> &[u64] {
        self.mask.as_ref().map_or(&[], |m| m.counts.as_slice())
    }

    /// True once the client sent Terminate.
    pub fn terminated(&self) -> bool {
        self.terminated
    }

    pub fn is_holding(&self) -> bool {
        self.held.is_some()
    }

    /// True between messages in the server-to-client direction: a gateway-made message may be
    /// written to the client here without breaking the framing.
    pub fn backend_at_boundary(&self) -> bool {
        self.back.body.is_none() && self.back.hdr_len == 0
    }

    /// True when nothing of the server message being received has been passed to the client yet
    /// (between messages, within a header, or in a message held whole, as masking holds them):
    /// a gateway-made message may go to the client here. Unlike `backend_at_boundary`, also after
    /// the relay refused the message it was receiving (too large, malformed), so the client can
    /// be told why its session ends.
    pub fn client_at_boundary(&self) -> bool {
        matches!(self.back.body, None | Some(Body::Capture(_)))
    }

    /// True when the session is outside a transaction block, nothing is owed by the server and no
    /// message is half-received in either direction: it can be ended without losing work.
    pub fn idle(&self) -> bool {
        self.in_flight == 0
            && self.last_status == b'I'
            && self.held.is_none()
            && self.backend_at_boundary()
            && self.front.body.is_none()
            && self.front.hdr_len == 0
    }

    /// True while the server still owes the client an answer: a Query, FunctionCall or Sync passed
    /// on whose ReadyForQuery has not come back, or a server message half-relayed.
    /// The stand-in text for denied statement `seq`: an identifier the server fails to parse,
    /// with this session's random nonce, so that no other error (a client's own RAISE quoting
    /// such text) is taken for a denial.
    fn deny_marker(&self, seq: u64) -> String {
        format!("{DENY_MARKER}{:016x}_{seq}", self.marker_nonce)
    }

    pub fn server_owes_answer(&self) -> bool {
        self.in_flight > 0 || !self.backend_at_boundary()
    }

    /// True when extended-protocol messages were sent after the last Sync or Query (Parse, Bind,
    /// Execute, Describe, Flush ...): the server may still send their answers (a Flush, an error)
    /// with no ReadyForQuery to say when it is done; only its closing the connection does.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// The transaction status of the last ReadyForQuery (b'I', b'T' or b'E').
    pub fn transaction_status(&self) -> u8 {
        self.last_status
    }

    fn gated(&self, tag: u8) -> bool {
        (!matches!(self.gate, Gate::AllowAll) || self.refusal.is_some())
            && matches!(tag, ftag::QUERY | ftag::PARSE | ftag::FUNCTION_CALL)
    }

    fn wants_capture_front(&self, tag: u8) -> bool {
        self.gated(tag)
            || (self.mask.is_some() && MaskState::wants_front(tag))
            || self.follows_executions(tag)
    }

    /// Bind, Execute and Close are read whole while executions of some prepared statement are
    /// held, or a portal bound from one may still run.
    fn follows_executions(&self, tag: u8) -> bool {
        (!self.exec_gated.is_empty() || !self.gated_portals.is_empty())
            && matches!(tag, ftag::BIND | ftag::EXECUTE | ftag::CLOSE)
    }

    /// Follows Bind and Close for held executions; returns the Execute to hold, if this is one.
    fn on_execution_message(&mut self, tag: u8, body: &[u8]) -> Option<Statement> {
        match tag {
            ftag::BIND => {
                let (_, stmt, _) = frontend::bind_fields(body, 0, &[]);
                let Some((text, types)) = self.exec_gated.get(&stmt).cloned() else {
                    let (portal, _, _) = frontend::bind_fields(body, 0, &[]);
                    self.gated_portals.remove(&portal);
                    return None;
                };
                let (portal, stmt, params) = frontend::bind_fields(body, EXEC_PARAMS_TEXT, &types);
                if self.gated_portals.len() >= GATED_PORTALS
                    && !self.gated_portals.contains_key(&portal)
                {
                    // (Checked by the caller as a protocol error: the session ends.)
                    self.gated_portals_overflow = true;
                }
                self.gated_portals.insert(portal, (stmt, text, params));
                None
            }
            ftag::CLOSE => {
                let (what, name) = body.split_first().unwrap_or((&b'S', &[]));
                let name = String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or(&[]));
                if *what == b'P' {
                    self.gated_portals.remove(name.as_ref());
                } else if let Some((text, _)) = self.exec_gated.remove(name.as_ref()) {
                    self.exec_gated_bytes -= text.len();
                }
                None
            }
            _ => {
                let (portal, _, _) = frontend::bind_fields(body, 0, &[]);
                let (stmt, text, params) = self.gated_portals.get(&portal)?.clone();
                let text = text.to_string();
                let seq = self.next_seq;
                self.next_seq += 1;
                Some(Statement {
                    seq,
                    kind: StatementKind::Execute,
                    name: stmt,
                    text,
                    params,
                })
            }
        }
    }

    /// Scans client bytes, appending what may go upstream to `out`. Stops early on a hold.
    pub fn feed_frontend(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<FrontendStop, WireError> {
        if self.held.is_some() {
            return Ok(FrontendStop::Hold {
                consumed: 0,
                statement: self.held.as_ref().map(|h| h.0.clone()).expect("held"),
            });
        }
        let mut pos = 0;
        while pos < input.len() {
            if self.front.body.is_none() {
                let Some((tag, len)) = self.front.read_header(
                    input,
                    &mut pos,
                    self.limits.max_message,
                    "client message",
                )?
                else {
                    break;
                };
                // PostgreSQL reads these with its small-message limit (PQ_SMALL_MESSAGE_LIMIT)
                // and drops the connection above it; a session that captures them would
                // otherwise wait for a body no client sends.
                if matches!(
                    tag,
                    ftag::SYNC
                        | ftag::FLUSH
                        | ftag::DESCRIBE
                        | ftag::EXECUTE
                        | ftag::CLOSE
                        | ftag::TERMINATE
                        | ftag::COPY_DONE
                ) && len > SMALL_MESSAGE_LIMIT
                {
                    return Err(WireError::TooLarge {
                        what: "client control message",
                        length: len,
                        limit: SMALL_MESSAGE_LIMIT,
                    });
                }
                self.unsynced = match tag {
                    ftag::SYNC | ftag::QUERY | ftag::FUNCTION_CALL => false,
                    ftag::TERMINATE | ftag::COPY_DATA | ftag::COPY_DONE | ftag::COPY_FAIL => {
                        self.unsynced
                    }
                    _ => true,
                };
                let capture = self.wants_capture_front(tag);
                if capture && len > self.limits.max_statement {
                    return Err(WireError::TooLarge {
                        what: if self.gated(tag) {
                            "statement"
                        } else {
                            FOLLOWED_MESSAGE
                        },
                        length: len,
                        limit: self.limits.max_statement,
                    });
                }
                let prefix = self.audit.as_ref().map_or(0, |a| a.wants_front(tag));
                self.front.begin_body(len, capture, prefix, out);
            }
            let tag = self.front.tag();
            match self.front.read_body(input, &mut pos, out) {
                None => {}
                Some(Done::Captured(buf)) if !self.gated(tag) => {
                    // Held whole for masking or for held executions, which follow it.
                    if self.follows_executions(tag) {
                        let held = self.on_execution_message(tag, &buf);
                        if self.gated_portals_overflow {
                            return Err(WireError::TooLarge {
                                what: "portals bound from prepared statements whose executions are held",
                                length: self.gated_portals.len() + 1,
                                limit: GATED_PORTALS,
                            });
                        }
                        if let Some(statement) = held {
                            let raw = Framer::raw(tag, &buf);
                            let key = (StatementKind::Execute, true, statement.text.clone());
                            self.held = Some((statement.clone(), raw, key));
                            self.stats.frontend_bytes += pos as u64;
                            return Ok(FrontendStop::Hold {
                                consumed: pos,
                                statement,
                            });
                        }
                    }
                    let raw = Framer::raw(tag, &buf);
                    if let Some(m) = self.mask.as_mut() {
                        m.track_front(&raw)?;
                    }
                    if let Some(a) = self.audit.as_mut() {
                        a.front(tag, &buf, None)?;
                    }
                    out.extend_from_slice(&raw);
                    self.on_streamed_front(tag);
                }
                Some(Done::Captured(buf)) => {
                    if let Some(statement) = self.on_statement(tag, buf, out)? {
                        self.stats.frontend_bytes += pos as u64;
                        return Ok(FrontendStop::Hold {
                            consumed: pos,
                            statement,
                        });
                    }
                }
                Some(Done::Streamed(prefix)) => {
                    if let (Some(a), Some(prefix)) = (self.audit.as_mut(), prefix) {
                        a.front(tag, &prefix, None)?;
                    }
                    self.on_streamed_front(tag)
                }
            }
        }
        self.stats.frontend_bytes += input.len() as u64;
        Ok(FrontendStop::Consumed)
    }

    fn on_streamed_front(&mut self, tag: u8) {
        match tag {
            ftag::QUERY | ftag::FUNCTION_CALL => {
                self.stats.statements += 1;
                self.in_flight += 1;
            }
            ftag::PARSE => self.stats.statements += 1,
            ftag::SYNC => self.in_flight += 1,
            ftag::TERMINATE => self.terminated = true,
            _ => {}
        }
    }

    fn on_statement(
        &mut self,
        tag: u8,
        body: Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<Option<Statement>, WireError> {
        self.stats.statements += 1;
        if tag != ftag::PARSE {
            self.in_flight += 1;
        }
        let (kind, name, text) = match tag {
            ftag::QUERY => (
                StatementKind::Query,
                String::new(),
                String::from_utf8_lossy(frontend::decode_query(&body)?).into_owned(),
            ),
            ftag::PARSE => {
                let (name, sql, _) = frontend::decode_parse(&body)?;
                (
                    StatementKind::Parse,
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(sql).into_owned(),
                )
            }
            _ => (
                StatementKind::FunctionCall,
                String::new(),
                format!("function {}", frontend::decode_function_call(&body)?),
            ),
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let statement = Statement {
            seq,
            kind,
            name,
            text,
            params: Vec::new(),
        };
        let raw = Framer::raw(tag, &body);
        if let Some((code, message)) = &self.refusal {
            let v = Verdict::Deny {
                code: code.clone(),
                message: message.clone(),
                rule: "audit".into(),
            };
            self.apply(&statement, raw, &v, out)?;
            return Ok(None);
        }
        if matches!(self.gate, Gate::AllowAll) {
            self.apply(&statement, raw, &Verdict::Allow, out)?;
            return Ok(None);
        }
        if let Gate::ConsultIf(flags) = self.gate {
            // A FunctionCall carries an oid, not SQL: no text predicate can clear it.
            if kind != StatementKind::FunctionCall && !flags(&statement.text) {
                self.apply(&statement, raw, &Verdict::Allow, out)?;
                return Ok(None);
            }
        }
        let (key, exact) = match self.gate {
            Gate::ConsultBy(key_of) => {
                let exact = (kind, true, statement.text.clone());
                (key_of(&statement.text), self.verdicts.get(&exact).cloned())
            }
            _ => (statement.text.clone(), None),
        };
        let key = (kind, false, key);
        match exact.or_else(|| self.verdicts.get(&key).cloned()) {
            Some(v) => {
                self.apply(&statement, raw, &v, out)?;
                Ok(None)
            }
            None => {
                self.held = Some((statement.clone(), raw, key));
                Ok(Some(statement))
            }
        }
    }

    /// Applies the control plane's verdict to the held statement, appending what goes upstream to
    /// `out`, and caches it in this session as `remember` says (a bool means `Key` or `No`).
    pub fn resolve(
        &mut self,
        seq: u64,
        verdict: Verdict,
        remember: impl Into<Remember>,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let Some((statement, raw, key)) = self.held.take() else {
            return Err(WireError::malformed("verdict", "no statement is held"));
        };
        if statement.seq != seq {
            let got = statement.seq;
            self.held = Some((statement, raw, key));
            return Err(WireError::malformed(
                "verdict",
                format!("verdict for statement {seq}, but {got} is held"),
            ));
        }
        let remember = if statement.kind == StatementKind::Execute
            || verdict == Verdict::AllowHoldingExecutions
        {
            Remember::No // decided for this execution (or this Parse) only
        } else {
            remember.into()
        };
        if statement.kind == StatementKind::Execute && verdict == Verdict::Allow {
            // Approved: fetching more rows of the same portal needs no new verdict.
            let (portal, _, _) = frontend::bind_fields(raw.get(5..).unwrap_or_default(), 0, &[]);
            self.gated_portals.remove(&portal);
        }
        let key = match remember {
            Remember::No => None,
            Remember::Key => Some(key),
            // Without shapes, the gate's key is the text already.
            Remember::Text if !matches!(self.gate, Gate::ConsultBy(_)) => Some(key),
            Remember::Text => Some((key.0, true, statement.text.clone())),
        };
        if let Some(key) = key {
            let size = key.2.len();
            if self.verdicts.len() >= VERDICT_CACHE_ENTRIES
                || self.verdict_bytes + size > VERDICT_CACHE_BYTES
            {
                self.verdicts.clear();
                self.verdict_bytes = 0;
            }
            if size <= VERDICT_CACHE_BYTES {
                self.verdict_bytes += size;
                self.verdicts.insert(key, verdict.clone());
            }
        }
        self.apply(&statement, raw, &verdict, out)
    }

    fn apply(
        &mut self,
        statement: &Statement,
        raw: Vec<u8>,
        verdict: &Verdict,
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        if let Some(a) = self.audit.as_mut() {
            a.front(raw[0], &raw[5..], Some(verdict))?;
        }
        if statement.kind == StatementKind::Parse {
            let gated = matches!(verdict, Verdict::AllowHoldingExecutions);
            if let Some((text, _)) = self.exec_gated.remove(&statement.name) {
                self.exec_gated_bytes -= text.len();
            }
            if gated {
                self.exec_gated_bytes += statement.text.len();
                if self.exec_gated_bytes > EXEC_GATED_BYTES {
                    return Err(WireError::TooLarge {
                        what: "text of prepared statements whose executions are held",
                        length: self.exec_gated_bytes,
                        limit: EXEC_GATED_BYTES,
                    });
                }
                let (_, _, _, types) = frontend::parse_fields(&raw[5..], 0);
                self.exec_gated.insert(
                    statement.name.clone(),
                    (Arc::from(statement.text.as_str()), types),
                );
            }
        }
        match verdict {
            Verdict::Allow | Verdict::AllowHoldingExecutions => {
                if let Some(m) = self.mask.as_mut() {
                    m.track_front(&raw)?;
                }
                out.extend_from_slice(&raw)
            }
            Verdict::Deny { code, message, .. } => {
                self.stats.denied += 1;
                let marker = self.deny_marker(statement.seq);
                let replacement = match statement.kind {
                    StatementKind::Parse => frontend::parse(&statement.name, &marker, &[]),
                    // A Parse that fails: the server then skips the rest of the pipeline to Sync.
                    StatementKind::Execute => frontend::parse("", &marker, &[]),
                    _ => frontend::query(&marker),
                };
                if let Some(m) = self.mask.as_mut() {
                    m.track_front(&replacement)?;
                }
                out.extend_from_slice(&replacement);
                let code = if code.is_empty() {
                    sqlstate::INSUFFICIENT_PRIVILEGE
                } else {
                    code.as_str()
                };
                let err = ErrorFields::new("ERROR", code, message).encode_error();
                // A Query or FunctionCall was counted in `in_flight` when it was read: its own
                // ReadyForQuery ends it. A Parse or Execute belongs to the block of the next Sync.
                let ends_at = self.ready_seen
                    + self.in_flight
                    + u64::from(matches!(
                        statement.kind,
                        StatementKind::Parse | StatementKind::Execute
                    ));
                self.denials.push_back((marker, err, ends_at));
            }
        }
        Ok(())
    }

    fn wants_capture_back(&self, tag: u8) -> bool {
        if self.mask.is_some() || (self.audit.is_some() && AuditTrack::wants_back(tag)) {
            return true;
        }
        match tag {
            btag::ERROR_RESPONSE => !self.denials.is_empty() || self.report,
            btag::COMMAND_COMPLETE | btag::READY_FOR_QUERY => true,
            btag::PARAMETER_STATUS => !matches!(self.gate, Gate::AllowAll),
            _ => false,
        }
    }

    /// Scans server bytes, appending what goes to the client to `out` and, when reporting is on,
    /// events to `events`.
    pub fn feed_backend(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        events: &mut Vec<BackendEvent>,
    ) -> Result<(), WireError> {
        self.stats.backend_bytes += input.len() as u64;
        let mut pos = 0;
        while pos < input.len() {
            if self.back.body.is_none() {
                let Some((tag, len)) = self.back.read_header(
                    input,
                    &mut pos,
                    self.limits.max_message,
                    "server message",
                )?
                else {
                    break;
                };
                if !super::backend::in_session(tag)
                    || (tag == btag::PARAMETER_STATUS && len > super::backend::MAX_PARAMETER_STATUS)
                {
                    // Not PostgreSQL's (or an impostor asking the client for its password): the
                    // client must not be handed it as if it were.
                    return Err(WireError::Unexpected {
                        tag: tag as char,
                        phase: "an established session",
                    });
                }
                // Counted per message (header and body), so the count does not depend on how
                // the bytes were chunked.
                self.bytes_since_complete += 5 + len as u64;
                if tag == btag::DATA_ROW {
                    self.rows_since_complete += 1;
                }
                if self.mask.is_some() && len > self.limits.max_statement {
                    // A masked session holds each server message whole: refuse rather than pass
                    // one unmasked.
                    return Err(WireError::TooLarge {
                        what: "server message to mask",
                        length: len,
                        limit: self.limits.max_statement,
                    });
                }
                let capture = self.wants_capture_back(tag) && len <= self.limits.max_statement;
                if capture && input.len() - pos >= len {
                    // The whole message is in this chunk (the common case): read it in place.
                    let body = &input[pos..pos + len];
                    pos += len;
                    self.back.hdr_len = 0;
                    self.on_backend_message(tag, body, out, events)?;
                    continue;
                }
                self.back.begin_body(len, capture, 0, out);
            }
            let tag = self.back.tag();
            if let Some(Done::Captured(buf)) = self.back.read_body(input, &mut pos, out) {
                self.on_backend_message(tag, &buf, out, events)?;
            }
        }
        Ok(())
    }

    fn on_backend_message(
        &mut self,
        tag: u8,
        body: &[u8],
        out: &mut Vec<u8>,
        events: &mut Vec<BackendEvent>,
    ) -> Result<(), WireError> {
        if let Some(a) = self.audit.as_mut() {
            if tag != btag::ERROR_RESPONSE {
                a.back(
                    tag,
                    body,
                    self.rows_since_complete,
                    self.bytes_since_complete,
                )?;
            }
        }
        match tag {
            btag::ERROR_RESPONSE => {
                let fields = ErrorFields::decode(body)?;
                let msg = fields.message().unwrap_or("");
                let hit = self.denials.iter().position(|(marker, _, _)| {
                    fields.code() == Some(sqlstate::SYNTAX_ERROR) && msg.contains(marker.as_str())
                });
                if let Some(i) = hit {
                    // Denials before this one in the queue were skipped by the server (an earlier
                    // error in their pipeline); they produce no error of their own.
                    let (_, err, _) = self
                        .denials
                        .drain(..=i)
                        .next_back()
                        .expect("hit is in range");
                    if let Some(m) = self.mask.as_mut() {
                        m.track_back(tag, body)?;
                    }
                    if let Some(a) = self.audit.as_mut() {
                        a.back(tag, &err[5..], self.rows_since_complete, 0)?;
                    }
                    if self.report {
                        let shown = ErrorFields::decode(&err[5..])?;
                        events.push(BackendEvent::Error {
                            code: shown.code().unwrap_or("").to_owned(),
                            message: shown.message().unwrap_or("").to_owned(),
                            denied: true,
                        });
                    }
                    out.extend_from_slice(&err);
                    return Ok(());
                }
                if let Some(a) = self.audit.as_mut() {
                    a.back(
                        tag,
                        body,
                        self.rows_since_complete,
                        self.bytes_since_complete,
                    )?;
                }
                if self.report {
                    events.push(BackendEvent::Error {
                        code: fields.code().unwrap_or("").to_owned(),
                        message: msg.to_owned(),
                        denied: false,
                    });
                }
            }
            btag::COMMAND_COMPLETE => {
                self.stats.rows += self.rows_since_complete;
                if self.report {
                    events.push(BackendEvent::CommandComplete {
                        tag: backend::decode_command_complete(body)?,
                        rows: self.rows_since_complete,
                        bytes: self.bytes_since_complete,
                    });
                }
                self.rows_since_complete = 0;
                self.bytes_since_complete = 0;
            }
            btag::READY_FOR_QUERY => {
                let status = backend::decode_ready_for_query(body)?;
                self.last_status = status;
                if self.in_flight > 0 {
                    self.in_flight -= 1;
                    self.ready_seen += 1;
                }
                // This ends a Query or Sync block: its denials still queued were skipped by the
                // server (an earlier error in the block). Those of later blocks stay.
                let seen = self.ready_seen;
                self.denials.retain(|(_, _, ends_at)| *ends_at > seen);
                self.stats.rows += self.rows_since_complete;
                self.rows_since_complete = 0;
                self.bytes_since_complete = 0;
                if self.report {
                    events.push(BackendEvent::ReadyForQuery { status });
                }
            }
            btag::PARAMETER_STATUS => {
                // Gated statements are judged as PostgreSQL lexes them with standard-conforming
                // strings; turned off (by a function or DO block the judgement let through), a
                // backslash would end strings early and later statements would mean something else.
                let (name, value) = backend::decode_parameter_status(body)?;
                if name == "standard_conforming_strings" && value != "on" {
                    return Err(WireError::Refused(
                        "standard_conforming_strings was turned off; the gateway ends sessions whose \
                         statements it judges when that happens"
                            .to_owned(),
                    ));
                }
                if name == "client_encoding" && super::client_encoding_splits_bytes(&value) {
                    return Err(WireError::Refused(format!(
                        "client_encoding {value} is not allowed in sessions whose statements the \
                         gateway judges (its characters can hide quotes and backslashes)"
                    )));
                }
            }
            _ => {}
        }
        if let Some(m) = self.mask.as_mut() {
            return m.emit(tag, body, out);
        }
        out.extend_from_slice(&header(tag, body.len()));
        out.extend_from_slice(body);
        Ok(())
    }
}

/// The five header bytes of a message with a body of `len` bytes.
fn header(tag: u8, len: usize) -> [u8; 5] {
    let l = ((len + 4) as u32).to_be_bytes();
    [tag, l[0], l[1], l[2], l[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::backend::ready_for_query;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        Framer::raw(tag, body)
    }

    fn feed_all_ways(relay_new: impl Fn() -> SessionRelay, input: &[u8]) {
        // Whole, byte by byte and in odd chunks must give the same output.
        let mut whole = Vec::new();
        let mut r = relay_new();
        assert_eq!(
            r.feed_frontend(input, &mut whole).unwrap(),
            FrontendStop::Consumed
        );
        for chunk in [1usize, 2, 3, 7, 64] {
            let mut r = relay_new();
            let mut out = Vec::new();
            for c in input.chunks(chunk) {
                assert_eq!(
                    r.feed_frontend(c, &mut out).unwrap(),
                    FrontendStop::Consumed
                );
            }
            assert_eq!(out, whole, "chunk size {chunk}");
        }
        assert_eq!(whole, input);
    }

    #[test]
    fn verdicts_remembered_per_text_under_shapes_hold_for_that_text_only() {
        fn shape(t: &str) -> String {
            t.chars().filter(|c| !c.is_ascii_digit()).collect()
        }
        let mut r = SessionRelay::new(Limits::default(), Gate::ConsultBy(shape), false);
        let mut out = Vec::new();
        let hold = |r: &mut SessionRelay, q: &str, out: &mut Vec<u8>| match r
            .feed_frontend(&frontend::query(q), out)
            .unwrap()
        {
            FrontendStop::Hold { statement, .. } => Some(statement.seq),
            FrontendStop::Consumed => None,
        };
        let seq = hold(&mut r, "set x = 1", &mut out).expect("first time: held");
        r.resolve(seq, Verdict::Allow, Remember::Text, &mut out)
            .unwrap();
        assert_eq!(
            hold(&mut r, "set x = 1", &mut out),
            None,
            "same text: remembered"
        );
        let seq = hold(&mut r, "set x = 2", &mut out).expect("same shape, other text: asked");
        r.resolve(seq, Verdict::Allow, Remember::Key, &mut out)
            .unwrap();
        assert_eq!(
            hold(&mut r, "set x = 3", &mut out),
            None,
            "remembered per shape"
        );
        let seq = hold(&mut r, "begin", &mut out).expect("held");
        r.resolve(seq, Verdict::Allow, Remember::No, &mut out)
            .unwrap();
        assert!(hold(&mut r, "begin", &mut out).is_some(), "not remembered");
    }

    #[test]
    fn allow_all_passes_bytes_unchanged_in_any_chunking() {
        let mut input = frontend::query("select 1");
        input.extend(frontend::parse("s1", "select $1", &[23]));
        input.extend(msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"));
        input.extend(frontend::sync());
        input.extend(msg(b'd', &vec![b'x'; 1000]));
        input.extend(frontend::terminate());
        feed_all_ways(
            || SessionRelay::new(Limits::default(), Gate::AllowAll, false),
            &input,
        );
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        r.feed_frontend(&input, &mut Vec::new()).unwrap();
        assert!(r.terminated());
        assert_eq!(r.stats.statements, 2);
    }

    fn bind_msg(portal: &str, stmt: &str, param: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(portal.as_bytes());
        b.push(0);
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&(param.len() as i32).to_be_bytes());
        b.extend_from_slice(param.as_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        msg(ftag::BIND, &b)
    }

    fn execute_msg(portal: &str) -> Vec<u8> {
        let mut b = portal.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(&0i32.to_be_bytes());
        msg(ftag::EXECUTE, &b)
    }

    #[test]
    fn executions_of_a_gated_parse_are_held_each_with_its_parameters() {
        let mut r = SessionRelay::new(Limits::default(), Gate::Consult, false);
        let mut out = Vec::new();
        let parse = frontend::parse("", "update t set v = $1", &[]);
        let FrontendStop::Hold { statement, .. } = r.feed_frontend(&parse, &mut out).unwrap()
        else {
            panic!("parse not held");
        };
        r.resolve(
            statement.seq,
            Verdict::AllowHoldingExecutions,
            true,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, parse);
        out.clear();
        let bind = bind_msg("", "", "5");
        let exec = execute_msg("");
        let input = [bind.clone(), exec.clone(), frontend::sync()].concat();
        let FrontendStop::Hold {
            consumed,
            statement,
        } = r.feed_frontend(&input, &mut out).unwrap()
        else {
            panic!("execute not held");
        };
        assert_eq!(out, bind, "the Bind passes, the Execute waits");
        assert_eq!(statement.kind, StatementKind::Execute);
        assert_eq!(statement.text, "update t set v = $1");
        assert_eq!(statement.params, vec![Some("5".to_owned())]);
        out.clear();
        r.resolve(statement.seq, Verdict::Allow, true, &mut out)
            .unwrap();
        assert_eq!(out, exec);
        out.clear();
        r.feed_frontend(&input[consumed..], &mut out).unwrap();
        // Fetching more of the approved portal needs no new verdict.
        assert!(matches!(
            r.feed_frontend(&exec, &mut out).unwrap(),
            FrontendStop::Consumed
        ));
        // A new Bind is a new execution: held again; denied, it becomes a Parse that fails.
        out.clear();
        let input = [bind_msg("", "", "6"), exec.clone()].concat();
        let FrontendStop::Hold { statement, .. } = r.feed_frontend(&input, &mut out).unwrap()
        else {
            panic!("second execute not held");
        };
        assert_eq!(statement.params, vec![Some("6".to_owned())]);
        out.clear();
        r.resolve(
            statement.seq,
            Verdict::Deny {
                code: "42501".into(),
                message: "no".into(),
                rule: "r".into(),
            },
            true,
            &mut out,
        )
        .unwrap();
        assert_eq!(out[0], ftag::PARSE);
        // Closing the statement ends the holding: a new Parse of that name goes its own way.
        out.clear();
        let mut close = vec![b'S', 0];
        close = msg(ftag::CLOSE, &close.split_off(0));
        r.feed_frontend(&close, &mut out).unwrap();
        assert!(r.exec_gated.is_empty());
    }

    #[test]
    fn parameters_cut_for_the_control_plane_still_tell_executions_apart() {
        // An approval binds the parameters it was asked for: two that differ only past the cut
        // must not read the same (the digest of all of them follows the mark).
        let head = "x".repeat(EXEC_PARAMS_TEXT);
        let fields = |tail: &str| {
            let m = bind_msg("", "s", &format!("{head}{tail}"));
            frontend::bind_fields(&m[5..], EXEC_PARAMS_TEXT, &[]).2
        };
        let (a, b) = (fields("approved"), fields("something else"));
        assert_ne!(a, b);
        let shown = a[0].as_deref().unwrap();
        assert!(shown.len() < EXEC_PARAMS_TEXT + 100, "{}", shown.len());
        assert!(
            shown.contains("… [parameters cut; sha256 "),
            "{}",
            &shown[shown.len() - 80..]
        );
        // Not cut: as sent.
        let m = bind_msg("", "s", "short…");
        assert_eq!(
            frontend::bind_fields(&m[5..], EXEC_PARAMS_TEXT, &[]).2,
            vec![Some("short…".to_owned())]
        );
    }

    #[test]
    fn a_portal_bound_from_a_held_statement_stays_held_after_its_statement_goes() {
        // PostgreSQL keeps a portal when its statement is closed or its name parsed again: the
        // portal's Execute runs the statement it was bound from, so it is still held.
        for after in ["reparse", "close"] {
            let mut r = SessionRelay::new(Limits::default(), Gate::Consult, false);
            let mut out = Vec::new();
            let parse = frontend::parse("s1", "update t set v = $1", &[]);
            let FrontendStop::Hold { statement, .. } = r.feed_frontend(&parse, &mut out).unwrap()
            else {
                panic!("parse not held");
            };
            r.resolve(
                statement.seq,
                Verdict::AllowHoldingExecutions,
                true,
                &mut out,
            )
            .unwrap();
            out.clear();
            let gone = if after == "close" {
                msg(ftag::CLOSE, b"Ss1\0")
            } else {
                frontend::parse("s1", "select 1", &[])
            };
            let input = [bind_msg("p1", "s1", "BYPASS"), gone, execute_msg("p1")].concat();
            let mut pos = 0;
            let held = loop {
                match r.feed_frontend(&input[pos..], &mut out).unwrap() {
                    FrontendStop::Hold {
                        consumed,
                        statement,
                    } => {
                        if statement.kind == StatementKind::Execute {
                            break Some(statement);
                        }
                        // The new Parse of "select 1" asks for its own verdict: allowed.
                        pos += consumed;
                        r.resolve(statement.seq, Verdict::Allow, true, &mut out)
                            .unwrap();
                    }
                    _ => break None,
                }
            };
            let statement = held.unwrap_or_else(|| panic!("{after}: the Execute ran unheld"));
            assert_eq!(statement.text, "update t set v = $1", "{after}");
            assert_eq!(statement.params, vec![Some("BYPASS".to_owned())], "{after}");
        }
    }

    #[test]
    fn consult_holds_then_allows_and_caches() {
        let mut r = SessionRelay::new(Limits::default(), Gate::Consult, false);
        let mut input = frontend::query("select 1");
        input.extend(frontend::query("select 2"));
        let mut out = Vec::new();
        let FrontendStop::Hold {
            consumed,
            statement,
        } = r.feed_frontend(&input, &mut out).unwrap()
        else {
            panic!()
        };
        assert_eq!(statement.text, "select 1");
        assert!(out.is_empty());
        r.resolve(statement.seq, Verdict::Allow, true, &mut out)
            .unwrap();
        assert_eq!(out, frontend::query("select 1"));
        let FrontendStop::Hold { statement, .. } =
            r.feed_frontend(&input[consumed..], &mut out).unwrap()
        else {
            panic!()
        };
        assert_eq!(statement.text, "select 2");
        r.resolve(statement.seq, Verdict::Allow, false, &mut out)
            .unwrap();
        // "select 1" is cached now: no hold.
        assert_eq!(
            r.feed_frontend(&frontend::query("select 1"), &mut out)
                .unwrap(),
            FrontendStop::Consumed
        );
    }

    #[test]
    fn messages_after_the_last_sync_are_unsynced() {
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        let mut out = Vec::new();
        assert!(!r.unsynced());
        let mut m = frontend::parse("", "select 1", &[]);
        m.extend(Framer::raw(ftag::FLUSH, b""));
        r.feed_frontend(&m, &mut out).unwrap();
        assert!(r.unsynced() && !r.server_owes_answer());
        r.feed_frontend(&frontend::sync(), &mut out).unwrap();
        assert!(!r.unsynced() && r.server_owes_answer());
        r.feed_frontend(&frontend::terminate(), &mut out).unwrap();
        assert!(!r.unsynced());
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        let mut m = frontend::parse("", "select 1", &[]);
        m.extend(frontend::terminate());
        r.feed_frontend(&m, &mut out).unwrap();
        assert!(r.unsynced() && r.terminated());
    }

    #[test]
    fn an_oversized_control_message_is_refused_at_its_header() {
        // Sync with a 100,000-byte length and ten bytes of body: refused at once, whatever the
        // session captures (it used to wait for the rest in masked sessions).
        for gate in [Gate::AllowAll, Gate::Consult] {
            let mut r = SessionRelay::new(Limits::default(), gate, false);
            let mut input = vec![ftag::SYNC];
            input.extend_from_slice(&100_004u32.to_be_bytes());
            input.extend_from_slice(&[0; 10]);
            let err = r.feed_frontend(&input, &mut Vec::new()).unwrap_err();
            assert!(
                matches!(
                    err,
                    WireError::TooLarge {
                        limit: SMALL_MESSAGE_LIMIT,
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        let mut ok = vec![ftag::SYNC];
        ok.extend_from_slice(&4u32.to_be_bytes());
        r.feed_frontend(&ok, &mut Vec::new()).unwrap();
    }

    #[test]
    fn consult_if_holds_only_flagged_statements() {
        fn flags(sql: &str) -> bool {
            sql.contains("danger")
        }
        let mut r = SessionRelay::new(Limits::default(), Gate::ConsultIf(flags), false);
        let mut input = frontend::query("select 1");
        input.extend(frontend::parse("s1", "select 2", &[]));
        input.extend(frontend::query("select 'danger'"));
        let mut out = Vec::new();
        let FrontendStop::Hold { statement, .. } = r.feed_frontend(&input, &mut out).unwrap()
        else {
            panic!()
        };
        assert_eq!(statement.text, "select 'danger'");
        let mut expected = frontend::query("select 1");
        expected.extend(frontend::parse("s1", "select 2", &[]));
        assert_eq!(out, expected);
        assert_eq!(r.stats.statements, 3);

        // A FunctionCall (set_config's oid, say) has no text to clear: always held.
        let mut r = SessionRelay::new(Limits::default(), Gate::ConsultIf(flags), false);
        let mut body = 2078u32.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        let mut out = Vec::new();
        let FrontendStop::Hold { statement, .. } = r
            .feed_frontend(&Framer::raw(ftag::FUNCTION_CALL, &body), &mut out)
            .unwrap()
        else {
            panic!("a FunctionCall went through unconsulted")
        };
        assert_eq!(statement.kind, StatementKind::FunctionCall);
        assert_eq!(statement.text, "function 2078");
        assert!(out.is_empty());
    }

    #[test]
    fn gated_session_ends_when_client_encoding_turns_to_sjis() {
        let status = |v: &str| msg(btag::PARAMETER_STATUS, &param_body("client_encoding", v));
        let mut r = SessionRelay::new(Limits::default(), Gate::Consult, false);
        let mut out = Vec::new();
        for ok in ["UTF8", "LATIN1", "SQL_ASCII"] {
            r.feed_backend(&status(ok), &mut out, &mut Vec::new())
                .unwrap();
        }
        for bad in [
            "SJIS",
            "Shift_JIS",
            "big5",
            "GBK",
            "UHC",
            "GB18030",
            "JOHAB",
        ] {
            let mut r = SessionRelay::new(Limits::default(), Gate::Consult, false);
            assert!(matches!(
                r.feed_backend(&status(bad), &mut out, &mut Vec::new()),
                Err(WireError::Refused(_))
            ));
        }
    }

    #[test]
    fn gated_session_ends_when_standard_conforming_strings_goes_off() {
        let on = msg(
            btag::PARAMETER_STATUS,
            &param_body("standard_conforming_strings", "on"),
        );
        let off = msg(
            btag::PARAMETER_STATUS,
            &param_body("standard_conforming_strings", "off"),
        );
        let mut events = Vec::new();
        let mut out = Vec::new();
        let mut gated = SessionRelay::new(Limits::default(), Gate::Consult, false);
        gated.feed_backend(&on, &mut out, &mut events).unwrap();
        assert_eq!(out, on);
        assert!(matches!(
            gated.feed_backend(&off, &mut out, &mut events),
            Err(WireError::Refused(_))
        ));
        let mut open = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        out.clear();
        open.feed_backend(&off, &mut out, &mut events).unwrap();
        assert_eq!(out, off);
    }

    fn param_body(name: &str, value: &str) -> Vec<u8> {
        let mut b = name.as_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(value.as_bytes());
        b.push(0);
        b
    }

    #[test]
    fn consult_by_key_caches_per_key() {
        fn first_word(sql: &str) -> String {
            sql.split(' ').next().unwrap_or("").to_owned()
        }
        let mut r = SessionRelay::new(Limits::default(), Gate::ConsultBy(first_word), false);
        let mut out = Vec::new();
        let FrontendStop::Hold { statement, .. } = r
            .feed_frontend(&frontend::query("select 1"), &mut out)
            .unwrap()
        else {
            panic!()
        };
        r.resolve(statement.seq, Verdict::Allow, true, &mut out)
            .unwrap();
        // Same key, other text: decided from the cache.
        assert_eq!(
            r.feed_frontend(&frontend::query("select 2"), &mut out)
                .unwrap(),
            FrontendStop::Consumed
        );
        assert!(matches!(
            r.feed_frontend(&frontend::query("delete 2"), &mut out)
                .unwrap(),
            FrontendStop::Hold { .. }
        ));
    }

    #[test]
    fn verdict_cache_is_bounded() {
        let mut r = SessionRelay::new(Limits::default(), Gate::Consult, false);
        let mut out = Vec::new();
        for i in 0..(VERDICT_CACHE_ENTRIES * 3) {
            let q = frontend::query(&format!("select {i}"));
            let FrontendStop::Hold { statement, .. } = r.feed_frontend(&q, &mut out).unwrap()
            else {
                panic!()
            };
            r.resolve(statement.seq, Verdict::Allow, true, &mut out)
                .unwrap();
            assert!(r.verdicts.len() <= VERDICT_CACHE_ENTRIES);
        }
        // A large statement cannot push the cache past its byte bound either.
        let big = "x".repeat(VERDICT_CACHE_BYTES - 10);
        for text in [big.clone(), format!("{big}y")] {
            let FrontendStop::Hold { statement, .. } =
                r.feed_frontend(&frontend::query(&text), &mut out).unwrap()
            else {
                panic!()
            };
            r.resolve(statement.seq, Verdict::Allow, true, &mut out)
                .unwrap();
            assert!(r.verdict_bytes <= VERDICT_CACHE_BYTES);
        }
    }

    #[test]
    fn denial_is_replaced_by_failing_statement_and_error_swapped() {
        let mut r = SessionRelay::new(Limits::default(), Gate::Consult, true);
        let mut out = Vec::new();
        let FrontendStop::Hold { statement, .. } = r
            .feed_frontend(&frontend::query("drop table t"), &mut out)
            .unwrap()
        else {
            panic!()
        };
        r.resolve(
            statement.seq,
            Verdict::Deny {
                code: "42501".into(),
                message: "blocked by rule x".into(),
                rule: "x".into(),
            },
            false,
            &mut out,
        )
        .unwrap();
        assert_eq!(out, frontend::query(&r.deny_marker(0)));
        // The server answers with a syntax error naming the marker, then ReadyForQuery.
        let mut server = backend::error_response(
            "ERROR",
            "42601",
            &format!("syntax error at or near \"{}\"", r.deny_marker(0)),
        );
        server.extend(ready_for_query(b'I'));
        let mut to_client = Vec::new();
        let mut events = Vec::new();
        for b in &server {
            r.feed_backend(std::slice::from_ref(b), &mut to_client, &mut events)
                .unwrap();
        }
        let mut expected = backend::error_response("ERROR", "42501", "blocked by rule x");
        expected.extend(ready_for_query(b'I'));
        assert_eq!(to_client, expected);
        assert!(
            matches!(&events[0], BackendEvent::Error { denied: true, code, .. } if code == "42501")
        );
    }

    /// What PostgreSQL answers a denial marker sent as a Query or a Parse.
    fn marker_error(r: &SessionRelay, seq: u64) -> Vec<u8> {
        backend::error_response(
            "ERROR",
            "42601",
            &format!("syntax error at or near \"{}\"", r.deny_marker(seq)),
        )
    }

    /// What the client gets for `n` statements refused while the audit trail cannot record, each
    /// in its own block.
    fn refused(n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.extend(backend::error_response("ERROR", "58030", "cannot record"));
            out.extend(ready_for_query(b'I'));
        }
        out
    }

    #[test]
    fn pipelined_denials_in_separate_blocks_each_get_their_error() {
        // Denied inline (a remembered verdict, here the refusal): two Queries in one write, then
        // an extended block with a denied Parse and one that runs. Each block's ReadyForQuery
        // must end only its own denials, not those of the blocks after it.
        let mut r = SessionRelay::new(Limits::default(), Gate::Consult, false);
        r.set_refusal(Some(("58030".into(), "cannot record".into())));
        let mut client = frontend::query("select 1");
        client.extend(frontend::query("select 2"));
        client.extend(msg(ftag::PARSE, b"\0select 3\0\0\0"));
        client.extend(msg(ftag::SYNC, b""));
        let mut out = Vec::new();
        assert!(matches!(
            r.feed_frontend(&client, &mut out).unwrap(),
            FrontendStop::Consumed
        ));
        let mut server = Vec::new();
        for seq in 0..3 {
            server.extend(marker_error(&r, seq));
            server.extend(ready_for_query(b'I'));
        }
        let mut to_client = Vec::new();
        r.feed_backend(&server, &mut to_client, &mut Vec::new())
            .unwrap();
        assert_eq!(to_client, refused(3));
        assert!(r.denials.is_empty());
    }

    #[test]
    fn a_denial_skipped_after_an_earlier_error_ends_with_its_block() {
        // Parse (denied), Parse (denied), Sync: the server fails the first and skips the second to
        // Sync. The second's marker never comes back; the block's ReadyForQuery drops it.
        let mut r = SessionRelay::new(Limits::default(), Gate::Consult, false);
        r.set_refusal(Some(("58030".into(), "cannot record".into())));
        let mut client = msg(ftag::PARSE, b"\0select 1\0\0\0");
        client.extend(msg(ftag::PARSE, b"\0select 2\0\0\0"));
        client.extend(msg(ftag::SYNC, b""));
        client.extend(frontend::query("select 3"));
        let mut out = Vec::new();
        r.feed_frontend(&client, &mut out).unwrap();
        let mut server = marker_error(&r, 0);
        server.extend(ready_for_query(b'I'));
        let mut to_client = Vec::new();
        r.feed_backend(&server, &mut to_client, &mut Vec::new())
            .unwrap();
        assert_eq!(
            r.denials.len(),
            1,
            "only the Query's denial is still to come"
        );
        let mut server = marker_error(&r, 2);
        server.extend(ready_for_query(b'I'));
        r.feed_backend(&server, &mut to_client, &mut Vec::new())
            .unwrap();
        assert_eq!(to_client, refused(2));
    }

    #[test]
    fn an_error_that_quotes_a_marker_is_not_taken_for_a_denial() {
        // A client's own RAISE (any code but the syntax error the stand-in causes) naming
        // markers: its error passes unchanged.
        let mut r = SessionRelay::new(Limits::default(), Gate::Consult, false);
        r.set_refusal(Some(("58030".into(), "cannot record".into())));
        let mut out = Vec::new();
        r.feed_frontend(&frontend::query("select 1"), &mut out)
            .unwrap();
        let spoof = format!("{} ostiary_denied_0 ostiary_denied_1", r.deny_marker(0));
        let mut server = backend::error_response("ERROR", "P0001", &spoof);
        server.extend(ready_for_query(b'I'));
        let mut to_client = Vec::new();
        r.feed_backend(&server, &mut to_client, &mut Vec::new())
            .unwrap();
        // (Even naming this session's own marker: only the server's syntax error about it is one.)
        assert_eq!(to_client, server, "passed as the server sent it");
    }

    #[test]
    fn other_errors_pass_unchanged() {
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, true);
        let server = backend::error_response("ERROR", "42P01", "relation \"nope\" does not exist");
        let mut out = Vec::new();
        let mut ev = Vec::new();
        r.feed_backend(&server, &mut out, &mut ev).unwrap();
        assert_eq!(out, server);
    }

    #[test]
    fn backend_counts_rows_and_reports_tags() {
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, true);
        let mut server = Vec::new();
        for _ in 0..3 {
            server.extend(msg(btag::DATA_ROW, b"\0\x01\0\0\0\x011"));
        }
        server.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 3\0"));
        server.extend(ready_for_query(b'T'));
        let mut out = Vec::new();
        let mut ev = Vec::new();
        for c in server.chunks(3) {
            r.feed_backend(c, &mut out, &mut ev).unwrap();
        }
        assert_eq!(out, server);
        assert!(
            matches!(&ev[0], BackendEvent::CommandComplete { tag, rows: 3, .. } if tag == "SELECT 3")
        );
        assert_eq!(ev[1], BackendEvent::ReadyForQuery { status: b'T' });
        assert_eq!(r.stats.rows, 3);
        assert!(!r.idle(), "in a transaction block");
    }

    #[test]
    fn server_messages_no_session_has_end_it() {
        // A request for the cleartext password (the client would send its token), startup-only
        // messages, bytes of no message, a ParameterStatus longer than libpq takes.
        let auth = [0, 0, 0, 3];
        let long_status = vec![b'x'; 30_001];
        for bad in [
            msg(btag::AUTHENTICATION, &auth),
            msg(btag::BACKEND_KEY_DATA, &[0; 8]),
            msg(btag::NEGOTIATE_PROTOCOL_VERSION, &[0; 8]),
            msg(b'x', b""),
            msg(0, b""),
            msg(btag::PARAMETER_STATUS, &long_status),
        ] {
            for gate in [Gate::AllowAll, Gate::Consult] {
                let mut r = SessionRelay::new(Limits::default(), gate, false);
                let mut out = Vec::new();
                let mut input = msg(btag::COMMAND_COMPLETE, b"SELECT 1\0");
                input.extend(&bad);
                let e = r.feed_backend(&input, &mut out, &mut Vec::new());
                assert!(
                    matches!(e, Err(WireError::Unexpected { .. })),
                    "{:?} {e:?}",
                    bad[0] as char
                );
                assert!(!out.windows(bad.len()).any(|w| w == bad.as_slice()));
            }
        }
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        let ok = msg(btag::PARAMETER_STATUS, b"application_name\0x\0");
        r.feed_backend(&ok, &mut Vec::new(), &mut Vec::new())
            .unwrap();
    }

    #[test]
    fn idle_tracks_outstanding_queries() {
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        assert!(r.idle());
        assert!(!r.server_owes_answer());
        r.feed_frontend(&frontend::query("select 1"), &mut Vec::new())
            .unwrap();
        assert!(!r.idle());
        assert!(r.server_owes_answer());
        let mut out = Vec::new();
        r.feed_backend(
            &msg(btag::COMMAND_COMPLETE, b"SELECT 1\0")[..4],
            &mut out,
            &mut Vec::new(),
        )
        .unwrap();
        assert!(!r.backend_at_boundary());
        r.feed_backend(
            &msg(btag::COMMAND_COMPLETE, b"SELECT 1\0")[4..],
            &mut out,
            &mut Vec::new(),
        )
        .unwrap();
        assert!(r.backend_at_boundary());
        assert!(r.server_owes_answer(), "ReadyForQuery still to come");
        r.feed_backend(&ready_for_query(b'I'), &mut out, &mut Vec::new())
            .unwrap();
        assert!(r.idle());
        assert!(!r.server_owes_answer());
    }

    #[test]
    fn extended_messages_are_owed_an_answer_only_from_their_sync() {
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        let mut out = Vec::new();
        r.feed_frontend(&msg(ftag::PARSE, b"\0select 1\0\0\0"), &mut out)
            .unwrap();
        r.feed_frontend(&msg(ftag::EXECUTE, b"\0\0\0\0\0"), &mut out)
            .unwrap();
        assert!(
            !r.server_owes_answer(),
            "no Sync yet: the server answers nothing"
        );
        r.feed_frontend(&msg(ftag::SYNC, b""), &mut out).unwrap();
        assert!(r.server_owes_answer());
        r.feed_backend(&ready_for_query(b'I'), &mut out, &mut Vec::new())
            .unwrap();
        assert!(!r.server_owes_answer());
    }

    #[test]
    fn oversized_and_negative_lengths_fail() {
        let limits = Limits {
            max_message: 100,
            ..Limits::default()
        };
        let mut r = SessionRelay::new(limits, Gate::AllowAll, false);
        let mut bad = vec![b'Q'];
        bad.extend_from_slice(&0x7fff_fff0u32.to_be_bytes());
        assert!(matches!(
            r.feed_frontend(&bad, &mut Vec::new()),
            Err(WireError::TooLarge { .. })
        ));
        let mut r = SessionRelay::new(limits, Gate::AllowAll, false);
        let mut bad = vec![b'Q'];
        bad.extend_from_slice(&2u32.to_be_bytes());
        assert!(matches!(
            r.feed_frontend(&bad, &mut Vec::new()),
            Err(WireError::LengthTooSmall { .. })
        ));
        let mut r = SessionRelay::new(limits, Gate::AllowAll, false);
        let mut bad = vec![b'D'];
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(r
            .feed_backend(&bad, &mut Vec::new(), &mut Vec::new())
            .is_err());
        // Nothing of the refused message reached the client: it can be told why the session ends.
        assert!(r.client_at_boundary() && !r.backend_at_boundary());
    }

    #[test]
    fn client_at_boundary_only_before_a_streamed_message_begins() {
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        let row = msg(btag::DATA_ROW, &[0, 1, 0, 0, 0, 3, b'a', b'b', b'c']);
        let mut out = Vec::new();
        r.feed_backend(&row[..3], &mut out, &mut Vec::new())
            .unwrap();
        assert!(r.client_at_boundary(), "within a header nothing went out");
        r.feed_backend(&row[3..8], &mut out, &mut Vec::new())
            .unwrap();
        assert!(
            !r.client_at_boundary(),
            "the header and part of the body went out"
        );
        r.feed_backend(&row[8..], &mut out, &mut Vec::new())
            .unwrap();
        assert!(r.client_at_boundary());
        assert_eq!(out, row);
    }

    #[test]
    fn statement_over_capture_limit_fails_in_consult_mode() {
        let limits = Limits {
            max_statement: 10,
            ..Limits::default()
        };
        let mut r = SessionRelay::new(limits, Gate::Consult, false);
        assert!(r
            .feed_frontend(&frontend::query("select 1234567890"), &mut Vec::new())
            .is_err());
    }
}
