//! TLS layers pumped against each other in memory: handshake, then bulk data both ways in
//! 64 KiB raw reads (the engine's read size), which must come out intact. Regression test for
//! rustls' 16 KiB received-plaintext limit and its sendable-plaintext limit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use ostiary_proxy::tls::{self, TlsLayer};

/// Each call gets its own directory: tests run on parallel threads of one process, and a
/// shared directory let one test's CA meet another's leaf (BadSignature, seen in CI).
fn write_material() -> (PathBuf, PathBuf, PathBuf) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ostiary-tls-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();
    (ca_path, cert_path, key_path)
}

/// Moves raw bytes from `from` to `to` in chunks of `chunk`, collecting `to`'s plaintext.
fn pump(from: &mut TlsLayer, to: &mut TlsLayer, chunk: usize, plain: &mut Vec<u8>) {
    let mut raw = Vec::new();
    from.take_raw(&mut raw).unwrap();
    for c in raw.chunks(chunk) {
        to.receive_raw_into(c, plain).unwrap();
    }
}

#[test]
fn handshake_and_bulk_both_ways() {
    let (ca, cert, key) = write_material();
    let scfg =
        tls::server_config(cert.to_str().unwrap(), key.to_str().unwrap(), None, false).unwrap();
    let ccfg = tls::client_config(Some(ca.to_str().unwrap()), true, None).unwrap();
    let mut server = TlsLayer::server(scfg).unwrap();
    let mut client = TlsLayer::client(ccfg, "localhost").unwrap();
    let mut sink = Vec::new();
    for _ in 0..10 {
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
        pump(&mut client, &mut server, 64 * 1024, &mut sink);
        pump(&mut server, &mut client, 64 * 1024, &mut sink);
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
    assert!(sink.is_empty());

    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    bulk(&mut server, &mut client, &data);
    bulk(&mut client, &mut server, &data);
}

fn bulk(a: &mut TlsLayer, b: &mut TlsLayer, data: &[u8]) {
    let mut got = Vec::new();
    for piece in data.chunks(64 * 1024) {
        a.write_plain(piece).unwrap();
        pump(a, b, 64 * 1024, &mut got);
    }
    assert_eq!(got.len(), data.len());
    assert!(got == data);
}

#[test]
fn wrong_ca_fails_verification() {
    let (_, cert, key) = write_material();
    let (other_ca, _, _) = {
        // A second, unrelated CA.
        let dir =
            std::env::temp_dir().join(format!("ostiary-tls-test-other-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let c = p.self_signed(&k).unwrap();
        std::fs::write(dir.join("ca.pem"), c.pem()).unwrap();
        (dir.join("ca.pem"), (), ())
    };
    let scfg =
        tls::server_config(cert.to_str().unwrap(), key.to_str().unwrap(), None, false).unwrap();
    let ccfg = tls::client_config(Some(other_ca.to_str().unwrap()), true, None).unwrap();
    let mut server = TlsLayer::server(scfg).unwrap();
    let mut client = TlsLayer::client(ccfg, "localhost").unwrap();
    let mut sink = Vec::new();
    let mut raw = Vec::new();
    client.take_raw(&mut raw).unwrap();
    server.receive_raw_into(&raw, &mut sink).unwrap();
    raw.clear();
    server.take_raw(&mut raw).unwrap();
    assert!(
        client.receive_raw_into(&raw, &mut sink).is_err(),
        "an unknown issuer must be refused"
    );
}

#[test]
fn verify_full_needs_a_ca() {
    assert!(tls::client_config(None, true, None).is_err());
    assert!(tls::server_config("/nonexistent.pem", "/nonexistent.key", None, false).is_err());
}
