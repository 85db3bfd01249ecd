"""The gateway carries the protocol unchanged: the same bytes sent to PostgreSQL directly and through
the gateway get the same answers, message for message.

Each scenario is raw protocol a driver could send (pipelines with errors, portals run in pieces,
COPY both ways and through the extended protocol, FunctionCall, notices, notifications, binary
results, a half-close, Terminate inside a transaction), sent on two fresh connections: one
straight to the test cluster (SCRAM, as PostgreSQL asks), one through a gateway (features off;
TLS on both legs; guardrails and masking on; the audit trail in sync mode), in one write or a few
bytes at a time. Everything after the login is
compared: tags and bodies of every message, and whether the connection ended. Only what differs
by nature is normalised: the notifying backend's process id in a NotificationResponse and the
table oids in a RowDescription (each session's temporary tables are its own).
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import (
    APP_PASSWORD,
    CLIENT_PASSWORD,
    CLIENT_USER,
    GatewayFactory,
    GatewayProcess,
    allow_plaintext,
)
from conftest import gateway_config as base_config
from ostiary.devcluster import PgCluster, TlsMaterial
from pgraw import (
    COPY_DONE,
    FLUSH,
    INT4PL,
    SYNC,
    TERMINATE,
    RawConn,
    bind,
    close,
    copy_data,
    copy_fail,
    data_rows,
    describe,
    errors_in,
    execute,
    function_call,
    parse,
    parse_fields,
    query_message,
    typed,
)

END = "end of scenario"
APP = "transparency"

Messages = list[tuple[bytes, bytes]]


def bind_binary(portal: str, stmt: str, value: bytes) -> bytes:
    """Bind with one parameter in binary format."""
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!hh", 1, 1)
    body += struct.pack("!h", 1) + struct.pack("!i", len(value)) + value + struct.pack("!h", 0)
    return typed(b"B", body)


def q(*sql: str) -> bytes:
    return b"".join(query_message(s) for s in sql)


# -- scenarios: (name, bytes sent in one write, "marker" or "eof") --------------------------------

SCENARIOS: list[tuple[str, bytes, str]] = [
    (
        "simple, several statements, an error in the middle",
        q("select 1 as a; select 1/0; select 2"),
        "marker",
    ),
    ("empty queries", q("", ";", "  "), "marker"),
    (
        "a transaction that fails and is rolled back",
        q("begin", "select 1/0", "select 'not run'", "rollback", "select 'after'"),
        "marker",
    ),
    (
        "extended: named statement, Describe both ways, Close, an error skips to Sync",
        parse("s1", "select $1::int + 1 as n, $2::text as t", (23, 25))
        + describe("S", "s1")
        + bind("p1", "s1", ("41", None))
        + describe("P", "p1")
        + execute("p1")
        + close("P", "p1")
        + parse("", "select * from no_such_table")
        + bind("", "")
        + execute()
        + SYNC
        + bind("", "s1", ("1", "x"))
        + execute()
        + close("S", "s1")
        + SYNC
        + bind("", "s1", ("1", "x"))
        + execute()
        + SYNC,
        "marker",
    ),
    (
        "extended: a portal run in pieces (PortalSuspended) inside a transaction",
        q("begin")
        + parse("", "select g, repeat('r', g) from generate_series(1, 7) g")
        + bind("cur", "")
        + execute("cur", 3)
        + execute("cur", 3)
        + execute("cur", 0)
        + SYNC
        + q("commit"),
        "marker",
    ),
    (
        "extended: Flush without Sync, then Sync",
        parse("", "select 'flushed'") + bind("", "") + execute() + FLUSH + SYNC,
        "marker",
    ),
    (
        "extended: wrong parameter count and a bad parameter value",
        parse("s2", "select $1::int")
        + bind("", "s2", ("1", "2"))
        + execute()
        + SYNC
        + bind("", "s2", ("not a number",))
        + execute()
        + SYNC,
        "marker",
    ),
    (
        "binary results",
        parse("", "select 7::int4, 'bin'::text, 2.5::float8, null::int8, '{1,2}'::int[]")
        + bind("", "", (), (1,))
        + execute()
        + SYNC,
        "marker",
    ),
    (
        "COPY FROM STDIN, done and failed",
        q("create temp table t (a int, b text)", "copy t from stdin")
        + copy_data(b"1\tone\n2\ttwo\n")
        + copy_data(b"3\tthree\n")
        + COPY_DONE
        + q("copy t from stdin")
        + copy_data(b"4\tfour\n")
        + copy_fail("changed my mind")
        + q("select * from t order by a"),
        "marker",
    ),
    (
        "COPY FROM STDIN with a bad row",
        q("create temp table t2 (a int)", "copy t2 from stdin") + copy_data(b"1\nnope\n3\n") + COPY_DONE,
        "marker",
    ),
    (
        "COPY TO STDOUT, text and CSV, and a COPY through the extended protocol",
        q(
            "copy (select g, 'v' || g from generate_series(1, 50) g) to stdout",
            "copy (select g, 'a,b' from generate_series(1, 3) g) to stdout with (format csv, header)",
            "create temp table t3 (a int)",
        )
        + parse("", "copy t3 from stdin")
        + bind("", "")
        + execute()
        + copy_data(b"10\n20\n")
        + COPY_DONE
        + SYNC
        + q("select sum(a) from t3"),
        "marker",
    ),
    ("FunctionCall", function_call(INT4PL, ("20", "22")) + function_call(INT4PL, ("1",)), "marker"),
    (
        "notices and a raised error with detail and hint",
        q(
            "do $$ begin raise notice 'hello %', 42; raise warning 'careful'; end $$",
            "do $$ begin raise exception 'custom' using detail = 'the detail', hint = 'a hint', "
            "errcode = 'P0042'; end $$",
        ),
        "marker",
    ),
    (
        "LISTEN, NOTIFY to itself, UNLISTEN",
        q("listen chan", "notify chan, 'the payload'", "select pg_notify('chan', 'second')", "unlisten chan"),
        "marker",
    ),
    (
        "ParameterStatus after SET",
        q("set application_name = 'renamed'", "set datestyle = 'SQL, DMY'", "reset application_name"),
        "marker",
    ),
    (
        "a larger result",
        q("select g, md5(g::text), repeat('x', g % 300) from generate_series(1, 5000) g"),
        "marker",
    ),
    (
        "an error in the middle of a result",
        q("select 1 / (3000 - g) from generate_series(1, 4000) g"),
        "marker",
    ),
    (
        "empty results, NULLs, text beyond ASCII, a wide row",
        q(
            "select 1 where false",
            "select null::text, 'ünïcödé ✓', E'tab\\there', '' as empty",
            "select repeat('w', 300000) as wide",
        ),
        "marker",
    ),
    (
        "a cursor fetched in pieces, and a statement timeout",
        q(
            "begin",
            "declare c cursor for select g from generate_series(1, 10) g",
            "fetch 4 from c",
            "fetch all from c",
            "close c",
            "commit",
            "set statement_timeout = 50",
            "select pg_sleep(2)",
            "reset statement_timeout",
        ),
        "marker",
    ),
    (
        "binary parameters, DEALLOCATE, and a Bind to what is gone",
        parse("s3", "select $1::int4 * 2")
        + bind_binary("", "s3", struct.pack("!i", 21))
        + execute()
        + SYNC
        + q("deallocate s3")
        + bind("", "s3", ("1",))
        + execute()
        + SYNC
        + close("S", "never_prepared")
        + SYNC,
        "marker",
    ),
    ("Terminate inside a transaction", q("begin", "select 'in tx'") + TERMINATE, "eof"),
    (
        "queries and then EOF (a half-close)",
        q("select 'first' from pg_sleep(0.2)", "select 'second'"),
        "half-close",
    ),
    # With no Sync, nothing says when the server is done: its answers to what was flushed still
    # reach the client, as they do from PostgreSQL (they used to be dropped).
    (
        "Parse, Bind, Execute and Flush, then EOF",
        parse("", "select 'flushed', g from generate_series(1, 3) g") + bind("", "") + execute() + FLUSH,
        "half-close",
    ),
    ("a Parse error with Flush, then EOF", parse("", "select * from no_such_table") + FLUSH, "half-close"),
    ("a Describe of no such statement, then EOF", describe("S", "nope") + FLUSH, "half-close"),
    (
        "Execute of 5,000 rows with Flush, then Terminate",
        parse("", "select g, repeat('x', 100) from generate_series(1, 5000) g")
        + bind("", "")
        + execute()
        + FLUSH
        + TERMINATE,
        "eof",
    ),
    (
        "COPY FROM STDIN cut short by EOF",
        q("create temp table t4 (a int)", "copy t4 from stdin") + copy_data(b"1\n"),
        "half-close",
    ),
]


# -- the two sides ---------------------------------------------------------------------------------


VARIANTS = ["plain", "tls", "guarded-masked", "audit-sync"]


@pytest.fixture(params=VARIANTS)
def gw(
    request: pytest.FixtureRequest,
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
) -> GatewayProcess:
    """The gateway four ways: features off on plaintext legs; TLS on both legs; plaintext with a
    guardrail on every new statement shape (each is held until the control plane decides) and
    email masking (every server message held whole and scanned; none of these answers has an
    email in it); plaintext with the audit trail in sync mode (what the client sends waits until
    its records are durable). The audit trail is on in all four (async, the default, in the
    first three)."""
    cfg = base_config(pg, gateway_tls, 0, tmp_path)
    if request.param != "tls":
        allow_plaintext(cfg)
        cfg["connections"][0]["upstream"]["tls"] = {"mode": "disable"}
    if request.param == "audit-sync":
        cfg["audit"] = {"mode": "sync", "flush_interval": 0.01}
    if request.param == "guarded-masked":
        # (No relation rule: under one, DO blocks are refused, and a scenario raises from one.)
        cfg["guardrails"] = [{"name": "no-lo-import", "match": {"functions": ["lo_import"]}, "message": "no"}]
        cfg["grants"][0]["guardrails"] = ["no-destructive-ddl", "no-lo-import"]
        cfg["masking"] = [{"name": "pii", "detectors": ["email"]}]
        cfg["connections"][0]["masking"] = ["pii"]
    gw = gateway_factory(cfg)
    gw.extra["client_tls"] = request.param == "tls"
    gw.extra["guarded"] = request.param == "guarded-masked"
    return gw


def direct(pg: PgCluster) -> RawConn:
    c = RawConn(pg.port)
    c.login_scram("app", APP_PASSWORD, application_name=APP)
    return c


def through(gw: GatewayProcess) -> RawConn:
    c = RawConn(gw.port)
    if gw.extra["client_tls"]:
        c.start_tls(gw.tls.ca_cert)
    c.login(CLIENT_USER, CLIENT_PASSWORD, application_name=APP)
    return c


def dribble(c: RawConn, data: bytes, rng: random.Random) -> None:
    """Sends `data` in pieces of 1 to 13 bytes with a pause after each, so that the gateway reads
    messages (and their headers) split across many reads."""
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 13)
        c.send(data[pos : pos + n])
        pos += n
        time.sleep(0.0002)


def run(c: RawConn, sent: bytes, end: str, rng: random.Random | None = None) -> tuple[Messages, bool]:
    """Sends the scenario and reads everything it is answered with: up to the end marker's
    ReadyForQuery, or to the end of the connection. Returns the messages and whether it ended."""
    with c:
        if rng is None:
            c.send(sent)
        else:
            dribble(c, sent, rng)
        if end == "half-close":
            socket.socket.shutdown(c.sock, socket.SHUT_WR)
        if end != "marker":
            out = c.outcome(15)
            assert out.closed, f"the connection did not end: {out.describe()}"
            return out.messages, True
        c.send(query_message(f"select '{END}'"))
        got: Messages = []
        seen_marker = False
        while True:
            m = c.recv_message(15)
            assert m is not None, f"closed early after {[t for t, _ in got][-10:]}"
            got.append(m)
            if m[0] == b"D" and END.encode() in m[1]:
                seen_marker = True
            if seen_marker and m[0] == b"Z":
                return got, False


def without_table_oids(body: bytes) -> bytes:
    """A RowDescription with each field's table oid zeroed (the two sessions' temporary tables
    are different tables)."""
    (n,) = struct.unpack("!h", body[:2])
    out, pos = bytearray(body[:2]), 2
    for _ in range(n):
        end = body.index(b"\0", pos) + 1
        out += body[pos:end] + b"\0\0\0\0" + body[end + 4 : end + 18]
        pos = end + 18
    assert pos == len(body), "a RowDescription with trailing bytes"
    return bytes(out)


def normalised(messages: Messages) -> Iterator[tuple[bytes, bytes]]:
    for tag, body in messages:
        if tag == b"A":  # NotificationResponse: the notifying backend's pid differs by nature
            body = b"\0\0\0\0" + body[4:]
        elif tag == b"T":
            body = without_table_oids(body)
        yield tag, body


def shown(messages: Messages) -> list[str]:
    out = []
    for tag, body in messages:
        if tag in (b"E", b"N"):
            f = parse_fields(body)
            out.append(f"{tag.decode()}:{f.get('S')}:{f.get('C')}:{f.get('M')}")
        else:
            out.append(f"{tag.decode()}:{body[:40]!r}")
    return out


@pytest.mark.parametrize("delivery", ["one-write", "dribbled"])
def test_every_scenario_is_answered_as_postgresql_answers_it(
    gw: GatewayProcess, pg: PgCluster, subtests: pytest.Subtests, delivery: str
) -> None:
    """`dribbled`: through the gateway, each scenario arrives a few bytes at a time (seeded)."""
    rng = random.Random(20261204) if delivery == "dribbled" else None
    for name, sent, end in SCENARIOS:
        if name == "FunctionCall" and gw.extra["guarded"]:
            with subtests.test(scenario="FunctionCall refused under guardrails"):
                # By design: a fast-path call carries no SQL to judge. Each is refused with 42501
                # and its ReadyForQuery, and the session goes on.
                got, _ = run(through(gw), sent, end, rng)
                assert [(t, parse_fields(b).get("C") if t == b"E" else b) for t, b in got[:4]] == [
                    (b"E", "42501"),
                    (b"Z", b"I"),
                    (b"E", "42501"),
                    (b"Z", b"I"),
                ], [parse_fields(b) for t, b in got if t == b"E"]
                assert "fast-path function calls" in parse_fields(got[0][1])["M"]
            continue
        with subtests.test(scenario=name):
            want, want_ended = run(direct(pg), sent, end)
            got, got_ended = run(through(gw), sent, end, rng)
            assert got_ended == want_ended
            w, g = list(normalised(want)), list(normalised(got))
            if w != g:
                first = next(
                    (i for i, (a, b) in enumerate(zip(w, g, strict=False)) if a != b), min(len(w), len(g))
                )
                raise AssertionError(
                    f"{name}: answers differ from message {first} on ({len(w)} direct, {len(g)} through "
                    f"the gateway)\n direct:  {shown(want[first : first + 6])}\n gateway: "
                    f"{shown(got[first : first + 6])}"
                )
    log = gw.log()
    for bad in ("internal_error", "protocol_error", "panicked", "Traceback"):
        assert bad not in log, f"{bad} in the gateway log:\n{log[-3000:]}"


@pytest.mark.parametrize(
    ("minor", "options"),
    [
        pytest.param(2, {}, id="3.2"),
        pytest.param(0, {"_pq_.test_option": "on"}, id="3.0-with-an-option"),
        pytest.param(9999, {"_pq_.a": "1", "_pq_.b": "2"}, id="3.9999-grease"),
    ],
)
def test_a_newer_protocol_is_negotiated_down_as_postgresql_does(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    tmp_path: Path,
    minor: int,
    options: dict[str, str],
) -> None:
    """A StartupMessage asking for protocol 3.2 (libpq 18 with max_protocol_version=latest), or with
    protocol options (`_pq_.*`), or the 3.9999 that libpq sends to test negotiation: PostgreSQL
    answers with NegotiateProtocolVersion (3.0, the options it does not know) before
    authenticating, and the client goes on with 3.0. The gateway answers the same bytes (that it
    leaves the options out of what it passes on is the handshake's unit test)."""
    cfg = base_config(pg, gateway_tls, 0, tmp_path)
    allow_plaintext(cfg)
    gw = gateway_factory(cfg)
    with RawConn(pg.port) as d:
        d.login_scram("app", APP_PASSWORD, minor=minor, application_name=APP, **options)
        assert d.negotiated is not None, "PostgreSQL did not negotiate"
    with RawConn(gw.port) as c:
        c.login(CLIENT_USER, CLIENT_PASSWORD, minor=minor, application_name=APP, **options)
        assert c.negotiated == d.negotiated
        rows = c.query("select current_setting('application_name'), 'works'")
        assert data_rows(rows) == [[APP, "works"]]


def startup_of_version(major: int, minor: int, params: dict[str, str]) -> bytes:
    body = struct.pack("!HH", major, minor) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()
    )
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(startup_of_version(2, 0, {"user": "app", "database": "app"}), id="protocol-2.0"),
        pytest.param(startup_of_version(4, 0, {"user": "app", "database": "app"}), id="protocol-4.0"),
        pytest.param(startup_of_version(3, 0, {"database": "app"}), id="no-user"),
    ],
)
def test_startup_packets_postgresql_refuses_get_its_error(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, packet: bytes
) -> None:
    """A StartupMessage of another protocol major version, or without a user name: PostgreSQL
    ends the connection with one FATAL error (0A000 "unsupported frontend protocol ...", 28000
    "no PostgreSQL user name ..."), to a protocol 2 client in that protocol's format (one string);
    the gateway sends the same severity, code and message, in the same format."""
    cfg = base_config(pg, gateway_tls, 0, tmp_path)
    allow_plaintext(cfg)
    gw = gateway_factory(cfg)
    seen: list[object] = []
    for port in (pg.port, gw.port):
        with RawConn(port) as c:
            c.send(packet)
            out = c.outcome(10)
        assert out.closed, out.describe()
        if out.messages:
            assert len(out.errors) == 1, out.describe()
            seen.append({k: v for k, v in out.errors[0].items() if k in "SVCM"})
        else:  # protocol 2: b"E", the message, a NUL; no length
            seen.append(out.raw)
    assert seen[0], "PostgreSQL said nothing"
    assert seen[1] == seen[0]


SESSION_SETTINGS = {
    "statement_timeout": "150",
    "search_path": "pg_catalog, public",
    "lock_timeout": "2s",
    "bytea_output": "escape",
    "default_transaction_isolation": "serializable",
    "my.custom": "abc",
    "jit": "off",
}


def test_startup_parameters_are_session_settings_as_with_postgresql(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    """Settings in the StartupMessage (asyncpg's server_settings, node-postgres' statement_timeout,
    pgJDBC's currentSchema) apply to the session as they do directly; an unknown setting or an
    invalid value ends the login with PostgreSQL's own error, fields and wording unchanged."""
    cfg = base_config(pg, gateway_tls, 0, tmp_path)
    allow_plaintext(cfg)
    gw = gateway_factory(cfg)
    shows = "select " + ", ".join(f"current_setting('{k}')" for k in SESSION_SETTINGS)
    seen = []
    for port in (pg.port, gw.port):
        with RawConn(port) as c:
            if port == pg.port:
                c.login_scram("app", APP_PASSWORD, **SESSION_SETTINGS)
            else:
                c.login(CLIENT_USER, CLIENT_PASSWORD, **SESSION_SETTINGS)
            seen.append(data_rows(c.query(shows)))
            errors = errors_in(c.query("select pg_sleep(1)"))
            seen.append([(e["C"], e["M"]) for e in errors])
    assert seen[0][0][0] == "150ms", seen
    assert seen[1] == [("57014", "canceling statement due to statement timeout")], seen
    assert seen[2:] == seen[:2]

    for bad in ({"nosuch_setting": "1"}, {"statement_timeout": "soon"}, {"DateStyle": "nonsense"}):
        refusals = []
        for port in (pg.port, gw.port):
            with RawConn(port) as c, pytest.raises(EOFError):
                if port == pg.port:
                    c.login_scram("app", APP_PASSWORD, **bad)
                else:
                    c.login(CLIENT_USER, CLIENT_PASSWORD, **bad)
            refusals.append([{k: v for k, v in e.items() if k in "SVCMDH"} for e in errors_in(c.before_eof)])
        assert len(refusals[0]) == 1 and refusals[0][0]["S"] == "FATAL", (bad, refusals)
        assert refusals[1] == refusals[0], bad


def test_psycopg_with_libpq_18_asking_for_the_latest_protocol(gw: GatewayProcess) -> None:
    """psycopg's own libpq (18 in the binary wheel) with max_protocol_version=latest asks for 3.2
    and settles for 3.0 through the gateway, as it does with PostgreSQL 15."""
    if psycopg.pq.version() < 180000:
        pytest.skip(f"libpq {psycopg.pq.version()} has no max_protocol_version")
    sslmode = "verify-full" if gw.extra["client_tls"] else "disable"
    dsn = gw.dsn(sslmode=sslmode) + " max_protocol_version=latest"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select 'negotiated'").fetchone() == ("negotiated",)
        assert conn.pgconn.protocol_version == 3


def test_the_session_starts_with_the_parameters_postgresql_reports(gw: GatewayProcess, pg: PgCluster) -> None:
    """After authentication PostgreSQL reports its settings (server_version, client_encoding,
    DateStyle, standard_conforming_strings, ...) that drivers read; through the gateway a client
    gets the same ParameterStatus messages with the same values, one BackendKeyData (the
    gateway's own) and ReadyForQuery, in PostgreSQL's order."""

    def welcome(messages: Messages) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        # (A cleartext login's AuthenticationOk comes with these; the SCRAM login reads its own.)
        rest = [t for t, b in messages if t != b"S" and (t, b) != (b"R", b"\0\0\0\0")]
        return [(t, b) for t, b in messages if t == b"S"], rest

    with direct(pg) as d:
        want = welcome(d.login_messages)
    with through(gw) as c:
        got = welcome(c.login_messages)
    assert got == want
    assert want[1] == [b"K", b"Z"], want[1]
