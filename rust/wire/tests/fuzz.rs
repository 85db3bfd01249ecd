//! Fuzzing of both directions' decoders with the stable toolchain (cargo-fuzz needs nightly, which
//! this project's machines do not have). A small xorshift generator mutates a corpus of valid
//! messages (bit flips, byte changes, length-field rewrites, truncation, splices, random chunking)
//! and feeds the result to every decoder. Properties: nothing panics; the relay in AllowAll mode
//! either errors or passes exactly the bytes it was given; feeding in chunks and whole agree; the
//! session recorder gives the same frames and outcome whole and chunked, within its buffer bound.
//! `FUZZ_ITERS` sets the iteration count (default: a smoke run for `make test`; `make fuzz` runs
//! millions) and `FUZZ_SEED` the seed.

use ostiary_wire::pg::backend::{self, Authentication, ErrorFields};
use ostiary_wire::pg::frontend;
use ostiary_wire::pg::handshake::{ClientHandshake, UpstreamHandshake, UpstreamStep};
use ostiary_wire::pg::recording::Recorder;
use ostiary_wire::pg::relay::{FrontendStop, Gate, SessionRelay, Verdict};
use ostiary_wire::pg::startup::{self, StartupPacket};
use ostiary_wire::Limits;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn frontend_corpus() -> Vec<Vec<u8>> {
    let mut bind = vec![b'B'];
    let body = b"\0s1\0\0\x01\0\x01\0\x01\0\0\0\x0412345\0\x01\0\x01";
    bind.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    bind.extend_from_slice(body);
    vec![
        frontend::query("select 1; select 2"),
        frontend::parse("s1", "select $1", &[23]),
        bind,
        frontend::sync(),
        frontend::terminate(),
        frontend::password(b"secret"),
        vec![b'd', 0, 0, 0, 8, b'a', b'\t', b'b', b'\n'],
        vec![b'c', 0, 0, 0, 4],
        vec![b'H', 0, 0, 0, 4],
        vec![b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0],
        vec![b'F', 0, 0, 0, 14, 0, 0, 4, 210, 0, 0, 0, 0, 0, 0],
    ]
}

fn backend_corpus() -> Vec<Vec<u8>> {
    vec![
        Authentication::Ok.encode(),
        Authentication::Md5Password { salt: [1, 2, 3, 4] }.encode(),
        Authentication::Sasl {
            mechanisms: vec!["SCRAM-SHA-256".into()],
        }
        .encode(),
        Authentication::SaslContinue {
            data: b"r=x,s=AA==,i=1".to_vec(),
        }
        .encode(),
        backend::parameter_status("server_version", "15"),
        backend::backend_key_data(1, 2),
        backend::ready_for_query(b'I'),
        backend::error_response(
            "ERROR",
            "42601",
            "syntax error at or near \"ostiary_denied_0\"",
        ),
        ErrorFields::new("NOTICE", "00000", "hi").encode_notice(),
        vec![b'T', 0, 0, 0, 6, 0, 0],
        vec![b'D', 0, 0, 0, 11, 0, 1, 0, 0, 0, 1, b'1'],
        vec![
            b'C', 0, 0, 0, 13, b'S', b'E', b'L', b'E', b'C', b'T', b' ', b'1', 0,
        ],
        vec![b'A', 0, 0, 0, 14, 0, 0, 0, 1, b'c', 0, b'p', b'a', b'y', 0],
    ]
}

fn startup_corpus() -> Vec<Vec<u8>> {
    vec![
        startup::encode(&StartupPacket::SslRequest),
        startup::encode(&StartupPacket::CancelRequest {
            process_id: 1,
            secret_key: 2,
        }),
        startup::encode(&StartupPacket::StartupMessage {
            minor_version: 0,
            params: vec![("user".into(), "u".into()), ("database".into(), "d".into())],
        }),
    ]
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(4) {
        out.extend_from_slice(&corpus[rng.below(corpus.len())]);
    }
    for _ in 0..rng.below(4) {
        if out.is_empty() {
            break;
        }
        let i = rng.below(out.len());
        match rng.below(6) {
            0 => out[i] ^= 1 << rng.below(8),
            1 => out[i] = rng.next() as u8,
            2 => out.truncate(i),
            3 => {
                // Rewrite a length field to something hostile.
                let v: u32 = [0, 3, 4, 0x7fff_ffff, 0xffff_ffff, rng.next() as u32][rng.below(6)];
                let at = i.min(out.len().saturating_sub(4));
                if out.len() >= 4 {
                    out[at..at + 4].copy_from_slice(&v.to_be_bytes());
                }
            }
            4 => {
                let extra: Vec<u8> = (0..rng.below(32)).map(|_| rng.next() as u8).collect();
                out.splice(i..i, extra);
            }
            _ => {
                let n = rng.below(16);
                out.drain(i..(i + n).min(out.len()));
            }
        }
    }
    out
}

fn chunks<'a>(rng: &mut Rng, data: &'a [u8]) -> Vec<&'a [u8]> {
    let mut v = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let n = 1 + rng.below(data.len() - pos);
        v.push(&data[pos..pos + n]);
        pos += n;
    }
    v
}

fn iterations() -> u64 {
    std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15)
}

fn small_limits() -> Limits {
    Limits {
        max_startup: 10_000,
        max_message: 1 << 20,
        max_statement: 4096,
    }
}

#[test]
fn fuzz_frontend_relay() {
    let corpus = frontend_corpus();
    let mut rng = Rng(seed());
    for _ in 0..iterations() {
        let input = mutate(&mut rng, &corpus);
        // AllowAll: pass-through property, and chunking must not change the outcome.
        let mut whole = SessionRelay::new(small_limits(), Gate::AllowAll, false);
        let mut out_whole = Vec::new();
        let r_whole = whole.feed_frontend(&input, &mut out_whole);
        if r_whole.is_ok() {
            // Only an incomplete header (under five bytes) may be held back.
            assert!(
                input.starts_with(&out_whole),
                "AllowAll must pass bytes unchanged"
            );
            assert!(
                input.len() - out_whole.len() < 5,
                "AllowAll held back more than a header"
            );
        }
        let mut chunked = SessionRelay::new(small_limits(), Gate::AllowAll, false);
        let mut out_chunked = Vec::new();
        let mut r_chunked = Ok(FrontendStop::Consumed);
        for c in chunks(&mut rng, &input) {
            r_chunked = chunked.feed_frontend(c, &mut out_chunked);
            if r_chunked.is_err() {
                break;
            }
        }
        assert_eq!(
            r_whole.is_ok(),
            r_chunked.is_ok(),
            "chunking changed the outcome for {input:?}"
        );
        if r_whole.is_ok() {
            assert_eq!(out_chunked, out_whole);
        }
        // Consult: every hold is resolved (alternating allow and deny); must never panic.
        let mut consult = SessionRelay::new(small_limits(), Gate::Consult, true);
        let mut out = Vec::new();
        let mut rest: &[u8] = &input;
        let mut n = 0;
        while let Ok(FrontendStop::Hold {
            consumed,
            statement,
        }) = consult.feed_frontend(rest, &mut out)
        {
            let v = if n % 2 == 0 {
                Verdict::Allow
            } else {
                Verdict::Deny {
                    code: "42501".into(),
                    message: "no".into(),
                    rule: String::new(),
                }
            };
            consult
                .resolve(statement.seq, v, n % 3 == 0, &mut out)
                .unwrap();
            rest = &rest[consumed..];
            n += 1;
            if n > 64 {
                break;
            }
        }
    }
}

#[test]
fn fuzz_backend_relay() {
    let corpus = backend_corpus();
    let mut rng = Rng(seed() ^ 0xdead_beef);
    for _ in 0..iterations() {
        let input = mutate(&mut rng, &corpus);
        let report = rng.below(2) == 0;
        let mut whole = SessionRelay::new(small_limits(), Gate::AllowAll, report);
        let mut out_whole = Vec::new();
        let r_whole = whole.feed_backend(&input, &mut out_whole, &mut Vec::new());
        if r_whole.is_ok() {
            // No denial is pending, so bytes pass unchanged; a message being captured (or a
            // header) may be held back until it is complete.
            assert!(
                input.starts_with(&out_whole),
                "the backend direction changed bytes"
            );
            if whole.backend_at_boundary() {
                assert_eq!(out_whole, input);
            }
        }
        let mut chunked = SessionRelay::new(small_limits(), Gate::AllowAll, report);
        let mut out_chunked = Vec::new();
        let mut ok = true;
        for c in chunks(&mut rng, &input) {
            if chunked
                .feed_backend(c, &mut out_chunked, &mut Vec::new())
                .is_err()
            {
                ok = false;
                break;
            }
        }
        assert_eq!(
            r_whole.is_ok(),
            ok,
            "chunking changed the outcome for {input:?}"
        );
        if ok {
            assert_eq!(out_chunked, out_whole);
        }
    }
}

#[test]
fn fuzz_startup_and_handshakes() {
    let scorpus = startup_corpus();
    let bcorpus = backend_corpus();
    let mut rng = Rng(seed() ^ 0x1234_5678);
    for _ in 0..iterations() {
        let input = mutate(&mut rng, &scorpus);
        let _ = startup::decode(&input, &small_limits());
        let mut h = ClientHandshake::new(small_limits());
        for c in chunks(&mut rng, &input) {
            if h.receive_data(c).is_err() {
                break;
            }
            while let Ok(Some(_)) = h.next_event() {
                h.expect_password();
            }
        }
        let input = mutate(&mut rng, &bcorpus);
        let (mut u, _) =
            UpstreamHandshake::new(vec![("user".into(), "u".into())], "pw", small_limits())
                .unwrap();
        for c in chunks(&mut rng, &input) {
            if u.receive_data(c).is_err() {
                break;
            }
            loop {
                match u.step() {
                    Ok(UpstreamStep::Send(_)) => {}
                    Ok(UpstreamStep::Derive) if u.derive().is_ok() => {}
                    _ => break,
                }
            }
        }
        let _ = Authentication::decode(&input);
        let _ = ErrorFields::decode(&input);
    }
}

/// Masks runs of 5+ digits ("#") and makes "nul" values NULL.
struct Digits;

impl ostiary_wire::pg::masking::Masker for Digits {
    fn rules(&self) -> usize {
        2
    }
    fn has_content(&self) -> bool {
        true
    }
    fn find_matches(&self, hay: &[u8], f: &mut dyn FnMut(usize, usize, usize)) {
        let mut i = 0;
        while i < hay.len() {
            if hay[i..].starts_with(b"nul") {
                f(i, i + 3, 1);
                i += 3;
                continue;
            }
            let s = i;
            while i < hay.len() && hay[i].is_ascii_digit() {
                i += 1;
            }
            if i - s >= 5 {
                f(s, i, 0);
            }
            i += usize::from(i == s);
        }
    }
    fn replace(&self, rule: usize, _: &[u8], out: &mut Vec<u8>) -> bool {
        out.push(b'#');
        rule == 0
    }
    fn apply(&self, rule: usize, value: &[u8], out: &mut Vec<u8>) -> bool {
        self.replace(rule, value, out)
    }
}

fn masked_relay(columns: bool) -> SessionRelay {
    let mut r = SessionRelay::new(small_limits(), Gate::AllowAll, false);
    let mut plan = ostiary_wire::pg::masking::MaskPlan {
        masker: std::sync::Arc::new(Digits),
        columns: Default::default(),
        names: Vec::new(),
        late_names: Vec::new(),
        max_oid: 0,
    };
    if columns {
        plan.names.push(("c*".into(), 0));
        plan.columns.insert((16384, 1), 1);
    }
    r.set_masking(plan);
    r
}

fn masking_backend_corpus() -> Vec<Vec<u8>> {
    let msg = |tag: u8, body: &[u8]| {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    };
    // RowDescription: "card" text from table 16384 attnum 1 (text), then "n" int8 binary.
    let mut rd = vec![0, 2];
    rd.extend_from_slice(b"card\0\0\0\x40\0\0\x01\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0");
    rd.extend_from_slice(b"n\0\0\0\0\0\0\0\0\0\0\x14\0\x08\xff\xff\xff\xff\0\x01");
    let mut corpus = backend_corpus();
    corpus.extend([
        msg(b'1', b""),
        msg(b'2', b""),
        msg(b'3', b""),
        msg(b'n', b""),
        msg(b's', b""),
        msg(b'I', b""),
        msg(b't', b"\0\x01\0\0\0\x17"),
        msg(b'T', &rd),
        msg(
            b'D',
            b"\0\x02\0\0\0\x0912345 nul\0\0\0\x08\0\0\0\0\0\x01\xe2\x40",
        ),
        msg(b'D', b"\0\x02\xff\xff\xff\xff\0\0\0\x03abc"),
        msg(b'H', b"\0\0\x01\0\0"),
        msg(b'H', b"\x01\0\x01\0\x01"),
        msg(b'd', b"1\t123456789\tnul\n"),
        msg(b'c', b""),
        msg(b'V', b"\0\0\0\x06123456"),
    ]);
    corpus
}

/// Every message of `out` is framed correctly (what a client would parse).
fn well_framed(out: &[u8]) -> bool {
    let mut rest = out;
    while !rest.is_empty() {
        match ostiary_wire::pg::codec::split_message(rest, 1 << 30) {
            Ok(Some((_, _, used))) => rest = &rest[used..],
            _ => return false,
        }
    }
    true
}

#[test]
fn fuzz_masking_relay() {
    let front = frontend_corpus();
    let back = masking_backend_corpus();
    let mut rng = Rng(seed() ^ 0x5eed_a5c0);
    for _ in 0..iterations() / 2 {
        let columns = rng.below(2) == 0;
        let client = mutate(&mut rng, &front);
        let server = mutate(&mut rng, &back);
        let mut whole = masked_relay(columns);
        let mut up = Vec::new();
        if whole.feed_frontend(&client, &mut up).is_err() {
            continue;
        }
        let mut out_whole = Vec::new();
        let r_whole = whole.feed_backend(&server, &mut out_whole, &mut Vec::new());
        let mut chunked = masked_relay(columns);
        chunked.feed_frontend(&client, &mut Vec::new()).unwrap();
        let mut out_chunked = Vec::new();
        let mut r_chunked = Ok(());
        for c in chunks(&mut rng, &server) {
            r_chunked = chunked.feed_backend(c, &mut out_chunked, &mut Vec::new());
            if r_chunked.is_err() {
                break;
            }
        }
        assert_eq!(
            r_whole.is_ok(),
            r_chunked.is_ok(),
            "chunking changed the outcome"
        );
        if r_whole.is_ok() {
            assert_eq!(out_chunked, out_whole);
            assert!(well_framed(&out_whole), "masking broke the framing");
            // The digits the corpus puts in text never reach the client in a message that
            // carries data (rows, COPY data, errors, notices, notifications).
            let mut rest: &[u8] = &out_whole;
            while let Ok(Some((tag, body, used))) =
                ostiary_wire::pg::codec::split_message(rest, 1 << 30)
            {
                if b"DdENAV".contains(&tag) {
                    assert!(
                        !body.windows(9).any(|w| w == b"123456789"),
                        "{tag}: {body:?}"
                    );
                }
                rest = &rest[used..];
            }
        }
    }
}

#[test]
fn fuzz_recorder() {
    let front = frontend_corpus();
    let back = backend_corpus();
    let mut rng = Rng(seed() ^ 0x5eed_2ec0);
    for _ in 0..iterations() {
        let backend = rng.below(2) == 0;
        let input = mutate(&mut rng, if backend { &back } else { &front });
        let (max_rows, max_field, max_buffer) =
            (rng.below(4) as u64, rng.below(8), 64 + rng.below(512));
        let feed = |r: &mut Recorder, data: &[u8]| {
            if backend {
                r.backend(data, 5)
            } else {
                r.frontend(data, 5)
            }
        };
        let mut whole = Recorder::new(max_rows, max_field, max_buffer);
        let r_whole = feed(&mut whole, &input);
        let mut chunked = Recorder::new(max_rows, max_field, max_buffer);
        let mut r_chunked = Ok(());
        for c in chunks(&mut rng, &input) {
            r_chunked = feed(&mut chunked, c);
            if r_chunked.is_err() {
                break;
            }
            // Only the stopped frame (an error's text) may exceed the bound.
            assert!(chunked.buffered() <= 2 * max_buffer + 64);
        }
        assert_eq!(
            r_whole.is_ok(),
            r_chunked.is_ok(),
            "chunking changed the outcome for {input:?}"
        );
        assert_eq!(
            whole.take(),
            chunked.take(),
            "chunking changed the frames for {input:?}"
        );
    }
}

/// The audit trail's follower on the relay: with audit on, AllowAll still passes every byte
/// unchanged in both directions; feeding whole or in chunks gives the same entries; nothing panics,
/// and a session's end closes every open entry.
#[test]
fn fuzz_audit_relay() {
    use ostiary_wire::pg::audit::AuditTrack;
    let front = frontend_corpus();
    let back = backend_corpus();
    let mut rng = Rng(seed() ^ 0x000a_0d17);
    for _ in 0..iterations() {
        let f = mutate(&mut rng, &front);
        let b = mutate(&mut rng, &back);
        let write_ahead = rng.below(2) == 0;
        let run = |rng: &mut Rng, chunked: bool| {
            let mut r = SessionRelay::new(small_limits(), Gate::AllowAll, false);
            r.set_audit(AuditTrack::new(64, write_ahead));
            r.set_now(7);
            let mut out_f = Vec::new();
            let mut out_b = Vec::new();
            let mut ok = true;
            let pieces_f: Vec<&[u8]> = if chunked {
                chunks(rng, &f)
            } else {
                vec![&f[..]]
            };
            for c in pieces_f {
                if r.feed_frontend(c, &mut out_f).is_err() {
                    ok = false;
                    break;
                }
            }
            if ok {
                let pieces_b: Vec<&[u8]> = if chunked {
                    chunks(rng, &b)
                } else {
                    vec![&b[..]]
                };
                for c in pieces_b {
                    if r.feed_backend(c, &mut out_b, &mut Vec::new()).is_err() {
                        ok = false;
                        break;
                    }
                }
            }
            let a = r.audit_mut().expect("audit on");
            a.finish();
            (ok, out_f, out_b, a.take())
        };
        let (ok_w, f_w, b_w, e_w) = run(&mut rng, false);
        let (ok_c, f_c, b_c, e_c) = run(&mut rng, true);
        assert_eq!(ok_w, ok_c, "chunking changed the outcome");
        if ok_w {
            assert!(f.starts_with(&f_w) && f.len() - f_w.len() < 5);
            assert!(b.starts_with(&b_w));
            assert_eq!((f_w, b_w), (f_c, b_c));
            assert_eq!(e_w, e_c, "chunking changed the audit entries");
            // Every entry ends with an outcome once the session is over.
            assert!(e_w
                .iter()
                .all(|e| e.phase == ostiary_wire::pg::audit::Phase::Start
                    || e.outcome != ostiary_wire::pg::audit::Outcome::Pending));
        }
    }
}
