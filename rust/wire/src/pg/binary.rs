//! Text forms of binary-format values, for the types the gateway reads (masking scans numbers and
//! addresses as text; audit records and approval requests show parameters as people read them).

/// Appends the text form of a binary-format value of the integer, numeric and address types
/// (what masking scans: card and phone numbers in integers or numeric, IPs in inet); false for
/// other types or malformed values.
pub fn render_binary(oid: u32, v: &[u8], out: &mut Vec<u8>) -> bool {
    use std::fmt::Write as _;
    let mut s = String::new();
    match (oid, v.len()) {
        (21, 2) => s = i16::from_be_bytes([v[0], v[1]]).to_string(),
        (23, 4) => s = i32::from_be_bytes(v.try_into().expect("4 bytes")).to_string(),
        (26, 4) => s = u32::from_be_bytes(v.try_into().expect("4 bytes")).to_string(),
        (20, 8) => s = i64::from_be_bytes(v.try_into().expect("8 bytes")).to_string(),
        (1700, n) if n >= 8 => {
            // ndigits, weight, sign, dscale, then base-10000 digits.
            let ndigits = i16::from_be_bytes([v[0], v[1]]).max(0) as usize;
            let weight = i16::from_be_bytes([v[2], v[3]]) as i32;
            if v.len() < 8 + 2 * ndigits {
                return false;
            }
            if v[4] == 0x40 {
                s.push('-');
            }
            for (k, d) in v[8..8 + 2 * ndigits].chunks(2).enumerate() {
                let d = u16::from_be_bytes([d[0], d[1]]);
                if k as i32 == weight + 1 {
                    s.push('.');
                }
                if k == 0 {
                    let _ = write!(s, "{d}");
                } else {
                    let _ = write!(s, "{d:04}");
                }
            }
            for _ in (ndigits as i32)..=weight {
                s.push_str("0000");
            }
        }
        (869 | 650, n) if n >= 4 => {
            let (family, bits, len) = (v[0], v[1], v[3] as usize);
            let addr = &v[4..];
            if addr.len() != len {
                return false;
            }
            match (family, len) {
                (2, 4) => {
                    s = std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).to_string()
                }
                (3, 16) => {
                    let a: [u8; 16] = addr.try_into().expect("16 bytes");
                    s = std::net::Ipv6Addr::from(a).to_string()
                }
                _ => return false,
            }
            let _ = write!(s, "/{bits}");
        }
        _ => return false,
    }
    out.extend_from_slice(s.as_bytes());
    true
}

/// `render_binary`, plus the types a statement's parameters commonly have (bool, floats, uuid), for
/// showing Bind parameters to people (audit records, approval requests).
pub fn render_param(oid: u32, v: &[u8], out: &mut Vec<u8>) -> bool {
    use std::fmt::Write as _;
    let mut s = String::new();
    match (oid, v.len()) {
        (16, 1) => s.push_str(if v[0] != 0 { "true" } else { "false" }),
        (700, 4) => s = f32::from_be_bytes(v.try_into().expect("4 bytes")).to_string(),
        (701, 8) => s = f64::from_be_bytes(v.try_into().expect("8 bytes")).to_string(),
        // text, varchar, bpchar, name: their binary form is their UTF-8 text.
        (25 | 1043 | 1042 | 19, _) => match std::str::from_utf8(v) {
            Ok(t) => s.push_str(t),
            Err(_) => return false,
        },
        // bytea: its text form is this hex.
        (17, _) => bytea_hex(v, &mut s),
        (2950, 16) => {
            for (i, b) in v.iter().enumerate() {
                if matches!(i, 4 | 6 | 8 | 10) {
                    s.push('-');
                }
                let _ = write!(s, "{b:02x}");
            }
        }
        _ => return render_binary(oid, v, out),
    }
    out.extend_from_slice(s.as_bytes());
    true
}

/// `v` as bytea's text form: `\\x` and two hex digits a byte.
pub fn bytea_hex(v: &[u8], out: &mut String) {
    use std::fmt::Write as _;
    out.reserve(2 + 2 * v.len());
    out.push_str("\\x");
    for b in v {
        let _ = write!(out, "{b:02x}");
    }
}
