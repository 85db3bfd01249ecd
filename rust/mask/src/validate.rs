//! Validators: cheap checks that turn a pattern match into a real finding.
//!
//! Rules of this file: every function takes bytes that a pattern already matched (so mostly ASCII,
//! but never assumed), never panics and never allocates more than a few bytes on the stack. A
//! validator answers yes or no; refining a match (trimming it, moving it) is the detectors' job.

/// Named validators a custom pattern may use, in the spelling of the policy file.
pub(crate) const NAMES: &[&str] = &["luhn", "mod97", "ssn", "ipv4", "jwt"];

/// A validator for a custom pattern, looked up by its policy name.
pub(crate) fn by_name(name: &str) -> Option<fn(&[u8]) -> bool> {
    Some(match name {
        "luhn" => luhn,
        "mod97" => mod97,
        "ssn" => ssn,
        "ipv4" => ipv4,
        "jwt" => jwt,
        _ => return None,
    })
}

/// Luhn checksum over the ASCII digits of `s` (separators ignored); needs at least two digits.
pub(crate) fn luhn(s: &[u8]) -> bool {
    let mut sum = 0u32;
    let mut n = 0usize;
    for &b in s.iter().rev() {
        if !b.is_ascii_digit() {
            continue;
        }
        let mut d = u32::from(b - b'0');
        if n % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        n += 1;
    }
    n >= 2 && sum.is_multiple_of(10)
}

/// IBAN check: spaces ignored, two letters, two digits, 11..=30 alphanumerics, the length the
/// country prescribes (for the countries in [`iban_len`]) and ISO 7064 mod-97 equal to 1.
pub(crate) fn mod97(s: &[u8]) -> bool {
    let mut buf = [0u8; 34];
    let mut n = 0;
    for &b in s {
        if b == b' ' {
            continue;
        }
        if n == buf.len() || !b.is_ascii_alphanumeric() {
            return false;
        }
        buf[n] = b.to_ascii_uppercase();
        n += 1;
    }
    let v = &buf[..n];
    if n < 15 || !v[0].is_ascii_uppercase() || !v[1].is_ascii_uppercase() {
        return false;
    }
    if !v[2].is_ascii_digit() || !v[3].is_ascii_digit() {
        return false;
    }
    if let Some(len) = iban_len(&v[..2]) {
        if len != n {
            return false;
        }
    }
    let mut rem = 0u32;
    for &b in v[4..].iter().chain(&v[..4]) {
        rem = if b.is_ascii_digit() {
            (rem * 10 + u32::from(b - b'0')) % 97
        } else {
            (rem * 100 + u32::from(b - b'A') + 10) % 97
        };
    }
    rem == 1
}

/// IBAN length by country code, for the countries we meet most; None for the others.
pub(crate) fn iban_len(cc: &[u8]) -> Option<usize> {
    Some(match cc {
        b"AT" => 20,
        b"BE" => 16,
        b"BG" => 22,
        b"CH" => 21,
        b"CY" => 28,
        b"CZ" => 24,
        b"DE" => 22,
        b"DK" => 18,
        b"EE" => 20,
        b"ES" => 24,
        b"FI" => 18,
        b"FR" => 27,
        b"GB" => 22,
        b"GR" => 27,
        b"HR" => 21,
        b"HU" => 28,
        b"IE" => 22,
        b"IS" => 26,
        b"IT" => 27,
        b"LI" => 21,
        b"LT" => 20,
        b"LU" => 20,
        b"LV" => 21,
        b"MT" => 31,
        b"NL" => 18,
        b"NO" => 15,
        b"PL" => 28,
        b"PT" => 25,
        b"RO" => 24,
        b"SE" => 24,
        b"SI" => 19,
        b"SK" => 24,
        b"TR" => 26,
        _ => return None,
    })
}

/// US Social Security Number: nine digits (separators ignored) with a valid area (not 000, 666 or
/// 900-999), group (not 00) and serial (not 0000).
pub(crate) fn ssn(s: &[u8]) -> bool {
    let mut d = [0u8; 9];
    let mut n = 0;
    for &b in s {
        if b.is_ascii_digit() {
            if n == 9 {
                return false;
            }
            d[n] = b - b'0';
            n += 1;
        }
    }
    if n != 9 {
        return false;
    }
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    let group = d[3] * 10 + d[4];
    let serial = d[5..].iter().any(|&x| x != 0);
    area != 0 && area != 666 && area < 900 && group != 0 && serial
}

/// Dotted quad with four decimal octets in 0..=255.
pub(crate) fn ipv4(s: &[u8]) -> bool {
    let mut parts = 0;
    for part in s.split(|&b| b == b'.') {
        parts += 1;
        if parts > 4 || part.is_empty() || part.len() > 3 || !part.iter().all(u8::is_ascii_digit) {
            return false;
        }
        let v = part.iter().fold(0u32, |a, &b| a * 10 + u32::from(b - b'0'));
        if v > 255 {
            return false;
        }
    }
    parts == 4
}

/// JSON Web Token: three dot-separated base64url segments whose header decodes to a JSON object
/// with an "alg" member.
pub(crate) fn jwt(s: &[u8]) -> bool {
    let mut segs = s.split(|&b| b == b'.');
    let (Some(header), Some(_), Some(_), None) =
        (segs.next(), segs.next(), segs.next(), segs.next())
    else {
        return false;
    };
    let Some(json) = base64url_decode(header) else {
        return false;
    };
    matches!(
        serde_json::from_slice::<serde_json::Value>(&json),
        Ok(serde_json::Value::Object(map)) if map.contains_key("alg")
    )
}

/// Decodes unpadded (or padded) base64url; None on any other byte or an impossible length.
fn base64url_decode(s: &[u8]) -> Option<Vec<u8>> {
    let s = s
        .strip_suffix(b"==")
        .or_else(|| s.strip_suffix(b"="))
        .unwrap_or(s);
    if s.len() % 4 == 1 || s.len() > 4096 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &b in s {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Payment card issuer prefix (IIN) for the major networks, on the first digits of the number.
pub(crate) fn card_iin(digits: &[u8]) -> bool {
    let num = |n: usize| {
        digits[..n]
            .iter()
            .fold(0u32, |a, &b| a * 10 + u32::from(b - b'0'))
    };
    if digits.len() < 6 {
        return false;
    }
    match digits[0] {
        b'4' => true,                                               // Visa
        b'5' => (51..=55).contains(&num(2)) || num(2) == 50,        // Mastercard, Maestro
        b'2' => (2221..=2720).contains(&num(4)),                    // Mastercard 2-series
        b'3' => matches!(num(2), 30 | 34 | 35 | 36 | 37 | 38 | 39), // Amex, Diners, JCB
        b'6' => matches!(num(2), 60 | 62 | 63 | 64 | 65 | 67),      // Discover, UnionPay, Maestro
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_known_values() {
        assert!(luhn(b"4111111111111111"));
        assert!(luhn(b"4111-1111-1111-1111"));
        assert!(!luhn(b"4111111111111112"));
        assert!(!luhn(b"0"));
    }

    #[test]
    fn mod97_known_values() {
        assert!(mod97(b"DE89370400440532013000"));
        assert!(mod97(b"GB82 WEST 1234 5698 7654 32"));
        assert!(!mod97(b"DE89370400440532013001"));
        assert!(!mod97(b"DE8937040044053201300")); // wrong length for DE
    }

    #[test]
    fn ssn_ranges() {
        assert!(ssn(b"123-45-6789"));
        for bad in [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "123-00-4567",
            "123-45-0000",
        ] {
            assert!(!ssn(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn ipv4_octets() {
        assert!(ipv4(b"192.168.0.1"));
        assert!(!ipv4(b"192.168.0.256"));
        assert!(!ipv4(b"1.2.3"));
        assert!(!ipv4(b"1.2.3.4.5"));
    }

    #[test]
    fn base64url() {
        assert_eq!(
            base64url_decode(b"eyJhbGciOiJIUzI1NiJ9").unwrap(),
            br#"{"alg":"HS256"}"#
        );
        assert!(base64url_decode(b"a").is_none());
    }
}
