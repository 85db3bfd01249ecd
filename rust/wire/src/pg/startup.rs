//! Untyped startup-phase packets a client sends first: SSLRequest, GSSENCRequest, CancelRequest
//! and StartupMessage. Each begins with an Int32 length that includes itself, then an Int32 code.

use super::codec::{Builder, Reader};
use crate::{Limits, WireError};

pub const PROTOCOL_3_0: i32 = 196_608;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    CancelRequest {
        process_id: i32,
        secret_key: i32,
    },
    /// Protocol 3, of the minor version the client asks for (`minor_version`; the gateway speaks
    /// 3.0 and negotiates down, see `handshake::ClientHandshake`).
    StartupMessage {
        minor_version: u16,
        params: Vec<(String, String)>,
    },
}

/// Decodes one startup packet from the front of `buf`: `Ok(None)` when incomplete, otherwise the
/// packet and the bytes it used. The length is checked against `limits.max_startup` first.
pub fn decode(buf: &[u8], limits: &Limits) -> Result<Option<(StartupPacket, usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as i64;
    if len < 8 {
        return Err(WireError::LengthTooSmall {
            length: len,
            min: 8,
        });
    }
    let len = len as usize;
    if len > limits.max_startup {
        return Err(WireError::TooLarge {
            what: "startup packet",
            length: len,
            limit: limits.max_startup,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut r = Reader::new(&buf[4..len], "startup packet");
    let code = r.i32()?;
    let packet = match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if len != 8 => {
            return Err(WireError::malformed(
                "startup packet",
                "SSLRequest/GSSENCRequest must be 8 bytes",
            ))
        }
        SSL_REQUEST_CODE => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            if len != 16 {
                return Err(WireError::malformed("CancelRequest", "must be 16 bytes"));
            }
            StartupPacket::CancelRequest {
                process_id: r.i32()?,
                secret_key: r.i32()?,
            }
        }
        code if code >> 16 == 3 => {
            let minor_version = (code & 0xffff) as u16;
            let mut params = Vec::new();
            loop {
                let key = r.cstr_utf8()?;
                if key.is_empty() {
                    break;
                }
                let value = r.cstr_utf8()?;
                params.push((key.to_owned(), value.to_owned()));
            }
            if !r.is_empty() {
                return Err(WireError::malformed(
                    "StartupMessage",
                    "trailing bytes after the parameter list",
                ));
            }
            if !params.iter().any(|(k, _)| k == "user") {
                return Err(WireError::NoUser);
            }
            StartupPacket::StartupMessage {
                minor_version,
                params,
            }
        }
        other => {
            let major = (other >> 16) as u16;
            let minor = (other & 0xffff) as u16;
            return Err(WireError::UnsupportedVersion { major, minor });
        }
    };
    Ok(Some((packet, len)))
}

/// Encodes a packet (the gateway sends StartupMessage, SSLRequest and CancelRequest upstream).
pub fn encode(packet: &StartupPacket) -> Vec<u8> {
    match packet {
        StartupPacket::SslRequest => Builder::untyped().i32(SSL_REQUEST_CODE).finish(),
        StartupPacket::GssEncRequest => Builder::untyped().i32(GSSENC_REQUEST_CODE).finish(),
        StartupPacket::CancelRequest {
            process_id,
            secret_key,
        } => Builder::untyped()
            .i32(CANCEL_REQUEST_CODE)
            .i32(*process_id)
            .i32(*secret_key)
            .finish(),
        StartupPacket::StartupMessage {
            minor_version,
            params,
        } => {
            let mut b = Builder::untyped().i32(PROTOCOL_3_0 | i32::from(*minor_version));
            for (k, v) in params {
                b = b.cstr(k.as_bytes()).cstr(v.as_bytes());
            }
            b.u8(0).finish()
        }
    }
}
