//! SCRAM-SHA-256 client (RFC 5802, RFC 7677) and the MD5 password hash, for authenticating the
//! gateway to an upstream with credentials only the gateway holds. Channel binding is not used
//! ("n,," GS2 header), which PostgreSQL accepts over TLS and plaintext alike.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};

use crate::WireError;

type HmacSha256 = Hmac<Sha256>;

pub const MECHANISM: &str = "SCRAM-SHA-256";
const MAX_ITERATIONS: u32 = 10_000_000;

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

fn auth_err(msg: impl Into<String>) -> WireError {
    WireError::Auth(msg.into())
}

/// Salted passwords (the PBKDF2 output, the expensive part of SCRAM) by password, salt and
/// iteration count. PostgreSQL keeps a role's salt until its password changes, so a gateway that
/// logs in to the same role over and over derives the key once. Bounded: it is emptied when full.
/// Entries are keyed by a SHA-256 digest, so the cache holds no password.
pub struct SaltedPasswordCache {
    map: std::sync::Mutex<std::collections::HashMap<[u8; 32], [u8; 32]>>,
    capacity: usize,
}

impl SaltedPasswordCache {
    pub fn new(capacity: usize) -> Self {
        SaltedPasswordCache {
            map: std::sync::Mutex::new(std::collections::HashMap::new()),
            capacity,
        }
    }

    fn key(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update((password.len() as u64).to_be_bytes());
        h.update(password);
        h.update(salt);
        h.update(iterations.to_be_bytes());
        h.finalize().into()
    }

    fn salted(&self, password: &[u8], salt: &[u8], iterations: u32) -> Result<[u8; 32], WireError> {
        let key = Self::key(password, salt, iterations);
        if let Some(v) = self.map.lock().ok().and_then(|m| m.get(&key).copied()) {
            return Ok(v);
        }
        let v = derive(password, salt, iterations)?;
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= self.capacity {
                m.clear();
            }
            m.insert(key, v);
        }
        Ok(v)
    }
}

fn derive(password: &[u8], salt: &[u8], iterations: u32) -> Result<[u8; 32], WireError> {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2::<HmacSha256>(password, salt, iterations, &mut salted)
        .map_err(|_| auth_err("SCRAM key derivation failed"))?;
    Ok(salted)
}

enum State {
    Initial,
    SentFirst { client_first_bare: String },
    SentFinal { server_signature: [u8; 32] },
    Done,
}

/// One SCRAM-SHA-256 exchange: `client_first`, then `server_first` (returns client-final),
/// then `server_final` (verifies the server's signature).
pub struct ScramClient {
    password: Vec<u8>,
    nonce: String,
    state: State,
    cache: Option<std::sync::Arc<SaltedPasswordCache>>,
}

impl ScramClient {
    pub fn new(password: &str) -> Result<Self, WireError> {
        let mut raw = [0u8; 18];
        getrandom::getrandom(&mut raw)
            .map_err(|e| auth_err(format!("no randomness for the nonce: {e}")))?;
        Ok(Self::with_nonce(password, &B64.encode(raw)))
    }

    /// Deterministic constructor for tests (RFC 7677 test vector).
    pub fn with_nonce(password: &str, nonce: &str) -> Self {
        ScramClient {
            password: password.as_bytes().to_vec(),
            nonce: nonce.to_owned(),
            state: State::Initial,
            cache: None,
        }
    }

    /// Uses (and fills) a cache of salted passwords.
    pub fn with_cache(mut self, cache: std::sync::Arc<SaltedPasswordCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    pub fn client_first(&mut self) -> Vec<u8> {
        // PostgreSQL ignores the SCRAM user name (it uses the startup user), so it is left empty.
        let bare = format!("n=,r={}", self.nonce);
        let msg = format!("n,,{bare}");
        self.state = State::SentFirst {
            client_first_bare: bare,
        };
        msg.into_bytes()
    }

    pub fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, WireError> {
        let State::SentFirst { client_first_bare } = &self.state else {
            return Err(auth_err("SCRAM server-first-message out of order"));
        };
        let server_first = std::str::from_utf8(data)
            .map_err(|_| auth_err("SCRAM server-first-message is not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in server_first.split(',') {
            if let Some(v) = part.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = part.strip_prefix("s=") {
                salt = Some(
                    B64.decode(v)
                        .map_err(|_| auth_err("SCRAM salt is not base64"))?,
                );
            } else if let Some(v) = part.strip_prefix("i=") {
                iterations = Some(
                    v.parse::<u32>()
                        .map_err(|_| auth_err("SCRAM iteration count is not a number"))?,
                );
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(auth_err("SCRAM server-first-message lacks r, s or i"));
        };
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(auth_err(
                "SCRAM server nonce does not extend the client nonce",
            ));
        }
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(auth_err(format!(
                "SCRAM iteration count {iterations} out of range"
            )));
        }
        let salted = match &self.cache {
            Some(cache) => cache.salted(&self.password, &salt, iterations)?,
            None => derive(&self.password, &salt, iterations)?,
        };
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(client_signature.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        let server_signature = hmac(&server_key, auth_message.as_bytes());
        self.state = State::SentFinal { server_signature };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    pub fn server_final(&mut self, data: &[u8]) -> Result<(), WireError> {
        let State::SentFinal { server_signature } = &self.state else {
            return Err(auth_err("SCRAM server-final-message out of order"));
        };
        let text = std::str::from_utf8(data)
            .map_err(|_| auth_err("SCRAM server-final-message is not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(auth_err(format!("upstream rejected SCRAM: {e}")));
        }
        let v = text
            .split(',')
            .find_map(|p| p.strip_prefix("v="))
            .ok_or_else(|| auth_err("SCRAM server-final-message lacks a verifier"))?;
        let got = B64
            .decode(v)
            .map_err(|_| auth_err("SCRAM verifier is not base64"))?;
        if got.as_slice() != server_signature.as_slice() {
            return Err(auth_err(
                "upstream's SCRAM signature is wrong (server does not know the password)",
            ));
        }
        self.state = State::Done;
        Ok(())
    }
}

/// The PasswordMessage payload for AuthenticationMD5Password: "md5" + md5(md5(password + user) + salt).
pub fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = Md5::digest([password.as_bytes(), user.as_bytes()].concat());
    let inner_hex = hex(&inner);
    let outer = Md5::digest([inner_hex.as_bytes(), &salt[..]].concat());
    format!("md5{}", hex(&outer))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7677_vector() {
        // RFC 7677 section 3, with the user name left out of client-first as PostgreSQL does.
        let mut c = ScramClient::with_nonce("pencil", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(c.client_first(), b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let fin = c.server_first(server_first).unwrap();
        let fin = String::from_utf8(fin).unwrap();
        assert!(fin.starts_with("c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p="));
        // A wrong server signature is refused.
        assert!(c.server_final(b"v=AAAA").is_err());
    }

    #[test]
    fn cache_gives_the_same_proof() {
        let server_first = b"r=abcdef,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let mut plain = ScramClient::with_nonce("pencil", "abc");
        plain.client_first();
        let expected = plain.server_first(server_first).unwrap();
        let cache = std::sync::Arc::new(SaltedPasswordCache::new(2));
        for _ in 0..3 {
            let mut c = ScramClient::with_nonce("pencil", "abc").with_cache(cache.clone());
            c.client_first();
            assert_eq!(c.server_first(server_first).unwrap(), expected);
        }
        let mut other = ScramClient::with_nonce("other", "abc").with_cache(cache.clone());
        other.client_first();
        assert_ne!(other.server_first(server_first).unwrap(), expected);
    }

    #[test]
    fn nonce_must_extend_ours() {
        let mut c = ScramClient::with_nonce("pw", "abc");
        c.client_first();
        assert!(c.server_first(b"r=xyz123,s=AAAA,i=4096").is_err());
        let mut c = ScramClient::with_nonce("pw", "abc");
        c.client_first();
        assert!(c.server_first(b"r=abc,s=AAAA,i=4096").is_err());
    }

    #[test]
    fn iteration_bounds() {
        let mut c = ScramClient::with_nonce("pw", "abc");
        c.client_first();
        assert!(c.server_first(b"r=abcd,s=AAAA,i=0").is_err());
    }

    #[test]
    fn md5_known_value() {
        // md5(md5("secret" + "alice") + salt), computed with PostgreSQL's algorithm.
        let got = md5_password("alice", "secret", [1, 2, 3, 4]);
        assert_eq!(got.len(), 35);
        assert!(got.starts_with("md5"));
        assert_ne!(got, md5_password("alice", "secret", [1, 2, 3, 5]));
    }
}
