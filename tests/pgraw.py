"""A minimal PostgreSQL wire client over a raw socket, for tests that must send what libpq never would.

Everything here is blocking with socket timeouts, so a gateway that hangs makes a test fail, not
stall: every read has a deadline. ``RawConn`` speaks protocol 3.0 in plaintext or, after
``start_tls``, through Python's ``ssl`` module (verify-full against the gateway's CA).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

PROTOCOL_3_0 = 196608
SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def startup_message(params: dict[str, str], minor: int = 0) -> bytes:
    """A StartupMessage of protocol 3.`minor` (3.0 unless asked otherwise)."""
    body = struct.pack("!i", PROTOCOL_3_0 | minor)
    for k, v in params.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!iiii", 16, 80877102, pid, key)


def typed(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def password_message(pw: str) -> bytes:
    return typed(b"p", pw.encode() + b"\0")


def query_message(sql: str) -> bytes:
    return typed(b"Q", sql.encode() + b"\0")


SYNC = typed(b"S", b"")
TERMINATE = typed(b"X", b"")


# -- extended protocol, COPY and fast-path messages ---------------------------------------------


def cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = (
        cstr(name) + cstr(sql) + struct.pack("!h", len(types)) + b"".join(struct.pack("!i", t) for t in types)
    )
    return typed(b"P", body)


def bind(
    portal: str, stmt: str, params: tuple[str | None, ...] = (), result_formats: tuple[int, ...] = ()
) -> bytes:
    body = cstr(portal) + cstr(stmt) + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p.encode())) + p.encode()
    body += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    return typed(b"B", body)


def describe(kind: str, name: str) -> bytes:
    return typed(b"D", kind.encode() + cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return typed(b"E", cstr(portal) + struct.pack("!i", max_rows))


def close(kind: str, name: str) -> bytes:
    return typed(b"C", kind.encode() + cstr(name))


FLUSH = typed(b"H", b"")


def copy_data(data: bytes) -> bytes:
    return typed(b"d", data)


COPY_DONE = typed(b"c", b"")


def copy_fail(why: str) -> bytes:
    return typed(b"f", cstr(why))


def function_call(oid: int, args: tuple[str, ...]) -> bytes:
    body = struct.pack("!i", oid) + struct.pack("!hh", 1, 0) + struct.pack("!h", len(args))
    for a in args:
        body += struct.pack("!i", len(a.encode())) + a.encode()
    return typed(b"F", body + struct.pack("!h", 0))


INT4PL = 177  # pg_proc oid of int4pl(int4, int4), for FunctionCall


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from `sock`; EOFError if it closes first."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("connection closed")
        out += chunk
    return out


def recv_raw_message(sock: socket.socket, typed_: bool = True) -> bytes:
    """One whole message as sent (tag, length, body), or an untyped one (StartupMessage)."""
    head = recv_exact(sock, 5 if typed_ else 4)
    (length,) = struct.unpack("!I", head[-4:])
    return head + recv_exact(sock, length - 4)


def last_bytes_then_fin(sock: socket.socket, data: bytes) -> None:
    """Sends `data` and a FIN in one TCP segment (TCP_CORK holds the data until the FIN joins it),
    so the receiver's epoll reports one edge for both. On a TLS socket `data` is encrypted and the
    FIN is sent without a close_notify."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    sock.sendall(data)
    socket.socket.shutdown(sock, socket.SHUT_WR)


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse fields keyed by their one-letter code ('S', 'V', 'C', 'M', 'H' ...)."""
    out: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode(errors="replace")
    return out


@dataclass
class Outcome:
    """What a connection got before it ended (or before the deadline)."""

    messages: list[tuple[bytes, bytes]] = field(default_factory=list)
    closed: bool = False  # EOF or reset seen
    reset: bool = False
    elapsed: float = 0.0
    raw: bytes = b""

    @property
    def errors(self) -> list[dict[str, str]]:
        return [parse_fields(b) for t, b in self.messages if t == b"E"]

    def describe(self) -> str:
        tags = [t.decode(errors="replace") for t, _ in self.messages]
        return (
            f"tags={tags} errors={self.errors} closed={self.closed} reset={self.reset} "
            f"elapsed={self.elapsed:.2f}s raw_head={self.raw[:40]!r}"
        )


class RawConn:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.timeout = timeout
        # The NegotiateProtocolVersion a login got before authentication, if any.
        self.negotiated: bytes | None = None
        self.before_eof: list[tuple[bytes, bytes]] = []  # what until_ready got before a close
        # What a login got after authentication, to ReadyForQuery.
        self.login_messages: list[tuple[bytes, bytes]] = []

    # -- plumbing ------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def start_tls(
        self,
        ca_cert: Path,
        server_hostname: str = "127.0.0.1",
        direct: bool = False,
        alpn: list[str] | None = None,
    ) -> None:
        """TLS after SSLRequest, or at once (`direct`, libpq's sslnegotiation=direct), offering
        the ALPN protocols `alpn`."""
        if not direct:
            self.send(SSL_REQUEST)
            answer = self._recv_exact_raw(1)
            assert answer == b"S", f"SSLRequest answered {answer!r}"
        ctx = ssl.create_default_context(cafile=str(ca_cert))
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def _recv_exact_raw(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

    def _fill(self, deadline: float) -> bool:
        """Reads more bytes into the buffer; False at EOF. Raises TimeoutError at the deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data before the deadline")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("no data before the deadline") from None
        if not chunk:
            return False
        self.buf += chunk
        return True

    def recv_message(self, timeout: float | None = None) -> tuple[bytes, bytes] | None:
        """One typed message, or None at EOF. Raises TimeoutError if nothing complete arrives."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack("!i", self.buf[1:5])
                if length < 4:
                    raise AssertionError(f"peer sent a bad length {length}")
                if len(self.buf) >= 1 + length:
                    tag, body = self.buf[:1], self.buf[5 : 1 + length]
                    self.buf = self.buf[1 + length :]
                    return tag, body
            if not self._fill(deadline):
                return None

    def until_ready(self, timeout: float | None = None) -> list[tuple[bytes, bytes]]:
        """Messages up to and including ReadyForQuery. Raises on EOF or timeout."""
        out: list[tuple[bytes, bytes]] = []
        while True:
            m = self.recv_message(timeout)
            if m is None:
                self.before_eof = out
                got = [(t, parse_fields(b) if t == b"E" else b[:60]) for t, b in out]
                raise EOFError(f"closed before ReadyForQuery; got {got}")
            out.append(m)
            if m[0] == b"Z":
                return out

    def outcome(self, timeout: float) -> Outcome:
        """Reads until EOF or the deadline; the messages received and whether the peer closed."""
        start = time.monotonic()
        deadline = start + timeout
        res = Outcome()
        raw = bytearray()
        while True:
            try:
                m = self.recv_message(deadline - time.monotonic())
            except TimeoutError:
                break
            except (ConnectionResetError, BrokenPipeError):
                res.closed = res.reset = True
                break
            except ssl.SSLError:
                res.closed = True
                break
            if m is None:
                res.closed = True
                break
            res.messages.append(m)
            raw += m[0] + m[1][:40]
        res.raw = bytes(raw) or self.buf
        res.elapsed = time.monotonic() - start
        return res

    def _first_answer(self) -> tuple[bytes, bytes] | None:
        """The first message after StartupMessage, past a NegotiateProtocolVersion (kept)."""
        m = self.recv_message()
        if m is not None and m[0] == b"v":
            self.negotiated = m[1]
            m = self.recv_message()
        return m

    def login(
        self, user: str, password: str, database: str = "app", minor: int = 0, **params: str
    ) -> list[tuple[bytes, bytes]]:
        """StartupMessage (protocol 3.`minor`), answers the cleartext password request, returns
        messages to ReadyForQuery."""
        self.send(startup_message({"user": user, "database": database, **params}, minor))
        m = self._first_answer()
        assert m is not None, "closed after StartupMessage"
        if m[0] == b"E":
            raise AssertionError(f"refused: {parse_fields(m[1])}")
        assert m[0] == b"R" and struct.unpack("!i", m[1][:4])[0] == 3, (
            f"expected cleartext password request, got {m!r}"
        )
        self.send(password_message(password))
        self.login_messages = self.until_ready()
        return self.login_messages

    def login_scram(
        self, user: str, password: str, database: str = "app", minor: int = 0, **params: str
    ) -> list[tuple[bytes, bytes]]:
        """StartupMessage and a SCRAM-SHA-256 exchange (RFC 5802/7677, no channel binding), as
        PostgreSQL itself asks for; returns the messages after AuthenticationOk to ReadyForQuery.
        Written here rather than borrowed from the gateway (`_core.UpstreamHandshake`) so that
        the reference side of a comparison does not run the code under test, and so that it can
        ask for other protocol versions."""
        self.send(startup_message({"user": user, "database": database, **params}, minor))

        def auth(expect: int, m: tuple[bytes, bytes] | None = None) -> bytes:
            m = m or self.recv_message()
            assert m is not None, "closed during authentication"
            if m[0] == b"E":
                raise AssertionError(f"refused: {parse_fields(m[1])}")
            (code,) = struct.unpack("!i", m[1][:4])
            assert m[0] == b"R" and code == expect, f"expected authentication {expect}, got {m!r}"
            return m[1][4:]

        assert b"SCRAM-SHA-256\0" in auth(10, self._first_answer())  # AuthenticationSASL
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n=,r={nonce}"
        first = ("n,," + first_bare).encode()
        self.send(typed(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
        server_first = auth(11).decode()
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        assert attrs["r"].startswith(nonce), server_first
        salted = hashlib.pbkdf2_hmac(
            "sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        final_bare = f"c=biws,r={attrs['r']}"
        message = f"{first_bare},{server_first},{final_bare}".encode()
        signature = hmac.new(hashlib.sha256(client_key).digest(), message, "sha256").digest()
        proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True))).decode()
        self.send(typed(b"p", f"{final_bare},p={proof}".encode()))
        server_final = auth(12).decode()
        server_key = hmac.new(salted, b"Server Key", "sha256").digest()
        expected = base64.b64encode(hmac.new(server_key, message, "sha256").digest()).decode()
        assert server_final == f"v={expected}", "the server's signature does not verify"
        auth(0)
        self.login_messages = self.until_ready()
        return self.login_messages

    def query(self, sql: str, timeout: float | None = None) -> list[tuple[bytes, bytes]]:
        self.send(query_message(sql))
        return self.until_ready(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def data_rows(messages: list[tuple[bytes, bytes]]) -> list[list[str | None]]:
    """Decodes DataRow messages (text format) to lists of strings."""
    rows: list[list[str | None]] = []
    for tag, body in messages:
        if tag != b"D":
            continue
        (n,) = struct.unpack("!h", body[:2])
        pos = 2
        row: list[str | None] = []
        for _ in range(n):
            (ln,) = struct.unpack("!i", body[pos : pos + 4])
            pos += 4
            if ln < 0:
                row.append(None)
            else:
                row.append(body[pos : pos + ln].decode())
                pos += ln
        rows.append(row)
    return rows


def errors_in(messages: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [parse_fields(b) for t, b in messages if t == b"E"]
