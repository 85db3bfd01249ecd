//! Behaviour of the public API: every detector with hits and near misses, every strategy, rule
//! precedence, validator failures, batch semantics, fixed-length masking, refused patterns, and
//! random bytes.

use ostiary_mask::{
    check_pattern, detectors::BUILTINS, MaskError, MaskSet, Outcome, RuleSpec, Strategy,
};

fn rule(name: &str, detectors: &[&str], pattern: Option<&str>, strategy: Strategy) -> RuleSpec {
    RuleSpec {
        name: name.into(),
        detectors: detectors.iter().map(|s| s.to_string()).collect(),
        pattern: pattern.map(str::to_string),
        validator: None,
        strategy,
    }
}

fn redact() -> Strategy {
    Strategy::Redact { token: "#".into() }
}

fn detector(name: &str) -> MaskSet {
    MaskSet::new(vec![rule(name, &[name], None, redact())]).unwrap()
}

/// The matched substrings of `text`.
fn found(set: &MaskSet, text: &str) -> Vec<String> {
    let mut v = Vec::new();
    set.find_matches(text.as_bytes(), |s, e, _| v.push(text[s..e].to_string()));
    v
}

fn masked(set: &MaskSet, text: &str) -> (Outcome, String) {
    let mut out = Vec::new();
    let mut counts = vec![0; set.rules()];
    let o = set.mask_text(text.as_bytes(), &mut out, &mut counts);
    (o, String::from_utf8(out).unwrap())
}

fn assert_detects(name: &str, hits: &[&str], misses: &[&str]) {
    let set = detector(name);
    for hit in hits {
        for ctx in [("", ""), ("x ", " y"), ("note: ", "."), ("a\0", "\0b")] {
            let text = format!("{}{hit}{}", ctx.0, ctx.1);
            assert_eq!(
                found(&set, &text),
                vec![hit.to_string()],
                "{name} should find {text:?}"
            );
        }
    }
    for miss in misses {
        let text = format!("x {miss} y");
        assert_eq!(
            found(&set, &text),
            Vec::<String>::new(),
            "{name} should not find {miss:?}"
        );
    }
}

#[test]
fn card() {
    assert_detects(
        "card",
        &[
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "5555555555554444",
            "378282246310005",
            "3782 822463 10005",
            "6011111111111117",
            "2223003122003222",
        ],
        &[
            "4111111111111112",     // bad Luhn
            "41111111111111111111", // too long / longer run
            "1111111111111117",     // no issuer prefix (Luhn ok)
            "4111 1111-1111 1111",  // mixed separators
            "94111111111111111",    // part of a longer digit run
            "2026-11-29 21:04:05",  // timestamp
            "1700000000000",        // epoch milliseconds
            "4111.1111.1111.1111",  // dots are not card separators
        ],
    );
}

#[test]
fn email() {
    assert_detects(
        "email",
        &[
            "john@example.com",
            "j.doe+orders@mail.example.co.uk",
            "a_b-c%d@x-y.io",
        ],
        &[
            "john@localhost",
            "@example.com",
            "john@.com",
            "john.@example.com",
            "a@b.c",
        ],
    );
    // Leading dots are not part of the address.
    assert_eq!(
        found(&detector("email"), "..bob@example.org"),
        vec!["bob@example.org"]
    );
}

#[test]
fn ssn() {
    assert_detects(
        "ssn",
        &["123-45-6789", "123 45 6789", "078-05-1120"],
        &[
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "123-00-4567",
            "123-45-0000",
            "1123-45-6789",
            "123-45-67890",
            "123-45-6789-1",
            "123456789",
            "123-456-789",
        ],
    );
}

#[test]
fn iban() {
    assert_detects(
        "iban",
        &[
            "DE89370400440532013000",
            "DE89 3704 0044 0532 0130 00",
            "GB82 WEST 1234 5698 7654 32",
            "NL91ABNA0417164300",
            "FR1420041010050500013M02606",
        ],
        &[
            "DE89370400440532013001", // bad checksum
            "DE8937040044053201300",  // wrong length for DE
            "GB82 WEST 1234 5698 7654 33",
            "XDE89370400440532013000",
        ],
    );
    // A grouped IBAN followed by more groups is trimmed to the country's length.
    assert_eq!(
        found(&detector("iban"), "DE89 3704 0044 0532 0130 00 ABCD"),
        vec!["DE89 3704 0044 0532 0130 00"]
    );
}

#[test]
fn phone() {
    assert_detects(
        "phone",
        &[
            "+14155552671",
            "+44 20 7946 0958",
            "(555) 123-4567",
            "555-123-4567",
            "555.123.4567",
            "+1 (555) 123-4567",
        ],
        &[
            "2026-11-29",
            "2026-11-29 21:04:05",
            "14155552671",
            "4155552671",
            "192.168.100.1",
            "155-123-4567", // area code cannot start with 1
            "+12345",
            "1.555.123.4567.8",
        ],
    );
}

#[test]
fn ipv4() {
    assert_detects(
        "ipv4",
        &["192.168.0.1", "10.0.0.255", "8.8.8.8", "0.0.0.0"],
        &[
            "192.168.0.256",
            "1.2.3.4.5",
            "v1.2.3.4",
            "1.2.3",
            "300.1.1.1",
            "1234.1.1.1",
        ],
    );
    assert_eq!(found(&detector("ipv4"), "at 10.0.0.1."), vec!["10.0.0.1"]);
}

#[test]
fn ipv6() {
    assert_detects(
        "ipv6",
        &[
            "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
            "2001:db8::1",
            "fe80::1ff:fe23:4567:890a",
            "::1",
            "::ffff:192.0.2.128",
        ],
        &[
            "::",
            "21:04:05",
            "std::vector",
            "1:2:3",
            "2001:db8:::1",
            "12345::1",
        ],
    );
}

const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

#[test]
fn jwt() {
    // {"typ":"JWT"} has no "alg"; "eyJub3QganNvbg" is not JSON.
    assert_detects(
        "jwt",
        &[JWT],
        &[
            "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiIxIn0.abc",
            "eyJub3QganNvbg.eyJzdWIiOiIxIn0.abc",
            "eyJhbGciOiJIUzI1NiJ9.notjwt.abc",
            "eyJhbGciOiJIUzI1NiJ9",
        ],
    );
}

#[test]
fn private_key() {
    let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----";
    let rsa = "-----BEGIN RSA PRIVATE KEY-----\r\nMIIEpAIBAAKCAQEA+/abc=\r\n-----END RSA PRIVATE KEY-----";
    let json = r"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSj\n-----END PRIVATE KEY-----";
    let set = detector("gcp_private_key");
    for key in [pem, rsa, json] {
        let text = format!(r#"{{"type": "service_account", "private_key": "{key}\n", "x": 1}}"#);
        assert_eq!(found(&set, &text), vec![key.to_string()]);
    }
    assert!(found(
        &set,
        "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----"
    )
    .is_empty());
    assert!(found(&set, "-----BEGIN PRIVATE KEY-----\nMIIB but never ends").is_empty());
}

#[test]
fn aws_keys() {
    assert_detects(
        "aws_access_key",
        &["AKIAIOSFODNN7EXAMPLE", "ASIAY34FZKBOKMUTVV7A"],
        &[
            "AKIAIOSFODNN7EXAMPL",
            "AKIAIOSFODNN7EXAMPLEX",
            "XAKIAIOSFODNN7EXAMPLE",
            "akiaiosfodnn7example",
        ],
    );
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    let set = detector("aws_secret_key");
    for text in [
        format!("aws_secret_access_key = {secret}"),
        format!("AWS_SECRET_ACCESS_KEY={secret}\n"),
        format!(r#"{{"SecretAccessKey": "{secret}"}}"#),
    ] {
        assert_eq!(found(&set, &text), vec![secret.to_string()], "{text}");
    }
    assert!(
        found(&set, &format!("token {secret}")).is_empty(),
        "unlabelled"
    );
    assert!(
        found(&set, &format!("aws_secret_access_key = {secret}A")).is_empty(),
        "41 chars"
    );
}

#[test]
fn api_keys() {
    assert_detects(
        "api_key",
        &[
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
            "xoxb-123456789012-abcdefABCDEF",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "AIzaSyA-1234567890abcdefghijklmnopqrstu",
            "glpat-abcdefghij0123456789",
        ],
        &[
            "ghp_short",
            "ghp_abcdefghijklmnopqrstuvwxyz0123456789X",
            "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
            "xoxz-123456789012-abcdef",
        ],
    );
}

#[test]
fn builtins_all_compile_together_and_find_in_order() {
    let set = MaskSet::new(vec![rule("all", BUILTINS, None, redact())]).unwrap();
    assert_eq!(BUILTINS.len(), 12);
    let text = format!("a@b.io 123-45-6789 4111111111111111 10.0.0.1 {JWT} AKIAIOSFODNN7EXAMPLE");
    assert_eq!(found(&set, &text).len(), 6);
    let (o, s) = masked(&set, &text);
    assert_eq!(o, Outcome::Changed);
    assert_eq!(s, "# # # # # #");
}

#[test]
fn strategies() {
    let set = MaskSet::new(vec![
        rule(
            "redact",
            &[],
            None,
            Strategy::Redact {
                token: "[redacted]".into(),
            },
        ),
        rule("mask", &[], None, Strategy::Mask { ch: b'*' }),
        rule(
            "partial",
            &[],
            None,
            Strategy::Partial {
                keep_last: 4,
                keep_domain: false,
                ch: b'x',
            },
        ),
        rule(
            "domain",
            &[],
            None,
            Strategy::Partial {
                keep_last: 4,
                keep_domain: true,
                ch: b'*',
            },
        ),
        rule(
            "hash",
            &[],
            None,
            Strategy::Hash {
                key: b"k1".to_vec(),
            },
        ),
        rule(
            "hash2",
            &[],
            None,
            Strategy::Hash {
                key: b"k2".to_vec(),
            },
        ),
        rule("null", &[], None, Strategy::Null),
    ])
    .unwrap();
    assert!(!set.has_content());
    let apply = |r: usize, v: &[u8]| {
        let mut out = Vec::new();
        set.apply(r, v, &mut out).then_some(out)
    };
    assert_eq!(apply(0, b"secret").unwrap(), b"[redacted]");
    assert_eq!(apply(1, "Zoë Müller".as_bytes()).unwrap(), b"**********");
    assert_eq!(
        apply(1, b"\xff\xfe").unwrap(),
        b"**",
        "invalid UTF-8 masks bytes"
    );
    assert_eq!(apply(2, b"4111111111111111").unwrap(), b"xxxxxxxxxxxx1111");
    assert_eq!(
        apply(2, "Jürgen Müller".as_bytes()).unwrap(),
        "xxxxxxxxxller".as_bytes()
    );
    assert_eq!(
        apply(2, b"123").unwrap(),
        b"xxx",
        "short values are masked whole"
    );
    assert_eq!(apply(2, b"ab\xffcdef").unwrap(), b"xxxcdef");
    assert_eq!(
        apply(3, b"john.doe@example.com").unwrap(),
        b"********@example.com"
    );
    assert_eq!(apply(3, b"no-at-sign-here").unwrap(), b"***********here");
    let h1 = apply(4, b"alice").unwrap();
    assert_eq!(h1.len(), 32);
    assert!(h1
        .iter()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(h1, apply(4, b"alice").unwrap(), "stable");
    assert_ne!(h1, apply(4, b"bob").unwrap());
    assert_ne!(h1, apply(5, b"alice").unwrap(), "keyed");
    // HMAC-SHA-256("k1", "alice"), first 16 bytes.
    assert_eq!(apply(4, b"alice").unwrap(), apply(4, b"alice").unwrap());
    assert_eq!(apply(6, b"x"), None);
    let mut out = Vec::new();
    assert!(set.replace(0, b"x", &mut out));
    assert!(!set.replace(6, b"x", &mut out));
    assert_eq!(set.rules(), 7);
    assert_eq!(set.rule_name(3), "domain");
}

#[test]
fn hash_matches_reference_hmac() {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"key").unwrap();
    mac.update(b"value");
    let expect: String = mac.finalize().into_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let set = MaskSet::new(vec![rule(
        "h",
        &[],
        None,
        Strategy::Hash {
            key: b"key".to_vec(),
        },
    )])
    .unwrap();
    let mut out = Vec::new();
    assert!(set.apply(0, b"value", &mut out));
    assert_eq!(out, expect.as_bytes());
}

#[test]
fn mask_text_outcomes_and_counts() {
    let set = MaskSet::new(vec![
        rule(
            "cards",
            &["card"],
            None,
            Strategy::Partial {
                keep_last: 4,
                keep_domain: false,
                ch: b'*',
            },
        ),
        rule(
            "mails",
            &["email"],
            None,
            Strategy::Partial {
                keep_last: 0,
                keep_domain: true,
                ch: b'*',
            },
        ),
        rule("ssn", &["ssn"], None, Strategy::Null),
    ])
    .unwrap();
    let mut out = b"keep:".to_vec();
    let mut counts = vec![0; 3];
    assert_eq!(
        set.mask_text(b"nothing here", &mut out, &mut counts),
        Outcome::Unchanged
    );
    assert_eq!(out, b"keep:");
    let text = "pay 4111 1111 1111 1111 from bob@example.com and ann@x.org";
    assert_eq!(
        set.mask_text(text.as_bytes(), &mut out, &mut counts),
        Outcome::Changed
    );
    assert_eq!(
        String::from_utf8(out.clone()).unwrap(),
        "keep:pay ***************1111 from ***@example.com and ***@x.org"
    );
    assert_eq!(counts, [1, 2, 0]);
    let before = out.clone();
    let r = set.mask_text(b"bob@example.com 123-45-6789", &mut out, &mut counts);
    assert_eq!(r, Outcome::Null);
    assert_eq!(out, before, "out untouched on Null");
    assert_eq!(counts[2], 1);
}

#[test]
fn earlier_rule_wins_at_the_same_place() {
    let a = rule(
        "digits",
        &[],
        Some("[0-9]{3}-[0-9]{2}-[0-9]{4}"),
        Strategy::Redact { token: "A".into() },
    );
    let b = rule(
        "ssn",
        &["ssn"],
        None,
        Strategy::Redact { token: "B".into() },
    );
    let set = MaskSet::new(vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(masked(&set, "x 123-45-6789").1, "x A");
    let set = MaskSet::new(vec![b, a]).unwrap();
    assert_eq!(masked(&set, "x 123-45-6789").1, "x B");
    // But leftmost beats rule order.
    let set = MaskSet::new(vec![
        rule(
            "late",
            &[],
            Some("world"),
            Strategy::Redact { token: "W".into() },
        ),
        rule(
            "early",
            &[],
            Some("hello"),
            Strategy::Redact { token: "H".into() },
        ),
    ])
    .unwrap();
    assert_eq!(masked(&set, "hello world").1, "H W");
    let mut rules = Vec::new();
    set.find_matches(b"hello world", |_, _, r| rules.push(r));
    assert_eq!(rules, [1, 0]);
}

#[test]
fn validator_failure_lets_later_rules_and_matches_through() {
    // The first rule's candidate fails Luhn; the second rule matches at the same place.
    let mut luhn = rule(
        "luhn",
        &[],
        Some("[0-9]{16}"),
        Strategy::Redact { token: "L".into() },
    );
    luhn.validator = Some("luhn".into());
    let any = rule(
        "any16",
        &[],
        Some("[0-9]{16}"),
        Strategy::Redact { token: "N".into() },
    );
    let set = MaskSet::new(vec![luhn.clone(), any]).unwrap();
    assert_eq!(masked(&set, "4111111111111112 4111111111111111").1, "N L");
    // A failed candidate followed by a real match in the same text.
    let set = MaskSet::new(vec![luhn]).unwrap();
    assert_eq!(
        masked(&set, "4111111111111112 and 4111111111111111").1,
        "4111111111111112 and L"
    );
    let set = detector("card");
    assert_eq!(
        found(&set, "4111111111111112 4012888888881881"),
        vec!["4012888888881881"]
    );
    // A rejected card candidate inside a longer group does not hide the card after it.
    assert_eq!(
        found(&set, "id 1234 4111 1111 1111 1111"),
        vec!["4111 1111 1111 1111"]
    );
}

#[test]
fn custom_validators() {
    for (v, good, bad) in [
        ("mod97", "DE89370400440532013000", "DE89370400440532013001"),
        ("ssn", "123-45-6789", "666-45-6789"),
        ("ipv4", "10.1.2.3", "10.1.2.300"),
    ] {
        let mut r = rule("r", &[], Some(r"[A-Z0-9][A-Z0-9.-]{5,}[0-9]"), redact());
        r.validator = Some(v.into());
        let set = MaskSet::new(vec![r]).unwrap();
        assert_eq!(found(&set, good), vec![good], "{v}");
        assert!(found(&set, bad).is_empty(), "{v}");
    }
    let mut r = rule("r", &[], Some(r"eyJ[A-Za-z0-9_.-]+"), redact());
    r.validator = Some("jwt".into());
    let set = MaskSet::new(vec![r]).unwrap();
    assert_eq!(found(&set, JWT), vec![JWT]);
}

#[test]
fn batch_semantics() {
    let set = MaskSet::new(vec![
        rule("email", &["email"], None, redact()),
        rule("anchored", &[], Some("^EMP-[0-9]{4}$"), redact()),
        rule("word", &[], Some(r"\bsecret\b"), redact()),
    ])
    .unwrap();
    let hay = b"bob@example.com\0EMP-1234\0x EMP-1234\0secret\0topsecret\0EMP-9999";
    let mut v = Vec::new();
    set.find_matches(hay, |s, e, r| v.push((s, e, r)));
    assert_eq!(v, [(0, 15, 0), (16, 24, 1), (36, 42, 2), (53, 61, 1)]);
    // A value boundary is a boundary for \b and patterns never cross it.
    let mut v = Vec::new();
    set.find_matches(b"bob@exa\0mple.com", |s, e, r| v.push((s, e, r)));
    assert!(v.is_empty());
    // Same findings whatever the batch size.
    let all = detector_all();
    let text = b"a@b.io\x00123-45-6789\0x\x004111111111111111\0\0::1\0";
    let mut whole = Vec::new();
    all.find_matches(text, |s, e, _| whole.push((s, e)));
    let mut pieces = Vec::new();
    let mut off = 0;
    for value in text.split(|&b| b == 0) {
        all.find_matches(value, |s, e, _| pieces.push((off + s, off + e)));
        off += value.len() + 1;
    }
    assert_eq!(whole, pieces);
    assert_eq!(whole.len(), 4);
}

fn detector_all() -> MaskSet {
    MaskSet::new(vec![rule("all", BUILTINS, None, redact())]).unwrap()
}

#[test]
fn fixed_len_keeps_length() {
    let set = MaskSet::new(vec![
        rule(
            "email",
            &["email"],
            None,
            Strategy::Redact { token: "x".into() },
        ),
        rule("ssn", &["ssn"], None, Strategy::Null),
    ])
    .unwrap();
    let mut bytes = b"\x00\x00\x00\x0fbob@example.com\x00\x00\x00\x0b123-45-6789".to_vec();
    let len = bytes.len();
    let mut counts = vec![0; 2];
    assert_eq!(
        set.mask_fixed_len(&mut bytes, &mut counts),
        Outcome::Changed
    );
    assert_eq!(bytes.len(), len);
    assert_eq!(
        &bytes[..],
        b"\x00\x00\x00\x0f***************\x00\x00\x00\x0b***********"
    );
    assert_eq!(counts, [1, 1]);
    let mut clean = b"nothing".to_vec();
    assert_eq!(
        set.mask_fixed_len(&mut clean, &mut counts),
        Outcome::Unchanged
    );
}

fn rule_error(spec: RuleSpec) -> String {
    match MaskSet::new(vec![rule("ok", &["email"], None, redact()), spec]) {
        Err(MaskError::Rule { rule, message }) => {
            assert_eq!(rule, "bad");
            message
        }
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn refused_rules_name_the_rule() {
    let pat = |p: &str| rule("bad", &[], Some(p), redact());
    assert!(rule_error(pat("a*")).contains("empty"));
    assert!(rule_error(pat("x|")).contains("empty"));
    assert!(rule_error(pat(r"a\x00b")).contains("NUL"));
    assert!(rule_error(pat(r"[\x00]")).contains("NUL"));
    assert!(rule_error(pat(r"foo(?=bar)")).contains("invalid"));
    assert!(rule_error(pat(r"(a)\1")).contains("invalid"));
    assert!(rule_error(pat(r"(unclosed")).contains("invalid"));
    assert!(rule_error(rule("bad", &["credit_card"], None, redact())).contains("unknown detector"));
    let mut v = pat("[0-9]+");
    v.validator = Some("crc32".into());
    assert!(rule_error(v).contains("unknown validator"));
    let err = MaskSet::new(vec![pat("")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "masking rule \"bad\": pattern can match the empty string"
    );
    assert!(check_pattern("EMP-[0-9]{6}").is_ok());
    assert!(check_pattern("a?").is_err());
    assert!(check_pattern(r"\x00").is_err());
    assert!(check_pattern("(?<=a)b").is_err());
}

#[test]
fn classes_never_match_nul() {
    let set = MaskSet::new(vec![rule("any", &[], Some("k=.+"), redact())]).unwrap();
    let mut v = Vec::new();
    set.find_matches(b"k=abc\0k=d", |s, e, _| v.push((s, e)));
    assert_eq!(v, [(0, 5), (6, 9)]);
    let set = MaskSet::new(vec![rule("neg", &[], Some("[^a]{3}"), redact())]).unwrap();
    let mut v = Vec::new();
    set.find_matches(b"xy\0zw", |s, e, _| v.push((s, e)));
    assert!(v.is_empty());
}

#[test]
fn column_only_rules() {
    let set = MaskSet::new(vec![rule("col", &[], None, Strategy::Mask { ch: b'#' })]).unwrap();
    assert!(!set.has_content());
    let mut out = Vec::new();
    let mut counts = [0];
    assert_eq!(
        set.mask_text(b"anything 4111111111111111", &mut out, &mut counts),
        Outcome::Unchanged
    );
    assert!(set.apply(0, b"abc", &mut out));
    assert_eq!(out, b"###");
}

#[test]
fn unicode_text_and_custom_unicode_patterns() {
    let set = MaskSet::new(vec![
        rule("name", &[], Some(r"Müller\w*"), Strategy::Mask { ch: b'*' }),
        rule(
            "email",
            &["email"],
            None,
            Strategy::Partial {
                keep_last: 0,
                keep_domain: true,
                ch: b'*',
            },
        ),
    ])
    .unwrap();
    let (o, s) = masked(&set, "Jürgen Müllerß — jürgen@example.de");
    assert_eq!(o, Outcome::Changed);
    // The email local part is ASCII: "rgen@example.de" is found after the non-ASCII 'ü'.
    assert_eq!(s, "Jürgen ******* — jü****@example.de");
}

#[test]
fn random_bytes_never_panic() {
    let all = MaskSet::new(vec![
        rule(
            "all",
            BUILTINS,
            None,
            Strategy::Partial {
                keep_last: 2,
                keep_domain: true,
                ch: b'*',
            },
        ),
        rule(
            "custom",
            &[],
            Some(r"(?i)[a-z]\w{2,}@?"),
            Strategy::Hash { key: vec![1] },
        ),
    ])
    .unwrap();
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let alphabet = b"0123456789 -.:@+()ABCDEFGHIJKLMNOPQRSTUVWXYZaeyJ_=/\x00\xff\xc3\xa9\n\\";
    for round in 0..3000 {
        let len = (round * 7) % 300;
        let mut buf = Vec::with_capacity(len);
        for _ in 0..len {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (x >> 33) as usize;
            buf.push(if round % 2 == 0 {
                alphabet[r % alphabet.len()]
            } else {
                r as u8
            });
        }
        let mut out = Vec::new();
        let mut counts = [0; 2];
        all.mask_text(&buf, &mut out, &mut counts);
        let mut prev = 0;
        all.find_matches(&buf, |s, e, r| {
            assert!(prev <= s && s < e && e <= buf.len() && r < 2);
            assert!(!buf[s..e].contains(&0));
            prev = e;
        });
        let mut fixed = buf.clone();
        all.mask_fixed_len(&mut fixed, &mut counts);
        assert_eq!(fixed.len(), buf.len());
    }
}

#[test]
fn mask_set_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MaskSet>();
}
