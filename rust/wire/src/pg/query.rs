//! A one-shot simple query on an upstream connection, before the session is handed to the relay
//! (the control plane reads the catalog with it). Sans-IO: `message()` gives the bytes to send,
//! `receive_data` takes the server's bytes, `result()` tells when the answer is complete.
//! Asynchronous messages the server sends meanwhile (NoticeResponse, NotificationResponse,
//! ParameterStatus) are kept, in order, to be passed on to the client.

use super::backend::{tag as btag, ErrorFields};
use super::codec::{split_message, Reader};
use super::frontend;
use crate::WireError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryOutcome {
    Rows(Vec<Vec<Option<String>>>),
    Failed { code: String, message: String },
}

pub struct SimpleQuery {
    sql: String,
    limit: usize,
    buf: Vec<u8>,
    rows: Vec<Vec<Option<String>>>,
    error: Option<(String, String)>,
    done: bool,
    passthrough: Vec<u8>,
    rest: Vec<u8>,
}

impl SimpleQuery {
    /// `limit` bounds each message and the bytes of all rows together.
    pub fn new(sql: &str, limit: usize) -> Self {
        SimpleQuery {
            sql: sql.to_owned(),
            limit,
            buf: Vec::new(),
            rows: Vec::new(),
            error: None,
            done: false,
            passthrough: Vec::new(),
            rest: Vec::new(),
        }
    }

    pub fn message(&self) -> Vec<u8> {
        frontend::query(&self.sql)
    }

    pub fn receive_data(&mut self, data: &[u8]) -> Result<(), WireError> {
        if self.done {
            self.rest.extend_from_slice(data);
            return Ok(());
        }
        if data.is_empty() {
            return Err(WireError::malformed(
                "query answer",
                "the server closed the connection",
            ));
        }
        self.buf.extend_from_slice(data);
        let mut used = 0;
        let mut size = 0usize;
        while let Some((tag, body, n)) = split_message(&self.buf[used..], self.limit)? {
            let raw = &self.buf[used..used + n];
            used += n;
            match tag {
                btag::ROW_DESCRIPTION | btag::COMMAND_COMPLETE | btag::EMPTY_QUERY_RESPONSE => {}
                btag::DATA_ROW => {
                    size += body.len();
                    if size > self.limit {
                        return Err(WireError::TooLarge {
                            what: "query answer",
                            length: size,
                            limit: self.limit,
                        });
                    }
                    let mut r = Reader::new(body, "DataRow");
                    let n = r.count16()?;
                    let mut row = Vec::with_capacity(n.min(1664));
                    for _ in 0..n {
                        let len = r.i32()?;
                        row.push(if len < 0 {
                            None
                        } else {
                            Some(String::from_utf8_lossy(r.bytes(len as usize)?).into_owned())
                        });
                    }
                    self.rows.push(row);
                }
                btag::ERROR_RESPONSE => {
                    let f = ErrorFields::decode(body)?;
                    self.error = Some((
                        f.code().unwrap_or("").to_owned(),
                        f.message().unwrap_or("").to_owned(),
                    ));
                }
                btag::NOTICE_RESPONSE | btag::NOTIFICATION_RESPONSE | btag::PARAMETER_STATUS => {
                    self.passthrough.extend_from_slice(raw)
                }
                btag::READY_FOR_QUERY => {
                    self.done = true;
                    self.rest = self.buf[used..].to_vec();
                    self.buf.clear();
                    return Ok(());
                }
                other => {
                    return Err(WireError::Unexpected {
                        tag: other as char,
                        phase: "a catalog query",
                    })
                }
            }
        }
        self.buf.drain(..used);
        Ok(())
    }

    /// The answer once ReadyForQuery arrived.
    pub fn result(&mut self) -> Option<QueryOutcome> {
        if !self.done {
            return None;
        }
        Some(match self.error.take() {
            Some((code, message)) => QueryOutcome::Failed { code, message },
            None => QueryOutcome::Rows(std::mem::take(&mut self.rows)),
        })
    }

    /// Asynchronous messages received meanwhile, then whatever followed ReadyForQuery.
    pub fn take_remaining(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.passthrough);
        v.append(&mut self.rest);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::backend::{error_response, ready_for_query};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn rows_errors_and_passthrough() {
        let mut answer = msg(b'T', b"\0\0");
        answer.extend(msg(b'S', b"a\0b\0"));
        answer.extend(msg(b'D', b"\0\x02\0\0\0\x0212\xff\xff\xff\xff"));
        answer.extend(msg(b'C', b"SELECT 1\0"));
        answer.extend(ready_for_query(b'I'));
        answer.extend(b"tail");
        for chunk in [1, 3, 1000] {
            let mut q = SimpleQuery::new("select", 1 << 20);
            for c in answer.chunks(chunk) {
                q.receive_data(c).unwrap();
            }
            assert_eq!(
                q.result(),
                Some(QueryOutcome::Rows(vec![vec![Some("12".into()), None]]))
            );
            let rest = q.take_remaining();
            assert!(rest.starts_with(b"S") && rest.ends_with(b"tail"));
        }
        let mut q = SimpleQuery::new("select", 1 << 20);
        let mut answer = error_response("ERROR", "42501", "permission denied");
        answer.extend(ready_for_query(b'I'));
        q.receive_data(&answer).unwrap();
        assert!(matches!(q.result(), Some(QueryOutcome::Failed { code, .. }) if code == "42501"));
        let mut q = SimpleQuery::new("select", 1 << 20);
        assert!(q.receive_data(b"").is_err());
        let mut q = SimpleQuery::new("select", 10);
        assert!(q.receive_data(&msg(b'D', &[0; 40])).is_err());
    }
}
