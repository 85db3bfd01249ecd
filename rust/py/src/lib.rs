//! `ostiary._core`: the only PyO3 code in Ostiary.
//!
//! Rules of this file: it converts, it does not decide. Each class wraps one machine of
//! `ostiary-wire` or the `ostiary-proxy` engine; events cross as plain tuples (tag first) so the
//! Python side needs no wrapper objects on its paths; every Rust error becomes one of the exceptions
//! created below through `err()`. Nothing here is called per message of an established session.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use ostiary_mask::{MaskSet as RsMaskSet, Outcome, RuleSpec, Strategy};

use ostiary_proxy::engine::{
    AuditSpec, Command, Engine as RsEngine, EngineConfig, Event, RecordSpec, SessionSpec,
};
use ostiary_proxy::tls::{self, TlsLayer};
use ostiary_wire::pg::backend::{self, Authentication, ErrorFields};
use ostiary_wire::pg::handshake::{self, ClientEvent, UpstreamStep};
use ostiary_wire::pg::masking::{MaskPlan, Masker};
use ostiary_wire::pg::query::{QueryOutcome, SimpleQuery as RsSimpleQuery};
use ostiary_wire::pg::relay::{BackendEvent, Gate, Remember, Verdict};
use ostiary_wire::pg::scram::SaltedPasswordCache;
use ostiary_wire::pg::startup::{self, StartupPacket};
use ostiary_wire::{Limits, WireError};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

create_exception!(
    _core,
    CoreError,
    PyException,
    "Base class of errors raised by the Rust core."
);
create_exception!(
    _core,
    ProtocolError,
    CoreError,
    "A peer broke the wire protocol (SQLSTATE 08P01)."
);
create_exception!(
    _core,
    StartupRefused,
    ProtocolError,
    "A StartupMessage PostgreSQL refuses with a SQLSTATE of its own; args: (sqlstate, message, protocol_2)."
);
create_exception!(
    _core,
    UpstreamAuthError,
    CoreError,
    "The gateway could not authenticate to the upstream."
);
create_exception!(
    _core,
    TlsError,
    CoreError,
    "TLS configuration or handshake failure."
);
create_exception!(
    _core,
    MaskError,
    CoreError,
    "A masking rule cannot be compiled."
);
create_exception!(
    _core,
    SqlError,
    CoreError,
    "A statement could not be analysed (it does not parse)."
);

fn wire_err(e: WireError) -> PyErr {
    match e {
        WireError::Auth(m) => UpstreamAuthError::new_err(m),
        e @ (WireError::UnsupportedVersion { .. } | WireError::NoUser) => {
            // A client of protocol 2 reads errors in that protocol's format; PostgreSQL answers so.
            let old = matches!(e, WireError::UnsupportedVersion { major, .. } if major < 3);
            StartupRefused::new_err((e.sqlstate(), e.to_string(), old))
        }
        other => ProtocolError::new_err(other.to_string()),
    }
}

fn tls_err(e: tls::TlsError) -> PyErr {
    TlsError::new_err(e.to_string())
}

fn limits(max_startup: usize, max_message: usize, max_statement: usize) -> Limits {
    Limits {
        max_startup,
        max_message,
        max_statement,
    }
}

fn bytes<'py>(py: Python<'py>, b: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, b)
}

/// The client-facing startup machine (see ostiary_wire::pg::handshake::ClientHandshake).
#[pyclass(module = "ostiary._core")]
struct ClientHandshake {
    inner: handshake::ClientHandshake,
}

#[pymethods]
impl ClientHandshake {
    #[new]
    #[pyo3(signature = (max_startup = 10_000))]
    fn new(max_startup: usize) -> Self {
        ClientHandshake {
            inner: handshake::ClientHandshake::new(Limits {
                max_startup,
                ..Limits::default()
            }),
        }
    }

    fn receive_data(&mut self, data: &[u8]) -> PyResult<()> {
        self.inner.receive_data(data).map_err(wire_err)
    }

    fn expect_password(&mut self) {
        self.inner.expect_password()
    }

    /// Bytes after the handshake (the relay takes them).
    fn take_remaining<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.take_remaining())
    }

    /// ("ssl_request",) | ("gssenc_request",) | ("cancel_request", pid, key) |
    /// ("startup", [(name, value), ...], negotiate: bytes) | ("password", bytes) | None when more
    /// data is needed. `negotiate` is a NegotiateProtocolVersion to send first, or empty.
    fn next_event<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let ev = self.inner.next_event().map_err(wire_err)?;
        Ok(match ev {
            None => None,
            Some(ClientEvent::SslRequest) => Some(PyTuple::new(py, ["ssl_request"])?),
            Some(ClientEvent::GssEncRequest) => Some(PyTuple::new(py, ["gssenc_request"])?),
            Some(ClientEvent::CancelRequest {
                process_id,
                secret_key,
            }) => Some(("cancel_request", process_id, secret_key).into_pyobject(py)?),
            Some(ClientEvent::Startup { params, negotiate }) => {
                Some(("startup", params, bytes(py, &negotiate)).into_pyobject(py)?)
            }
            Some(ClientEvent::Password(pw)) => {
                Some(("password", bytes(py, &pw)).into_pyobject(py)?)
            }
        })
    }
}

/// Salted passwords shared by every upstream login of this process (see SaltedPasswordCache).
static SCRAM_CACHE: std::sync::LazyLock<Arc<SaltedPasswordCache>> =
    std::sync::LazyLock::new(|| Arc::new(SaltedPasswordCache::new(1024)));

/// The upstream startup machine: call `start()` for the StartupMessage, then loop on `step()`.
#[pyclass(module = "ostiary._core")]
struct UpstreamHandshake {
    inner: handshake::UpstreamHandshake,
    first: Option<Vec<u8>>,
}

#[pymethods]
impl UpstreamHandshake {
    /// `require_auth`: the methods the upstream may ask for ("none", "password", "md5",
    /// "scram-sha-256"); empty: any.
    #[new]
    #[pyo3(signature = (params, password, require_auth = Vec::new()))]
    fn new(
        params: Vec<(String, String)>,
        password: String,
        require_auth: Vec<String>,
    ) -> PyResult<Self> {
        let methods = require_auth
            .iter()
            .map(|m| {
                handshake::AuthMethod::parse(m).ok_or_else(|| {
                    pyo3::exceptions::PyValueError::new_err(format!(
                        "unknown authentication method {m:?}"
                    ))
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let (inner, first) =
            handshake::UpstreamHandshake::new(params, &password, Limits::default())
                .map_err(wire_err)?;
        let inner = inner
            .with_scram_cache(SCRAM_CACHE.clone())
            .with_require_auth(methods);
        Ok(UpstreamHandshake {
            inner,
            first: Some(first),
        })
    }

    fn start<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.first.take().unwrap_or_default())
    }

    fn receive_data(&mut self, data: &[u8]) -> PyResult<()> {
        self.inner.receive_data(data).map_err(wire_err)
    }

    fn take_remaining<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.take_remaining())
    }

    /// The SCRAM key derivation `step` asked for with ("derive",); releases the GIL (call it
    /// from a worker thread: it can take a second).
    fn derive(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        py.allow_threads(|| inner.derive()).map_err(wire_err)
    }

    /// ("need_data",) | ("send", bytes) | ("derive",) | ("failed", {field: value}) |
    /// ("ready", [(name, value)], process_id, secret_key, status, [notice bytes]).
    fn step<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        Ok(match self.inner.step().map_err(wire_err)? {
            UpstreamStep::NeedData => PyTuple::new(py, ["need_data"])?,
            UpstreamStep::Derive => PyTuple::new(py, ["derive"])?,
            UpstreamStep::Send(b) => ("send", bytes(py, &b)).into_pyobject(py)?,
            UpstreamStep::Failed(fields) => {
                ("failed", error_dict(py, &fields)?).into_pyobject(py)?
            }
            UpstreamStep::Ready(r) => {
                let notices: Vec<Bound<'py, PyBytes>> =
                    r.notices.iter().map(|n| bytes(py, n)).collect();
                (
                    "ready",
                    r.params,
                    r.process_id,
                    r.secret_key,
                    (r.transaction_status as char).to_string(),
                    notices,
                )
                    .into_pyobject(py)?
            }
        })
    }
}

fn field_name(f: u8) -> String {
    match f {
        b'S' => "severity_local".into(),
        b'V' => "severity".into(),
        b'C' => "code".into(),
        b'M' => "message".into(),
        b'D' => "detail".into(),
        b'H' => "hint".into(),
        other => (other as char).to_string(),
    }
}

fn error_dict<'py>(py: Python<'py>, fields: &ErrorFields) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (f, v) in &fields.fields {
        d.set_item(field_name(*f), v)?;
    }
    Ok(d)
}

#[pyclass(module = "ostiary._core", frozen)]
struct TlsServerConfig {
    cfg: Arc<tls::ServerConfig>,
}

#[pymethods]
impl TlsServerConfig {
    #[new]
    #[pyo3(signature = (cert, key, client_ca = None, require_client_cert = false))]
    fn new(
        cert: &str,
        key: &str,
        client_ca: Option<&str>,
        require_client_cert: bool,
    ) -> PyResult<Self> {
        Ok(TlsServerConfig {
            cfg: tls::server_config(cert, key, client_ca, require_client_cert).map_err(tls_err)?,
        })
    }
}

#[pyclass(module = "ostiary._core", frozen)]
struct TlsClientConfig {
    cfg: Arc<tls::ClientConfig>,
}

#[pymethods]
impl TlsClientConfig {
    #[new]
    #[pyo3(signature = (ca = None, verify = true, cert = None, key = None))]
    fn new(
        ca: Option<&str>,
        verify: bool,
        cert: Option<&str>,
        key: Option<&str>,
    ) -> PyResult<Self> {
        let pair = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(TlsError::new_err(
                    "a client certificate needs both cert and key",
                ))
            }
        };
        Ok(TlsClientConfig {
            cfg: tls::client_config(ca, verify, pair).map_err(tls_err)?,
        })
    }
}

/// One TLS connection pumped sans-IO by the control plane during the handshake, then handed to
/// the engine with the session (after which it is empty).
#[pyclass(module = "ostiary._core")]
struct TlsSession {
    inner: Mutex<Option<TlsLayer>>,
    /// Plaintext decrypted by `receive_raw` and not yet taken by `read_plain`.
    plain: Mutex<(Vec<u8>, bool)>,
}

impl TlsSession {
    fn new(layer: TlsLayer) -> Self {
        TlsSession {
            inner: Mutex::new(Some(layer)),
            plain: Mutex::new((Vec::new(), false)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut TlsLayer) -> Result<T, tls::TlsError>) -> PyResult<T> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| TlsError::new_err("TLS session lock poisoned"))?;
        let layer = g
            .as_mut()
            .ok_or_else(|| TlsError::new_err("this TLS session was handed to the engine"))?;
        f(layer).map_err(tls_err)
    }

    fn take(&self) -> PyResult<TlsLayer> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| TlsError::new_err("TLS session lock poisoned"))?;
        g.take()
            .ok_or_else(|| TlsError::new_err("this TLS session was handed to the engine already"))
    }
}

#[pymethods]
impl TlsSession {
    #[staticmethod]
    fn server(config: &TlsServerConfig) -> PyResult<Self> {
        let layer = TlsLayer::server(config.cfg.clone()).map_err(tls_err)?;
        Ok(TlsSession::new(layer))
    }

    #[staticmethod]
    fn client(config: &TlsClientConfig, server_name: &str) -> PyResult<Self> {
        let layer = TlsLayer::client(config.cfg.clone(), server_name).map_err(tls_err)?;
        Ok(TlsSession::new(layer))
    }

    #[getter]
    fn handshaking(&self) -> PyResult<bool> {
        self.with(|t| Ok(t.is_handshaking()))
    }

    fn receive_raw(&self, data: &[u8]) -> PyResult<()> {
        let mut plain = self
            .plain
            .lock()
            .map_err(|_| TlsError::new_err("TLS session lock poisoned"))?;
        let (buf, closed) = &mut *plain;
        let peer_closed = self.with(|t| t.receive_raw_into(data, buf))?;
        *closed |= peer_closed;
        Ok(())
    }

    /// (plaintext received so far, peer_closed)
    fn read_plain<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyBytes>, bool)> {
        let mut plain = self
            .plain
            .lock()
            .map_err(|_| TlsError::new_err("TLS session lock poisoned"))?;
        let out = std::mem::take(&mut plain.0);
        Ok((bytes(py, &out), plain.1))
    }

    fn write_plain(&self, data: &[u8]) -> PyResult<()> {
        self.with(|t| t.write_plain(data))
    }

    /// Queues a TLS close_notify alert; the next `take_raw` returns it.
    fn send_close_notify(&self) -> PyResult<()> {
        self.with(|t| {
            t.send_close_notify();
            Ok(())
        })
    }

    fn take_raw<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::new();
        self.with(|t| t.take_raw(&mut out))?;
        Ok(bytes(py, &out))
    }

    fn peer_certificates<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let certs = self.with(|t| Ok(t.peer_certificates()))?;
        Ok(certs.iter().map(|c| bytes(py, c)).collect())
    }

    /// The ALPN protocol the handshake chose (b"postgresql"), or None.
    #[getter]
    fn alpn_protocol<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let p = self.with(|t| Ok(t.alpn_protocol()))?;
        Ok(p.map(|p| bytes(py, &p)))
    }

    /// (protocol version, cipher suite)
    fn describe(&self) -> PyResult<(String, String)> {
        self.with(|t| Ok(t.describe()))
    }
}

#[pyfunction]
#[pyo3(signature = (severity, code, message, detail = None, hint = None))]
fn error_response<'py>(
    py: Python<'py>,
    severity: &str,
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Bound<'py, PyBytes> {
    let mut f = ErrorFields::new(severity, code, message);
    if let Some(d) = detail {
        f = f.with(b'D', d);
    }
    if let Some(h) = hint {
        f = f.with(b'H', h);
    }
    bytes(py, &f.encode_error())
}

#[pyfunction]
fn auth_cleartext_password(py: Python<'_>) -> Bound<'_, PyBytes> {
    bytes(py, &Authentication::CleartextPassword.encode())
}

#[pyfunction]
fn auth_ok(py: Python<'_>) -> Bound<'_, PyBytes> {
    bytes(py, &Authentication::Ok.encode())
}

#[pyfunction]
fn parameter_status<'py>(py: Python<'py>, name: &str, value: &str) -> Bound<'py, PyBytes> {
    bytes(py, &backend::parameter_status(name, value))
}

#[pyfunction]
fn backend_key_data(py: Python<'_>, process_id: i32, secret_key: i32) -> Bound<'_, PyBytes> {
    bytes(py, &backend::backend_key_data(process_id, secret_key))
}

#[pyfunction]
fn ready_for_query<'py>(py: Python<'py>, status: &str) -> PyResult<Bound<'py, PyBytes>> {
    let s = match status {
        "I" | "T" | "E" => status.as_bytes()[0],
        _ => {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "status must be I, T or E",
            ))
        }
    };
    Ok(bytes(py, &backend::ready_for_query(s)))
}

#[pyfunction]
fn ssl_request(py: Python<'_>) -> Bound<'_, PyBytes> {
    bytes(py, &startup::encode(&StartupPacket::SslRequest))
}

#[pyfunction]
fn cancel_request(py: Python<'_>, process_id: i32, secret_key: i32) -> Bound<'_, PyBytes> {
    bytes(
        py,
        &startup::encode(&StartupPacket::CancelRequest {
            process_id,
            secret_key,
        }),
    )
}

/// The data path engine (see ostiary_proxy::engine).
#[pyclass(module = "ostiary._core", frozen)]
struct Engine {
    inner: RsEngine,
}

fn owned_fd(fd: i32, what: &str) -> PyResult<OwnedFd> {
    if fd < 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{what} is not an open descriptor"
        )));
    }
    // SAFETY: the caller gives up the descriptor (socket.detach()); from here the engine owns it and
    // closes it exactly once. The `adopt` docstring states this contract.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[pymethods]
impl Engine {
    #[new]
    /// `fault_spin_us` burns that much CPU per chunk scanned: fault injection for the perf gate's
    /// self-test, never for production.
    /// `audit_flush_ms`: how long audit entries may wait in a worker before they are handed over.
    #[pyo3(signature = (workers = 1, max_message = (1 << 30) - 1, max_statement = 16 * 1024 * 1024, event_capacity = 65_536, fault_spin_us = 0, audit_flush_ms = 20))]
    fn new(
        workers: usize,
        max_message: usize,
        max_statement: usize,
        event_capacity: usize,
        fault_spin_us: u64,
        audit_flush_ms: u64,
    ) -> PyResult<Self> {
        let config = EngineConfig {
            workers,
            limits: limits(10_000, max_message, max_statement),
            event_capacity,
            fault_spin: std::time::Duration::from_micros(fault_spin_us),
            audit_flush: std::time::Duration::from_millis(audit_flush_ms.max(1)),
        };
        Ok(Engine {
            inner: RsEngine::new(config)
                .map_err(|e| CoreError::new_err(format!("cannot start the engine: {e}")))?,
        })
    }

    #[getter]
    fn workers(&self) -> usize {
        self.inner.workers()
    }

    #[getter]
    fn event_fd(&self) -> i32 {
        self.inner.event_fd()
    }

    /// Hands a session to the engine. The descriptors become the engine's (pass
    /// `socket.detach()`); the TLS sessions are emptied; the prefixes are plaintext already read.
    /// `consult`: "never", "always" (verdicts remembered per text), "shapes" (remembered per
    /// statement shape), "read-only-escapes" (only statements `may_leave_read_only` flags), "copy"
    /// (only statements that mention COPY), or "read-only-escapes+copy".
    /// `mask`: None, or (MaskSet, {(table oid, attnum): rule}, [(name glob, rule)],
    /// [(late name glob, rule)], max oid) from `ostiary.policy.masking`.
    /// `audit`: None, or (max_text, write_ahead): the session's statements become "audit" events.
    /// `record`: None, or (max_rows, max_field, max_buffer): "recording" events carry its frames.
    #[pyo3(signature = (session, client_fd, client_tls, client_prefix, upstream_fd, upstream_tls, upstream_prefix, consult = "never", report = false, mask = None, audit = None, record = None))]
    #[allow(clippy::too_many_arguments)]
    fn adopt(
        &self,
        session: u64,
        client_fd: i32,
        client_tls: Option<&TlsSession>,
        client_prefix: &[u8],
        upstream_fd: i32,
        upstream_tls: Option<&TlsSession>,
        upstream_prefix: &[u8],
        consult: &str,
        report: bool,
        mask: Option<MaskArg>,
        audit: Option<(usize, bool)>,
        record: Option<(u64, usize, usize)>,
    ) -> PyResult<()> {
        // Own the descriptors first: whatever fails below then closes them (the caller has given
        // them up), so a client is never left waiting on a socket nobody holds.
        let client = owned_fd(client_fd, "client_fd")?;
        let upstream = owned_fd(upstream_fd, "upstream_fd")?;
        let gate = match consult {
            "never" => Gate::AllowAll,
            "always" => Gate::Consult,
            "read-only-escapes" => Gate::ConsultIf(|sql| {
                ostiary_sql::read_only::may_leave_read_only(sql)
                    || ostiary_sql::read_only::may_act_on_server(sql)
            }),
            "shapes" => Gate::ConsultBy(ostiary_sql::shape::shape),
            "copy" => Gate::ConsultIf(ostiary_sql::mentions_copy),
            "read-only-escapes+copy" => Gate::ConsultIf(|sql| {
                ostiary_sql::read_only::may_leave_read_only(sql)
                    || ostiary_sql::read_only::may_act_on_server(sql)
                    || ostiary_sql::mentions_copy(sql)
            }),
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "consult must be never, always, shapes, read-only-escapes, copy or read-only-escapes+copy, not {other:?}"
                )))
            }
        };
        let client_tls = client_tls.map(|t| t.take()).transpose()?;
        let upstream_tls = upstream_tls.map(|t| t.take()).transpose()?;
        let spec = SessionSpec {
            id: session,
            client,
            client_tls,
            client_prefix: client_prefix.to_vec(),
            upstream,
            upstream_tls,
            upstream_prefix: upstream_prefix.to_vec(),
            gate,
            report,
            mask: mask.map(|(set, columns, names, late_names, max_oid)| MaskPlan {
                masker: Arc::new(MaskAdapter(Arc::clone(&set.borrow().inner))),
                columns,
                names,
                late_names,
                max_oid,
            }),
            audit: audit.map(|(max_text, write_ahead)| AuditSpec {
                max_text,
                write_ahead,
            }),
            record: record.map(|(max_rows, max_field, max_buffer)| RecordSpec {
                max_rows,
                max_field,
                max_buffer,
            }),
        };
        self.inner.adopt(spec).map_err(CoreError::new_err)
    }

    /// Answers a held statement. Returns False if the session has ended. `remember`: False (ask
    /// again), True (for every statement with the same gate key: text, or shape under "shapes"),
    /// or "text" (for this exact text only). `rule` names what denied it (for the audit trail).
    /// `hold_executions` (a Parse only): allow it, and hold every Execute of it for its own verdict.
    #[pyo3(signature = (session, seq, allow, code = "42501", message = "", remember = RememberArg::Flag(false), rule = "", hold_executions = false))]
    #[allow(clippy::too_many_arguments)]
    fn verdict(
        &self,
        session: u64,
        seq: u64,
        allow: bool,
        code: &str,
        message: &str,
        remember: RememberArg,
        rule: &str,
        hold_executions: bool,
    ) -> PyResult<bool> {
        let remember = match remember {
            RememberArg::Flag(b) => Remember::from(b),
            RememberArg::Word(w) if w == "text" => Remember::Text,
            RememberArg::Word(w) => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "remember must be True, False or \"text\", not {w:?}"
                )))
            }
        };
        let verdict = if allow && hold_executions {
            Verdict::AllowHoldingExecutions
        } else if allow {
            Verdict::Allow
        } else {
            Verdict::Deny {
                code: code.into(),
                message: message.into(),
                rule: rule.into(),
            }
        };
        Ok(self.inner.command(
            session,
            Command::Verdict {
                seq,
                verdict,
                remember,
            },
        ))
    }

    /// Ends sessions at their next idle point; `session=None` means all. Returns how many.
    #[pyo3(signature = (session, code, message))]
    fn drain(&self, session: Option<u64>, code: &str, message: &str) -> usize {
        let cmd = Command::Drain {
            code: code.into(),
            message: message.into(),
        };
        match session {
            Some(s) => self.inner.command(s, cmd) as usize,
            None => self.inner.broadcast(cmd),
        }
    }

    /// Ends sessions now with a FATAL error; `session=None` means all. Returns how many.
    #[pyo3(signature = (session, code, message))]
    fn terminate(&self, session: Option<u64>, code: &str, message: &str) -> usize {
        let cmd = Command::Terminate {
            code: code.into(),
            message: message.into(),
        };
        match session {
            Some(s) => self.inner.command(s, cmd) as usize,
            None => self.inner.broadcast(cmd),
        }
    }

    fn session_count(&self) -> usize {
        self.inner.session_count()
    }

    /// Sync audit: the entries handed over with `ticket` are durable; the session may go on.
    fn audit_durable(&self, session: u64, ticket: u64) -> bool {
        self.inner
            .command(session, Command::AuditDurable { ticket })
    }

    /// Sync audit: the entries could not be recorded; the held statements are dropped and the
    /// session ends with this FATAL error.
    fn audit_failed(&self, session: u64, code: &str, message: &str) -> bool {
        self.inner.command(
            session,
            Command::AuditFailed {
                code: code.into(),
                message: message.into(),
            },
        )
    }

    /// Sends the session's client a NoticeResponse (SQLSTATE `code`, default 00000) at the next
    /// message boundary. `held`: the statement waiting for a verdict is held for people to decide
    /// (an approval), and the client's leaving meanwhile ends the session. False if the session
    /// has ended.
    #[pyo3(signature = (session, message, code = "00000", held = false))]
    fn notice(&self, session: u64, message: &str, code: &str, held: bool) -> bool {
        self.inner.command(
            session,
            Command::Notice {
                code: code.into(),
                message: message.into(),
                held,
            },
        )
    }

    /// Refuses every statement of every session with this error (`code=None`: stop refusing).
    /// Returns how many sessions were told.
    #[pyo3(signature = (code = None, message = ""))]
    fn refuse_statements(&self, code: Option<&str>, message: &str) -> usize {
        let refusal = code.map(|c| (c.to_owned(), message.to_owned()));
        self.inner.broadcast(Command::Refuse { refusal })
    }

    /// The audit trail's backlog: `pending` unwritten records, plus the entries of audit events
    /// not yet made records of; sessions wait before handing over more entries while it is at or
    /// above `high` (0: never), until it is below half of it. `taken`: entries of audit events
    /// made records of since the last call (every audit event's entries must be reported once).
    #[pyo3(signature = (pending, high, taken = 0))]
    fn set_audit_backlog(&self, pending: usize, high: usize, taken: usize) {
        self.inner.set_audit_backlog(pending, high, taken)
    }

    /// Waiting events as tuples: ("statement", session, seq, kind, name, text, params),
    /// ("complete", session, tag, rows, bytes), ("error", session, code, message, denied),
    /// ("ready", session, status), ("ended", session, reason, detail, stats dict),
    /// ("audit", ack session or 0, ack ticket or 0, [entry, ...]) with each entry
    /// (session, seq, phase, kind, (name, text, truncated, params), denied (code, message, rule) or
    /// None, (started_us, ended_us), (rows, bytes, tag, commands), outcome, error (code, message) or
    /// None), ("recording", session, frames).
    #[pyo3(signature = (max = 4096))]
    fn poll_events<'py>(&self, py: Python<'py>, max: usize) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let mut out = Vec::new();
        for ev in self.inner.poll_events(max) {
            match ev {
                Event::Statement { session, statement } => out.push(
                    (
                        "statement",
                        session,
                        statement.seq,
                        statement.kind.as_str(),
                        statement.name,
                        statement.text,
                        statement.params,
                    )
                        .into_pyobject(py)?,
                ),
                Event::Backend { session, events } => {
                    for e in events {
                        out.push(match e {
                            BackendEvent::CommandComplete { tag, rows, bytes } => {
                                ("complete", session, tag, rows, bytes).into_pyobject(py)?
                            }
                            BackendEvent::Error {
                                code,
                                message,
                                denied,
                            } => ("error", session, code, message, denied).into_pyobject(py)?,
                            BackendEvent::ReadyForQuery { status } => {
                                ("ready", session, (status as char).to_string())
                                    .into_pyobject(py)?
                            }
                        });
                    }
                }
                Event::Audit { entries, ack } => {
                    let list = pyo3::types::PyList::empty(py);
                    for (session, e) in entries {
                        list.append(
                            (
                                session,
                                e.seq,
                                e.phase.as_str(),
                                e.kind.as_str(),
                                (e.name, e.text, e.truncated, e.params),
                                e.denied,
                                (e.started_us, e.ended_us),
                                (e.rows, e.bytes, e.tag, e.commands),
                                e.outcome.as_str(),
                                e.error,
                            )
                                .into_pyobject(py)?,
                        )?;
                    }
                    let (s, t) = ack.unwrap_or((0, 0));
                    out.push(("audit", s, t, list).into_pyobject(py)?);
                }
                Event::Recording { session, frames } => {
                    out.push(("recording", session, PyBytes::new(py, &frames)).into_pyobject(py)?);
                }
                Event::Ended {
                    session,
                    reason,
                    detail,
                    stats,
                    masked,
                } => {
                    let d = PyDict::new(py);
                    d.set_item("frontend_bytes", stats.frontend_bytes)?;
                    d.set_item("backend_bytes", stats.backend_bytes)?;
                    d.set_item("statements", stats.statements)?;
                    d.set_item("rows", stats.rows)?;
                    d.set_item("denied", stats.denied)?;
                    d.set_item("masked", masked)?;
                    out.push(("ended", session, reason, detail, d).into_pyobject(py)?);
                }
            }
        }
        Ok(out)
    }
}

#[derive(FromPyObject)]
enum RememberArg {
    Flag(bool),
    Word(String),
}

type MaskArg<'py> = (
    Bound<'py, MaskSet>,
    HashMap<(u32, i16), usize>,
    Vec<(String, usize)>,
    Vec<(String, usize)>,
    u32,
);

/// The masking engine behind the relay's `Masker` (the trait lives in the wire crate).
struct MaskAdapter(Arc<RsMaskSet>);

impl Masker for MaskAdapter {
    fn rules(&self) -> usize {
        self.0.rules()
    }
    fn has_content(&self) -> bool {
        self.0.has_content()
    }
    fn find_matches(&self, hay: &[u8], f: &mut dyn FnMut(usize, usize, usize)) {
        self.0.find_matches(hay, f)
    }
    fn replace(&self, rule: usize, matched: &[u8], out: &mut Vec<u8>) -> bool {
        self.0.replace(rule, matched, out)
    }
    fn apply(&self, rule: usize, value: &[u8], out: &mut Vec<u8>) -> bool {
        self.0.apply(rule, value, out)
    }
}

/// A compiled masking rule set (see ostiary_mask::MaskSet). Rules are dicts with `name`,
/// `detectors`, `pattern`, `validator`, `strategy` (redact, mask, partial, hash, null),
/// `replacement`, `mask_char`, `keep_last`, `keep_domain`, and `key` (bytes, for hash).
#[pyclass(module = "ostiary._core", frozen)]
struct MaskSet {
    inner: Arc<RsMaskSet>,
}

fn rule_spec(d: &Bound<'_, PyDict>) -> PyResult<RuleSpec> {
    fn get<'py, T: FromPyObject<'py>>(d: &Bound<'py, PyDict>, k: &str, default: T) -> PyResult<T> {
        match d.get_item(k)? {
            Some(v) if !v.is_none() => v.extract(),
            _ => Ok(default),
        }
    }
    let name: String = get(d, "name", String::new())?;
    let ch: String = get(d, "mask_char", "*".to_owned())?;
    let ch = match ch.as_bytes() {
        [c] if c.is_ascii() => *c,
        _ => {
            return Err(MaskError::new_err(format!(
                "masking rule {name:?}: mask_char must be one ASCII character"
            )))
        }
    };
    let strategy = match get(d, "strategy", "redact".to_owned())?.as_str() {
        "redact" => Strategy::Redact {
            token: get(d, "replacement", "****".to_owned())?,
        },
        "mask" => Strategy::Mask { ch },
        "partial" => Strategy::Partial {
            keep_last: get(d, "keep_last", 4usize)?,
            keep_domain: get(d, "keep_domain", false)?,
            ch,
        },
        "hash" => Strategy::Hash {
            key: get(d, "key", Vec::<u8>::new())?,
        },
        "null" => Strategy::Null,
        other => {
            return Err(MaskError::new_err(format!(
                "masking rule {name:?}: unknown strategy {other:?}"
            )))
        }
    };
    Ok(RuleSpec {
        name,
        detectors: get(d, "detectors", Vec::new())?,
        pattern: get(d, "pattern", None)?,
        validator: get(d, "validator", None)?,
        strategy,
    })
}

#[pymethods]
impl MaskSet {
    #[new]
    fn new(rules: Vec<Bound<'_, PyDict>>) -> PyResult<Self> {
        let specs = rules.iter().map(rule_spec).collect::<PyResult<Vec<_>>>()?;
        let inner = RsMaskSet::new(specs).map_err(|e| MaskError::new_err(e.to_string()))?;
        Ok(MaskSet {
            inner: Arc::new(inner),
        })
    }

    fn rule_names(&self) -> Vec<String> {
        (0..self.inner.rules())
            .map(|i| self.inner.rule_name(i).to_owned())
            .collect()
    }

    /// Masks one text: (masked bytes or None when it becomes NULL, counts per rule).
    fn mask<'py>(&self, py: Python<'py>, text: &[u8]) -> (Option<Bound<'py, PyBytes>>, Vec<u64>) {
        let mut out = Vec::new();
        let mut counts = vec![0; self.inner.rules()];
        let masked = match self.inner.mask_text(text, &mut out, &mut counts) {
            Outcome::Unchanged => Some(bytes(py, text)),
            Outcome::Changed => Some(bytes(py, &out)),
            Outcome::Null => None,
        };
        (masked, counts)
    }

    /// The matches in `text`: [(start, end, rule)] (for benchmarks and `policy explain`).
    fn find(&self, py: Python<'_>, text: &[u8]) -> Vec<(usize, usize, usize)> {
        let inner = Arc::clone(&self.inner);
        let mut v = Vec::new();
        py.allow_threads(|| inner.find_matches(text, |s, e, r| v.push((s, e, r))));
        v
    }

    /// Bytes of `text` scanned, without building results (benchmarks): number of matches.
    fn count(&self, py: Python<'_>, text: &[u8]) -> usize {
        let inner = Arc::clone(&self.inner);
        let mut n = 0;
        py.allow_threads(|| inner.find_matches(text, |_, _, _| n += 1));
        n
    }
}

/// The relay of an established session, for benchmarks and tests of the data path's scanning from
/// Python (the engine runs it without Python). Statements pass (no gate); `mask` as in
/// `Engine.adopt`.
#[pyclass(module = "ostiary._core")]
struct Relay {
    inner: ostiary_wire::pg::relay::SessionRelay,
}

#[pymethods]
impl Relay {
    #[new]
    #[pyo3(signature = (mask = None, max_statement = 16 * 1024 * 1024))]
    fn new(mask: Option<MaskArg>, max_statement: usize) -> Self {
        let mut inner = ostiary_wire::pg::relay::SessionRelay::new(
            limits(10_000, (1 << 30) - 1, max_statement),
            Gate::AllowAll,
            false,
        );
        if let Some((set, columns, names, late_names, max_oid)) = mask {
            inner.set_masking(MaskPlan {
                masker: Arc::new(MaskAdapter(Arc::clone(&set.borrow().inner))),
                columns,
                names,
                late_names,
                max_oid,
            });
        }
        Relay { inner }
    }

    /// Client bytes in, what goes upstream out.
    fn feed_frontend<'py>(
        &mut self,
        py: Python<'py>,
        data: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::with_capacity(data.len());
        self.inner.feed_frontend(data, &mut out).map_err(wire_err)?;
        Ok(bytes(py, &out))
    }

    /// Server bytes in, what goes to the client out.
    fn feed_backend<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::with_capacity(data.len());
        self.inner
            .feed_backend(data, &mut out, &mut Vec::new())
            .map_err(wire_err)?;
        Ok(bytes(py, &out))
    }

    /// Server bytes scanned without building a Python result (benchmarks): bytes out.
    fn scan_backend(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<usize> {
        let inner = &mut self.inner;
        py.allow_threads(|| {
            let mut out = Vec::with_capacity(data.len());
            inner
                .feed_backend(data, &mut out, &mut Vec::new())
                .map(|()| out.len())
        })
        .map_err(wire_err)
    }

    /// Values masked so far, per rule.
    fn masked_counts(&self) -> Vec<u64> {
        self.inner.masked_counts().to_vec()
    }
}

// --- Session recording (ostiary_wire::pg::recording) ---------------------------------------

/// The session recorder (see ostiary_wire::pg::recording for the frame format and the caps): fed
/// the plaintext bytes each way after the startup phase, one call per chunk; `take()` drains the
/// frames. Raises ProtocolError once on malformed input, after which it records nothing.
#[pyclass(module = "ostiary._core")]
struct Recorder {
    inner: ostiary_wire::pg::recording::Recorder,
}

#[pymethods]
impl Recorder {
    #[new]
    #[pyo3(signature = (max_rows = 1000, max_field = 4096, max_buffer = 1 << 20))]
    fn new(max_rows: u64, max_field: usize, max_buffer: usize) -> Self {
        Recorder {
            inner: ostiary_wire::pg::recording::Recorder::new(max_rows, max_field, max_buffer),
        }
    }

    /// Bytes the client sent, at `now_us` (the caller's clock, microseconds).
    fn frontend(&mut self, data: &[u8], now_us: u64) -> PyResult<()> {
        self.inner.frontend(data, now_us).map_err(wire_err)
    }

    /// Bytes the gateway sent to the client, at `now_us`.
    fn backend(&mut self, data: &[u8], now_us: u64) -> PyResult<()> {
        self.inner.backend(data, now_us).map_err(wire_err)
    }

    fn take<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.take())
    }

    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }
}

// --- end of session recording ----------------------------------------------------------------

/// Checks a custom masking pattern as the engine would: None when it compiles, else why not.
#[pyfunction]
fn mask_pattern_problem(pattern: &str) -> Option<String> {
    ostiary_mask::check_pattern(pattern).err()
}

/// A one-shot simple query on an upstream connection during startup (the catalog lookup of
/// masking rules): `message()` to send, `receive_data`, then `result()`: None until complete,
/// ("rows", [[str | None]]) or ("failed", code, message). `take_remaining()` gives asynchronous
/// messages received meanwhile and any bytes after ReadyForQuery.
#[pyclass(module = "ostiary._core")]
struct SimpleQuery {
    inner: RsSimpleQuery,
}

#[pymethods]
impl SimpleQuery {
    #[new]
    #[pyo3(signature = (sql, limit = 16 * 1024 * 1024))]
    fn new(sql: &str, limit: usize) -> Self {
        SimpleQuery {
            inner: RsSimpleQuery::new(sql, limit),
        }
    }

    fn message<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.message())
    }

    fn receive_data(&mut self, data: &[u8]) -> PyResult<()> {
        self.inner.receive_data(data).map_err(wire_err)
    }

    fn result<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        Ok(match self.inner.result() {
            None => None,
            Some(QueryOutcome::Rows(rows)) => Some(("rows", rows).into_pyobject(py)?),
            Some(QueryOutcome::Failed { code, message }) => {
                Some(("failed", code, message).into_pyobject(py)?)
            }
        })
    }

    fn take_remaining<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        bytes(py, &self.inner.take_remaining())
    }
}

/// Whether a statement could turn a read-only session writable (an interim, conservative text
/// check; see `ostiary_sql::read_only`).
#[pyfunction]
fn may_leave_read_only(sql: &str) -> bool {
    ostiary_sql::read_only::may_leave_read_only(sql)
}

/// Whether a statement could act on the server in ways a read-only transaction allows (COPY to a
/// file or program, ALTER SYSTEM, signal, reload, WAL, slot, statistics and backup functions):
/// read-only sessions have such statements analysed before they run.
#[pyfunction]
fn may_act_on_server(sql: &str) -> bool {
    ostiary_sql::read_only::may_act_on_server(sql)
}

/// Whether a client encoding is one whose characters can hide quotes and backslashes from the
/// gateway's analysis (see `ostiary_wire::pg::client_encoding_splits_bytes`).
#[pyfunction]
fn client_encoding_splits_bytes(name: &str) -> bool {
    ostiary_wire::pg::client_encoding_splits_bytes(name)
}

/// Analyses every statement of `sql` with PostgreSQL's parser: a list of dicts with `start`, `len`
/// (byte span), `kinds`, `reads`, `writes`, `functions`, `effects`, `derived_columns`,
/// `whole_rows` (sorted lists of str), `unbounded_write` and `literal_sensitive`. Raises
/// `SqlError` when the text does not parse.
#[pyfunction]
fn analyze_sql<'py>(py: Python<'py>, sql: &str) -> PyResult<Vec<Bound<'py, PyDict>>> {
    let statements =
        ostiary_sql::analyze::analyze(sql).map_err(|e| SqlError::new_err(e.to_string()))?;
    statements
        .into_iter()
        .map(|s| {
            let d = PyDict::new(py);
            d.set_item("start", s.start)?;
            d.set_item("len", s.len)?;
            d.set_item("kinds", s.kinds.into_iter().collect::<Vec<_>>())?;
            d.set_item("reads", s.reads.into_iter().collect::<Vec<_>>())?;
            d.set_item("writes", s.writes.into_iter().collect::<Vec<_>>())?;
            d.set_item("functions", s.functions.into_iter().collect::<Vec<_>>())?;
            d.set_item("effects", s.effects.into_iter().collect::<Vec<_>>())?;
            d.set_item("unbounded_write", s.unbounded_write)?;
            d.set_item("literal_sensitive", s.literal_sensitive)?;
            d.set_item(
                "derived_columns",
                s.columns.derived.iter().collect::<Vec<_>>(),
            )?;
            d.set_item(
                "whole_rows",
                s.columns.whole_rows.iter().collect::<Vec<_>>(),
            )?;
            Ok(d)
        })
        .collect()
}

/// The shape of a statement: literals replaced by `?`, comments and case normalised (the key of
/// the data path's verdict cache).
#[pyfunction]
fn statement_shape(sql: &str) -> String {
    ostiary_sql::shape::shape(sql)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CoreError", m.py().get_type::<CoreError>())?;
    m.add("ProtocolError", m.py().get_type::<ProtocolError>())?;
    m.add("StartupRefused", m.py().get_type::<StartupRefused>())?;
    m.add("UpstreamAuthError", m.py().get_type::<UpstreamAuthError>())?;
    m.add("TlsError", m.py().get_type::<TlsError>())?;
    m.add_class::<ClientHandshake>()?;
    m.add_class::<UpstreamHandshake>()?;
    m.add_class::<TlsServerConfig>()?;
    m.add_class::<TlsClientConfig>()?;
    m.add_class::<TlsSession>()?;
    m.add_class::<Engine>()?;
    m.add_class::<MaskSet>()?;
    m.add_class::<SimpleQuery>()?;
    m.add_class::<Relay>()?;
    m.add_class::<Recorder>()?;
    m.add("MaskError", m.py().get_type::<MaskError>())?;
    m.add("MASK_DETECTORS", ostiary_mask::detectors::BUILTINS.to_vec())?;
    m.add(
        "ALPN_POSTGRESQL",
        PyBytes::new(m.py(), tls::ALPN_POSTGRESQL),
    )?;
    m.add("BINARY_MARK", ostiary_wire::pg::frontend::BINARY_MARK)?;
    m.add_function(wrap_pyfunction!(mask_pattern_problem, m)?)?;
    m.add_function(wrap_pyfunction!(error_response, m)?)?;
    m.add_function(wrap_pyfunction!(auth_cleartext_password, m)?)?;
    m.add_function(wrap_pyfunction!(auth_ok, m)?)?;
    m.add_function(wrap_pyfunction!(parameter_status, m)?)?;
    m.add_function(wrap_pyfunction!(backend_key_data, m)?)?;
    m.add_function(wrap_pyfunction!(ready_for_query, m)?)?;
    m.add_function(wrap_pyfunction!(ssl_request, m)?)?;
    m.add_function(wrap_pyfunction!(cancel_request, m)?)?;
    m.add_function(wrap_pyfunction!(may_leave_read_only, m)?)?;
    m.add_function(wrap_pyfunction!(may_act_on_server, m)?)?;
    m.add_function(wrap_pyfunction!(client_encoding_splits_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(analyze_sql, m)?)?;
    m.add_function(wrap_pyfunction!(statement_shape, m)?)?;
    m.add("SqlError", m.py().get_type::<SqlError>())?;
    Ok(())
}
