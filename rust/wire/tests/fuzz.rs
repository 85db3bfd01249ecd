//! Fuzzing of both directions' decoders with the stable toolchain (cargo-fuzz needs nightly, which
//! this project's machines do not have). A small xorshift generator mutates a corpus of valid
//! messages (bit flips, byte changes, length-field rewrites, truncation, splices, random chunking)
//! and feeds the result to every decoder. Properties: nothing panics; the relay in AllowAll mode
//! either errors or passes exactly the bytes it was given; feeding in chunks and whole agree.
//! `FUZZ_ITERS` sets the iteration count (default: a smoke run for `make test`; `make fuzz` runs
//! millions) and `FUZZ_SEED` the seed.

use ostiary_wire::pg::backend::{self, Authentication, ErrorFields};
use ostiary_wire::pg::frontend;
use ostiary_wire::pg::handshake::{ClientHandshake, UpstreamHandshake, UpstreamStep};
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
            while let Ok(UpstreamStep::Send(_)) = u.step() {}
        }
        let _ = Authentication::decode(&input);
        let _ = ErrorFields::decode(&input);
    }
}
