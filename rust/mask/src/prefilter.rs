//! Trigger scan: the cheap first stage that decides which values the full search must look at.
//!
//! Theory of operation. A lazy DFA walks one byte per dependent table load, about 600 MB/s on our
//! machines whatever the patterns; result text is mostly digits, words and punctuation that no
//! detector will ever match. So before the DFA, this scan classifies 64 bytes at a time with SIMD
//! compares into bitmaps (digit, separator, dot, uppercase, '@', '+', ':') and combines shifted
//! bitmaps into triggers: byte shapes that every match of the enabled digit-bearing detectors must
//! contain:
//!
//! - `email`: an '@'.
//! - `card`, `ssn`, `phone` (national forms): two digits, one of `-`, `.`, space, four digits
//!   (`45-6789`, `23-4567`, `11 1111`), or a run of 13 digits (an ungrouped card).
//! - `phone` (E.164): '+' and a digit.
//! - `iban`: two uppercase letters and two digits.
//! - `ipv4`: digit, '.', one to three digits, '.'.
//! - `ipv6`: "::", or four colons each two to five bytes after the previous (the full form).
//!
//! A trigger only selects the NUL-delimited value that holds it; the full search then runs over
//! that whole value, so a trigger never decides anything: a missing trigger shape would lose a
//! finding, an extra one only costs time. Each 64-byte window owns its middle 32 bytes and keeps
//! 16 bytes of context on each side, enough for every shape above.

/// Which trigger shapes to look for (only those of the detectors a rule set uses).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Shapes {
    pub email: bool,
    pub grouped_digits: bool,
    pub plus_digit: bool,
    pub iban: bool,
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Shapes {
    pub fn add(&mut self, o: Shapes) {
        self.email |= o.email;
        self.grouped_digits |= o.grouped_digits;
        self.plus_digit |= o.plus_digit;
        self.iban |= o.iban;
        self.ipv4 |= o.ipv4;
        self.ipv6 |= o.ipv6;
    }

    pub fn any(&self) -> bool {
        self.email || self.grouped_digits || self.plus_digit || self.iban || self.ipv4 || self.ipv6
    }
}

/// Byte-class bitmaps of a 64-byte window: bit i describes byte i.
struct Classes {
    digit: u64,
    sep: u64,
    dot: u64,
    upper: u64,
    at: u64,
    plus: u64,
    colon: u64,
}

const WINDOW: usize = 64;
const OWNED: usize = 32;
const LEAD: usize = 16;

/// First trigger position in `hay[from..to]`, or None. Positions are approximate within the
/// value (any byte of the triggering shape).
pub(crate) fn next_trigger(shapes: &Shapes, hay: &[u8], from: usize, to: usize) -> Option<usize> {
    let mut k = from;
    while k < to {
        let w = k.wrapping_sub(LEAD);
        let bits = if k >= LEAD && w + WINDOW <= hay.len() {
            let window: &[u8; WINDOW] = hay[w..w + WINDOW].try_into().expect("64 bytes");
            triggers(shapes, &classify(window))
        } else {
            let mut buf = [0u8; WINDOW];
            for (i, slot) in buf.iter_mut().enumerate() {
                if let Some(&b) = (k + i).checked_sub(LEAD).and_then(|j| hay.get(j)) {
                    *slot = b;
                }
            }
            triggers(shapes, &classify(&buf))
        };
        let owned = ((1u64 << OWNED) - 1) << LEAD;
        let limit = to - k;
        let mut hits = (bits & owned) >> LEAD;
        if limit < OWNED {
            hits &= (1u64 << limit) - 1;
        }
        if hits != 0 {
            return Some(k + hits.trailing_zeros() as usize);
        }
        k += OWNED;
    }
    None
}

/// Bit i set when byte i + k has the property (k may be negative: byte i - |k|).
#[inline(always)]
fn at(x: u64, k: i32) -> u64 {
    if k >= 0 {
        x >> k
    } else {
        x << -k
    }
}

#[inline(always)]
fn triggers(s: &Shapes, c: &Classes) -> u64 {
    let d = c.digit;
    let mut t = 0;
    if s.email {
        t |= c.at;
    }
    if s.grouped_digits {
        let four_after = at(d, 1) & at(d, 2) & at(d, 3) & at(d, 4);
        t |= c.sep & at(d, -1) & at(d, -2) & four_after;
        let r2 = d & at(d, 1);
        let r4 = r2 & at(r2, 2);
        let r8 = r4 & at(r4, 4);
        t |= r8 & at(r4, 8) & at(d, 12);
    }
    if s.plus_digit {
        t |= c.plus & at(d, 1);
    }
    if s.iban {
        t |= c.upper & at(c.upper, 1) & at(d, 2) & at(d, 3);
    }
    if s.ipv4 {
        let dot2 = at(c.dot, 2) | at(c.dot, 3) | at(c.dot, 4);
        t |= c.dot & at(d, -1) & at(d, 1) & dot2;
    }
    if s.ipv6 {
        t |= c.colon & at(c.colon, 1);
        // Four colons, each 2..=5 bytes after the previous: the start of a full-form address
        // (timestamps have two).
        let next = |x: u64| at(x, 2) | at(x, 3) | at(x, 4) | at(x, 5);
        let c2 = c.colon & next(c.colon);
        let c3 = c.colon & next(c2);
        t |= c.colon & next(c3);
    }
    t
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn classify(w: &[u8; WINDOW]) -> Classes {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86_64 baseline, so these intrinsics are always available; the
    // four unaligned loads read exactly the 64 bytes of `w` (offsets 0, 16, 32, 48).
    unsafe {
        let mut c = Classes {
            digit: 0,
            sep: 0,
            dot: 0,
            upper: 0,
            at: 0,
            plus: 0,
            colon: 0,
        };
        let in_range = |v: __m128i, lo: u8, width: u8| {
            let t = _mm_sub_epi8(v, _mm_set1_epi8(lo as i8));
            _mm_cmpeq_epi8(_mm_min_epu8(t, _mm_set1_epi8(width as i8)), t)
        };
        let eq = |v: __m128i, b: u8| _mm_cmpeq_epi8(v, _mm_set1_epi8(b as i8));
        let mask = |m: __m128i| u64::from(_mm_movemask_epi8(m) as u16);
        for i in 0..4 {
            let v = _mm_loadu_si128(w.as_ptr().add(i * 16).cast());
            let shift = i * 16;
            let dot = eq(v, b'.');
            c.digit |= mask(in_range(v, b'0', 9)) << shift;
            c.upper |= mask(in_range(v, b'A', 25)) << shift;
            c.dot |= mask(dot) << shift;
            c.sep |= mask(_mm_or_si128(_mm_or_si128(eq(v, b'-'), eq(v, b' ')), dot)) << shift;
            c.at |= mask(eq(v, b'@')) << shift;
            c.plus |= mask(eq(v, b'+')) << shift;
            c.colon |= mask(eq(v, b':')) << shift;
        }
        c
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn classify(w: &[u8; WINDOW]) -> Classes {
    let mut c = Classes {
        digit: 0,
        sep: 0,
        dot: 0,
        upper: 0,
        at: 0,
        plus: 0,
        colon: 0,
    };
    for (i, &b) in w.iter().enumerate() {
        let bit = 1u64 << i;
        let set = |x: &mut u64, yes: bool| {
            if yes {
                *x |= bit
            }
        };
        set(&mut c.digit, b.is_ascii_digit());
        set(&mut c.upper, b.is_ascii_uppercase());
        set(&mut c.dot, b == b'.');
        set(&mut c.sep, matches!(b, b'-' | b' ' | b'.'));
        set(&mut c.at, b == b'@');
        set(&mut c.plus, b == b'+');
        set(&mut c.colon, b == b':');
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Shapes = Shapes {
        email: true,
        grouped_digits: true,
        plus_digit: true,
        iban: true,
        ipv4: true,
        ipv6: true,
    };

    fn first(s: &str) -> Option<usize> {
        next_trigger(&ALL, s.as_bytes(), 0, s.len())
    }

    #[test]
    fn shapes_trigger_anywhere_in_long_text() {
        for needle in [
            "a@b",
            "123-45-6789",
            "4111111111111111",
            "+4412345678",
            "DE89",
            "10.1.2.3",
            "fe80::1",
            "1:2:3:4:5:6:7:8",
        ] {
            for pad in [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100] {
                let text = format!("{}{needle}{}", "x".repeat(pad), "y".repeat(pad % 7));
                let p = first(&text).unwrap_or_else(|| panic!("{needle} at {pad}"));
                assert!(p >= pad && p < pad + needle.len(), "{needle} at {pad}: {p}");
            }
        }
    }

    #[test]
    fn ordinary_text_does_not_trigger() {
        let text =
            "Olivia Smith\0Zürich\x002026-11-29 21:04:05\x001234.56\0qty 3 of yoga mat\x00481213";
        assert_eq!(first(text), None);
    }
}
