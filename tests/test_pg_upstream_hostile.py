"""An upstream that is not what it claims: an impostor on the network path, a compromised server, a
broken proxy in between. The gateway holds the upstream password and the clients' trust, so such a
server must get neither the password (where the configuration says so) nor the gateway's memory,
its event loop or the cancel key, and the client must get a clear FATAL, never the server's garbage.

The server is played by a few lines of socket code (`FakeUpstream`), one scripted exchange per
connection; the clients are real (psql, psycopg).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import APP_PASSWORD, GatewayFactory, GatewayProcess, psql
from ostiary.devcluster import PgCluster, TlsMaterial
from test_pg_upstream_failures import assert_still_serving, with_extra_connection

SSL_REQUEST_CODE = 80877103
CANCEL_REQUEST_CODE = 80877102


def msg(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def auth(code: int, data: bytes = b"") -> bytes:
    return msg(b"R", struct.pack("!i", code) + data)


def error(code: str, message: str, severity: str = "FATAL") -> bytes:
    body = (
        b"S" + severity.encode() + b"\0V" + severity.encode() + b"\0C" + code.encode(errors="surrogateescape")
    )
    return msg(b"E", body + b"\0M" + message.encode() + b"\0\0")


def notice(text: str) -> bytes:
    return msg(b"N", b"SNOTICE\0VNOTICE\0C00000\0M" + text.encode() + b"\0\0")


def param(name: str, value: str) -> bytes:
    return msg(b"S", name.encode() + b"\0" + value.encode() + b"\0")


READY = msg(b"K", struct.pack("!ii", 4242, 77)) + msg(b"Z", b"I")
LOGGED_IN = auth(0) + param("server_version", "15.0") + param("client_encoding", "UTF8") + READY


class Peer:
    """One accepted connection of the fake server, with what the gateway sent on it."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.received = b""

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the gateway closed")
            out += chunk
        self.received += out
        return out

    def read_message(self) -> tuple[bytes, bytes]:
        tag = self.read(1)
        (length,) = struct.unpack("!i", self.read(4))
        return tag, self.read(length - 4)

    def read_startup(self, tls: ssl.SSLContext | None) -> dict[str, str] | tuple[int, int]:
        """Reads the StartupMessage (answering an SSLRequest with 'S' and TLS when ``tls`` is
        given, 'N' otherwise); a CancelRequest comes back as (pid, key)."""
        while True:
            (length,) = struct.unpack("!i", self.read(4))
            body = self.read(length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code == SSL_REQUEST_CODE:
                if tls is None:
                    self.sock.sendall(b"N")
                    continue
                self.sock.sendall(b"S")
                self.sock = tls.wrap_socket(self.sock, server_side=True)
                continue
            if code == CANCEL_REQUEST_CODE:
                return struct.unpack("!ii", body[4:12])
            parts = body[4:].split(b"\0")
            return {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 2, 2)}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


Script = Callable[[Peer, int], None]


def log_in(peer: Peer, tls: ssl.SSLContext | None = None) -> bytes:
    """Plays a server's side of a cleartext login up to the client's first message, and returns
    that message's tag."""
    peer.read_startup(tls)
    peer.send(auth(3))
    peer.read_message()
    peer.send(LOGGED_IN)
    tag, _ = peer.read_message()
    return tag


class FakeUpstream:
    """A TCP server that runs ``script(peer, n)`` on its n-th connection (from 0), in a thread."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(0.2)
        self.port: int = self.srv.getsockname()[1]
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except TimeoutError:
                continue
            conn.settimeout(15)
            peer = Peer(conn)
            self.peers.append(peer)
            threading.Thread(target=self._run, args=(peer, n), daemon=True).start()
            n += 1

    def _run(self, peer: Peer, n: int) -> None:
        try:
            self.script(peer, n)
        except (OSError, ConnectionError, ssl.SSLError):
            pass
        except BaseException as e:  # a bug in the script: reported by the test
            self.errors.append(e)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.srv.close()
        for p in self.peers:
            with contextlib.suppress(OSError):
                p.sock.close()


@pytest.fixture
def fake_upstream() -> Iterator[Callable[[Script], FakeUpstream]]:
    servers: list[FakeUpstream] = []

    def start(script: Script) -> FakeUpstream:
        servers.append(FakeUpstream(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
        assert not s.errors, s.errors


FakeGateway = Callable[..., tuple[FakeUpstream, GatewayProcess]]


@pytest.fixture
def fake_gateway(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    fake_upstream: Callable[[Script], FakeUpstream],
) -> FakeGateway:
    """``start(script, **upstream)``: a fake server playing ``script`` and a gateway whose
    connection ``fake`` goes to it (plaintext unless ``tls`` is given in ``upstream``)."""

    def start(script: Script, **upstream: Any) -> tuple[FakeUpstream, GatewayProcess]:
        fake = fake_upstream(script)
        extra = {"port": fake.port, "tls": {"mode": "disable"}, **upstream}
        conns = with_extra_connection(pg, gateway_tls, tmp_path, "fake", extra)
        return fake, gateway_factory(connections=conns)

    return start


def login_error(gw: GatewayProcess) -> str:
    r = psql(gw, "-c", "select 1", dbname="fake", timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    return r.stderr


def wait_log(gw: GatewayProcess, words: str) -> None:
    deadline = time.monotonic() + 10
    while words not in gw.log():
        assert time.monotonic() < deadline, f"{words!r} not in the log:\n{gw.log()[-3000:]}"
        time.sleep(0.05)


def test_a_server_that_asks_for_the_password_after_accepting_the_login_does_not_get_it(
    fake_gateway: FakeGateway,
) -> None:
    def script(peer: Peer, n: int) -> None:
        peer.read_startup(None)
        peer.send(auth(0) + auth(3))  # OK, then "send me your cleartext password"
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            peer.read_message()

    fake, gw = fake_gateway(script)
    err = login_error(gw)
    assert "asked for authentication after accepting the login" in err, err
    assert APP_PASSWORD.encode() not in b"".join(p.received for p in fake.peers)
    assert_still_serving(gw)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (LOGGED_IN, "asked for none authentication; require_auth allows only scram-sha-256"),
        (auth(3), "asked for password authentication; require_auth allows only scram-sha-256"),
        (auth(5, b"salt"), "asked for md5 authentication; require_auth allows only scram-sha-256"),
    ],
    ids=["no password at all", "cleartext", "md5"],
)
def test_require_auth_refuses_weaker_methods(
    fake_gateway: FakeGateway,
    answer: bytes,
    words: str,
) -> None:
    def script(peer: Peer, n: int) -> None:
        peer.read_startup(None)
        peer.send(answer)
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            peer.read_message()

    fake, gw = fake_gateway(script, require_auth=["scram-sha-256"])
    err = login_error(gw)
    assert words in err, err
    sent = b"".join(p.received for p in fake.peers)
    assert APP_PASSWORD.encode() not in sent
    assert hashlib.md5((APP_PASSWORD + "app").encode()).hexdigest().encode() not in sent
    assert_still_serving(gw)


def test_require_auth_lets_the_real_servers_scram_through(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    conns = with_extra_connection(pg, gateway_tls, tmp_path, "strict", {"require_auth": ["scram-sha-256"]})
    gw = gateway_factory(connections=conns)
    r = psql(gw, "-At", "-c", "select current_user", dbname="strict")
    assert r.returncode == 0 and r.stdout.strip() == "app", r.stderr


def test_what_a_server_sends_during_login_is_bounded(
    fake_gateway: FakeGateway,
) -> None:
    """Notices and parameters before ReadyForQuery are held for the client: a server that never
    stops sending them is cut off at 1 MiB, not after gigabytes."""

    def script(peer: Peer, n: int) -> None:
        peer.read_startup(None)
        peer.send(auth(0))
        chunk = notice("n" * 60_000) * 16 if n == 0 else param("p", "v" * 20_000) * 48
        for _ in range(200):  # up to ~190 MB
            peer.send(chunk)

    _fake, gw = fake_gateway(script)
    before = gw.rss_kib()
    for _ in range(2):  # notices, then parameters
        err = login_error(gw)
        assert "notices and parameters sent by the upstream during login" in err, err
    assert gw.rss_kib() - before < 64 * 1024
    _, gw2 = fake_gateway(
        lambda peer, n: (peer.read_startup(None), peer.send(auth(0) + param("p", "v" * 40_000)))
    )
    err = login_error(gw2)
    assert "ParameterStatus" in err, err
    assert_still_serving(gw)


def test_a_server_error_that_is_not_postgresql_s_is_a_protocol_error(
    fake_gateway: FakeGateway,
) -> None:
    secret = APP_PASSWORD

    def script(peer: Peer, n: int) -> None:
        peer.read_startup(None)
        if n == 0:
            peer.send(error("0800\udcff", "odd"))
        else:
            # A server that echoes the password it was given in its refusal.
            peer.send(auth(3))
            _, body = peer.read_message()
            peer.send(error("53300", f"too many connections for {body[:-1].decode()}"))

    _fake, gw = fake_gateway(script)
    err = login_error(gw)
    assert "broke the protocol during login" in err and "SQLSTATE" in err, err
    err = login_error(gw)
    assert "too many connections for ****" in err, err
    assert secret not in err + gw.log()


def test_the_upstream_s_own_reason_for_refusing_the_gateway_is_logged_not_sent(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
) -> None:
    conns = with_extra_connection(
        pg, gateway_tls, tmp_path, "badpw", {"password_env": None, "password": "not-the-password"}
    )
    gw = gateway_factory(connections=conns)
    err = login_error_db(gw, "badpw")
    assert "refused the gateway's credentials" in err and 'user "app"' not in err, err
    assert 'refused the login of app: 28P01 password authentication failed for user "app"' in gw.log()
    assert "not-the-password" not in gw.log()


def login_error_db(gw: GatewayProcess, db: str) -> str:
    r = psql(gw, "-c", "select 1", dbname=db, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    return r.stderr


def _scram_server(peer: Peer, iterations: int, derived: dict[str, float]) -> None:
    """The server side of SCRAM-SHA-256 for APP_PASSWORD with ``iterations``; records when the
    client's proof arrived."""
    peer.send(auth(10, b"SCRAM-SHA-256\0\0"))
    _, body = peer.read_message()
    mech_end = body.index(b"\0")
    (n,) = struct.unpack("!i", body[mech_end + 1 : mech_end + 5])
    client_first = body[mech_end + 5 : mech_end + 5 + n].decode()
    bare = client_first.split(",", 2)[2]
    nonce = bare.split("r=", 1)[1] + "srv"
    salt = b"hostile-salt"
    first = f"r={nonce},s={base64.b64encode(salt).decode()},i={iterations}"
    peer.send(auth(11, first.encode()))
    derived["first_sent"] = time.monotonic()
    _, final = peer.read_message()
    derived["at"] = time.monotonic()
    salted = hashlib.pbkdf2_hmac("sha256", APP_PASSWORD.encode(), salt, iterations)
    without_proof = final.decode().rsplit(",p=", 1)[0]
    message = f"{bare},{first},{without_proof}".encode()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    signature = base64.b64encode(hmac.new(server_key, message, "sha256").digest())
    peer.send(auth(12, b"v=" + signature) + LOGGED_IN)
    with contextlib.suppress(OSError, ConnectionError, TimeoutError):
        while True:
            tag, _ = peer.read_message()
            if tag == b"Q":
                peer.send(msg(b"I", b"") + msg(b"Z", b"I"))
            if tag == b"X":
                return


def test_a_costly_scram_derivation_does_not_stall_other_sessions(
    fake_gateway: FakeGateway,
) -> None:
    """A server may ask for 10,000,000 PBKDF2 iterations (about a second or more of CPU): the
    derivation runs off the event loop, so a session's login and statements go on meanwhile, and
    the login to that server still completes."""
    derived: dict[str, float] = {}
    _fake, gw = fake_gateway(
        lambda peer, n: (peer.read_startup(None), _scram_server(peer, 10_000_000, derived)),
        connect_timeout=60,
    )
    result: dict[str, Any] = {}

    def slow_login() -> None:
        result["r"] = psql(gw, "-c", "select 1", dbname="fake", timeout=90)

    t = threading.Thread(target=slow_login)
    t.start()
    deadline = time.monotonic() + 20
    while "first_sent" not in derived:  # the gateway has the server's first message: deriving
        assert time.monotonic() < deadline, gw.log()[-3000:]
        time.sleep(0.01)
    with psycopg.connect(gw.dsn()) as c:  # a whole login and statements to the real cluster
        for _ in range(3):
            assert c.execute("select 1").fetchone() == (1,)
    done = time.monotonic()
    t.join(60)
    assert result["r"].returncode == 0, result["r"].stderr
    # The other session's login and statements ended before the derivation did.
    assert done < derived["at"], (done, derived)


def test_a_cancel_is_never_sent_in_plaintext_when_tls_is_asked_for(
    fake_gateway: FakeGateway, gateway_tls: TlsMaterial
) -> None:
    """The login went over TLS; the server (or whoever answers on its address) then refuses TLS to
    the gateway's cancel connection: the backend's key stays with the gateway."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(gateway_tls.server_cert, gateway_tls.server_key)
    release = threading.Event()
    query_arrived = threading.Event()

    def script(peer: Peer, n: int) -> None:
        if n == 0:
            assert log_in(peer, tls) == b"Q"
            query_arrived.set()
            release.wait(30)  # never answers: the client will cancel
            peer.sock.close()
        else:
            peer.read_startup(None)  # answers the SSLRequest with 'N'
            peer.read(1)  # anything after that is the key in clear

    fake, gw = fake_gateway(script, tls={"mode": "require"})
    conn = psycopg.connect(gw.dsn(dbname="fake"))

    def run() -> None:
        with contextlib.suppress(psycopg.Error):
            conn.execute("select 1")

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert query_arrived.wait(20)
        # (cancel_safe waits in Python: libpq's blocking PQcancel would hold this process, the fake
        # server's, until the gateway answered.)
        conn.cancel_safe(timeout=20)
        wait_log(gw, "cancel not forwarded")
        assert len(fake.peers) == 2
        time.sleep(0.3)
        assert fake.peers[1].received == struct.pack("!ii", 8, SSL_REQUEST_CODE), fake.peers[1].received
    finally:
        release.set()
        worker.join(30)
        conn.close()
    assert_still_serving(gw)


@pytest.mark.parametrize(
    "answer",
    [auth(3), msg(b"x", b"?"), msg(b"K", struct.pack("!ii", 1, 2)), param("p", "v" * 40_000)],
    ids=["a password request", "no message at all", "BackendKeyData", "a 40 kB ParameterStatus"],
)
def test_what_no_session_has_from_a_server_ends_the_session(
    fake_gateway: FakeGateway,
    answer: bytes,
) -> None:
    """Mid-session, a server that asks for authentication would have the client send it its
    password or token; other bytes no PostgreSQL sends would reach the client as if they were
    messages. The session ends with 08P01 instead."""
    after: dict[str, bytes] = {}

    def script(peer: Peer, n: int) -> None:
        assert log_in(peer) == b"Q"
        mark = len(peer.received)
        peer.send(answer)
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            while True:
                peer.read_message()
        after["sent"] = peer.received[mark:]

    _fake, gw = fake_gateway(script)
    with psycopg.connect(gw.dsn(dbname="fake")) as c, pytest.raises(psycopg.OperationalError) as e:
        c.execute("select 1")
    assert e.value.sqlstate == "08P01", e.value
    assert "protocol violation from the server: unexpected message type" in str(e.value), e.value
    deadline = time.monotonic() + 10
    while "sent" not in after:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # Nothing but the gateway's Terminate (or nothing) followed: no password message.
    assert not after["sent"].startswith(b"p"), after
    assert_still_serving(gw)
