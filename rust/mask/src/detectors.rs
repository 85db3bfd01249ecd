//! The built-in detector catalogue.
//!
//! Rules of this file: a detector is one pattern (ASCII only, compiled without Unicode classes so
//! `\b`, `\d` and `\s` are ASCII and the lazy DFA never gives up on non-ASCII text) plus a check.
//! The pattern is deliberately a little loose and cheap; the check runs only on candidates and
//! holds the precise rules (checksums, ranges, context bytes around the match). A check may refine
//! a candidate to a sub-span (trim a card or IBAN to its valid length, keep only the secret after
//! its label) but never widen it. No pattern can match the empty string or a NUL byte.

use crate::prefilter::Shapes;
use crate::validate;

/// Built-in detector names, in catalogue order:
///
/// - `card`: payment card numbers, 13–19 digits, plain or in 4-4-4-4(-3) / 4-6-5 groups separated
///   by one space or dash; the issuer prefix (Visa, Mastercard, Amex, Diners, JCB, Discover,
///   UnionPay, Maestro) and the Luhn checksum must pass; never part of a longer number.
/// - `email`: `local@domain.tld`, a practical RFC 5322 subset (local part ≤ 64 bytes without
///   leading, trailing or doubled dots; hostname labels; an alphabetic TLD of 2–24 letters).
/// - `ssn`: US Social Security Numbers `ddd-dd-dddd` or `ddd dd dddd`, area not 000, 666 or
///   900–999, group not 00, serial not 0000; never part of a longer number.
/// - `iban`: International Bank Account Numbers, compact or in groups of four separated by single
///   spaces; the per-country length (for common countries, otherwise 15–34) and mod-97 must pass.
/// - `phone`: E.164 (`+` and 8–15 digits, optionally grouped, e.g. `+44 20 7946 0958`) and North
///   American formats (`(555) 123-4567`, `555-123-4567`, `555.123.4567`, `555 123 4567`); dates,
///   plain integers without separators and dotted addresses do not match.
/// - `ipv4`: dotted quads with octets 0–255, not inside a longer dotted or digit run (so version
///   strings such as `1.2.3.4.5` do not match).
/// - `ipv6`: full and compressed (`::`) forms, with an optional dotted-quad tail, checked by the
///   standard library's parser; `::` alone does not match.
/// - `jwt`: JSON Web Tokens: three base64url segments, the first two starting with `eyJ`, whose
///   header decodes to a JSON object with an `alg` member.
/// - `gcp_private_key`: PEM private keys (`PRIVATE KEY`, `RSA`, `EC`, `DSA`, `OPENSSH` and
///   `ENCRYPTED` variants), also in the `\n`-escaped form found inside service-account JSON.
/// - `aws_access_key`: AWS access key ids (`AKIA`, `ASIA`, `AGPA`, `AIDA`, `AROA`, `AIPA`, `ANPA`,
///   `ANVA`, `ABIA`, `ACCA` followed by 16 uppercase letters or digits).
/// - `aws_secret_key`: AWS secret access keys, only when labelled (`aws_secret_access_key = ...`,
///   `"SecretAccessKey": "..."`); only the 40-character secret itself is the match.
/// - `api_key`: common token shapes: GitHub (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`,
///   `github_pat_`), Slack (`xoxa-`, `xoxb-`, `xoxp-`, `xoxr-`, `xoxs-`), Stripe (`sk_live_`,
///   `rk_live_`), Google API keys (`AIza` + 35), GitLab (`glpat-`).
pub const BUILTINS: &[&str] = &[
    "card",
    "email",
    "ssn",
    "iban",
    "phone",
    "ipv4",
    "ipv6",
    "jwt",
    "gcp_private_key",
    "aws_access_key",
    "aws_secret_key",
    "api_key",
];

/// Confirms (and possibly narrows) a candidate `hay[start..end]`; `hay` gives the context bytes.
pub(crate) type Check = fn(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)>;

/// A built-in detector: its pattern, its check and how the first stage finds its candidates.
pub(crate) struct Builtin {
    pub pattern: &'static str,
    pub check: Check,
    /// Trigger shapes (see `prefilter`); None: the pattern itself has a literal prefix and goes
    /// into the gate regex.
    pub shapes: Option<Shapes>,
}

/// The detector called `name`, if it is one of [`BUILTINS`].
pub(crate) fn builtin(name: &str) -> Option<Builtin> {
    let none = Shapes::default();
    let (pattern, check, shapes): (&'static str, Check, Option<Shapes>) = match name {
        "card" => (
            CARD,
            card,
            Some(Shapes {
                grouped_digits: true,
                ..none
            }),
        ),
        "email" => (
            EMAIL,
            email,
            Some(Shapes {
                email: true,
                ..none
            }),
        ),
        "ssn" => (
            SSN,
            ssn,
            Some(Shapes {
                grouped_digits: true,
                ..none
            }),
        ),
        "iban" => (IBAN, iban, Some(Shapes { iban: true, ..none })),
        "phone" => (
            PHONE,
            phone,
            Some(Shapes {
                grouped_digits: true,
                plus_digit: true,
                ..none
            }),
        ),
        "ipv4" => (IPV4, ipv4, Some(Shapes { ipv4: true, ..none })),
        "ipv6" => (IPV6, ipv6, Some(Shapes { ipv6: true, ..none })),
        "jwt" => (JWT, jwt, None),
        "gcp_private_key" => (PRIVATE_KEY, accept, None),
        "aws_access_key" => (AWS_ACCESS_KEY, accept, None),
        "aws_secret_key" => (AWS_SECRET_KEY, aws_secret_key, None),
        "api_key" => (API_KEY, api_key, None),
        _ => return None,
    };
    Some(Builtin {
        pattern,
        check,
        shapes,
    })
}

const CARD: &str = r"\b(?:[2-6][0-9]{12,18}|[2-6][0-9]{3}[ -][0-9]{4}[ -][0-9]{4}[ -][0-9]{4}(?:[ -][0-9]{3})?|3[0-9]{3}[ -][0-9]{6}[ -][0-9]{4,5})\b";
const EMAIL: &str = r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}\b";
const SSN: &str = r"\b(?:[0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{3} [0-9]{2} [0-9]{4})\b";
const IBAN: &str =
    r"\b[A-Z]{2}[0-9]{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)\b";
const PHONE: &str = concat!(
    r"\+[1-9](?:[ .-]?[0-9]){7,14}\b",
    r"|\+[1-9][0-9]{0,2}[ .-]?\([0-9]{1,4}\)(?:[ .-]?[0-9]){4,12}\b",
    r"|\([2-9][0-9]{2}\) ?[0-9]{3}[-. ][0-9]{4}\b",
    r"|\b[2-9][0-9]{2}(?:-[0-9]{3}-|\.[0-9]{3}\.| [0-9]{3} )[0-9]{4}\b",
);
const IPV4: &str = r"\b[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\b";
const IPV6: &str = concat!(
    r"(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}",
    r"|(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?::",
    r"(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6}(?:\.[0-9]{1,3}){0,3})?",
);
const JWT: &str = r"eyJ[A-Za-z0-9_-]{2,}\.eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*";
const PRIVATE_KEY: &str = concat!(
    r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----",
    r"(?:[A-Za-z0-9+/=\s:,.-]|\\[nr])+?",
    r"-----END (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----",
);
const AWS_ACCESS_KEY: &str =
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}\b";
const AWS_SECRET_KEY: &str = concat!(
    r#"(?i:aws_?secret_?(?:access_?)?key|secret_?access_?key)["']?\s*(?:[:=]|=>)\s*["']?"#,
    r"[A-Za-z0-9/+=]{40}",
);
const API_KEY: &str = concat!(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}|xox[abprs]-[A-Za-z0-9-]{10,}",
    r"|[sr]k_live_[A-Za-z0-9]{24,}|AIza[0-9A-Za-z_-]{35}|glpat-[0-9A-Za-z_-]{20})",
);

fn at(hay: &[u8], i: usize) -> u8 {
    hay.get(i).copied().unwrap_or(0)
}

fn before(hay: &[u8], start: usize) -> u8 {
    start.checked_sub(1).map_or(0, |i| hay[i])
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// True when the span continues a longer number: `1-` or `1.` just before it, `-1` or `.1` just
/// after it (so parts of `1.2.3.4.5` or `12-123-45-6789` are not findings).
fn in_longer_number(hay: &[u8], start: usize, end: usize) -> bool {
    let b = before(hay, start);
    let extends_left = (b == b'-' || b == b'.') && start >= 2 && hay[start - 2].is_ascii_digit();
    let a = at(hay, end);
    let extends_right = (a == b'-' || a == b'.') && at(hay, end + 1).is_ascii_digit();
    b.is_ascii_digit() || a.is_ascii_digit() || extends_left || extends_right
}

fn accept(_: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    Some((start, end))
}

fn card(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    if in_longer_number(hay, start, end) {
        return None;
    }
    let m = &hay[start..end];
    let mut digits = [0u8; 19];
    let mut n = 0;
    let mut sep = None;
    for &b in m {
        if b.is_ascii_digit() {
            digits[n] = b;
            n += 1;
        } else if *sep.get_or_insert(b) != b {
            return None; // mixed separators: not one number
        }
    }
    let digits = &digits[..n];
    ((13..=19).contains(&n) && validate::card_iin(digits) && validate::luhn(digits))
        .then_some((start, end))
}

fn email(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    let m = &hay[start..end];
    let at_sign = memchr::memchr(b'@', m)?;
    let (local, domain) = (&m[..at_sign], &m[at_sign + 1..]);
    let bad_local = local.starts_with(b".")
        || local.ends_with(b".")
        || local.windows(2).any(|w| w == b"..")
        || is_word(before(hay, start));
    let bad_domain = domain
        .split(|&b| b == b'.')
        .any(|label| label.starts_with(b"-") || label.ends_with(b"-"));
    (!bad_local && !bad_domain && at(hay, end) != b'@').then_some((start, end))
}

fn ssn(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    (!in_longer_number(hay, start, end) && validate::ssn(&hay[start..end])).then_some((start, end))
}

fn iban(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    let m = &hay[start..end];
    // A grouped IBAN may be followed by another group of alphanumerics; trim to the country's
    // length when that ends on a group boundary.
    let mut end = end;
    if let Some(len) = validate::iban_len(&m[..2]) {
        let mut count = 0;
        for (i, &b) in m.iter().enumerate() {
            if b != b' ' {
                count += 1;
            }
            if count == len {
                if i + 1 < m.len() && m[i + 1] != b' ' {
                    return None;
                }
                end = start + i + 1;
                break;
            }
        }
    }
    validate::mod97(&hay[start..end]).then_some((start, end))
}

fn phone(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    let m = &hay[start..end];
    let b = before(hay, start);
    if in_longer_number(hay, start, end) || is_word(b) || b == b'+' {
        return None;
    }
    let digits = m.iter().filter(|b| b.is_ascii_digit()).count();
    let ok = if m[0] == b'+' {
        (8..=15).contains(&digits)
    } else {
        digits == 10
    };
    ok.then_some((start, end))
}

fn ipv4(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    (!in_longer_number(hay, start, end) && validate::ipv4(&hay[start..end])).then_some((start, end))
}

fn ipv6(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    let m = &hay[start..end];
    let b = before(hay, start);
    let a = at(hay, end);
    if is_word(b) || b == b':' || b == b'.' || is_word(a) || a == b':' {
        return None;
    }
    if !m.iter().any(u8::is_ascii_hexdigit) {
        return None;
    }
    let s = std::str::from_utf8(m).ok()?;
    s.parse::<std::net::Ipv6Addr>().ok().map(|_| (start, end))
}

fn jwt(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    let b = before(hay, start);
    if is_word(b) || b == b'-' || b == b'.' {
        return None;
    }
    validate::jwt(&hay[start..end]).then_some((start, end))
}

fn aws_secret_key(hay: &[u8], _start: usize, end: usize) -> Option<(usize, usize)> {
    let a = at(hay, end);
    let more = a.is_ascii_alphanumeric() || a == b'/' || a == b'+' || a == b'=';
    (!more).then_some((end - 40, end))
}

fn api_key(hay: &[u8], start: usize, end: usize) -> Option<(usize, usize)> {
    let a = at(hay, end);
    (!is_word(a) && a != b'-').then_some((start, end))
}
