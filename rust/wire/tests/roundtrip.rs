//! A round trip per message type: encode, then decode fed whole, byte by byte and with trailing
//! data; the decoded value must equal the original and trailing bytes must stay unconsumed.

use ostiary_wire::pg::backend::{self, Authentication, ErrorFields};
use ostiary_wire::pg::codec::split_message;
use ostiary_wire::pg::frontend;
use ostiary_wire::pg::handshake::{ClientEvent, ClientHandshake};
use ostiary_wire::pg::startup::{self, StartupPacket};
use ostiary_wire::Limits;

const TRAILER: &[u8] = b"Q\0\0\0\x0dselect 1\0";

/// Decodes one typed message from `bytes` three ways and returns its tag and body.
fn typed_three_ways(bytes: &[u8]) -> (u8, Vec<u8>) {
    let limit = 1 << 20;
    let (tag, body, used) = split_message(bytes, limit).unwrap().expect("complete");
    assert_eq!(used, bytes.len());
    // Byte by byte: incomplete until the last byte.
    for end in 0..bytes.len() {
        assert!(
            split_message(&bytes[..end], limit).unwrap().is_none(),
            "complete too early at {end}"
        );
    }
    // With trailing data: the same message, the trailer untouched.
    let mut with_trailer = bytes.to_vec();
    with_trailer.extend_from_slice(TRAILER);
    let (tag2, body2, used2) = split_message(&with_trailer, limit).unwrap().unwrap();
    assert_eq!((tag2, body2, used2), (tag, body, used));
    assert_eq!(&with_trailer[used2..], TRAILER);
    (tag, body.to_vec())
}

fn startup_three_ways(p: &StartupPacket) {
    let bytes = startup::encode(p);
    let limits = Limits::default();
    let (got, used) = startup::decode(&bytes, &limits).unwrap().unwrap();
    assert_eq!((&got, used), (p, bytes.len()));
    for end in 0..bytes.len() {
        assert!(startup::decode(&bytes[..end], &limits).unwrap().is_none());
    }
    let mut with_trailer = bytes.clone();
    with_trailer.extend_from_slice(TRAILER);
    let (got2, used2) = startup::decode(&with_trailer, &limits).unwrap().unwrap();
    assert_eq!((&got2, used2), (p, bytes.len()));
}

#[test]
fn startup_packets() {
    startup_three_ways(&StartupPacket::SslRequest);
    startup_three_ways(&StartupPacket::GssEncRequest);
    startup_three_ways(&StartupPacket::CancelRequest {
        process_id: 4242,
        secret_key: -17,
    });
    startup_three_ways(&StartupPacket::StartupMessage {
        minor_version: 0,
        params: vec![
            ("user".into(), "ci".into()),
            ("database".into(), "app".into()),
            ("application_name".into(), "psql ünïcode".into()),
        ],
    });
    startup_three_ways(&StartupPacket::StartupMessage {
        minor_version: 2,
        params: vec![
            ("user".into(), "ci".into()),
            ("_pq_.some_option".into(), "on".into()),
        ],
    });
}

#[test]
fn authentication_variants() {
    for a in [
        Authentication::Ok,
        Authentication::CleartextPassword,
        Authentication::Md5Password { salt: [9, 8, 7, 6] },
        Authentication::Sasl {
            mechanisms: vec!["SCRAM-SHA-256".into(), "SCRAM-SHA-256-PLUS".into()],
        },
        Authentication::SaslContinue {
            data: b"r=abc,s=c2FsdA==,i=4096".to_vec(),
        },
        Authentication::SaslFinal {
            data: b"v=c2ln".to_vec(),
        },
        Authentication::Unsupported { code: 7 },
    ] {
        let (tag, body) = typed_three_ways(&a.encode());
        assert_eq!(tag, b'R');
        assert_eq!(Authentication::decode(&body).unwrap(), a);
    }
}

#[test]
fn error_and_notice_response() {
    let e = ErrorFields::new("ERROR", "42501", "permission denied")
        .with(b'D', "detail")
        .with(b'H', "hint");
    let (tag, body) = typed_three_ways(&e.encode_error());
    assert_eq!(tag, b'E');
    assert_eq!(ErrorFields::decode(&body).unwrap(), e);
    let (tag, body) = typed_three_ways(&e.encode_notice());
    assert_eq!(tag, b'N');
    assert_eq!(ErrorFields::decode(&body).unwrap(), e);
}

#[test]
fn parameter_status_key_data_ready() {
    let (t, b) = typed_three_ways(&backend::parameter_status("TimeZone", "Europe/Paris"));
    assert_eq!(
        (t, backend::decode_parameter_status(&b).unwrap()),
        (b'S', ("TimeZone".into(), "Europe/Paris".into()))
    );
    let (t, b) = typed_three_ways(&backend::backend_key_data(-5, i32::MAX));
    assert_eq!(
        (t, backend::decode_backend_key_data(&b).unwrap()),
        (b'K', (-5, i32::MAX))
    );
    for s in [b'I', b'T', b'E'] {
        let (t, b) = typed_three_ways(&backend::ready_for_query(s));
        assert_eq!((t, backend::decode_ready_for_query(&b).unwrap()), (b'Z', s));
    }
    assert!(backend::decode_ready_for_query(b"X").is_err());
}

#[test]
fn command_complete() {
    let mut raw = vec![b'C'];
    raw.extend_from_slice(&14u32.to_be_bytes());
    raw.extend_from_slice(b"SELECT 42\0");
    let (t, b) = typed_three_ways(&raw);
    assert_eq!(
        (t, backend::decode_command_complete(&b).unwrap()),
        (b'C', "SELECT 42".to_string())
    );
}

#[test]
fn frontend_messages() {
    let (t, b) = typed_three_ways(&frontend::query("select 'a;b'"));
    assert_eq!(
        (t, frontend::decode_query(&b).unwrap()),
        (b'Q', &b"select 'a;b'"[..])
    );
    let (t, b) = typed_three_ways(&frontend::parse("stmt", "select $1::int", &[23]));
    assert_eq!(t, b'P');
    let (name, sql, types) = frontend::decode_parse(&b).unwrap();
    assert_eq!(
        (name, sql, types),
        (&b"stmt"[..], &b"select $1::int"[..], vec![23])
    );
    let (t, b) = typed_three_ways(&frontend::password(b"token.with.dots"));
    assert_eq!(
        (t, frontend::decode_password(&b).unwrap()),
        (b'p', b"token.with.dots".to_vec())
    );
    let mut fc = vec![b'F'];
    fc.extend_from_slice(&14u32.to_be_bytes());
    fc.extend_from_slice(&1234u32.to_be_bytes());
    fc.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let (t, b) = typed_three_ways(&fc);
    assert_eq!(
        (t, frontend::decode_function_call(&b).unwrap()),
        (b'F', 1234)
    );
    let (t, b) = typed_three_ways(&frontend::sync());
    assert_eq!((t, b.len()), (b'S', 0));
    let (t, b) = typed_three_ways(&frontend::terminate());
    assert_eq!((t, b.len()), (b'X', 0));
}

#[test]
fn client_handshake_keeps_pipelined_bytes() {
    let mut h = ClientHandshake::new(Limits::default());
    let mut input = startup::encode(&StartupPacket::StartupMessage {
        minor_version: 0,
        params: vec![("user".into(), "u".into())],
    });
    h.receive_data(&input).unwrap();
    assert!(matches!(
        h.next_event().unwrap(),
        Some(ClientEvent::Startup { .. })
    ));
    h.expect_password();
    input = frontend::password(b"pw");
    input.extend_from_slice(TRAILER);
    h.receive_data(&input).unwrap();
    assert_eq!(
        h.next_event().unwrap(),
        Some(ClientEvent::Password(b"pw".to_vec()))
    );
    assert_eq!(h.take_remaining(), TRAILER);
}

#[test]
fn malformed_bodies_are_errors_not_panics() {
    assert!(frontend::decode_parse(b"name\0sql\0\xff\xff").is_err());
    assert!(frontend::decode_parse(b"name").is_err());
    assert!(frontend::decode_password(b"pw\0extra").is_err());
    assert!(Authentication::decode(b"\0\0\0\x05ab").is_err());
    assert!(ErrorFields::decode(b"Cabc").is_err());
    assert!(backend::decode_backend_key_data(b"\0\0").is_err());
    assert!(startup::decode(b"\0\0\0\x08\0\x04\0\0", &Limits::default()).is_err()); // protocol 4.0
    assert!(startup::decode(b"\0\0\0\x04", &Limits::default()).is_err());
    // A StartupMessage without a user.
    let no_user = startup::encode(&StartupPacket::StartupMessage {
        minor_version: 0,
        params: vec![("database".into(), "x".into())],
    });
    assert!(startup::decode(&no_user, &Limits::default()).is_err());
}

#[test]
fn parameter_counts_are_unsigned_as_postgresql_reads_them() {
    // 40,000 parameter types: the count's high bit is set (negative as an i16).
    let types: Vec<u32> = (0..40_000).map(|i| 23 + (i % 2)).collect();
    let mut body = Vec::new();
    body.extend_from_slice(b"s1\0select 1\0");
    body.extend_from_slice(&40_000u16.to_be_bytes());
    for t in &types {
        body.extend_from_slice(&t.to_be_bytes());
    }
    let (name, sql, got) = frontend::decode_parse(&body).unwrap();
    assert_eq!((name, sql), (&b"s1"[..], &b"select 1"[..]));
    assert_eq!(got, types);
    let mut body = Vec::new();
    body.extend_from_slice(b"s\0q\0");
    body.extend_from_slice(&65_535u16.to_be_bytes());
    body.extend(std::iter::repeat_n(0u8, 65_535 * 4));
    assert_eq!(frontend::decode_parse(&body).unwrap().2.len(), 65_535);
}
