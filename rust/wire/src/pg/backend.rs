//! Backend (server to client) messages that the gateway reads from an upstream or writes itself.
//! Bulk messages (DataRow, CopyData, RowDescription) are not decoded here: the relay streams them.

use super::codec::{Builder, Reader};
use crate::WireError;

pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const DATA_ROW: u8 = b'D';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const NO_DATA: u8 = b'n';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// Whether `t` is a message an established session's server may send (protocol 3.0): not an
/// Authentication request (the client would answer it with its password or token), not the
/// startup-only BackendKeyData and NegotiateProtocolVersion, not a byte of no message at all.
pub const fn in_session(t: u8) -> bool {
    matches!(
        t,
        tag::BIND_COMPLETE
            | tag::CLOSE_COMPLETE
            | tag::COMMAND_COMPLETE
            | tag::COPY_DATA
            | tag::COPY_DONE
            | tag::COPY_IN_RESPONSE
            | tag::COPY_OUT_RESPONSE
            | tag::COPY_BOTH_RESPONSE
            | tag::DATA_ROW
            | tag::EMPTY_QUERY_RESPONSE
            | tag::ERROR_RESPONSE
            | tag::FUNCTION_CALL_RESPONSE
            | tag::NO_DATA
            | tag::NOTICE_RESPONSE
            | tag::NOTIFICATION_RESPONSE
            | tag::PARAMETER_DESCRIPTION
            | tag::PARAMETER_STATUS
            | tag::PARSE_COMPLETE
            | tag::PORTAL_SUSPENDED
            | tag::READY_FOR_QUERY
            | tag::ROW_DESCRIPTION
    )
}

/// The largest ParameterStatus libpq accepts (longer ones are a loss of synchronisation to it).
pub const MAX_PARAMETER_STATUS: usize = 30_000;

/// The Authentication request variants (message 'R').
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue {
        data: Vec<u8>,
    },
    SaslFinal {
        data: Vec<u8>,
    },
    /// Kerberos, SCM, GSSAPI, SSPI: not supported towards an upstream.
    Unsupported {
        code: i32,
    },
}

impl Authentication {
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "Authentication");
        Ok(match r.i32()? {
            0 => Authentication::Ok,
            3 => Authentication::CleartextPassword,
            5 => {
                let s = r.bytes(4)?;
                Authentication::Md5Password {
                    salt: [s[0], s[1], s[2], s[3]],
                }
            }
            10 => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = r.cstr_utf8()?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m.to_owned());
                }
                Authentication::Sasl { mechanisms }
            }
            11 => Authentication::SaslContinue {
                data: r.remaining().to_vec(),
            },
            12 => Authentication::SaslFinal {
                data: r.remaining().to_vec(),
            },
            code => Authentication::Unsupported { code },
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let b = Builder::new(tag::AUTHENTICATION);
        match self {
            Authentication::Ok => b.i32(0),
            Authentication::CleartextPassword => b.i32(3),
            Authentication::Md5Password { salt } => b.i32(5).bytes(salt),
            Authentication::Sasl { mechanisms } => {
                let mut b = b.i32(10);
                for m in mechanisms {
                    b = b.cstr(m.as_bytes());
                }
                b.u8(0)
            }
            Authentication::SaslContinue { data } => b.i32(11).bytes(data),
            Authentication::SaslFinal { data } => b.i32(12).bytes(data),
            Authentication::Unsupported { code } => b.i32(*code),
        }
        .finish()
    }
}

/// ErrorResponse and NoticeResponse share this body: typed fields, each a code byte and a string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    /// A gateway-made error: severity (ERROR, FATAL), SQLSTATE and message.
    pub fn new(severity: &str, code: &str, message: &str) -> Self {
        ErrorFields {
            fields: vec![
                (b'S', severity.to_owned()),
                (b'V', severity.to_owned()),
                (b'C', code.to_owned()),
                (b'M', message.to_owned()),
            ],
        }
    }

    pub fn with(mut self, field: u8, value: &str) -> Self {
        self.fields.push((field, value.to_owned()));
        self
    }

    pub fn get(&self, field: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, v)| v.as_str())
    }

    pub fn code(&self) -> Option<&str> {
        self.get(b'C')
    }
    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }

    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(body, "ErrorResponse");
        let mut fields = Vec::new();
        loop {
            let f = r.u8()?;
            if f == 0 {
                break;
            }
            let v = String::from_utf8_lossy(r.cstr()?).into_owned();
            fields.push((f, v));
        }
        Ok(ErrorFields { fields })
    }

    fn encode_as(&self, tag: u8) -> Vec<u8> {
        let mut b = Builder::new(tag);
        for (f, v) in &self.fields {
            b = b.u8(*f).cstr(v.as_bytes());
        }
        b.u8(0).finish()
    }

    pub fn encode_error(&self) -> Vec<u8> {
        self.encode_as(tag::ERROR_RESPONSE)
    }
    pub fn encode_notice(&self) -> Vec<u8> {
        self.encode_as(tag::NOTICE_RESPONSE)
    }
}

/// ErrorResponse bytes for a gateway-made error.
pub fn error_response(severity: &str, code: &str, message: &str) -> Vec<u8> {
    ErrorFields::new(severity, code, message).encode_error()
}

/// NegotiateProtocolVersion: the newest version of protocol 3 this side speaks (sent whole, major
/// and minor, as PostgreSQL sends it and libpq reads it), and the protocol options (`_pq_.*`
/// startup parameters) it does not recognise.
pub fn negotiate_protocol_version(newest_minor: u16, unrecognized: &[&str]) -> Vec<u8> {
    let mut b = Builder::new(tag::NEGOTIATE_PROTOCOL_VERSION)
        .i32((3 << 16) | i32::from(newest_minor))
        .i32(unrecognized.len() as i32);
    for option in unrecognized {
        b = b.cstr(option.as_bytes());
    }
    b.finish()
}

pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    Builder::new(tag::PARAMETER_STATUS)
        .cstr(name.as_bytes())
        .cstr(value.as_bytes())
        .finish()
}

pub fn decode_parameter_status(body: &[u8]) -> Result<(String, String), WireError> {
    let mut r = Reader::new(body, "ParameterStatus");
    let name = String::from_utf8_lossy(r.cstr()?).into_owned();
    let value = String::from_utf8_lossy(r.cstr()?).into_owned();
    Ok((name, value))
}

pub fn backend_key_data(process_id: i32, secret_key: i32) -> Vec<u8> {
    Builder::new(tag::BACKEND_KEY_DATA)
        .i32(process_id)
        .i32(secret_key)
        .finish()
}

pub fn decode_backend_key_data(body: &[u8]) -> Result<(i32, i32), WireError> {
    let mut r = Reader::new(body, "BackendKeyData");
    Ok((r.i32()?, r.i32()?))
}

/// ReadyForQuery with a transaction status: b'I' idle, b'T' in a block, b'E' failed block.
pub fn ready_for_query(status: u8) -> Vec<u8> {
    Builder::new(tag::READY_FOR_QUERY).u8(status).finish()
}

pub fn decode_ready_for_query(body: &[u8]) -> Result<u8, WireError> {
    let mut r = Reader::new(body, "ReadyForQuery");
    let s = r.u8()?;
    if !matches!(s, b'I' | b'T' | b'E') {
        return Err(WireError::malformed(
            "ReadyForQuery",
            format!("unknown status {s:#x}"),
        ));
    }
    Ok(s)
}

/// The command tag of CommandComplete, e.g. "SELECT 3" or "INSERT 0 1".
pub fn decode_command_complete(body: &[u8]) -> Result<String, WireError> {
    let mut r = Reader::new(body, "CommandComplete");
    Ok(String::from_utf8_lossy(r.cstr()?).into_owned())
}
