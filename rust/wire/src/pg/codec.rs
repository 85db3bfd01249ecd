//! Byte-level helpers: a bounds-checked reader over one message body and a builder that writes a
//! message with its length prefix filled in at the end. Every read returns a `WireError` on
//! truncation rather than panicking.

use crate::WireError;

/// Reads the fields of one message body. `what` names the message in errors.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn short(&self, need: usize) -> WireError {
        WireError::malformed(
            self.what,
            format!(
                "needed {need} more bytes at offset {} of {}",
                self.pos,
                self.buf.len()
            ),
        )
    }

    pub fn remaining(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        let b = *self.buf.get(self.pos).ok_or_else(|| self.short(1))?;
        self.pos += 1;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        Ok(i16::from_be_bytes(self.array::<2>()?))
    }

    /// A 16-bit count, unsigned as PostgreSQL reads it (`pq_getmsgint(msg, 2)`): 0 to 65535
    /// parameters, formats or columns.
    pub fn count16(&mut self) -> Result<usize, WireError> {
        Ok(usize::from(u16::from_be_bytes(self.array::<2>()?)))
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_be_bytes(self.array::<4>()?))
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array::<4>()?))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let end = self.pos.checked_add(N).ok_or_else(|| self.short(N))?;
        let slice = self.buf.get(self.pos..end).ok_or_else(|| self.short(N))?;
        self.pos = end;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.short(n))?;
        let slice = self.buf.get(self.pos..end).ok_or_else(|| self.short(n))?;
        self.pos = end;
        Ok(slice)
    }

    /// A NUL-terminated string, returned without its terminator.
    pub fn cstr(&mut self) -> Result<&'a [u8], WireError> {
        let rest = &self.buf[self.pos.min(self.buf.len())..];
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| WireError::malformed(self.what, "string without NUL terminator"))?;
        self.pos += nul + 1;
        Ok(&rest[..nul])
    }

    /// A NUL-terminated string that must be UTF-8.
    pub fn cstr_utf8(&mut self) -> Result<&'a str, WireError> {
        let what = self.what;
        std::str::from_utf8(self.cstr()?)
            .map_err(|_| WireError::malformed(what, "string is not UTF-8"))
    }
}

/// Builds one message: `Builder::new(b'E')`, put fields, then `finish()` writes the length.
pub struct Builder {
    buf: Vec<u8>,
    start: usize,
}

impl Builder {
    /// A typed message (one tag byte, then the length).
    pub fn new(tag: u8) -> Self {
        let mut b = Builder {
            buf: Vec::with_capacity(64),
            start: 0,
        };
        b.buf.push(tag);
        b.start = 1;
        b.buf.extend_from_slice(&[0, 0, 0, 0]);
        b
    }

    /// An untyped message (startup phase: the length comes first).
    pub fn untyped() -> Self {
        Builder {
            buf: vec![0, 0, 0, 0],
            start: 0,
        }
    }

    pub fn u8(mut self, v: u8) -> Self {
        self.buf.push(v);
        self
    }
    pub fn i16(mut self, v: i16) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.buf.extend_from_slice(v);
        self
    }
    /// Appends `v` and a NUL terminator; interior NULs are dropped so the frame stays valid.
    pub fn cstr(mut self, v: &[u8]) -> Self {
        self.buf.extend(v.iter().copied().filter(|&b| b != 0));
        self.buf.push(0);
        self
    }
    pub fn finish(mut self) -> Vec<u8> {
        let len = (self.buf.len() - self.start) as u32;
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_be_bytes());
        self.buf
    }
}

/// One typed message split off a buffer: (tag, body, bytes used including the header).
pub type Split<'a> = (u8, &'a [u8], usize);

/// Splits one complete typed message off the front of `buf`, if it is all there.
///
/// Returns `Ok(None)` when more bytes are needed; the length is checked against `limit` as soon as
/// the five header bytes are present, before the caller buffers the body.
pub fn split_message(buf: &[u8], limit: usize) -> Result<Option<Split<'_>>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
    if len < 4 {
        return Err(WireError::LengthTooSmall {
            length: len,
            min: 4,
        });
    }
    let len = len as usize;
    if len - 4 > limit {
        return Err(WireError::TooLarge {
            what: "message",
            length: len - 4,
            limit,
        });
    }
    let total = len + 1;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((tag, &buf[5..total], total)))
}
