//! Masking of what the server sends in an established session.
//!
//! Theory of operation. A masked session's relay holds every server message whole (bounded by
//! `Limits::max_statement`; one row, never a result) and passes it through `MaskState`, which
//! rewrites the values that rules cover and writes the message out with correct lengths:
//!
//! - DataRow: each value is judged with the type and format of its column. Column rules (resolved
//!   by the control plane from the catalog to table oid + attribute number, or by result column
//!   name) replace the whole value; content rules (the `Masker`'s detectors and patterns) replace
//!   what they find. All content-scanned values of a row are joined with NUL separators and
//!   searched in one pass (patterns never match NUL).
//! - ErrorResponse and NoticeResponse text fields (message, detail, hint, context, ...),
//!   NotificationResponse payloads, CopyData of COPY TO in text format, FunctionCallResponse.
//!
//! Knowing a DataRow's columns. In the simple protocol the RowDescription before the rows is
//! authoritative. In the extended protocol rows belong to the portal an Execute names; the portal
//! was bound from a prepared statement (Bind carries the result formats) whose columns a Describe
//! reported, possibly much earlier and possibly for another statement than the last RowDescription
//! on the wire. So the state follows the client's messages in the order the server answers them: a
//! queue of what each forwarded message will produce, popped as the answers arrive, and maps of
//! prepared statements and portals to their descriptions. An error in the extended protocol makes
//! the server skip to Sync; the queue does the same. Rows whose columns are unknown still get
//! content masking (as text); when column rules exist they end the session rather than pass.
//!
//! Values by type. Text-like types (text, varchar, char, name, json, jsonb, xml, unknown) are the
//! same bytes in text and binary format and take every strategy. Other types: in text format a
//! column rule or a content match makes scalars (numbers, dates, inet, uuid, arrays of those)
//! NULL, since a token would not parse as the type; arrays of text, records and unknown types
//! are masked in place. In binary format scalars pass untouched (unless a column rule makes them
//! NULL), and containers are masked with same-length `*` so their inner lengths stay valid.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use super::backend::tag as btag;
use super::binary::render_binary;
use super::codec::Reader;
use super::frontend::tag as ftag;
use crate::WireError;

/// The content and strategy engine a session masks with (implemented over `ostiary-mask`).
pub trait Masker: Send + Sync {
    /// Number of rules; counts are indexed by rule.
    fn rules(&self) -> usize;
    /// True if any rule finds content (detectors or patterns), not only columns.
    fn has_content(&self) -> bool;
    /// Calls `f(start, end, rule)` for each validated match in `hay`, in order, non-overlapping.
    fn find_matches(&self, hay: &[u8], f: &mut dyn FnMut(usize, usize, usize));
    /// Writes the replacement of `matched` under `rule`; false when the strategy is NULL.
    fn replace(&self, rule: usize, matched: &[u8], out: &mut Vec<u8>) -> bool;
    /// Writes `rule`'s strategy applied to a whole value; false when the strategy is NULL.
    fn apply(&self, rule: usize, value: &[u8], out: &mut Vec<u8>) -> bool;
}

/// What a session masks: the engine plus the column rules resolved for this session.
#[derive(Clone)]
pub struct MaskPlan {
    pub masker: Arc<dyn Masker>,
    /// (table oid, attribute number) -> rule, resolved from the catalog at session start.
    pub columns: HashMap<(u32, i16), usize>,
    /// Globs (`*`, `?`) over result column names -> rule; apply to every column with that name.
    pub names: Vec<(String, usize)>,
    /// Column globs of table-qualified rules, applied by name to columns of tables created after
    /// the catalog was read (table oid above `max_oid`), so a new table cannot slip past them.
    pub late_names: Vec<(String, usize)>,
    pub max_oid: u32,
}

impl MaskPlan {
    pub fn has_columns(&self) -> bool {
        !self.columns.is_empty() || !self.names.is_empty() || !self.late_names.is_empty()
    }

    fn column_rule(&self, name: &[u8], table: u32, attnum: i16) -> Option<usize> {
        if table != 0 {
            if let Some(&r) = self.columns.get(&(table, attnum)) {
                return Some(r);
            }
        }
        if let Some(&(_, r)) = self
            .names
            .iter()
            .find(|(g, _)| glob_match(g.as_bytes(), name))
        {
            return Some(r);
        }
        if table != 0 && table > self.max_oid {
            if let Some(&(_, r)) = self
                .late_names
                .iter()
                .find(|(g, _)| glob_match(g.as_bytes(), name))
            {
                return Some(r);
            }
        }
        None
    }
}

/// Case-insensitive glob match with `*` (any run) and `?` (one byte).
pub fn glob_match(glob: &[u8], text: &[u8]) -> bool {
    let (mut g, mut t) = (0usize, 0usize);
    let (mut star, mut mark) = (usize::MAX, 0usize);
    while t < text.len() {
        if g < glob.len() && (glob[g] == b'?' || glob[g].eq_ignore_ascii_case(&text[t])) {
            g += 1;
            t += 1;
        } else if g < glob.len() && glob[g] == b'*' {
            star = g;
            mark = t;
            g += 1;
        } else if star != usize::MAX {
            g = star + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    while g < glob.len() && glob[g] == b'*' {
        g += 1;
    }
    g == glob.len()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeClass {
    /// Same bytes in text and binary format; every strategy applies.
    Text,
    /// A fixed-form scalar (or an array of them): binary passes, a text-format hit becomes NULL.
    Scalar,
    /// Containers and unknown types: masked in place (text) or with same-length `*` (binary).
    Other,
}

fn type_class(oid: u32) -> TypeClass {
    match oid {
        // text, varchar, bpchar, name, "char", json, jsonb, xml, unknown, jsonpath
        25 | 1043 | 1042 | 19 | 18 | 114 | 3802 | 142 | 705 | 4072 => TypeClass::Text,
        // bool, int2, int4, int8, oid, float4, float8, numeric, money, date, time, timetz,
        // timestamp, timestamptz, interval, uuid, inet, cidr, macaddr, macaddr8, xid, tid, pg_lsn
        16 | 21 | 23 | 20 | 26 | 700 | 701 | 1700 | 790 | 1082 | 1083 | 1266 | 1114 | 1184
        | 1186 | 2950 | 869 | 650 | 829 | 774 | 28 | 27 | 3220 => TypeClass::Scalar,
        // arrays of those scalars
        1000 | 1005 | 1007 | 1016 | 1028 | 1021 | 1022 | 1231 | 791 | 1182 | 1183 | 1270 | 1115
        | 1185 | 1187 | 2951 | 1041 | 651 | 1040 | 775 => TypeClass::Scalar,
        _ => TypeClass::Other,
    }
}

#[derive(Debug, Clone, Copy)]
struct Column {
    oid: u32,
    class: TypeClass,
    /// The format RowDescription gave (exact in the simple protocol and for Describe portal).
    format: i16,
    rule: Option<usize>,
}

type Desc = Arc<[Column]>;

#[derive(Debug, Clone)]
enum StmtDesc {
    Rows(Desc),
    NoData,
}

#[derive(Debug, Clone)]
struct Portal {
    desc: Option<StmtDesc>,
    /// Result format codes from Bind (none: all text; one: all columns; else one per column).
    formats: Arc<[i16]>,
}

/// What a forwarded client message will make the server answer, in order.
#[derive(Debug)]
enum Expect {
    Simple,
    /// A Parse: the statement's name, and whether its text is SQL EXECUTE or FETCH.
    Parse(String, bool),
    Bind {
        portal: String,
        stmt: String,
        formats: Arc<[i16]>,
    },
    DescribeStmt(String),
    DescribePortal(String),
    Execute(String),
    Close {
        portal: bool,
        name: String,
    },
    Sync,
}

/// Results of the simple protocol take formats from RowDescription; extended ones from Bind.
#[derive(Debug, Clone)]
struct Current {
    desc: Option<Desc>,
    bind_formats: Option<Arc<[i16]>>,
}

/// Bounds on what a client can make the state hold.
const MAX_EXPECTED: usize = 1 << 20;
const MAX_NAMED: usize = 1 << 16;

pub struct MaskState {
    plan: MaskPlan,
    expect: VecDeque<Expect>,
    stmts: HashMap<String, StmtDesc>,
    /// Prepared statements whose text is SQL EXECUTE or FETCH: what they return is decided when
    /// they run (the SQL statement or cursor they name can be replaced after a Describe), so
    /// their statement-level description is not kept; a portal Describe still is.
    utility: HashSet<String>,
    portals: HashMap<String, Portal>,
    current: Option<Current>,
    /// Some(format) while a COPY TO is sending data.
    copy_out: Option<u8>,
    scan: Vec<u8>,
    /// Per content-scanned value: (value index, start in `scan`, end).
    scanned: Vec<(usize, usize, usize)>,
    hits: Vec<(usize, usize, usize)>,
    values: Vec<Option<(usize, usize)>>,
    decided: Vec<Value>,
    scratch: Vec<u8>,
    /// Values masked, per rule.
    pub counts: Vec<u64>,
}

enum Value {
    Keep,
    Null,
    /// Replacement bytes at this range of `scratch`.
    New(usize, usize),
}

impl MaskState {
    pub fn new(plan: MaskPlan) -> Self {
        let n = plan.masker.rules();
        MaskState {
            plan,
            expect: VecDeque::new(),
            stmts: HashMap::new(),
            utility: HashSet::new(),
            portals: HashMap::new(),
            current: None,
            copy_out: None,
            scan: Vec::new(),
            scanned: Vec::new(),
            hits: Vec::new(),
            values: Vec::new(),
            decided: Vec::new(),
            scratch: Vec::new(),
            counts: vec![0; n],
        }
    }

    /// Client message tags whose bodies the state must read.
    pub fn wants_front(tag: u8) -> bool {
        matches!(
            tag,
            ftag::QUERY
                | ftag::PARSE
                | ftag::FUNCTION_CALL
                | ftag::BIND
                | ftag::DESCRIBE
                | ftag::EXECUTE
                | ftag::CLOSE
                | ftag::SYNC
        )
    }

    /// Follows one client message that goes upstream (whole, header included).
    pub fn track_front(&mut self, msg: &[u8]) -> Result<(), WireError> {
        let tag = msg[0];
        let mut r = Reader::new(&msg[5..], "client message");
        let e = match tag {
            ftag::QUERY | ftag::FUNCTION_CALL => Expect::Simple,
            ftag::PARSE => {
                let name = lossy(r.cstr()?);
                Expect::Parse(name, runs_named_sql(r.cstr()?))
            }
            ftag::BIND => {
                let portal = lossy(r.cstr()?);
                let stmt = lossy(r.cstr()?);
                let n = r.count16()?;
                r.bytes(2 * n)?;
                let params = r.count16()?;
                for _ in 0..params {
                    let len = r.i32()?;
                    if len > 0 {
                        r.bytes(len as usize)?;
                    }
                }
                let n = r.count16()?;
                let mut formats = Vec::with_capacity(n);
                for _ in 0..n {
                    formats.push(r.i16()?);
                }
                Expect::Bind {
                    portal,
                    stmt,
                    formats: formats.into(),
                }
            }
            ftag::DESCRIBE => match r.u8()? {
                b'S' => Expect::DescribeStmt(lossy(r.cstr()?)),
                _ => Expect::DescribePortal(lossy(r.cstr()?)),
            },
            ftag::EXECUTE => Expect::Execute(lossy(r.cstr()?)),
            ftag::CLOSE => {
                let portal = r.u8()? == b'P';
                Expect::Close {
                    portal,
                    name: lossy(r.cstr()?),
                }
            }
            ftag::SYNC => Expect::Sync,
            _ => return Ok(()),
        };
        if self.expect.len() >= MAX_EXPECTED {
            return Err(WireError::TooLarge {
                what: "pipeline of unanswered messages",
                length: self.expect.len(),
                limit: MAX_EXPECTED,
            });
        }
        self.expect.push_back(e);
        Ok(())
    }

    /// Follows a server message whose body the relay replaced (a denial's error): the state
    /// changes as for the original, nothing is written.
    pub fn track_back(&mut self, tag: u8, body: &[u8]) -> Result<(), WireError> {
        self.on_back(tag, body).map(|_| ())
    }

    /// Follows a server message and writes it, masked, to `out`.
    pub fn emit(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        let rows = self.on_back(tag, body)?;
        let masker = Arc::clone(&self.plan.masker);
        match tag {
            btag::DATA_ROW => self.data_row(rows, body, out),
            btag::ERROR_RESPONSE | btag::NOTICE_RESPONSE
                if masker.has_content() || self.plan.has_columns() =>
            {
                self.fields(tag, body, out)
            }
            btag::NOTIFICATION_RESPONSE if masker.has_content() => {
                let mut r = Reader::new(body, "NotificationResponse");
                let pid = r.bytes(4)?;
                let channel = r.cstr()?;
                let payload = r.cstr()?;
                let mut new = Vec::with_capacity(body.len());
                new.extend_from_slice(pid);
                new.extend_from_slice(channel);
                new.push(0);
                self.scratch.clear();
                if self.mask_in_text(payload, true) {
                    new.extend_from_slice(&self.scratch);
                } else {
                    new.extend_from_slice(payload);
                }
                new.push(0);
                if !r.is_empty() {
                    return Err(WireError::malformed(
                        "NotificationResponse",
                        "bytes after the payload",
                    ));
                }
                write(out, tag, &new);
                Ok(())
            }
            // A setting's value can be made of data (set_config('application_name', (select
            // email ...), false)), and the reported ones come back in ParameterStatus.
            btag::PARAMETER_STATUS if masker.has_content() => {
                let mut r = Reader::new(body, "ParameterStatus");
                let name = r.cstr()?;
                let value = r.cstr()?;
                if !r.is_empty() {
                    return Err(WireError::malformed(
                        "ParameterStatus",
                        "bytes after the value",
                    ));
                }
                self.scratch.clear();
                if self.mask_in_text(value, true) {
                    let mut new = Vec::with_capacity(body.len());
                    new.extend_from_slice(name);
                    new.push(0);
                    new.extend_from_slice(&self.scratch);
                    new.push(0);
                    write(out, tag, &new);
                } else {
                    write(out, tag, body);
                }
                Ok(())
            }
            // Servers send CopyData only during COPY TO (or replication); masked either way.
            btag::COPY_DATA if masker.has_content() => {
                self.scratch.clear();
                if self.mask_in_text(body, true) {
                    let new = std::mem::take(&mut self.scratch);
                    write(out, tag, &new);
                    self.scratch = new;
                } else {
                    write(out, tag, body);
                }
                Ok(())
            }
            btag::FUNCTION_CALL_RESPONSE if masker.has_content() => {
                let mut new = body.to_vec();
                if new.len() > 4 {
                    self.fixed_len(&mut new[4..]);
                }
                write(out, tag, &new);
                Ok(())
            }
            _ => {
                write(out, tag, body);
                Ok(())
            }
        }
    }

    /// Updates the state for a server message; for DataRow returns the description to use.
    fn on_back(&mut self, tag: u8, body: &[u8]) -> Result<Option<Current>, WireError> {
        match tag {
            btag::PARSE_COMPLETE => {
                if let Some(Expect::Parse(name, utility)) =
                    self.pop_if(|e| matches!(e, Expect::Parse(..)))
                {
                    self.stmts.remove(&name);
                    if utility {
                        if self.utility.len() >= MAX_NAMED {
                            self.utility.clear();
                        }
                        self.utility.insert(name);
                    } else {
                        self.utility.remove(&name);
                    }
                }
            }
            btag::BIND_COMPLETE => {
                if let Some(Expect::Bind {
                    portal,
                    stmt,
                    formats,
                }) = self.pop_if(|e| matches!(e, Expect::Bind { .. }))
                {
                    let desc = self.stmts.get(&stmt).cloned();
                    if self.portals.len() >= MAX_NAMED && !self.portals.contains_key(&portal) {
                        self.portals.clear();
                    }
                    self.portals.insert(portal, Portal { desc, formats });
                }
            }
            btag::ROW_DESCRIPTION => {
                let desc = self.describe(body)?;
                match self.expect.front() {
                    Some(Expect::DescribeStmt(_)) => {
                        if let Some(Expect::DescribeStmt(s)) = self.expect.pop_front() {
                            if self.utility.contains(&s) {
                                self.stmts.remove(&s); // decided when it runs: not kept
                            } else {
                                if self.stmts.len() >= MAX_NAMED && !self.stmts.contains_key(&s) {
                                    self.stmts.clear();
                                }
                                self.stmts.insert(s, StmtDesc::Rows(desc));
                            }
                        }
                    }
                    Some(Expect::DescribePortal(_)) => {
                        if let Some(Expect::DescribePortal(p)) = self.expect.pop_front() {
                            if let Some(portal) = self.portals.get_mut(&p) {
                                portal.desc = Some(StmtDesc::Rows(desc));
                            }
                        }
                    }
                    _ => {
                        self.current = Some(Current {
                            desc: Some(desc),
                            bind_formats: None,
                        })
                    }
                }
            }
            btag::NO_DATA => match self.expect.pop_front() {
                Some(Expect::DescribeStmt(s)) => {
                    self.stmts.insert(s, StmtDesc::NoData);
                }
                Some(Expect::DescribePortal(p)) => {
                    if let Some(portal) = self.portals.get_mut(&p) {
                        portal.desc = Some(StmtDesc::NoData);
                    }
                }
                Some(other) => self.expect.push_front(other),
                None => {}
            },
            btag::DATA_ROW => {
                if let Some(Expect::Execute(p)) = self.expect.front() {
                    let portal = self.portals.get(p);
                    return Ok(Some(Current {
                        desc: match portal.and_then(|p| p.desc.as_ref()) {
                            Some(StmtDesc::Rows(d)) => Some(Arc::clone(d)),
                            _ => None,
                        },
                        bind_formats: Some(
                            portal.map(|p| Arc::clone(&p.formats)).unwrap_or_default(),
                        ),
                    }));
                }
                return Ok(Some(self.current.clone().unwrap_or(Current {
                    desc: None,
                    bind_formats: None,
                })));
            }
            btag::COMMAND_COMPLETE | btag::EMPTY_QUERY_RESPONSE | btag::PORTAL_SUSPENDED => {
                self.current = None;
                self.copy_out = None;
                if matches!(self.expect.front(), Some(Expect::Execute(_))) {
                    self.expect.pop_front();
                }
            }
            btag::CLOSE_COMPLETE => {
                if let Some(Expect::Close { portal, name }) =
                    self.pop_if(|e| matches!(e, Expect::Close { .. }))
                {
                    if portal {
                        self.portals.remove(&name);
                    } else {
                        self.stmts.remove(&name);
                    }
                }
            }
            btag::ERROR_RESPONSE => {
                self.current = None;
                self.copy_out = None;
                // The extended protocol skips to Sync after an error; a simple query's error is
                // followed by its ReadyForQuery.
                if !matches!(self.expect.front(), Some(Expect::Simple)) {
                    while let Some(e) = self.expect.front() {
                        if matches!(e, Expect::Sync | Expect::Simple) {
                            break;
                        }
                        self.expect.pop_front();
                    }
                }
            }
            btag::READY_FOR_QUERY => {
                self.current = None;
                self.copy_out = None;
                while let Some(e) = self.expect.pop_front() {
                    if matches!(e, Expect::Sync | Expect::Simple) {
                        break;
                    }
                }
                // A simple query ends the unnamed portal.
            }
            btag::COPY_OUT_RESPONSE | btag::COPY_BOTH_RESPONSE => {
                let format = body.first().copied().unwrap_or(0);
                if self.plan.has_columns() {
                    return Err(WireError::Refused(
                        "COPY TO cannot be masked by column rules (COPY names no columns); this \
                         session has column masking rules, so the gateway ends it: use SELECT"
                            .to_owned(),
                    ));
                }
                if format != 0 && self.plan.masker.has_content() {
                    return Err(WireError::Refused(
                        "binary COPY TO cannot be masked; use the text or CSV format".to_owned(),
                    ));
                }
                self.copy_out = Some(format);
            }
            btag::COPY_DONE => self.copy_out = None,
            _ => {}
        }
        Ok(None)
    }

    fn pop_if(&mut self, pred: impl Fn(&Expect) -> bool) -> Option<Expect> {
        if self.expect.front().is_some_and(pred) {
            self.expect.pop_front()
        } else {
            None
        }
    }

    fn describe(&self, body: &[u8]) -> Result<Desc, WireError> {
        let mut r = Reader::new(body, "RowDescription");
        let n = r.count16()?;
        let mut cols = Vec::with_capacity(n);
        for _ in 0..n {
            let name = r.cstr()?;
            let table = r.u32()?;
            let attnum = r.i16()?;
            let type_oid = r.u32()?;
            let _size = r.i16()?;
            let _modifier = r.i32()?;
            let format = r.i16()?;
            cols.push(Column {
                oid: type_oid,
                class: type_class(type_oid),
                format,
                rule: self.plan.column_rule(name, table, attnum),
            });
        }
        Ok(cols.into())
    }

    fn data_row(
        &mut self,
        cur: Option<Current>,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), WireError> {
        let cur = cur.unwrap_or(Current {
            desc: None,
            bind_formats: None,
        });
        if cur.desc.is_none() && self.plan.has_columns() {
            return Err(WireError::Refused(
                "rows arrived for a statement the client never described, so the gateway cannot \
                 tell their columns and apply this session's column masking rules"
                    .to_owned(),
            ));
        }
        let masker = Arc::clone(&self.plan.masker);
        let mut r = Reader::new(body, "DataRow");
        let n = r.count16()?;
        self.values.clear();
        let mut pos = 2usize;
        for _ in 0..n {
            let len = r.i32()?;
            pos += 4;
            if len < 0 {
                self.values.push(None);
            } else {
                let len = len as usize;
                r.bytes(len)?;
                self.values.push(Some((pos, pos + len)));
                pos += len;
            }
        }
        if !r.is_empty() {
            return Err(WireError::malformed("DataRow", "trailing bytes"));
        }
        let format_of = |i: usize| -> i16 {
            match &cur.bind_formats {
                Some(f) => match f.len() {
                    0 => 0,
                    1 => f[0],
                    _ => f.get(i).copied().unwrap_or(0),
                },
                None => cur
                    .desc
                    .as_ref()
                    .and_then(|d| d.get(i))
                    .map_or(0, |c| c.format),
            }
        };
        let col_of = |i: usize| -> Column {
            cur.desc
                .as_ref()
                .and_then(|d| d.get(i).copied())
                .unwrap_or(Column {
                    oid: 0,
                    class: TypeClass::Other,
                    format: 0,
                    rule: None,
                })
        };

        // Decide each value: column rules at once, content rules after one search.
        self.scratch.clear();
        self.scan.clear();
        self.scanned.clear();
        let mut decided = std::mem::take(&mut self.decided);
        decided.clear();
        let content = masker.has_content();
        for i in 0..n {
            let Some((s, e)) = self.values[i] else {
                decided.push(Value::Keep);
                continue;
            };
            let col = col_of(i);
            if let Some(rule) = col.rule {
                self.counts[rule] += 1;
                if col.class == TypeClass::Text {
                    let start = self.scratch.len();
                    if masker.apply(rule, &body[s..e], &mut self.scratch) {
                        decided.push(Value::New(start, self.scratch.len()));
                        continue;
                    }
                }
                decided.push(Value::Null);
                continue;
            }
            if content {
                let start = self.scan.len();
                if col.class == TypeClass::Scalar && format_of(i) != 0 {
                    // A binary number or address is scanned as the text it stands for (a card
                    // number in a bigint is still a card number); other binary scalars as their
                    // bytes. A hit makes the value NULL.
                    if !render_binary(col.oid, &body[s..e], &mut self.scan) {
                        self.scan.extend_from_slice(&body[s..e]);
                    }
                } else {
                    self.scan.extend_from_slice(&body[s..e]);
                }
                self.scanned.push((i, start, self.scan.len()));
                self.scan.push(0);
            }
            decided.push(Value::Keep);
        }
        if !self.scanned.is_empty() {
            self.hits.clear();
            let hits = &mut self.hits;
            masker.find_matches(&self.scan, &mut |s, e, rule| hits.push((s, e, rule)));
            let mut h = 0;
            for &(i, vs, ve) in &self.scanned {
                let first = h;
                while h < self.hits.len() && self.hits[h].0 < ve {
                    h += 1;
                }
                if first == h {
                    continue;
                }
                let col = col_of(i);
                let binary = format_of(i) != 0;
                let value = &self.scan[vs..ve];
                let hits = &self.hits[first..h];
                for &(_, _, rule) in hits {
                    self.counts[rule] += 1;
                }
                decided[i] = match (col.class, binary) {
                    (TypeClass::Scalar, _) => Value::Null,
                    (TypeClass::Other, true) => {
                        let start = self.scratch.len();
                        self.scratch.extend_from_slice(value);
                        for &(ms, me, _) in hits {
                            self.scratch[start + ms - vs..start + me - vs].fill(b'*');
                        }
                        Value::New(start, self.scratch.len())
                    }
                    _ => {
                        let start = self.scratch.len();
                        let mut at = vs;
                        let mut null = false;
                        let json = matches!(col.oid, 114 | 3802);
                        let mut strings = JsonStrings::default();
                        for &(ms, me, rule) in hits {
                            self.scratch.extend_from_slice(&self.scan[at..ms]);
                            // In JSON, a match outside a string (a number) becomes a string, so
                            // the document stays valid.
                            let quote = json && !strings.inside_at(&self.scan[vs..ve], ms - vs);
                            if quote {
                                self.scratch.push(b'"');
                            }
                            if !masker.replace(rule, &self.scan[ms..me], &mut self.scratch) {
                                null = true;
                                break;
                            }
                            if quote {
                                self.scratch.push(b'"');
                            }
                            at = me;
                        }
                        if null {
                            self.scratch.truncate(start);
                            Value::Null
                        } else {
                            self.scratch.extend_from_slice(&self.scan[at..ve]);
                            Value::New(start, self.scratch.len())
                        }
                    }
                };
            }
        }
        if decided.iter().all(|v| matches!(v, Value::Keep)) {
            write(out, btag::DATA_ROW, body);
            self.decided = decided;
            return Ok(());
        }
        // Written straight to `out`, the length patched once the row is complete.
        let at = out.len();
        out.push(btag::DATA_ROW);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&body[..2]);
        let new = out;
        for (i, v) in decided.iter().enumerate() {
            let bytes: Option<&[u8]> = match v {
                Value::Keep => self.values[i].map(|(s, e)| &body[s..e]),
                Value::Null => None,
                Value::New(s, e) => Some(&self.scratch[*s..*e]),
            };
            match bytes {
                None => new.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(b) => {
                    new.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    new.extend_from_slice(b);
                }
            }
        }
        let len = (new.len() - at - 1) as u32;
        new[at + 1..at + 5].copy_from_slice(&len.to_be_bytes());
        self.decided = decided;
        Ok(())
    }

    /// Masks `text` into `scratch` (cleared by the caller); true when something changed. Where a
    /// strategy would make the value NULL, text outside a value (messages, COPY lines) gets
    /// same-length `*` instead, or, with `fixed`, every replacement does.
    fn mask_in_text(&mut self, text: &[u8], fixed_null: bool) -> bool {
        let masker = Arc::clone(&self.plan.masker);
        self.hits.clear();
        let hits = &mut self.hits;
        masker.find_matches(text, &mut |s, e, rule| hits.push((s, e, rule)));
        if self.hits.is_empty() {
            return false;
        }
        let mut at = 0;
        for &(s, e, rule) in &self.hits {
            self.counts[rule] += 1;
            self.scratch.extend_from_slice(&text[at..s]);
            let mark = self.scratch.len();
            if !masker.replace(rule, &text[s..e], &mut self.scratch) {
                debug_assert!(fixed_null);
                self.scratch.truncate(mark);
                self.scratch.resize(mark + (e - s), b'*');
            }
            at = e;
        }
        self.scratch.extend_from_slice(&text[at..]);
        true
    }

    /// Overwrites matches with same-length `*`; returns how many.
    fn fixed_len(&mut self, bytes: &mut [u8]) -> usize {
        let masker = Arc::clone(&self.plan.masker);
        self.hits.clear();
        let hits = &mut self.hits;
        masker.find_matches(bytes, &mut |s, e, rule| hits.push((s, e, rule)));
        for &(s, e, rule) in &self.hits {
            self.counts[rule] += 1;
            bytes[s..e].fill(b'*');
        }
        self.hits.len()
    }

    fn fields(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        let mut new = Vec::with_capacity(body.len());
        let mut changed = false;
        // Column rules mask values where a result column names its origin; errors of classes
        // 22 (data exception: `invalid input syntax for type integer: "<value>"`) and 23
        // (integrity: `Failing row contains (...)`, `Key (c)=(<value>) already exists`) print
        // values of any column with none. Their details, context and quoted values are withheld.
        let state = sqlstate(body).filter(|_| self.plan.has_columns());
        let class22 = state.is_some_and(|c| c.starts_with(b"22"));
        let withhold = class22 || state.is_some_and(|c| c.starts_with(b"23"));
        let content = self.plan.masker.has_content();
        let mut r = Reader::new(body, "ErrorResponse");
        loop {
            let code = r.u8()?;
            new.push(code);
            if code == 0 {
                if !r.is_empty() {
                    return Err(WireError::malformed(
                        "ErrorResponse",
                        "bytes after the fields",
                    ));
                }
                break;
            }
            let value = r.cstr()?;
            if withhold && matches!(code, b'D' | b'W' | b'M') {
                changed = true;
                if code == b'M' {
                    if class22 {
                        // Values are quoted in these messages (`value "..." is out of range`,
                        // `invalid input syntax for type integer: "..."`): each quoted part goes.
                        withhold_quoted(value, &mut new);
                    } else {
                        // Class 23 messages name constraints and relations, not values.
                        new.extend_from_slice(value);
                    }
                } else {
                    new.extend_from_slice(WITHHELD);
                }
                new.push(0);
                continue;
            }
            // Severity, SQLSTATE, source file/line/routine and positions carry no data.
            self.scratch.clear();
            if content
                && !matches!(code, b'S' | b'V' | b'C' | b'F' | b'L' | b'R' | b'P' | b'p')
                && self.mask_in_text(value, true)
            {
                changed = true;
                new.extend_from_slice(&self.scratch);
            } else {
                new.extend_from_slice(value);
            }
            new.push(0);
        }
        write(out, tag, if changed { &new } else { body });
        Ok(())
    }
}

const WITHHELD: &[u8] =
    b"(withheld by the gateway: errors of this class can show values of masked columns)";
const WITHHELD_VALUE: &[u8] = b"(value withheld by the gateway)";

/// `text` with what stands between each pair of double quotes replaced by `WITHHELD_VALUE` (and
/// everything after an unpaired quote).
fn withhold_quoted(text: &[u8], out: &mut Vec<u8>) {
    let mut rest = text;
    while let Some(open) = rest.iter().position(|&b| b == b'"') {
        out.extend_from_slice(&rest[..=open]);
        out.extend_from_slice(WITHHELD_VALUE);
        match rest[open + 1..].iter().position(|&b| b == b'"') {
            Some(close) => {
                out.push(b'"');
                rest = &rest[open + 1 + close + 1..];
            }
            None => return,
        }
    }
    out.extend_from_slice(rest);
}

/// The SQLSTATE (`C` field) of an ErrorResponse or NoticeResponse body.
fn sqlstate(body: &[u8]) -> Option<&[u8]> {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let code = body[i];
        let end = i + 1 + body[i + 1..].iter().position(|&b| b == 0)?;
        if code == b'C' {
            return Some(&body[i + 1..end]);
        }
        i = end + 1;
    }
    None
}

/// Whether positions of a JSON text are inside a string; asked for increasing positions.
#[derive(Default)]
struct JsonStrings {
    pos: usize,
    inside: bool,
    escaped: bool,
}

impl JsonStrings {
    fn inside_at(&mut self, text: &[u8], at: usize) -> bool {
        while self.pos < at.min(text.len()) {
            let c = text[self.pos];
            if self.escaped {
                self.escaped = false;
            } else if self.inside && c == b'\\' {
                self.escaped = true;
            } else if c == b'"' {
                self.inside = !self.inside;
            }
            self.pos += 1;
        }
        self.inside
    }
}

/// Whether a statement text is SQL EXECUTE or FETCH (after blanks and comments): its rows are
/// those of another statement or cursor, chosen when it runs.
fn runs_named_sql(sql: &[u8]) -> bool {
    let mut i = 0;
    loop {
        while i < sql.len() && (sql[i].is_ascii_whitespace() || sql[i] == b'(') {
            i += 1;
        }
        if sql[i..].starts_with(b"--") {
            while i < sql.len() && sql[i] != b'\n' {
                i += 1;
            }
        } else if sql[i..].starts_with(b"/*") {
            let mut depth = 0usize;
            while i < sql.len() {
                if sql[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if sql[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            break;
        }
    }
    let word: Vec<u8> = sql[i..]
        .iter()
        .take_while(|b| b.is_ascii_alphabetic())
        .map(u8::to_ascii_lowercase)
        .collect();
    word == b"execute" || word == b"fetch"
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::frontend;
    use crate::pg::relay::{Gate, SessionRelay};
    use crate::Limits;

    /// Rule 0: runs of 6+ digits become "####"; rule 1: the word "secret" becomes NULL.
    struct Digits;
    impl Masker for Digits {
        fn rules(&self) -> usize {
            2
        }
        fn has_content(&self) -> bool {
            true
        }
        fn find_matches(&self, hay: &[u8], f: &mut dyn FnMut(usize, usize, usize)) {
            let mut i = 0;
            while i < hay.len() {
                if hay[i..].starts_with(b"secret") {
                    f(i, i + 6, 1);
                    i += 6;
                    continue;
                }
                let s = i;
                while i < hay.len() && hay[i].is_ascii_digit() {
                    i += 1;
                }
                if i - s >= 6 {
                    f(s, i, 0);
                }
                if i == s {
                    i += 1;
                }
            }
        }
        fn replace(&self, rule: usize, _m: &[u8], out: &mut Vec<u8>) -> bool {
            if rule == 1 {
                return false;
            }
            out.extend_from_slice(b"####");
            true
        }
        fn apply(&self, rule: usize, value: &[u8], out: &mut Vec<u8>) -> bool {
            self.replace(rule, value, out)
        }
    }

    fn plan() -> MaskPlan {
        MaskPlan {
            masker: Arc::new(Digits),
            columns: HashMap::new(),
            names: Vec::new(),
            late_names: Vec::new(),
            max_oid: 0,
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write(&mut v, tag, body);
        v
    }

    fn row_desc(cols: &[(&str, u32, i16, u32, i16)]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for (name, table, attnum, ty, format) in cols {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&table.to_be_bytes());
            b.extend_from_slice(&attnum.to_be_bytes());
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(-1i16).to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&format.to_be_bytes());
        }
        msg(btag::ROW_DESCRIPTION, &b)
    }

    fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        msg(btag::DATA_ROW, &b)
    }

    fn bind(portal: &str, stmt: &str, formats: &[i16]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(portal.as_bytes());
        b.push(0);
        b.extend_from_slice(stmt.as_bytes());
        b.push(0);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        msg(ftag::BIND, &b)
    }

    fn named(tag: u8, prefix: Option<u8>, name: &str, tail: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(prefix);
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(tail);
        msg(tag, &b)
    }

    fn relay(plan: MaskPlan) -> SessionRelay {
        let mut r = SessionRelay::new(Limits::default(), Gate::AllowAll, false);
        r.set_masking(plan);
        r
    }

    /// Feeds client bytes, then server bytes whole and in every small chunking; all must agree.
    fn run(plan: impl Fn() -> MaskPlan, front: &[u8], back: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut whole = None;
        for chunk in [usize::MAX, 1, 2, 5, 13] {
            let mut r = relay(plan());
            let mut up = Vec::new();
            r.feed_frontend(front, &mut up)?;
            assert_eq!(up, front, "client bytes pass unchanged");
            let mut out = Vec::new();
            for c in back.chunks(chunk.min(back.len().max(1))) {
                r.feed_backend(c, &mut out, &mut Vec::new())?;
            }
            match &whole {
                None => whole = Some(out),
                Some(w) => assert_eq!(&out, w, "chunk size {chunk}"),
            }
        }
        Ok(whole.unwrap())
    }

    #[test]
    fn simple_query_rows_are_masked_by_type() {
        let front = frontend::query("select");
        let mut back = row_desc(&[
            ("a", 0, 0, 25, 0),
            ("b", 0, 0, 20, 0),
            ("c", 0, 0, 1009, 0),
            ("d", 0, 0, 25, 0),
        ]);
        back.extend(data_row(&[
            Some(b"card 4111111111111111 x"),
            Some(b"12345678"),
            Some(b"{1234567,ok}"),
            Some(b"a secret"),
        ]));
        back.extend(data_row(&[Some(b"12"), None, Some(b"{}"), Some(b"plain")]));
        back.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 2\0"));
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        let out = run(plan, &front, &back).unwrap();
        let mut want = row_desc(&[
            ("a", 0, 0, 25, 0),
            ("b", 0, 0, 20, 0),
            ("c", 0, 0, 1009, 0),
            ("d", 0, 0, 25, 0),
        ]);
        want.extend(data_row(&[
            Some(b"card #### x"),
            None,
            Some(b"{####,ok}"),
            None,
        ]));
        want.extend(data_row(&[Some(b"12"), None, Some(b"{}"), Some(b"plain")]));
        want.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 2\0"));
        want.extend(msg(btag::READY_FOR_QUERY, b"I"));
        assert_eq!(out, want);
        let mut r = relay(plan());
        r.feed_frontend(&front, &mut Vec::new()).unwrap();
        r.feed_backend(&back, &mut Vec::new(), &mut Vec::new())
            .unwrap();
        assert_eq!(r.masked_counts(), &[3, 1]);
    }

    #[test]
    fn extended_rows_use_their_portals_description_and_formats() {
        // s1 (text, int8) is described, then s2 (int8 only); rows of s1 arrive last, in binary.
        let mut front = frontend::parse("s1", "q1", &[]);
        front.extend(named(ftag::DESCRIBE, Some(b'S'), "s1", b""));
        front.extend(frontend::parse("s2", "q2", &[]));
        front.extend(named(ftag::DESCRIBE, Some(b'S'), "s2", b""));
        front.extend(frontend::sync());
        front.extend(bind("", "s1", &[1]));
        front.extend(named(ftag::EXECUTE, None, "", &0i32.to_be_bytes()));
        front.extend(frontend::sync());
        let d1 = row_desc(&[("t", 0, 0, 25, 0), ("n", 0, 0, 20, 0)]);
        let d2 = row_desc(&[("n", 0, 0, 20, 0)]);
        let mut back = msg(btag::PARSE_COMPLETE, b"");
        back.extend(msg(btag::PARAMETER_DESCRIPTION, &0i16.to_be_bytes()));
        back.extend(d1.clone());
        back.extend(msg(btag::PARSE_COMPLETE, b""));
        back.extend(msg(btag::PARAMETER_DESCRIPTION, &0i16.to_be_bytes()));
        back.extend(d2.clone());
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        back.extend(msg(btag::BIND_COMPLETE, b""));
        // The int8 in binary holds six ASCII digits but stands for 256: it passes.
        back.extend(data_row(&[
            Some(b"id 9999999"),
            Some(b"\x00\x00\x00\x00\x00\x00\x01\x00"),
        ]));
        back.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 1\0"));
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        let out = run(plan, &front, &back).unwrap();
        let mut want = back.clone();
        let old = data_row(&[
            Some(b"id 9999999"),
            Some(b"\x00\x00\x00\x00\x00\x00\x01\x00"),
        ]);
        let new = data_row(&[Some(b"id ####"), Some(b"\x00\x00\x00\x00\x00\x00\x01\x00")]);
        let at = want.windows(old.len()).position(|w| w == old).unwrap();
        want.splice(at..at + old.len(), new);
        assert_eq!(out, want);
    }

    #[test]
    fn binary_containers_keep_their_length() {
        let mut front = frontend::parse("", "q", &[]);
        front.extend(bind("", "", &[1]));
        front.extend(named(ftag::DESCRIBE, Some(b'P'), "", b""));
        front.extend(named(ftag::EXECUTE, None, "", &0i32.to_be_bytes()));
        front.extend(frontend::sync());
        let mut back = msg(btag::PARSE_COMPLETE, b"");
        back.extend(msg(btag::BIND_COMPLETE, b""));
        back.extend(row_desc(&[("arr", 0, 0, 1009, 1)]));
        back.extend(data_row(&[Some(b"\x00\x00\x00\x0a4111111111")]));
        back.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 1\0"));
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        let out = run(plan, &front, &back).unwrap();
        assert!(out.windows(14).any(|w| w == b"\x00\x00\x00\x0a**********"));
    }

    #[test]
    fn an_error_skips_to_sync_like_the_server() {
        // Execute of s1 fails; the queued Describe of s2 is skipped, so the next RowDescription
        // belongs to the later simple query, not to s2.
        let mut front = frontend::parse("s1", "q1", &[]);
        front.extend(bind("", "s1", &[]));
        front.extend(named(ftag::EXECUTE, None, "", &0i32.to_be_bytes()));
        front.extend(named(ftag::DESCRIBE, Some(b'S'), "s2", b""));
        front.extend(frontend::sync());
        front.extend(frontend::query("select"));
        let mut back = msg(btag::PARSE_COMPLETE, b"");
        back.extend(msg(btag::BIND_COMPLETE, b""));
        back.extend(crate::pg::backend::error_response(
            "ERROR",
            "22012",
            "boom 1234567",
        ));
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        back.extend(row_desc(&[("x", 0, 0, 20, 0)]));
        back.extend(data_row(&[Some(b"7777777")]));
        back.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 1\0"));
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        let out = run(plan, &front, &back).unwrap();
        assert!(
            out.windows(12).any(|w| w == b"Mboom ####\0\0"),
            "error text masked"
        );
        let null_row = data_row(&[None]);
        assert!(out.windows(null_row.len()).any(|w| w == null_row));
    }

    #[test]
    fn column_rules_by_catalog_and_name_and_fail_closed_without_description() {
        let p = || {
            let mut p = plan();
            p.columns.insert((500, 2), 0);
            p.names.push(("*mail*".into(), 1));
            p.late_names.push(("card".into(), 0));
            p.max_oid = 1000;
            p
        };
        let front = frontend::query("select");
        let mut back = row_desc(&[
            ("alias", 500, 2, 25, 0),
            ("Email", 0, 0, 25, 0),
            ("card", 2000, 1, 25, 0),
            ("card", 600, 1, 25, 0),
            ("n", 500, 2, 23, 0),
        ]);
        back.extend(data_row(&[
            Some(b"x"),
            Some(b"a@b"),
            Some(b"y"),
            Some(b"z"),
            Some(b"5"),
        ]));
        back.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 1\0"));
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        let out = run(p, &front, &back).unwrap();
        let want = data_row(&[Some(b"####"), None, Some(b"####"), Some(b"z"), None]);
        assert!(out.windows(want.len()).any(|w| w == want));

        // Extended rows of a statement never described: refused when column rules exist.
        let mut front = frontend::parse("", "q", &[]);
        front.extend(bind("", "", &[]));
        front.extend(named(ftag::EXECUTE, None, "", &0i32.to_be_bytes()));
        front.extend(frontend::sync());
        let mut back = msg(btag::PARSE_COMPLETE, b"");
        back.extend(msg(btag::BIND_COMPLETE, b""));
        back.extend(data_row(&[Some(b"x")]));
        assert!(matches!(run(p, &front, &back), Err(WireError::Refused(_))));
        // Without column rules, such rows still get content masking.
        back.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 1\0"));
        let mut back2 = msg(btag::PARSE_COMPLETE, b"");
        back2.extend(msg(btag::BIND_COMPLETE, b""));
        back2.extend(data_row(&[Some(b"1234567")]));
        let out = run(plan, &front, &back2).unwrap();
        assert!(out.windows(4).any(|w| w == b"####"));
    }

    #[test]
    fn a_described_sql_execute_or_fetch_is_not_trusted_later() {
        // Parse "execute q" (or "fetch next from c"), Describe it while q returns an unruled
        // column, re-PREPARE q over a ruled one, then Bind and Execute without describing the
        // portal: the rows are those of the new q, so the old description must not be used.
        let p = || {
            let mut p = plan();
            p.columns.insert((500, 2), 0);
            p.max_oid = 1000;
            p
        };
        // Parse `text` as "s", Describe it (the server answers for column `attnum` of table 500),
        // then Bind and Execute it without describing the portal.
        let exchange = |text: &str, attnum: i16| {
            let mut front = frontend::parse("s", text, &[]);
            front.extend(named(ftag::DESCRIBE, Some(b'S'), "s", b""));
            front.extend(frontend::sync());
            front.extend(bind("", "s", &[]));
            front.extend(named(ftag::EXECUTE, None, "", &0i32.to_be_bytes()));
            front.extend(frontend::sync());
            let mut back = msg(btag::PARSE_COMPLETE, b"");
            back.extend(msg(btag::PARAMETER_DESCRIPTION, b"\0\0"));
            back.extend(row_desc(&[("v", 500, attnum, 25, 0)]));
            back.extend(msg(btag::READY_FOR_QUERY, b"I"));
            back.extend(msg(btag::BIND_COMPLETE, b""));
            back.extend(data_row(&[Some(b"TOPSECRET")]));
            (front, back)
        };
        for text in ["execute q", " /* x */ FETCH next from c", "(execute q)"] {
            let (front, back) = exchange(text, 1);
            assert!(
                matches!(run(p, &front, &back), Err(WireError::Refused(_))),
                "{text}"
            );
        }
        // An ordinary prepared statement keeps its description.
        let (front, mut back) = exchange("select v from t", 2);
        back.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 1\0"));
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        let out = run(p, &front, &back).unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("TOPSECRET"));
    }

    #[test]
    fn binds_with_more_than_32767_parameters_are_followed() {
        // PostgreSQL reads the counts as unsigned (up to 65535); so must the masking state.
        let mut bind = b"\0\0".to_vec(); // unnamed portal, unnamed statement
        bind.extend_from_slice(&0u16.to_be_bytes()); // parameter formats: all text
        bind.extend_from_slice(&40_000u16.to_be_bytes());
        for _ in 0..40_000 {
            bind.extend_from_slice(&1i32.to_be_bytes());
            bind.push(b'1');
        }
        bind.extend_from_slice(&0u16.to_be_bytes()); // result formats: all text
        let mut front = frontend::parse("", "select $1", &[]);
        front.extend(msg(ftag::BIND, &bind));
        front.extend(msg(ftag::DESCRIBE, b"P\0"));
        front.extend(msg(ftag::EXECUTE, b"\0\0\0\0\0"));
        front.extend(frontend::sync());
        let mut back = msg(btag::PARSE_COMPLETE, b"");
        back.extend(msg(btag::BIND_COMPLETE, b""));
        back.extend(row_desc(&[("x", 0, 0, 25, 0)]));
        back.extend(data_row(&[Some(b"card 4111111111111111")]));
        back.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 1\0"));
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        let out = run(plan, &front, &back).unwrap();
        assert!(String::from_utf8_lossy(&out).contains("card ####"));
    }

    #[test]
    fn copy_notices_and_notifications_are_masked() {
        let front = frontend::query("copy");
        let mut back = msg(btag::COPY_OUT_RESPONSE, b"\x00\x00\x01\x00\x00");
        back.extend(msg(btag::COPY_DATA, b"1\t4111111111111111\tsecret\n"));
        back.extend(msg(btag::COPY_DONE, b""));
        back.extend(msg(btag::COMMAND_COMPLETE, b"COPY 1\0"));
        back.extend(
            crate::pg::backend::ErrorFields::new("NOTICE", "00000", "saw 1234567")
                .with(b'D', "Key (card)=(4111111111111111) exists")
                .encode_notice(),
        );
        let mut note = 42i32.to_be_bytes().to_vec();
        note.extend_from_slice(b"chan\0pay 123456789\0");
        back.extend(msg(btag::NOTIFICATION_RESPONSE, &note));
        // A reported setting whose value was made of data.
        back.extend(msg(
            btag::PARAMETER_STATUS,
            b"application_name\0card 4111111111111111\0",
        ));
        back.extend(msg(btag::PARAMETER_STATUS, b"TimeZone\0UTC\0"));
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        let out = run(plan, &front, &back).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("1\t####\t******\n"), "{text}");
        assert!(text.contains("saw ####") && text.contains("Key (card)=(####) exists"));
        assert!(text.contains("chan\0pay ####\0"));
        assert!(text.contains("application_name\0card ####\0") && text.contains("TimeZone\0UTC\0"));
        assert!(!text.contains("4111") && !text.contains("123456789"));

        // Binary COPY cannot be masked: refused.
        let mut back = msg(btag::COPY_OUT_RESPONSE, b"\x01\x00\x01\x00\x01");
        back.extend(msg(btag::COPY_DATA, b"PGCOPY"));
        assert!(matches!(
            run(plan, &front, &back),
            Err(WireError::Refused(_))
        ));
    }

    #[test]
    fn errors_that_print_values_are_withheld_under_column_rules() {
        let columns = || {
            let mut p = plan();
            p.columns.insert((500, 2), 0);
            p
        };
        let front = frontend::query("update");
        let mut back =
            crate::pg::backend::ErrorFields::new("ERROR", "23502", "null value in column \"id\"")
                .with(b'D', "Failing row contains (null, Bob, zebra-octopus-42).")
                .encode_error();
        back.extend(
            crate::pg::backend::ErrorFields::new(
                "ERROR",
                "22P02",
                "invalid input syntax for type integer: \"mango-falcon\"",
            )
            .with(b'W', "JSON data, line 1: \"mango-falcon")
            .encode_error(),
        );
        back.extend(
            crate::pg::backend::ErrorFields::new(
                "ERROR",
                "22003",
                "value \"zebra-99999999999\" is out of range for type integer",
            )
            .encode_error(),
        );
        back.extend(
            crate::pg::backend::ErrorFields::new("ERROR", "42501", "permission denied: \"x\"")
                .with(b'D', "kept as it is")
                .encode_error(),
        );
        back.extend(msg(btag::READY_FOR_QUERY, b"I"));
        let text = String::from_utf8_lossy(&run(columns, &front, &back).unwrap()).into_owned();
        assert!(!text.contains("zebra") && !text.contains("mango"), "{text}");
        assert!(text.contains("null value in column \"id\"\0"), "{text}");
        assert!(text.contains(
            "invalid input syntax for type integer: \"(value withheld by the gateway)\"\0"
        ));
        assert!(text.contains("permission denied: \"x\"\0") && text.contains("kept as it is"));
        // Without column rules the server's text passes (content rules still scan it).
        let text = String::from_utf8_lossy(&run(plan, &front, &back).unwrap()).into_owned();
        assert!(
            text.contains("zebra-octopus-42") && text.contains("mango-falcon"),
            "{text}"
        );
    }

    #[test]
    fn oversized_server_messages_are_refused_not_passed() {
        let mut r = SessionRelay::new(
            Limits {
                max_statement: 100,
                ..Limits::default()
            },
            Gate::AllowAll,
            false,
        );
        r.set_masking(plan());
        r.feed_frontend(&frontend::query("x"), &mut Vec::new())
            .unwrap();
        let row = data_row(&[Some(&[b'1'; 200])]);
        let err = r.feed_backend(&row, &mut Vec::new(), &mut Vec::new());
        assert!(matches!(err, Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn json_numbers_become_strings_so_documents_stay_valid() {
        let front = frontend::query("select");
        let mut back = row_desc(&[("j", 0, 0, 114, 0)]);
        back.extend(data_row(&[Some(
            br#####"{"a":"x 1234567 \" y","n":12345678,"m":[7654321]}"#####,
        )]));
        back.extend(msg(btag::COMMAND_COMPLETE, b"SELECT 1\0"));
        let out = run(plan, &front, &back).unwrap();
        let want = data_row(&[Some(
            br#####"{"a":"x #### \" y","n":"####","m":["####"]}"#####,
        )]);
        assert!(
            out.windows(want.len()).any(|w| w == want),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"*mail*", b"EMail_Address"));
        assert!(glob_match(b"card", b"CARD"));
        assert!(!glob_match(b"card", b"cards"));
        assert!(glob_match(b"c?rd*", b"cord_no"));
        assert!(glob_match(b"*", b""));
    }
}

#[cfg(test)]
mod render_tests {
    use super::render_binary;
    use crate::pg::binary::render_param;

    fn shown(render: fn(u32, &[u8], &mut Vec<u8>) -> bool, oid: u32, v: &[u8]) -> Option<String> {
        let mut out = Vec::new();
        render(oid, v, &mut out).then(|| String::from_utf8(out).unwrap())
    }

    fn r(oid: u32, v: &[u8]) -> Option<String> {
        shown(render_binary, oid, v)
    }

    #[test]
    fn text_params_read_as_their_text_and_bytea_as_its_hex() {
        // As a text parameter of the same value would read (an approval binds what it shows).
        let p = |oid, v| shown(render_param, oid, v);
        assert_eq!(p(25, b"orig4").as_deref(), Some("orig4"));
        assert_eq!(p(1043, "\u{e9}".as_bytes()).as_deref(), Some("\u{e9}"));
        assert_eq!(p(17, b"\x01\xff").as_deref(), Some("\\x01ff"));
        // Not UTF-8, or a type the server resolves itself: not rendered (the caller marks it).
        assert_eq!(p(25, b"\xff"), None);
        assert_eq!(p(0, b"orig4"), None);
    }

    #[test]
    fn binary_numbers_and_addresses_render_as_text() {
        assert_eq!(
            r(20, &4111111111111111i64.to_be_bytes()).unwrap(),
            "4111111111111111"
        );
        assert_eq!(r(23, &(-5i32).to_be_bytes()).unwrap(), "-5");
        // numeric 4111111111111111: 4 base-10000 digits, weight 3.
        let mut n = vec![0, 4, 0, 3, 0, 0, 0, 0];
        for d in [4111u16, 1111, 1111, 1111] {
            n.extend_from_slice(&d.to_be_bytes());
        }
        assert_eq!(r(1700, &n).unwrap(), "4111111111111111");
        // numeric 12.5: digits [12, 5000], weight 0.
        let n = [0, 2, 0, 0, 0, 0, 0, 1, 0, 12, 0x13, 0x88];
        assert_eq!(r(1700, &n).unwrap(), "12.5000");
        // numeric 10000: digit [1], weight 1.
        assert_eq!(r(1700, &[0, 1, 0, 1, 0, 0, 0, 0, 0, 1]).unwrap(), "10000");
        assert_eq!(
            r(869, &[2, 32, 0, 4, 10, 20, 30, 40]).unwrap(),
            "10.20.30.40/32"
        );
        assert_eq!(r(869, &[2, 32, 0, 5, 10, 20, 30, 40]), None);
        assert_eq!(r(1700, &[0, 9, 0, 0]), None);
        assert_eq!(r(16, &[1]), None);
    }
}
