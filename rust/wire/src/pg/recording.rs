//! Session recording: a sans-IO recorder of what a client sent and what the gateway sent it back.
//!
//! Rules of this file. The recorder is fed the plaintext bytes of an established session after the
//! startup phase, in chunks of any size, one call per chunk and direction: `frontend` with what the
//! client sent, `backend` with what the gateway sent to the client (after masking). It never holds
//! an unbounded message: the five header bytes of every message are read, then the body is either
//! *skipped* while it streams (nothing is copied: the cost of a skipped message is its header),
//! *kept* up to a cap (statements, descriptions, tags, errors; [`MAX_KEPT`] bytes, CopyData
//! `max_field` bytes) or *stream-parsed* (DataRow: each field is cut to `max_field` bytes as it
//! arrives, so a 1 GiB row costs at most `2 + fields * (4 + max_field)` bytes, and no more than
//! `max_buffer`). Lengths are checked before anything is allocated; a malformed message (a length
//! under 4, a DataRow whose fields do not fill it exactly, a malformed Bind) is a [`WireError`]:
//! the recorder writes a `stopped` frame and records nothing more. Nothing here panics on input.
//!
//! Caps. At most `max_rows` DataRow (or CopyData) messages are kept per statement and direction;
//! the rest are counted and reported in one `rows omitted` frame just before the statement's
//! CommandComplete, ErrorResponse, EmptyQueryResponse, PortalSuspended or ReadyForQuery (client
//! CopyData: before its CopyDone, CopyFail, Sync or Query). A row whose frame would take the buffer
//! past `max_buffer` is omitted the same way; other frames may use up to twice `max_buffer`, beyond
//! that they are counted and reported in one `frames lost` frame once the caller has taken the
//! buffer. The buffer therefore never grows without bound between two `take` calls.
//!
//! Frame format, version 1 (also decoded by `ostiary.recording.format`). The buffer is a sequence
//! of frames, each:
//!
//! ```text
//! kind:u8  delta:uvarint  tag:u8  length:u32be  body[length - 4]
//! ```
//!
//! `kind` is `F` (a message the client sent), `B` (a message the gateway sent to the client) or `R`
//! (a frame of the recorder itself). `delta` is LEB128: microseconds since the previous frame (the
//! first frame's delta is the caller's clock at the start; a clock that goes backwards gives 0).
//! `tag`, `length` and `body` are the PostgreSQL message as the protocol defines it (the length
//! counts itself), so `F`/`B` frames hold the message verbatim unless it was cut (below); `R` frames
//! use the same envelope with their own tags:
//!
//! - `V` header, first frame of every recording: `version:u16 max_rows:u64 max_field:u32`.
//! - `X` truncated, just before the message it describes: `count:u16`, then `count` times
//!   `field:i16 original_length:i32`. `field` is the DataRow column or Bind parameter whose value was
//!   cut to `max_field` bytes; `-1` means the body itself was cut (at [`MAX_KEPT`] bytes, CopyData at
//!   `max_field`): its last string may lack its NUL terminator and later fields are missing.
//! - `O` rows omitted: `count:u64` DataRow/CopyData messages of the statement that were not kept.
//! - `L` frames lost: `count:u64` other frames dropped because the buffer was full.
//! - `S` stopped: the recorder met malformed input and recorded nothing more; body: the reason
//!   (UTF-8).
//!
//! Kept client messages: Query, Parse, Bind (values cut to `max_field`), Execute, Sync, Describe,
//! Close, FunctionCall, CopyData (capped like rows), CopyDone, CopyFail, Terminate. Kept server
//! messages: RowDescription, DataRow, CommandComplete, EmptyQueryResponse, ErrorResponse,
//! NoticeResponse, ReadyForQuery, CopyIn/Out/BothResponse, CopyData, CopyDone, ParameterStatus,
//! NotificationResponse, PortalSuspended, FunctionCallResponse. Everything else (passwords,
//! Flush, ParseComplete, BindComplete, NoData, ParameterDescription, ...) is skipped.

use super::backend::tag as btag;
use super::codec::Reader;
use super::frontend::tag as ftag;
use crate::WireError;

/// The version written in the header frame; bumped on any change of the frame format.
pub const FORMAT_VERSION: u16 = 1;

/// Bodies of kept messages other than DataRow and CopyData are cut at this many bytes.
pub const MAX_KEPT: usize = 256 * 1024;

/// Frame kinds (the first byte of every frame).
pub mod kind {
    pub const FRONTEND: u8 = b'F';
    pub const BACKEND: u8 = b'B';
    pub const RECORDER: u8 = b'R';
}

/// Tags of the recorder's own frames (kind `R`).
pub mod rtag {
    pub const HEADER: u8 = b'V';
    pub const TRUNCATED: u8 = b'X';
    pub const ROWS_OMITTED: u8 = b'O';
    pub const FRAMES_LOST: u8 = b'L';
    pub const STOPPED: u8 = b'S';
}

/// Upper bound of a frame's envelope: kind, a 10-byte varint, tag, length.
const ENVELOPE: usize = 1 + 10 + 1 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Frontend,
    Backend,
}

/// What happens to the body of the message being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Body {
    #[default]
    Skip,
    /// Keep the first `cap` bytes; `row` when the message counts against the row caps.
    Keep { cap: usize, row: bool },
    /// Stream-parse a DataRow, cutting its fields.
    Row,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum RowPhase {
    #[default]
    Count,
    Len,
    Keep,
    Skip,
    Done,
}

/// The stream parser of one DataRow body.
#[derive(Debug, Default)]
struct RowParse {
    phase: RowPhase,
    part: [u8; 4],
    part_len: usize,
    fields_left: u16,
    index: u16,
    keep_left: usize,
    skip_left: usize,
    /// False once the kept row outgrew the buffer cap: the rest is checked but not kept.
    keeping: bool,
}

/// One direction's framing state. `scratch` is reused from message to message.
#[derive(Debug, Default)]
struct Framer {
    head: [u8; 5],
    head_len: usize,
    tag: u8,
    /// Body length announced by the header, and how much of it is still to come.
    len: usize,
    remaining: usize,
    body: Body,
    scratch: Vec<u8>,
    truncs: Vec<(i16, i32)>,
    row: RowParse,
}

/// Per-statement row counters of one direction.
#[derive(Debug, Default, Clone, Copy)]
struct RowCount {
    seen: u64,
    omitted: u64,
}

/// The recorder of one session (see the module documentation for the format and the caps).
#[derive(Debug)]
pub struct Recorder {
    max_rows: u64,
    max_field: usize,
    max_buffer: usize,
    out: Vec<u8>,
    last_us: u64,
    started: bool,
    failed: Option<WireError>,
    front: Framer,
    back: Framer,
    front_rows: RowCount,
    back_rows: RowCount,
    lost: u64,
}

impl Recorder {
    /// `max_rows`: DataRow/CopyData messages kept per statement; `max_field`: bytes kept of each
    /// value; `max_buffer`: bytes of row frames the buffer may hold before `take`.
    pub fn new(max_rows: u64, max_field: usize, max_buffer: usize) -> Self {
        Recorder {
            max_rows,
            max_field: max_field.min(i32::MAX as usize),
            max_buffer,
            out: Vec::new(),
            last_us: 0,
            started: false,
            failed: None,
            front: Framer::default(),
            back: Framer::default(),
            front_rows: RowCount::default(),
            back_rows: RowCount::default(),
            lost: 0,
        }
    }

    /// Records bytes the client sent. The header frame is written by the first call with bytes;
    /// an empty chunk does nothing. After an error the recorder is stopped and later calls do
    /// nothing.
    pub fn frontend(&mut self, data: &[u8], now_us: u64) -> Result<(), WireError> {
        self.feed(Dir::Frontend, data, now_us)
    }

    /// Records bytes the gateway sent to the client.
    pub fn backend(&mut self, data: &[u8], now_us: u64) -> Result<(), WireError> {
        self.feed(Dir::Backend, data, now_us)
    }

    /// Drains the frames recorded so far (whole frames only). Call it once `buffered()` passes
    /// about half of `max_buffer` (or per chunk): rows that do not fit are omitted, not waited for.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Bytes of frames waiting for `take`.
    pub fn buffered(&self) -> usize {
        self.out.len()
    }

    /// The error that stopped the recorder, if any.
    pub fn failed(&self) -> Option<&WireError> {
        self.failed.as_ref()
    }

    fn feed(&mut self, dir: Dir, data: &[u8], now: u64) -> Result<(), WireError> {
        if self.failed.is_some() || data.is_empty() {
            return Ok(());
        }
        if !self.started {
            self.started = true;
            let mut body = [0u8; 14];
            body[..2].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
            body[2..10].copy_from_slice(&self.max_rows.to_be_bytes());
            body[10..].copy_from_slice(&(self.max_field as u32).to_be_bytes());
            self.write(kind::RECORDER, now, rtag::HEADER, &[&body]);
        }
        let mut f = std::mem::take(match dir {
            Dir::Frontend => &mut self.front,
            Dir::Backend => &mut self.back,
        });
        let result = self.scan(dir, &mut f, data, now);
        match dir {
            Dir::Frontend => self.front = f,
            Dir::Backend => self.back = f,
        }
        if let Err(e) = &result {
            let reason = e.to_string();
            self.write(kind::RECORDER, now, rtag::STOPPED, &[reason.as_bytes()]);
            self.failed = Some(e.clone());
            self.front = Framer::default();
            self.back = Framer::default();
        }
        result
    }

    fn scan(
        &mut self,
        dir: Dir,
        f: &mut Framer,
        mut data: &[u8],
        now: u64,
    ) -> Result<(), WireError> {
        while !data.is_empty() {
            if f.head_len < 5 {
                let n = (5 - f.head_len).min(data.len());
                f.head[f.head_len..f.head_len + n].copy_from_slice(&data[..n]);
                f.head_len += n;
                data = &data[n..];
                if f.head_len < 5 {
                    break;
                }
                let len = i32::from_be_bytes([f.head[1], f.head[2], f.head[3], f.head[4]]);
                if len < 4 {
                    return Err(WireError::LengthTooSmall {
                        length: len as i64,
                        min: 4,
                    });
                }
                f.tag = f.head[0];
                f.len = len as usize - 4;
                f.remaining = f.len;
                f.body = self.decide(dir, f.tag);
                f.scratch.clear();
                f.truncs.clear();
                if f.body == Body::Row {
                    f.row = RowParse {
                        keeping: true,
                        ..RowParse::default()
                    };
                }
                if f.remaining == 0 {
                    self.finish(dir, f, now)?;
                }
                continue;
            }
            let n = f.remaining.min(data.len());
            let (chunk, rest) = data.split_at(n);
            match f.body {
                Body::Skip => {}
                Body::Keep { cap, .. } => {
                    let room = cap.saturating_sub(f.scratch.len()).min(n);
                    f.scratch.extend_from_slice(&chunk[..room]);
                }
                Body::Row => f.row_feed(chunk, self.max_field, self.max_buffer)?,
            }
            f.remaining -= n;
            data = rest;
            if f.remaining == 0 {
                self.finish(dir, f, now)?;
            }
        }
        Ok(())
    }

    /// Chooses what to do with a message's body from its tag (and the row caps).
    fn decide(&mut self, dir: Dir, tag: u8) -> Body {
        let keep = Body::Keep {
            cap: MAX_KEPT,
            row: false,
        };
        match dir {
            Dir::Frontend => match tag {
                ftag::COPY_DATA => self.row_body(
                    dir,
                    Body::Keep {
                        cap: self.max_field,
                        row: true,
                    },
                ),
                ftag::QUERY
                | ftag::PARSE
                | ftag::BIND
                | ftag::EXECUTE
                | ftag::SYNC
                | ftag::FUNCTION_CALL
                | ftag::CLOSE
                | ftag::DESCRIBE
                | ftag::COPY_DONE
                | ftag::COPY_FAIL
                | ftag::TERMINATE => keep,
                _ => Body::Skip,
            },
            Dir::Backend => match tag {
                btag::DATA_ROW => self.row_body(dir, Body::Row),
                btag::COPY_DATA => self.row_body(
                    dir,
                    Body::Keep {
                        cap: self.max_field,
                        row: true,
                    },
                ),
                btag::ROW_DESCRIPTION
                | btag::COMMAND_COMPLETE
                | btag::EMPTY_QUERY_RESPONSE
                | btag::ERROR_RESPONSE
                | btag::NOTICE_RESPONSE
                | btag::READY_FOR_QUERY
                | btag::COPY_IN_RESPONSE
                | btag::COPY_OUT_RESPONSE
                | btag::COPY_BOTH_RESPONSE
                | btag::COPY_DONE
                | btag::PARAMETER_STATUS
                | btag::NOTIFICATION_RESPONSE
                | btag::PORTAL_SUSPENDED
                | btag::FUNCTION_CALL_RESPONSE => keep,
                _ => Body::Skip,
            },
        }
    }

    /// A row-like message: kept while the statement is under `max_rows` and the buffer under
    /// `max_buffer`, else skipped and counted.
    fn row_body(&mut self, dir: Dir, body: Body) -> Body {
        let max_rows = self.max_rows;
        let full = self.out.len() >= self.max_buffer;
        let count = self.rows_mut(dir);
        count.seen += 1;
        if count.seen > max_rows || full {
            count.omitted += 1;
            Body::Skip
        } else {
            body
        }
    }

    fn rows_mut(&mut self, dir: Dir) -> &mut RowCount {
        match dir {
            Dir::Frontend => &mut self.front_rows,
            Dir::Backend => &mut self.back_rows,
        }
    }

    /// Whether a message of this direction ends the rows of a statement.
    fn ends_rows(dir: Dir, tag: u8) -> bool {
        match dir {
            Dir::Frontend => matches!(
                tag,
                ftag::COPY_DONE | ftag::COPY_FAIL | ftag::SYNC | ftag::QUERY
            ),
            Dir::Backend => matches!(
                tag,
                btag::COMMAND_COMPLETE
                    | btag::ERROR_RESPONSE
                    | btag::EMPTY_QUERY_RESPONSE
                    | btag::PORTAL_SUSPENDED
                    | btag::READY_FOR_QUERY
            ),
        }
    }

    /// A message's body is complete: write its frames.
    fn finish(&mut self, dir: Dir, f: &mut Framer, now: u64) -> Result<(), WireError> {
        f.head_len = 0;
        let kind = match dir {
            Dir::Frontend => kind::FRONTEND,
            Dir::Backend => kind::BACKEND,
        };
        match f.body {
            Body::Skip => Ok(()),
            Body::Row => {
                if f.row.phase != RowPhase::Done {
                    return Err(WireError::malformed(
                        "DataRow",
                        "the message ends inside its fields",
                    ));
                }
                if !f.row.keeping || !self.write_row(kind, now, f) {
                    self.back_rows.omitted += 1;
                }
                Ok(())
            }
            Body::Keep { row, .. } => {
                if f.scratch.len() < f.len {
                    f.truncs.push((-1, f.len as i32));
                } else if dir == Dir::Frontend && f.tag == ftag::BIND {
                    cut_bind(f, self.max_field)?;
                }
                if row {
                    if !self.write_row(kind, now, f) {
                        self.rows_mut(dir).omitted += 1;
                    }
                    return Ok(());
                }
                if Self::ends_rows(dir, f.tag) {
                    let count = std::mem::take(self.rows_mut(dir));
                    if count.omitted > 0 {
                        let body = count.omitted.to_be_bytes();
                        self.write_other(kind::RECORDER, now, rtag::ROWS_OMITTED, &[&body]);
                    }
                }
                if !f.truncs.is_empty() {
                    let marker = truncation_body(&f.truncs);
                    self.write_other(kind::RECORDER, now, rtag::TRUNCATED, &[&marker]);
                }
                self.write_other(kind, now, f.tag, &[&f.scratch]);
                Ok(())
            }
        }
    }

    /// Writes a row-like message (and its truncation marker) if the buffer has room under
    /// `max_buffer`; false when it was dropped.
    fn write_row(&mut self, kind: u8, now: u64, f: &Framer) -> bool {
        let marker = (!f.truncs.is_empty()).then(|| truncation_body(&f.truncs));
        let size = ENVELOPE + f.scratch.len() + marker.as_ref().map_or(0, |m| ENVELOPE + m.len());
        if self.out.len() + size > self.max_buffer {
            return false;
        }
        self.flush_lost(now);
        if let Some(m) = marker {
            self.write(kind::RECORDER, now, rtag::TRUNCATED, &[&m]);
        }
        self.write(kind, now, f.tag, &[&f.scratch]);
        true
    }

    /// Writes a frame other than a row, under the hard cap of twice `max_buffer`.
    fn write_other(&mut self, kind: u8, now: u64, tag: u8, parts: &[&[u8]]) {
        let size = ENVELOPE + parts.iter().map(|p| p.len()).sum::<usize>();
        if self.out.len() + size > self.max_buffer.saturating_mul(2) {
            self.lost += 1;
            return;
        }
        self.flush_lost(now);
        self.write(kind, now, tag, parts);
    }

    fn flush_lost(&mut self, now: u64) {
        if self.lost > 0 && self.out.len() + 2 * ENVELOPE + 8 <= self.max_buffer.saturating_mul(2) {
            let body = self.lost.to_be_bytes();
            self.lost = 0;
            self.write(kind::RECORDER, now, rtag::FRAMES_LOST, &[&body]);
        }
    }

    fn write(&mut self, kind: u8, now: u64, tag: u8, parts: &[&[u8]]) {
        let delta = now.saturating_sub(self.last_us);
        self.last_us = self.last_us.max(now);
        let body_len: usize = parts.iter().map(|p| p.len()).sum();
        self.out.reserve(ENVELOPE + body_len);
        self.out.push(kind);
        let mut v = delta;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.out.push(byte);
                break;
            }
            self.out.push(byte | 0x80);
        }
        self.out.push(tag);
        // Bodies are bounded by MAX_KEPT, or by max_buffer for rows, which fit a u32.
        self.out
            .extend_from_slice(&((body_len + 4) as u32).to_be_bytes());
        for p in parts {
            self.out.extend_from_slice(p);
        }
    }
}

fn truncation_body(truncs: &[(i16, i32)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + truncs.len() * 6);
    b.extend_from_slice(&(truncs.len().min(u16::MAX as usize) as u16).to_be_bytes());
    for (field, len) in truncs.iter().take(u16::MAX as usize) {
        b.extend_from_slice(&field.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    }
    b
}

impl Framer {
    /// Feeds body bytes of a DataRow to its stream parser, keeping each field's first
    /// `max_field` bytes in `scratch` (re-encoded with the kept lengths).
    fn row_feed(
        &mut self,
        mut chunk: &[u8],
        max_field: usize,
        max_buffer: usize,
    ) -> Result<(), WireError> {
        let r = &mut self.row;
        while !chunk.is_empty() {
            match r.phase {
                RowPhase::Count | RowPhase::Len => {
                    let need = if r.phase == RowPhase::Count { 2 } else { 4 };
                    let n = (need - r.part_len).min(chunk.len());
                    r.part[r.part_len..r.part_len + n].copy_from_slice(&chunk[..n]);
                    r.part_len += n;
                    chunk = &chunk[n..];
                    if r.part_len < need {
                        break;
                    }
                    r.part_len = 0;
                    if r.phase == RowPhase::Count {
                        let count = i16::from_be_bytes([r.part[0], r.part[1]]);
                        if count < 0 {
                            return Err(WireError::malformed("DataRow", "negative field count"));
                        }
                        self.scratch.extend_from_slice(&count.to_be_bytes());
                        r.fields_left = count as u16;
                        r.phase = if count == 0 {
                            RowPhase::Done
                        } else {
                            RowPhase::Len
                        };
                        continue;
                    }
                    let len = i32::from_be_bytes(r.part);
                    if len < -1 {
                        return Err(WireError::malformed(
                            "DataRow",
                            format!("field length {len}"),
                        ));
                    }
                    if len == -1 {
                        if r.keeping {
                            self.scratch.extend_from_slice(&(-1i32).to_be_bytes());
                        }
                        r.next_field();
                        continue;
                    }
                    let len = len as usize;
                    let keep = len.min(max_field);
                    if keep < len {
                        self.truncs.push((r.index as i16, len as i32));
                    }
                    if r.keeping {
                        self.scratch.extend_from_slice(&(keep as i32).to_be_bytes());
                    }
                    r.keep_left = keep;
                    r.skip_left = len - keep;
                    r.phase = RowPhase::Keep;
                    r.settle();
                }
                RowPhase::Keep => {
                    let n = r.keep_left.min(chunk.len());
                    if r.keeping {
                        self.scratch.extend_from_slice(&chunk[..n]);
                    }
                    chunk = &chunk[n..];
                    r.keep_left -= n;
                    r.settle();
                }
                RowPhase::Skip => {
                    let n = r.skip_left.min(chunk.len());
                    chunk = &chunk[n..];
                    r.skip_left -= n;
                    r.settle();
                }
                RowPhase::Done => {
                    return Err(WireError::malformed(
                        "DataRow",
                        "bytes after the last field",
                    ));
                }
            }
            if r.keeping && self.scratch.len() > max_buffer {
                r.keeping = false;
            }
        }
        Ok(())
    }
}

impl RowParse {
    fn next_field(&mut self) {
        self.index = self.index.wrapping_add(1);
        self.fields_left -= 1;
        self.phase = if self.fields_left == 0 {
            RowPhase::Done
        } else {
            RowPhase::Len
        };
    }

    /// Moves past the parts of a field that are complete (a value may be empty or fully kept).
    fn settle(&mut self) {
        if self.phase == RowPhase::Keep && self.keep_left == 0 {
            self.phase = RowPhase::Skip;
        }
        if self.phase == RowPhase::Skip && self.skip_left == 0 {
            self.next_field();
        }
    }
}

/// Re-encodes a whole Bind in `f.scratch` with parameter values cut to `max_field` bytes (left
/// as it is when none is longer), noting each cut in `f.truncs`.
fn cut_bind(f: &mut Framer, max_field: usize) -> Result<(), WireError> {
    const WHAT: &str = "Bind";
    let body = &f.scratch;
    let mut r = Reader::new(body, WHAT);
    r.cstr()?;
    r.cstr()?;
    let formats = r.count16()?;
    r.bytes(formats * 2)?;
    let params = r.count16()?;
    let values_at = body.len() - r.remaining().len();
    let mut long = false;
    for _ in 0..params {
        let len = r.i32()?;
        if len < -1 {
            return Err(WireError::malformed(
                WHAT,
                format!("parameter length {len}"),
            ));
        }
        if len > 0 {
            r.bytes(len as usize)?;
            long |= len as usize > max_field;
        }
    }
    let results = r.count16()?;
    r.bytes(results * 2)?;
    if !r.is_empty() {
        return Err(WireError::malformed(WHAT, "bytes after the result formats"));
    }
    if !long {
        return Ok(());
    }
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&body[..values_at]);
    let mut r = Reader::new(&body[values_at..], WHAT);
    for i in 0..params {
        let len = r.i32()?;
        if len <= 0 {
            out.extend_from_slice(&len.to_be_bytes());
            continue;
        }
        let value = r.bytes(len as usize)?;
        let keep = value.len().min(max_field);
        if keep < value.len() {
            f.truncs.push((i16::try_from(i).unwrap_or(i16::MAX), len));
        }
        out.extend_from_slice(&(keep as i32).to_be_bytes());
        out.extend_from_slice(&value[..keep]);
    }
    out.extend_from_slice(r.remaining());
    f.scratch = out;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::backend::{self, ErrorFields};
    use crate::pg::codec::Builder;
    use crate::pg::frontend;

    /// One decoded frame: (kind, absolute µs, tag, body).
    type Frame = (u8, u64, u8, Vec<u8>);

    fn frames(mut buf: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut at = 0u64;
        while !buf.is_empty() {
            let kind = buf[0];
            let mut i = 1;
            let mut delta = 0u64;
            let mut shift = 0;
            loop {
                let b = buf[i];
                i += 1;
                delta |= u64::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            at += delta;
            let tag = buf[i];
            let len = u32::from_be_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]) as usize;
            let body = buf[i + 5..i + 1 + len].to_vec();
            out.push((kind, at, tag, body));
            buf = &buf[i + 1 + len..];
        }
        out
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        Builder::new(tag).bytes(body).finish()
    }

    fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Builder::new(b'D').i16(values.len() as i16);
        for v in values {
            b = match v {
                None => b.i32(-1),
                Some(v) => b.i32(v.len() as i32).bytes(v),
            };
        }
        b.finish()
    }

    fn bind(params: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Builder::new(b'B')
            .cstr(b"")
            .cstr(b"s1")
            .i16(1)
            .i16(1)
            .i16(params.len() as i16);
        for v in params {
            b = match v {
                None => b.i32(-1),
                Some(v) => b.i32(v.len() as i32).bytes(v),
            };
        }
        b.i16(0).finish()
    }

    fn row_description() -> Vec<u8> {
        Builder::new(b'T')
            .i16(1)
            .cstr(b"n")
            .i32(0)
            .i16(0)
            .i32(23)
            .i16(4)
            .i32(-1)
            .i16(0)
            .finish()
    }

    /// Feeds `input` to a fresh recorder whole, byte by byte and in pseudo-random splits; all must
    /// give the same frames, which are returned (header frame removed).
    fn record_all_ways(dir: Dir, input: &[u8], caps: (u64, usize, usize)) -> Vec<Frame> {
        let run = |splits: &mut dyn FnMut(usize) -> usize| {
            let mut r = Recorder::new(caps.0, caps.1, caps.2);
            let mut pos = 0;
            while pos < input.len() {
                let n = splits(input.len() - pos).max(1).min(input.len() - pos);
                let chunk = &input[pos..pos + n];
                match dir {
                    Dir::Frontend => r.frontend(chunk, 7).unwrap(),
                    Dir::Backend => r.backend(chunk, 7).unwrap(),
                }
                pos += n;
            }
            r.take()
        };
        let whole = run(&mut |rest| rest);
        assert_eq!(run(&mut |_| 1), whole, "byte by byte");
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let random = run(&mut |rest| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1 + (x % rest.min(40) as u64) as usize
        });
        assert_eq!(random, whole, "random splits");
        let mut f = frames(&whole);
        let header = f.remove(0);
        assert_eq!((header.0, header.2), (kind::RECORDER, rtag::HEADER));
        assert_eq!(&header.3[..2], &FORMAT_VERSION.to_be_bytes());
        f
    }

    const CAPS: (u64, usize, usize) = (100, 1024, 1 << 20);

    #[test]
    fn kept_frontend_messages_round_trip() {
        let kept = [
            frontend::query("select 1; select 2"),
            frontend::parse("s1", "select $1::int", &[23]),
            bind(&[Some(b"42"), None, Some(b"\x00\x01binary")]),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'D', b"Ss1\0"),
            msg(b'C', b"Pp\0"),
            msg(b'F', &[0, 0, 4, 210, 0, 0, 0, 0, 0, 0]),
            msg(b'd', b"1\tone\n"),
            msg(b'c', b""),
            msg(b'f', b"abort\0"),
            frontend::sync(),
            frontend::terminate(),
        ];
        let skipped = [
            frontend::password(b"secret"),
            msg(b'H', b""),
            msg(b'?', b"unknown"),
        ];
        let mut input = Vec::new();
        for (k, s) in kept.iter().zip(skipped.iter().cycle()) {
            input.extend_from_slice(s);
            input.extend_from_slice(k);
        }
        let got = record_all_ways(Dir::Frontend, &input, CAPS);
        let expect: Vec<Frame> = kept
            .iter()
            .map(|m| (kind::FRONTEND, 7, m[0], m[5..].to_vec()))
            .collect();
        assert_eq!(got, expect);
        assert!(!got.iter().any(|f| f.3.windows(6).any(|w| w == b"secret")));
    }

    #[test]
    fn kept_backend_messages_round_trip() {
        let kept = [
            row_description(),
            data_row(&[Some(b"1"), None, Some(b"")]),
            msg(b'C', b"SELECT 1\0"),
            msg(b'I', b""),
            backend::error_response("ERROR", "22012", "division by zero"),
            ErrorFields::new("NOTICE", "00000", "hi").encode_notice(),
            backend::ready_for_query(b'T'),
            msg(b'G', &[0, 0, 1, 0, 0]),
            msg(b'H', &[0, 0, 1, 0, 0]),
            msg(b'd', b"1\tone\n"),
            msg(b'c', b""),
            backend::parameter_status("TimeZone", "UTC"),
            msg(b'A', b"\0\0\0\x07chan\0payload\0"),
            msg(b's', b""),
            msg(b'V', &[0, 0, 0, 1, b'x']),
        ];
        let skipped = [
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'n', b""),
            msg(b't', &[0, 1, 0, 0, 0, 23]),
            backend::backend_key_data(1, 2),
        ];
        let mut input = Vec::new();
        for (k, s) in kept.iter().zip(skipped.iter().cycle()) {
            input.extend_from_slice(s);
            input.extend_from_slice(k);
        }
        let got = record_all_ways(Dir::Backend, &input, CAPS);
        let expect: Vec<Frame> = kept
            .iter()
            .map(|m| (kind::BACKEND, 7, m[0], m[5..].to_vec()))
            .collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn row_cap_counts_the_rest_and_reports_at_the_end_of_the_statement() {
        let mut input = row_description();
        for i in 0..25 {
            input.extend(data_row(&[Some(format!("{i}").as_bytes())]));
        }
        input.extend(msg(b'C', b"SELECT 25\0"));
        input.extend(data_row(&[Some(b"next")]));
        input.extend(msg(b'C', b"SELECT 1\0"));
        let got = record_all_ways(Dir::Backend, &input, (10, 1024, 1 << 20));
        let tags: Vec<u8> = got.iter().map(|f| f.2).collect();
        let mut expect = vec![b'T'];
        expect.extend([b'D'; 10]);
        expect.extend([b'O', b'C', b'D', b'C']);
        assert_eq!(tags, expect);
        assert_eq!(got[11].0, kind::RECORDER);
        assert_eq!(got[11].3, 15u64.to_be_bytes());
        // The tenth kept row is the tenth sent.
        assert_eq!(got[10].3, data_row(&[Some(b"9")])[5..]);
    }

    #[test]
    fn long_fields_are_cut_and_marked() {
        let long = vec![b'x'; 5000];
        let input = data_row(&[Some(b"short"), Some(&long), None, Some(&long[..8])]);
        let got = record_all_ways(Dir::Backend, &input, (100, 8, 1 << 20));
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, got[0].2), (kind::RECORDER, rtag::TRUNCATED));
        let mut marker = 1u16.to_be_bytes().to_vec();
        marker.extend(1i16.to_be_bytes());
        marker.extend(5000i32.to_be_bytes());
        assert_eq!(got[0].3, marker);
        let cut = data_row(&[Some(b"short"), Some(&long[..8]), None, Some(&long[..8])]);
        assert_eq!(got[1], (kind::BACKEND, 7, b'D', cut[5..].to_vec()));
    }

    #[test]
    fn long_bind_values_and_copy_data_are_cut() {
        let long = vec![7u8; 300];
        let mut input = bind(&[Some(&long), None, Some(b"ok")]);
        input.extend(msg(b'd', &long));
        let got = record_all_ways(Dir::Frontend, &input, (100, 16, 1 << 20));
        let tags: Vec<(u8, u8)> = got.iter().map(|f| (f.0, f.2)).collect();
        assert_eq!(
            tags,
            [(b'R', b'X'), (b'F', b'B'), (b'R', b'X'), (b'F', b'd')]
        );
        assert_eq!(got[1].3, bind(&[Some(&long[..16]), None, Some(b"ok")])[5..]);
        let mut marker = 1u16.to_be_bytes().to_vec();
        marker.extend((-1i16).to_be_bytes());
        marker.extend(300i32.to_be_bytes());
        assert_eq!(got[2].3, marker);
        assert_eq!(got[3].3, long[..16]);
    }

    #[test]
    fn long_statements_are_cut_at_max_kept() {
        let text = "x".repeat(MAX_KEPT + 100);
        let got = record_all_ways(Dir::Frontend, &frontend::query(&text), CAPS);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].2, rtag::TRUNCATED);
        assert_eq!(got[1].3.len(), MAX_KEPT);
    }

    #[test]
    fn buffer_cap_omits_rows_and_keeps_the_rest() {
        let mut input = row_description();
        for _ in 0..1000 {
            input.extend(data_row(&[Some(&[b'v'; 100])]));
        }
        input.extend(msg(b'C', b"SELECT 1000\0"));
        input.extend(backend::ready_for_query(b'I'));
        let max_buffer = 4096;
        let mut r = Recorder::new(u64::MAX, 1024, max_buffer);
        r.backend(&input, 1).unwrap();
        assert!(r.buffered() <= 2 * max_buffer);
        let f = frames(&r.take());
        let rows = f.iter().filter(|f| f.2 == b'D').count();
        assert!(rows > 10 && rows < 1000, "{rows} rows kept");
        let omitted = f
            .iter()
            .find(|f| f.0 == kind::RECORDER && f.2 == rtag::ROWS_OMITTED);
        assert_eq!(omitted.unwrap().3, ((1000 - rows) as u64).to_be_bytes());
        assert_eq!(f.last().unwrap().2, b'Z');
        // After a take, rows are kept again.
        r.backend(&data_row(&[Some(b"1")]), 2).unwrap();
        assert_eq!(frames(&r.take())[0].2, b'D');
    }

    #[test]
    fn huge_rows_never_buffer_more_than_the_cap() {
        // One row of 1000 fields of 10 kB: kept fields would take 1000 * (4 + 1000) bytes.
        let value = vec![b'z'; 10_000];
        let values: Vec<Option<&[u8]>> = (0..1000).map(|_| Some(&value[..])).collect();
        let row = data_row(&values);
        let mut r = Recorder::new(10, 1000, 64 * 1024);
        for c in row.chunks(4096) {
            r.backend(c, 1).unwrap();
            assert!(r.back.scratch.len() <= 64 * 1024 + 1004);
        }
        r.backend(&msg(b'C', b"SELECT 1\0"), 2).unwrap();
        let f = frames(&r.take());
        assert_eq!(
            f.iter().map(|f| f.2).collect::<Vec<_>>(),
            [b'V', b'O', b'C']
        );
    }

    #[test]
    fn non_row_frames_are_bounded_and_losses_reported() {
        let notice = ErrorFields::new("NOTICE", "00000", "again").encode_notice();
        let mut r = Recorder::new(10, 100, 1000);
        for _ in 0..1000 {
            r.backend(&notice, 1).unwrap();
        }
        assert!(r.buffered() <= 2000);
        let kept = frames(&r.take()).len() - 1;
        r.backend(&notice, 2).unwrap();
        let f = frames(&r.take());
        assert_eq!((f[0].2, f[1].2), (rtag::FRAMES_LOST, b'N'));
        assert_eq!(f[0].3, ((1000 - kept) as u64).to_be_bytes());
    }

    #[test]
    fn timestamps_are_deltas() {
        let mut r = Recorder::new(10, 100, 1 << 20);
        r.frontend(&frontend::query("select 1"), 1_000_000).unwrap();
        r.backend(&msg(b'C', b"SELECT 1\0"), 1_000_250).unwrap();
        // A clock going backwards gives a zero delta.
        r.backend(&backend::ready_for_query(b'I'), 900_000).unwrap();
        let f = frames(&r.take());
        let at: Vec<u64> = f.iter().map(|f| f.1).collect();
        assert_eq!(at, [1_000_000, 1_000_000, 1_000_250, 1_000_250]);
    }

    #[test]
    fn malformed_input_errors_and_stops_recording() {
        let cases: Vec<Vec<u8>> = vec![
            vec![b'Q', 0, 0, 0, 3],
            vec![b'D', 0xff, 0xff, 0xff, 0xff],
            msg(b'D', &[0xff, 0xff]),
            msg(b'D', &[0, 1, 0xff, 0xff, 0xff, 0xfe]),
            msg(b'D', &[0, 1, 0, 0, 0, 9, b'a']),
            msg(b'D', &[0, 1, 0, 0, 0, 1, b'a', b'b']),
        ];
        for case in cases {
            let mut r = Recorder::new(10, 100, 1 << 20);
            let res = if case[0] == b'Q' {
                r.frontend(&case, 1)
            } else {
                r.backend(&case, 1)
            };
            assert!(res.is_err(), "{case:?}");
            assert!(r.failed().is_some());
            let f = frames(&r.take());
            assert_eq!(f.last().unwrap().2, rtag::STOPPED);
            r.backend(&backend::ready_for_query(b'I'), 2).unwrap();
            assert_eq!(r.buffered(), 0, "records nothing after an error");
        }
        let mut r = Recorder::new(10, 100, 1 << 20);
        let mut bad_bind = bind(&[Some(b"1")]);
        bad_bind.truncate(bad_bind.len() - 2);
        let len = (bad_bind.len() - 1) as u32;
        bad_bind[1..5].copy_from_slice(&len.to_be_bytes());
        assert!(r.frontend(&bad_bind, 1).is_err());
    }
}
