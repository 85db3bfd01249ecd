//! The two startup machines, both fed plaintext (TLS is a layer below them).
//!
//! `ClientHandshake` faces a connecting client: it decodes the untyped startup packets and then the
//! client's PasswordMessage, surfacing each as a `ClientEvent` for the control plane to decide on.
//! `UpstreamHandshake` faces the real server: it sends the StartupMessage and answers cleartext,
//! MD5 and SCRAM-SHA-256 requests with the gateway's own credentials, collecting ParameterStatus
//! and BackendKeyData until ReadyForQuery. Neither buffers more than `Limits` allows.

use super::backend::{self, tag as btag, Authentication, ErrorFields};
use super::codec::split_message;
use super::frontend::{self, tag as ftag};
use super::scram::{self, ScramClient};
use super::startup::{self, StartupPacket};
use crate::{Limits, WireError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    SslRequest,
    GssEncRequest,
    CancelRequest {
        process_id: i32,
        secret_key: i32,
    },
    /// The client's parameters without protocol options (`_pq_.*`), and a NegotiateProtocolVersion
    /// to send before anything else when the client asked for more than protocol 3.0 (a newer
    /// minor version or protocol options), as PostgreSQL does; empty when there is nothing to
    /// negotiate.
    Startup {
        params: Vec<(String, String)>,
        negotiate: Vec<u8>,
    },
    Password(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientPhase {
    Startup,
    Password,
    Done,
}

/// Room for a password that is a 16 KiB identity token, whatever `max_startup` says.
pub const MIN_PASSWORD_MESSAGE: usize = 16 * 1024 + 64;

pub struct ClientHandshake {
    buf: Vec<u8>,
    phase: ClientPhase,
    limits: Limits,
}

impl ClientHandshake {
    pub fn new(limits: Limits) -> Self {
        ClientHandshake {
            buf: Vec::new(),
            phase: ClientPhase::Startup,
            limits,
        }
    }

    /// The largest PasswordMessage accepted: `max_startup`, but at least room for a 16 KiB token
    /// (the size identity tokens are held to) and its terminator.
    fn max_password(&self) -> usize {
        self.limits.max_startup.max(MIN_PASSWORD_MESSAGE)
    }

    /// Appends bytes from the client. Refuses to buffer more than one bounded message's worth.
    pub fn receive_data(&mut self, data: &[u8]) -> Result<(), WireError> {
        let bound = self.max_password() + 5;
        if self.buf.len() + data.len() > bound {
            return Err(WireError::TooLarge {
                what: "startup-phase input",
                length: self.buf.len() + data.len(),
                limit: bound,
            });
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Bytes the client sent after the handshake ended (pipelined queries); the relay takes them.
    pub fn take_remaining(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// After StartupMessage, the gateway asks for a password and the next message must be one.
    pub fn expect_password(&mut self) {
        self.phase = ClientPhase::Password;
    }

    pub fn next_event(&mut self) -> Result<Option<ClientEvent>, WireError> {
        match self.phase {
            ClientPhase::Startup => {
                let Some((packet, used)) = startup::decode(&self.buf, &self.limits)? else {
                    return Ok(None);
                };
                self.buf.drain(..used);
                Ok(Some(match packet {
                    StartupPacket::SslRequest | StartupPacket::GssEncRequest
                        if !self.buf.is_empty() =>
                    {
                        // Bytes after an encryption request, before the answer, would be read as if
                        // they had been protected (CVE-2021-23214): refuse.
                        return Err(WireError::malformed(
                            "SSLRequest",
                            "data received after an encryption request before its answer",
                        ));
                    }
                    StartupPacket::SslRequest => ClientEvent::SslRequest,
                    StartupPacket::GssEncRequest => ClientEvent::GssEncRequest,
                    StartupPacket::CancelRequest {
                        process_id,
                        secret_key,
                    } => {
                        self.phase = ClientPhase::Done;
                        ClientEvent::CancelRequest {
                            process_id,
                            secret_key,
                        }
                    }
                    StartupPacket::StartupMessage {
                        minor_version,
                        params,
                    } => {
                        let (options, params): (Vec<_>, Vec<_>) = params
                            .into_iter()
                            .partition(|(k, _)| k.starts_with("_pq_."));
                        let negotiate = if minor_version > 0 || !options.is_empty() {
                            let names: Vec<&str> =
                                options.iter().map(|(k, _)| k.as_str()).collect();
                            backend::negotiate_protocol_version(0, &names)
                        } else {
                            Vec::new()
                        };
                        ClientEvent::Startup { params, negotiate }
                    }
                }))
            }
            ClientPhase::Password => {
                let Some((tag, body, used)) = split_message(&self.buf, self.max_password())? else {
                    return Ok(None);
                };
                if tag != ftag::PASSWORD {
                    return Err(WireError::Unexpected {
                        tag: tag as char,
                        phase: "authentication",
                    });
                }
                let pw = frontend::decode_password(body)?;
                self.buf.drain(..used);
                self.phase = ClientPhase::Done;
                Ok(Some(ClientEvent::Password(pw)))
            }
            ClientPhase::Done => Ok(None),
        }
    }
}

/// What the upstream machine wants next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamStep {
    /// Feed more bytes from the upstream.
    NeedData,
    /// Write these bytes to the upstream, then call `step` again.
    Send(Vec<u8>),
    /// The session is established.
    Ready(UpstreamReady),
    /// The upstream refused (bad credentials, unknown database, too many connections ...).
    Failed(ErrorFields),
    /// The SCRAM salted password must be derived (PBKDF2: up to a second of CPU for a server that
    /// asks for many iterations): call `derive` (off the event loop), then `step` again.
    Derive,
}

/// The upstream authentication methods a login may use (libpq's `require_auth`): `None` is a
/// server that lets the login in without asking for a password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    None,
    Password,
    Md5,
    ScramSha256,
}

impl AuthMethod {
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            AuthMethod::None,
            AuthMethod::Password,
            AuthMethod::Md5,
            AuthMethod::ScramSha256,
        ]
        .into_iter()
        .find(|m| m.name() == name)
    }
}

/// What the upstream may have the gateway hold before ReadyForQuery: its NoticeResponses and
/// ParameterStatus messages together (they are passed on to the client).
pub const STARTUP_HELD_LIMIT: usize = 1 << 20;
pub use super::backend::MAX_PARAMETER_STATUS;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamReady {
    pub params: Vec<(String, String)>,
    pub process_id: i32,
    pub secret_key: i32,
    pub transaction_status: u8,
    /// NoticeResponse messages received during startup, to pass on to the client as they are.
    pub notices: Vec<Vec<u8>>,
}

pub struct UpstreamHandshake {
    user: String,
    password: String,
    buf: Vec<u8>,
    scram: Option<ScramClient>,
    cache: Option<std::sync::Arc<scram::SaltedPasswordCache>>,
    authenticated: bool,
    ready: UpstreamReady,
    limits: Limits,
    /// Methods the login may use; empty: any.
    require_auth: Vec<AuthMethod>,
    /// The method the gateway answered with; a second request after it is refused.
    answered: Option<AuthMethod>,
    /// A SCRAM server-first message waiting for `derive`, then the reply to send.
    pending_first: Option<Vec<u8>>,
    pending_send: Option<Vec<u8>>,
    /// Bytes of notices and parameters held so far (bounded by STARTUP_HELD_LIMIT).
    held: usize,
}

impl UpstreamHandshake {
    /// Returns the machine and the StartupMessage to send first.
    pub fn new(
        params: Vec<(String, String)>,
        password: &str,
        limits: Limits,
    ) -> Result<(Self, Vec<u8>), WireError> {
        let user = params
            .iter()
            .find(|(k, _)| k == "user")
            .map(|(_, v)| v.clone())
            .ok_or(WireError::NoUser)?;
        let first = startup::encode(&StartupPacket::StartupMessage {
            minor_version: 0,
            params,
        });
        let m = UpstreamHandshake {
            user,
            password: password.to_owned(),
            buf: Vec::new(),
            scram: None,
            cache: None,
            authenticated: false,
            ready: UpstreamReady {
                params: Vec::new(),
                process_id: 0,
                secret_key: 0,
                transaction_status: b'I',
                notices: Vec::new(),
            },
            limits,
            require_auth: Vec::new(),
            answered: None,
            pending_first: None,
            pending_send: None,
            held: 0,
        };
        Ok((m, first))
    }

    /// Restricts the methods the upstream may ask for (empty: any).
    pub fn with_require_auth(mut self, methods: Vec<AuthMethod>) -> Self {
        self.require_auth = methods;
        self
    }

    fn allow(&mut self, method: AuthMethod) -> Result<(), WireError> {
        if let Some(done) = self.answered {
            return Err(WireError::Auth(format!(
                "upstream asked for {} authentication after the gateway had answered its {} \
                 request",
                method.name(),
                done.name()
            )));
        }
        if !self.require_auth.is_empty() && !self.require_auth.contains(&method) {
            let allowed: Vec<&str> = self.require_auth.iter().map(|m| m.name()).collect();
            return Err(WireError::Auth(format!(
                "upstream asked for {} authentication; require_auth allows only {}",
                method.name(),
                allowed.join(", ")
            )));
        }
        if method != AuthMethod::None {
            self.answered = Some(method);
        }
        Ok(())
    }

    fn hold(&mut self, bytes: usize) -> Result<(), WireError> {
        self.held += bytes;
        if self.held > STARTUP_HELD_LIMIT {
            return Err(WireError::TooLarge {
                what: "notices and parameters sent by the upstream during login",
                length: self.held,
                limit: STARTUP_HELD_LIMIT,
            });
        }
        Ok(())
    }

    /// Derives the SCRAM salted password for the pending server-first message (the costly step;
    /// no shared state but the salted-password cache).
    pub fn derive(&mut self) -> Result<(), WireError> {
        let Some(data) = self.pending_first.take() else {
            return Ok(());
        };
        let c = self
            .scram
            .as_mut()
            .ok_or_else(|| WireError::Auth("SASLContinue without SASL".into()))?;
        self.pending_send = Some(frontend::sasl_response(&c.server_first(&data)?));
        Ok(())
    }

    /// Shares a cache of SCRAM salted passwords across logins.
    pub fn with_scram_cache(mut self, cache: std::sync::Arc<scram::SaltedPasswordCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    pub fn receive_data(&mut self, data: &[u8]) -> Result<(), WireError> {
        let bound = self.limits.max_message.min(1 << 20) + 5;
        if self.buf.len() + data.len() > bound {
            return Err(WireError::TooLarge {
                what: "upstream startup input",
                length: self.buf.len() + data.len(),
                limit: bound,
            });
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Bytes after ReadyForQuery (there should be none; they are handed to the relay).
    pub fn take_remaining(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    pub fn step(&mut self) -> Result<UpstreamStep, WireError> {
        if self.pending_first.is_some() {
            return Ok(UpstreamStep::Derive);
        }
        if let Some(reply) = self.pending_send.take() {
            return Ok(UpstreamStep::Send(reply));
        }
        loop {
            let Some((tag, body, used)) = split_message(&self.buf, 1 << 20)? else {
                return Ok(UpstreamStep::NeedData);
            };
            let body = body.to_vec();
            self.buf.drain(..used);
            match tag {
                btag::AUTHENTICATION => {
                    if self.authenticated {
                        // libpq refuses this too: a server that accepted the login and then asks
                        // again (for the cleartext password, say) is not one to answer.
                        return Err(WireError::Auth(
                            "upstream asked for authentication after accepting the login".into(),
                        ));
                    }
                    if let Some(reply) = self.on_auth(Authentication::decode(&body)?)? {
                        return Ok(UpstreamStep::Send(reply));
                    }
                    if self.pending_first.is_some() {
                        return Ok(UpstreamStep::Derive);
                    }
                }
                btag::ERROR_RESPONSE => {
                    return Ok(UpstreamStep::Failed(ErrorFields::decode(&body)?))
                }
                btag::NOTICE_RESPONSE => {
                    self.hold(body.len() + 5)?;
                    let mut raw = vec![tag];
                    raw.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
                    raw.extend_from_slice(&body);
                    self.ready.notices.push(raw);
                }
                btag::PARAMETER_STATUS if self.authenticated => {
                    if body.len() > MAX_PARAMETER_STATUS {
                        return Err(WireError::TooLarge {
                            what: "ParameterStatus",
                            length: body.len(),
                            limit: MAX_PARAMETER_STATUS,
                        });
                    }
                    self.hold(body.len() + 5)?;
                    self.ready
                        .params
                        .push(backend::decode_parameter_status(&body)?)
                }
                btag::BACKEND_KEY_DATA if self.authenticated => {
                    let (pid, key) = backend::decode_backend_key_data(&body)?;
                    self.ready.process_id = pid;
                    self.ready.secret_key = key;
                }
                btag::NEGOTIATE_PROTOCOL_VERSION => {
                    // The server lacks some protocol option we asked for; we ask for none, so the
                    // minor version it names is all that changes. Carry on.
                }
                btag::READY_FOR_QUERY if self.authenticated => {
                    self.ready.transaction_status = backend::decode_ready_for_query(&body)?;
                    return Ok(UpstreamStep::Ready(self.ready.clone()));
                }
                other => {
                    return Err(WireError::Unexpected {
                        tag: other as char,
                        phase: "upstream startup",
                    })
                }
            }
        }
    }

    fn on_auth(&mut self, auth: Authentication) -> Result<Option<Vec<u8>>, WireError> {
        match auth {
            Authentication::Ok => {
                if self.scram.is_some() {
                    return Err(WireError::Auth(
                        "upstream skipped the SCRAM final message".into(),
                    ));
                }
                if self.answered.is_none() {
                    self.allow(AuthMethod::None)?;
                }
                self.authenticated = true;
                Ok(None)
            }
            Authentication::CleartextPassword => {
                self.allow(AuthMethod::Password)?;
                Ok(Some(frontend::password(self.password.as_bytes())))
            }
            Authentication::Md5Password { salt } => {
                self.allow(AuthMethod::Md5)?;
                Ok(Some(frontend::password(
                    scram::md5_password(&self.user, &self.password, salt).as_bytes(),
                )))
            }
            Authentication::Sasl { mechanisms } => {
                self.allow(AuthMethod::ScramSha256)?;
                if !mechanisms.iter().any(|m| m == scram::MECHANISM) {
                    return Err(WireError::Auth(format!(
                        "upstream offers only {mechanisms:?}; SCRAM-SHA-256 is supported"
                    )));
                }
                let mut c = ScramClient::new(&self.password)?;
                if let Some(cache) = &self.cache {
                    c = c.with_cache(cache.clone());
                }
                let first = c.client_first();
                self.scram = Some(c);
                Ok(Some(frontend::sasl_initial_response(
                    scram::MECHANISM,
                    &first,
                )))
            }
            Authentication::SaslContinue { data } => {
                if self.scram.is_none() {
                    return Err(WireError::Auth("SASLContinue without SASL".into()));
                }
                // Derived by `derive`, off the caller's event loop.
                self.pending_first = Some(data);
                Ok(None)
            }
            Authentication::SaslFinal { data } => {
                let mut c = self
                    .scram
                    .take()
                    .ok_or_else(|| WireError::Auth("SASLFinal without SASL".into()))?;
                c.server_final(&data)?;
                // AuthenticationOk follows; mark SCRAM as finished so Ok is accepted.
                self.scram = None;
                Ok(None)
            }
            Authentication::Unsupported { code } => Err(WireError::Auth(format!(
                "upstream asks for authentication method {code}, which the gateway does not speak"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::backend::ready_for_query;

    fn startup_bytes(params: &[(&str, &str)]) -> Vec<u8> {
        startup::encode(&StartupPacket::StartupMessage {
            minor_version: 0,
            params: params
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        })
    }

    #[test]
    fn client_startup_then_password_byte_by_byte() {
        let mut all = startup_bytes(&[("user", "ci"), ("database", "app")]);
        let mut h = ClientHandshake::new(Limits::default());
        let pw = frontend::password(b"tok");
        let mut events = Vec::new();
        for b in all.drain(..) {
            h.receive_data(&[b]).unwrap();
            while let Some(e) = h.next_event().unwrap() {
                events.push(e);
                h.expect_password();
            }
        }
        for b in pw {
            h.receive_data(&[b]).unwrap();
            while let Some(e) = h.next_event().unwrap() {
                events.push(e);
            }
        }
        assert_eq!(events.len(), 2);
        assert!(
            matches!(&events[0], ClientEvent::Startup { params, negotiate } if params[0] == ("user".into(), "ci".into()) && negotiate.is_empty())
        );
        assert_eq!(events[1], ClientEvent::Password(b"tok".to_vec()));
    }

    #[test]
    fn a_newer_minor_version_and_protocol_options_are_negotiated_down_to_3_0() {
        for (minor, params, unrecognized) in [
            (2u16, vec![("user", "ci")], vec![]),
            (
                0,
                vec![("user", "ci"), ("_pq_.compression", "on")],
                vec!["_pq_.compression"],
            ),
            (
                9999,
                vec![("_pq_.a", "1"), ("user", "ci"), ("_pq_.b", "2")],
                vec!["_pq_.a", "_pq_.b"],
            ),
        ] {
            let mut h = ClientHandshake::new(Limits::default());
            h.receive_data(&startup::encode(&StartupPacket::StartupMessage {
                minor_version: minor,
                params: params
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            }))
            .unwrap();
            let Some(ClientEvent::Startup { params, negotiate }) = h.next_event().unwrap() else {
                panic!("no startup event")
            };
            assert_eq!(params, vec![("user".to_string(), "ci".to_string())]);
            assert_eq!(
                negotiate,
                backend::negotiate_protocol_version(0, &unrecognized)
            );
            // 'v', length, the version (3.0, whole as PostgreSQL sends it), the count, the names.
            assert_eq!(negotiate[0], b'v');
            assert_eq!(&negotiate[5..9], &[0, 3, 0, 0]);
            assert_eq!(
                i32::from_be_bytes(negotiate[9..13].try_into().unwrap()) as usize,
                unrecognized.len()
            );
        }
    }

    #[test]
    fn ssl_request_with_trailing_data_is_refused() {
        let mut h = ClientHandshake::new(Limits::default());
        let mut data = startup::encode(&StartupPacket::SslRequest);
        data.extend_from_slice(b"Qxxxx");
        h.receive_data(&data).unwrap();
        assert!(h.next_event().is_err());
    }

    #[test]
    fn huge_startup_length_is_refused_before_buffering() {
        let mut h = ClientHandshake::new(Limits::default());
        h.receive_data(&0x7fff_ffffu32.to_be_bytes()).unwrap();
        assert!(matches!(h.next_event(), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn upstream_cleartext_and_ready() {
        let (mut u, first) =
            UpstreamHandshake::new(vec![("user".into(), "app".into())], "pw", Limits::default())
                .unwrap();
        assert_eq!(&first[4..8], &startup::PROTOCOL_3_0.to_be_bytes());
        u.receive_data(&Authentication::CleartextPassword.encode())
            .unwrap();
        assert_eq!(
            u.step().unwrap(),
            UpstreamStep::Send(frontend::password(b"pw"))
        );
        let mut rest = Authentication::Ok.encode();
        rest.extend(backend::parameter_status("server_version", "15.0"));
        rest.extend(backend::backend_key_data(42, 7));
        rest.extend(ready_for_query(b'I'));
        u.receive_data(&rest).unwrap();
        match u.step().unwrap() {
            UpstreamStep::Ready(r) => {
                assert_eq!(r.process_id, 42);
                assert_eq!(r.params, vec![("server_version".into(), "15.0".into())]);
            }
            other => panic!("{other:?}"),
        }
    }

    fn upstream(require: &[AuthMethod]) -> UpstreamHandshake {
        let (u, _) =
            UpstreamHandshake::new(vec![("user".into(), "app".into())], "pw", Limits::default())
                .unwrap();
        u.with_require_auth(require.to_vec())
    }

    fn auth_error(u: &mut UpstreamHandshake) -> String {
        match u.step() {
            Err(WireError::Auth(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn upstream_asking_again_after_the_login_is_refused() {
        // Authentication OK, then a request for the cleartext password: libpq refuses it too.
        let mut u = upstream(&[]);
        let mut input = Authentication::Ok.encode();
        input.extend(Authentication::CleartextPassword.encode());
        u.receive_data(&input).unwrap();
        assert!(auth_error(&mut u).contains("after accepting the login"));
        // A second method after the first was answered.
        let mut u = upstream(&[]);
        u.receive_data(&Authentication::Md5Password { salt: [1, 2, 3, 4] }.encode())
            .unwrap();
        assert!(matches!(u.step().unwrap(), UpstreamStep::Send(_)));
        u.receive_data(&Authentication::CleartextPassword.encode())
            .unwrap();
        assert!(auth_error(&mut u).contains("after the gateway had answered its md5 request"));
        // A second SCRAM exchange.
        let mut u = upstream(&[]);
        let sasl = Authentication::Sasl {
            mechanisms: vec![scram::MECHANISM.into()],
        }
        .encode();
        u.receive_data(&sasl).unwrap();
        assert!(matches!(u.step().unwrap(), UpstreamStep::Send(_)));
        u.receive_data(&sasl).unwrap();
        assert!(auth_error(&mut u).contains("scram-sha-256 authentication after"));
    }

    #[test]
    fn require_auth_limits_the_methods() {
        let mut u = upstream(&[AuthMethod::ScramSha256]);
        u.receive_data(&Authentication::Ok.encode()).unwrap();
        assert_eq!(
            auth_error(&mut u),
            "upstream asked for none authentication; require_auth allows only scram-sha-256"
        );
        let mut u = upstream(&[AuthMethod::ScramSha256]);
        u.receive_data(&Authentication::CleartextPassword.encode())
            .unwrap();
        assert!(auth_error(&mut u).contains("asked for password authentication"));
        let mut u = upstream(&[AuthMethod::ScramSha256, AuthMethod::Md5]);
        u.receive_data(&Authentication::Md5Password { salt: [0; 4] }.encode())
            .unwrap();
        assert!(matches!(u.step().unwrap(), UpstreamStep::Send(_)));
        let mut u = upstream(&[AuthMethod::None]);
        let mut rest = Authentication::Ok.encode();
        rest.extend(backend::backend_key_data(1, 2));
        rest.extend(ready_for_query(b'I'));
        u.receive_data(&rest).unwrap();
        assert!(matches!(u.step().unwrap(), UpstreamStep::Ready(_)));
        for name in ["none", "password", "md5", "scram-sha-256"] {
            assert_eq!(AuthMethod::parse(name).unwrap().name(), name);
        }
        assert_eq!(AuthMethod::parse("gss"), None);
    }

    /// Starts SCRAM and answers the client's first message with a server-first built from its
    /// nonce by `first` (nothing is derived yet).
    fn scram_to_server_first(first: impl Fn(&str) -> String) -> UpstreamHandshake {
        let mut u = upstream(&[]);
        u.receive_data(
            &Authentication::Sasl {
                mechanisms: vec![scram::MECHANISM.into()],
            }
            .encode(),
        )
        .unwrap();
        let UpstreamStep::Send(initial) = u.step().unwrap() else {
            panic!()
        };
        let text = String::from_utf8_lossy(&initial).into_owned();
        let nonce = text.split("r=").nth(1).unwrap().to_owned();
        u.receive_data(
            &Authentication::SaslContinue {
                data: first(&nonce).into_bytes(),
            }
            .encode(),
        )
        .unwrap();
        u
    }

    #[test]
    fn scram_derivation_is_a_step_of_its_own() {
        let mut u = scram_to_server_first(|nonce| format!("r={nonce}srv,s=c2FsdA==,i=4096"));
        // Nothing is computed in step(): it asks for derive(), and repeats until it is done.
        assert_eq!(u.step().unwrap(), UpstreamStep::Derive);
        assert_eq!(u.step().unwrap(), UpstreamStep::Derive);
        u.derive().unwrap();
        let UpstreamStep::Send(reply) = u.step().unwrap() else {
            panic!()
        };
        assert!(String::from_utf8_lossy(&reply).contains(",p="));
        assert_eq!(u.step().unwrap(), UpstreamStep::NeedData);
        // A server-first that does not extend our nonce fails in derive().
        let mut u = scram_to_server_first(|_| "r=other,s=c2FsdA==,i=4096".into());
        assert_eq!(u.step().unwrap(), UpstreamStep::Derive);
        assert!(u.derive().is_err());
    }

    #[test]
    fn what_the_upstream_has_held_during_login_is_bounded() {
        let mut u = upstream(&[]);
        let notice = ErrorFields::new("NOTICE", "00000", &"n".repeat(60_000)).encode_notice();
        let mut refused = false;
        for _ in 0..40 {
            if u.receive_data(&notice).is_err() {
                break;
            }
            match u.step() {
                Ok(UpstreamStep::NeedData) => {}
                Err(WireError::TooLarge { what, .. }) => {
                    assert!(what.contains("during login"));
                    refused = true;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(refused);
        let mut u = upstream(&[]);
        let mut input = Authentication::Ok.encode();
        input.extend(backend::parameter_status(
            "x",
            &"v".repeat(MAX_PARAMETER_STATUS),
        ));
        u.receive_data(&input).unwrap();
        assert!(matches!(
            u.step(),
            Err(WireError::TooLarge {
                what: "ParameterStatus",
                ..
            })
        ));
    }

    #[test]
    fn upstream_error_is_reported() {
        let (mut u, _) =
            UpstreamHandshake::new(vec![("user".into(), "app".into())], "pw", Limits::default())
                .unwrap();
        u.receive_data(&backend::error_response(
            "FATAL",
            "3D000",
            "database \"x\" does not exist",
        ))
        .unwrap();
        match u.step().unwrap() {
            UpstreamStep::Failed(e) => assert_eq!(e.code(), Some("3D000")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn upstream_ready_before_auth_is_refused() {
        let (mut u, _) =
            UpstreamHandshake::new(vec![("user".into(), "app".into())], "pw", Limits::default())
                .unwrap();
        u.receive_data(&ready_for_query(b'I')).unwrap();
        assert!(u.step().is_err());
    }
}
