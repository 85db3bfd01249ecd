//! TLS for both legs, driven sans-IO: rustls connections are fed raw bytes and yield plaintext, so
//! the same object can be pumped by the control plane during the handshake and then moved into an
//! engine worker with the session.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
pub use rustls::{ClientConfig, ServerConfig};
use rustls::{
    ClientConnection, DigitallySignedStruct, RootCertStore, ServerConnection, SignatureScheme,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("TLS: {0}")]
    Protocol(#[from] rustls::Error),
    #[error("TLS I/O: {0}")]
    Io(#[from] io::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Config(format!("cannot read certificates from {path}: {e}")))?
        .collect();
    let certs = certs.map_err(|e| TlsError::Config(format!("bad certificate in {path}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Config(format!("no certificate found in {path}")));
    }
    Ok(certs)
}

fn load_roots(path: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Config(format!("bad CA certificate in {path}: {e}")))?;
    }
    Ok(roots)
}

/// Server side (client leg): certificate chain and key; with `client_ca`, client certificates
/// signed by it are requested and verified (optional unless `require_client_cert`).
pub fn server_config(
    cert: &str,
    key: &str,
    client_ca: Option<&str>,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Config(format!("cannot read private key from {key}: {e}")))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?;
    let builder = match client_ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let mut v =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
            if !require_client_cert {
                v = v.allow_unauthenticated();
            }
            builder
                .with_client_cert_verifier(v.build().map_err(|e| TlsError::Config(e.to_string()))?)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::Protocol)?;
    // PostgreSQL's ALPN name (PostgreSQL 17): libpq offers it, and requires it to be chosen when
    // it starts TLS at once (`sslnegotiation=direct`). A client that offers ALPN without it is
    // refused in the handshake, as PostgreSQL refuses it; one that offers none is served.
    cfg.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(cfg))
}

/// The ALPN protocol name of PostgreSQL.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Client side (upstream leg). With a CA bundle the server's certificate and name are verified
/// (libpq's verify-full); without one (`verify = false`) only encryption is had (sslmode=require).
pub fn client_config(
    ca: Option<&str>,
    verify: bool,
    client_cert: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?;
    let builder = if verify {
        let ca =
            ca.ok_or_else(|| TlsError::Config("verify-full needs a CA bundle (tls.ca)".into()))?;
        builder.with_root_certificates(load_roots(ca)?)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    };
    let cfg = match client_cert {
        Some((cert, key)) => {
            let chain = load_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                TlsError::Config(format!("cannot read private key from {key}: {e}"))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(TlsError::Protocol)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// sslmode=require: encrypt without authenticating the server. Signatures are still checked so
/// the handshake is well-formed; only the chain of trust is skipped.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One TLS connection, either side, fed and drained sans-IO.
pub enum TlsLayer {
    Server(ServerConnection),
    Client(ClientConnection),
}

impl TlsLayer {
    /// The sendable-plaintext limit is lifted: callers encrypt one chunk and write the records out
    /// before the next, so what rustls buffers is bounded by a chunk, and a partial write would
    /// otherwise need a second pump.
    pub fn server(cfg: Arc<ServerConfig>) -> Result<Self, TlsError> {
        let mut c = ServerConnection::new(cfg)?;
        c.set_buffer_limit(None);
        Ok(TlsLayer::Server(c))
    }

    pub fn client(cfg: Arc<ClientConfig>, server_name: &str) -> Result<Self, TlsError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| TlsError::Config(format!("bad server name {server_name:?}: {e}")))?;
        let mut c = ClientConnection::new(cfg, name)?;
        c.set_buffer_limit(None);
        Ok(TlsLayer::Client(c))
    }

    pub fn is_handshaking(&self) -> bool {
        match self {
            TlsLayer::Server(c) => c.is_handshaking(),
            TlsLayer::Client(c) => c.is_handshaking(),
        }
    }

    /// Feeds raw bytes from the peer and appends the plaintext they carry to `plain`; returns
    /// whether the peer closed its TLS session (close_notify).
    ///
    /// rustls refuses more ciphertext once its received-plaintext buffer holds 16 KiB, so records
    /// are decrypted and drained one slice at a time rather than all fed first.
    pub fn receive_raw_into(
        &mut self,
        mut data: &[u8],
        plain: &mut Vec<u8>,
    ) -> Result<bool, TlsError> {
        let mut closed = false;
        loop {
            if !data.is_empty() {
                let n = match self {
                    TlsLayer::Server(c) => c.read_tls(&mut data)?,
                    TlsLayer::Client(c) => c.read_tls(&mut data)?,
                };
                let state = match self {
                    TlsLayer::Server(c) => c.process_new_packets(),
                    TlsLayer::Client(c) => c.process_new_packets(),
                };
                state?;
                if n == 0 {
                    return Err(TlsError::Config("TLS refused further input".into()));
                }
            }
            let (_, peer_closed) = self.read_plain(plain)?;
            closed |= peer_closed;
            if data.is_empty() || closed {
                return Ok(closed);
            }
        }
    }

    /// Appends decrypted bytes already received to `out`; returns how many, and whether the peer
    /// closed cleanly.
    pub fn read_plain(&mut self, out: &mut Vec<u8>) -> Result<(usize, bool), TlsError> {
        let start = out.len();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let r = match self {
                TlsLayer::Server(c) => c.reader().read(&mut chunk),
                TlsLayer::Client(c) => c.reader().read(&mut chunk),
            };
            match r {
                Ok(0) => return Ok((out.len() - start, true)),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((out.len() - start, false))
                }
                Err(e) => return Err(TlsError::Io(e)),
            }
        }
    }

    /// Encrypts plaintext; the records come out of `take_raw`.
    pub fn write_plain(&mut self, data: &[u8]) -> Result<(), TlsError> {
        match self {
            TlsLayer::Server(c) => c.writer().write_all(data)?,
            TlsLayer::Client(c) => c.writer().write_all(data)?,
        }
        Ok(())
    }

    /// Queues a close_notify alert.
    pub fn send_close_notify(&mut self) {
        match self {
            TlsLayer::Server(c) => c.send_close_notify(),
            TlsLayer::Client(c) => c.send_close_notify(),
        }
    }

    /// Appends raw bytes to send to the peer.
    pub fn take_raw(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        loop {
            let wants = match self {
                TlsLayer::Server(c) => c.wants_write(),
                TlsLayer::Client(c) => c.wants_write(),
            };
            if !wants {
                return Ok(());
            }
            match self {
                TlsLayer::Server(c) => c.write_tls(out)?,
                TlsLayer::Client(c) => c.write_tls(out)?,
            };
        }
    }

    /// DER certificates the peer presented (client certificates on the server side).
    pub fn peer_certificates(&self) -> Vec<Vec<u8>> {
        let certs = match self {
            TlsLayer::Server(c) => c.peer_certificates(),
            TlsLayer::Client(c) => c.peer_certificates(),
        };
        certs
            .map(|cs| cs.iter().map(|c| c.as_ref().to_vec()).collect())
            .unwrap_or_default()
    }

    /// The ALPN protocol the handshake chose, if any.
    pub fn alpn_protocol(&self) -> Option<Vec<u8>> {
        match self {
            TlsLayer::Server(c) => c.alpn_protocol().map(<[u8]>::to_vec),
            TlsLayer::Client(c) => c.alpn_protocol().map(<[u8]>::to_vec),
        }
    }

    /// Negotiated protocol version and cipher suite, for the audit trail.
    pub fn describe(&self) -> (String, String) {
        let (v, s) = match self {
            TlsLayer::Server(c) => (c.protocol_version(), c.negotiated_cipher_suite()),
            TlsLayer::Client(c) => (c.protocol_version(), c.negotiated_cipher_suite()),
        };
        (
            v.map(|v| format!("{v:?}")).unwrap_or_default(),
            s.map(|s| format!("{:?}", s.suite())).unwrap_or_default(),
        )
    }
}
