"""psycopg 3 through the gateway: both protocols, binary format, pipelines, COPY, LISTEN/NOTIFY."""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Iterator
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql

from conftest import GatewayProcess


@pytest.fixture
def conn(gateway: GatewayProcess) -> Iterator[psycopg.Connection]:
    with psycopg.connect(gateway.dsn(), autocommit=True) as c:
        yield c


def test_simple_query_protocol(conn: psycopg.Connection) -> None:
    # No parameters: psycopg sends a simple Query; two statements give two result sets.
    cur = conn.execute("select 1 as a, 'x' as b; select current_user, current_database()")
    assert cur.fetchall() == [(1, "x")]
    assert cur.nextset()
    assert cur.fetchall() == [("app", "app")]
    assert not cur.nextset()


def test_parameterized_queries_extended_protocol(conn: psycopg.Connection) -> None:
    cur = conn.execute("select %s::int + %s::int, %s::text || '!', %s::text is null", (40, 2, "hé", None))
    assert cur.fetchone() == (42, "hé!", True)
    cur = conn.execute("select x, x * %(k)s from generate_series(1, %(n)s) x order by x", {"k": 10, "n": 5})
    assert cur.fetchall() == [(i, i * 10) for i in range(1, 6)]
    # Many executions with different parameters keep the protocol in step.
    for i in range(200):
        assert conn.execute("select %s::bigint * 2", (i,)).fetchone() == (i * 2,)


def test_prepared_statements(conn: psycopg.Connection) -> None:
    for i in range(5):
        row = conn.execute("select %s::int * 3 as tripled", (i,), prepare=True).fetchone()
        assert row == (i * 3,)
    prepared = conn.execute(
        "select statement from pg_prepared_statements where statement like %s",
        ("%::int * 3 as tripled%",),
    ).fetchall()
    # One server-side prepared statement, created on the first prepare=True and reused since.
    assert len(prepared) == 1
    assert "$1::int * 3" in prepared[0][0]


def test_binary_format_round_trip(conn: psycopg.Connection) -> None:
    ts = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456)
    tstz = datetime.datetime(2001, 9, 9, 1, 46, 40, tzinfo=datetime.UTC)
    blob = bytes(range(256)) * 4
    values = (
        2**62 + 17,
        -(2**31),
        blob,
        Decimal("-12345678901234567890.000000000123"),
        ts,
        tstz,
        [1, 2, None, 4],
        ["a", "b c", "ü", ""],
        [[1.5, 2.5], [3.5, 4.5]],
    )
    with conn.cursor(binary=True) as cur:
        cur.execute(
            "select %s::int8, %s::int4, %b::bytea, %s::numeric, %s::timestamp, %s::timestamptz,"
            " %s::int4[], %s::text[], %s::float8[]",
            values,
        )
        row = cur.fetchone()
        assert cur.pgresult is not None
        assert cur.pgresult.fformat(0) == 1, "results must come back in binary"
    assert row is not None
    assert row[:6] == values[:6]
    assert row[6:] == values[6:]
    # Binary results of a server-generated set, without parameters.
    cur = conn.execute(
        "select g::int4, decode(md5(g::text), 'hex') from generate_series(1, 100) g", binary=True
    )
    rows = cur.fetchall()
    assert len(rows) == 100
    assert rows[0][0] == 1
    assert rows[99][1] == bytes.fromhex("f899139df5e1059396431415e770c6dd")  # md5('100')


def test_pipeline_mode(conn: psycopg.Connection) -> None:
    conn.execute("drop table if exists psy_pipeline")
    conn.execute("create table psy_pipeline (id int primary key, payload text)")
    n = 5000
    with conn.pipeline() as p, conn.cursor() as cur:
        for i in range(n):
            cur.execute("insert into psy_pipeline values (%s, %s)", (i, f"payload-{i}"))
        p.sync()
        cur.execute("select count(*), sum(id), max(payload) from psy_pipeline")
        counted = cur.fetchone()
    assert counted == (n, n * (n - 1) // 2, "payload-999")
    # An error inside a pipeline aborts the rest up to the next sync; the session survives.
    with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
        conn.execute("insert into psy_pipeline values (1, 'dup')")
        conn.execute("insert into psy_pipeline values (-1, 'skipped')")
    assert conn.execute("select count(*) from psy_pipeline").fetchone() == (n,)
    conn.execute("drop table psy_pipeline")


def test_copy_from_stdin_and_to_stdout(conn: psycopg.Connection) -> None:
    conn.execute("drop table if exists psy_copy")
    conn.execute("create table psy_copy (id int, name text, amount numeric, at timestamp)")
    base = datetime.datetime(2020, 1, 1)
    rows = [
        (
            i,
            None if i % 50 == 0 else f"name\t{i}\\ 'q' ü",
            Decimal(i) / 4,
            base + datetime.timedelta(minutes=i),
        )
        for i in range(20_000)
    ]
    with conn.cursor() as cur:
        with cur.copy("copy psy_copy (id, name, amount, at) from stdin") as copy:
            for r in rows:
                copy.write_row(r)
        assert cur.rowcount == len(rows)
        with cur.copy("copy (select id, name, amount, at from psy_copy order by id) to stdout") as copy:
            copy.set_types(["int4", "text", "numeric", "timestamp"])
            out = list(copy.rows())
    assert out == rows
    # Binary COPY both ways.
    with conn.cursor() as cur:
        with cur.copy("copy psy_copy (id, name, amount, at) from stdin (format binary)") as copy:
            copy.set_types(["int4", "text", "numeric", "timestamp"])
            copy.write_row((-1, "binary", Decimal("1.5"), base))
        with cur.copy("copy (select id, name from psy_copy where id < 0) to stdout (format binary)") as copy:
            copy.set_types(["int4", "text"])
            assert list(copy.rows()) == [(-1, "binary")]
    conn.execute("drop table psy_copy")


def test_transactions_commit_and_rollback(gateway: GatewayProcess) -> None:
    with psycopg.connect(gateway.dsn()) as c:  # not autocommit: psycopg opens transactions
        c.execute("drop table if exists psy_tx")
        c.execute("create table psy_tx (v int)")
        c.commit()
        c.execute("insert into psy_tx values (1)")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        c.rollback()
        c.execute("insert into psy_tx values (2)")
        c.commit()
        with c.transaction():
            c.execute("insert into psy_tx values (3)")
            with pytest.raises(psycopg.errors.DivisionByZero), c.transaction():  # savepoint
                c.execute("insert into psy_tx values (4)")
                c.execute("select 1/0")
        c.execute("insert into psy_tx values (5)")
        with pytest.raises(psycopg.errors.UndefinedTable):
            c.execute("select * from no_such_table")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        c.rollback()
        assert c.execute("select array_agg(v order by v) from psy_tx").fetchone() == ([2, 3],)
        c.execute("drop table psy_tx")
        c.commit()


def test_listen_notify_between_two_sessions(gateway: GatewayProcess) -> None:
    with (
        psycopg.connect(gateway.dsn(), autocommit=True) as listener,
        psycopg.connect(gateway.dsn(), autocommit=True) as sender,
    ):
        listener.execute("listen ostiary_chan")
        sender_pid = sender.execute("select pg_backend_pid()").fetchone()
        assert sender_pid is not None
        sender.execute("notify ostiary_chan, 'first'")
        sender.execute("select pg_notify('ostiary_chan', %s)", ("second ü",))
        got = list(listener.notifies(timeout=5, stop_after=2))
        assert [(n.channel, n.payload) for n in got] == [
            ("ostiary_chan", "first"),
            ("ostiary_chan", "second ü"),
        ]
        # The pid in a notification is the sender's pg_backend_pid(), and libpq reports the same
        # pid for the sender (code that skips its own notifications relies on this).
        assert {n.pid for n in got} == {sender_pid[0]} == {sender.info.backend_pid}
        # Nothing else arrives.
        assert list(listener.notifies(timeout=0.5)) == []
        # A notification sent while the listener is idle (not in a query) is delivered too.
        t = threading.Timer(0.3, lambda: sender.execute("notify ostiary_chan, 'late'"))
        t.start()
        try:
            late = list(listener.notifies(timeout=5, stop_after=1))
        finally:
            t.join()
        assert [n.payload for n in late] == ["late"]


def test_server_side_cursor_in_chunks(gateway: GatewayProcess) -> None:
    with psycopg.connect(gateway.dsn()) as c:
        with c.cursor(name="chunks") as cur:
            cur.execute("select g, repeat('r', g % 50) from generate_series(1, 10000) g order by g")
            first = cur.fetchmany(1000)
            assert [r[0] for r in first] == list(range(1, 1001))
            cur.scroll(5000)  # skip forward on the server
            nxt = cur.fetchone()
            assert nxt == (6001, "r")
            chunks = 0
            total = nxt[0]
            while batch := cur.fetchmany(777):
                chunks += 1
                total += sum(r[0] for r in batch)
            assert chunks == 6  # 3999 rows left in batches of 777
            assert total == sum(range(6001, 10001))
        # The cursor lived inside the transaction; it is gone at commit.
        c.commit()
        assert c.execute("select count(*) from pg_cursors").fetchone() == (0,)


def test_large_result(conn: psycopg.Connection) -> None:
    t0 = time.monotonic()
    cur = conn.execute("select g, md5(g::text) from generate_series(1, 200000) g")
    n = 0
    s = 0
    last = None
    for row in cur:
        n += 1
        s += row[0]
        last = row
    assert n == 200_000
    assert s == 200_000 * 200_001 // 2
    assert last is not None and last[0] == 200_000
    assert conn.execute("select md5('200000')").fetchone() == (last[1],)
    assert time.monotonic() - t0 < 30


def test_identifiers_and_composed_sql(conn: psycopg.Connection) -> None:
    # sql.Identifier quoting survives the trip: an odd table name with a quote and a space.
    name = sql.Identifier('psy "odd" name')
    conn.execute(sql.SQL("drop table if exists {}").format(name))
    conn.execute(sql.SQL("create table {} (v text)").format(name))
    conn.execute(sql.SQL("insert into {} values (%s)").format(name), ("ok",))
    assert conn.execute(sql.SQL("select v from {}").format(name)).fetchall() == [("ok",)]
    conn.execute(sql.SQL("drop table {}").format(name))
