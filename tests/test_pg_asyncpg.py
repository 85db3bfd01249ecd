"""asyncpg through the gateway over TLS (verify-full against the gateway's CA).

asyncpg speaks only the extended protocol, with named prepared statements and binary formats, and
its own COPY implementation: a different code path from libpq's. No pytest-asyncio: each test runs
its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ssl
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from conftest import CLIENT_PASSWORD, CLIENT_USER, GatewayProcess


def ssl_context(gw: GatewayProcess) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(gw.tls.ca_cert))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def connect(gw: GatewayProcess, **kw: Any) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=gw.port,
        user=CLIENT_USER,
        password=CLIENT_PASSWORD,
        database="app",
        ssl=ssl_context(gw),
        timeout=10,
        **kw,
    )


def run(gw: GatewayProcess, body: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        conn = await connect(gw)
        try:
            return await asyncio.wait_for(body(conn), 30)
        finally:
            await conn.close(timeout=5)

    return asyncio.run(main())


def test_fetch_and_session_is_tls(gateway: GatewayProcess) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        rows = await conn.fetch("select g, g * g as sq from generate_series(1, 5) g order by g")
        assert [(r["g"], r["sq"]) for r in rows] == [(1, 1), (2, 4), (3, 9), (4, 16), (5, 25)]
        row = await conn.fetchrow("select current_user as u, current_database() as d")
        assert dict(row) == {"u": "app", "d": "app"}
        # The client leg really is TLS, with the gateway's certificate.
        transport_ssl = conn._transport.get_extra_info("ssl_object")
        assert transport_ssl is not None
        assert transport_ssl.getpeercert()["subject"] == ((("commonName", "localhost"),),)

    run(gateway, body)


def test_server_settings_apply_to_the_session(gateway: GatewayProcess) -> None:
    """asyncpg's server_settings travel in the StartupMessage; they apply as with PostgreSQL (the
    gateway once dropped every setting but six, silently), and an unknown one fails the login with
    PostgreSQL's error."""

    async def main() -> None:
        settings = {"search_path": "pg_catalog", "statement_timeout": "100", "jit": "off"}
        conn = await connect(gateway, server_settings=settings)
        try:
            got = await conn.fetchrow(
                "select current_setting('search_path'), current_setting('statement_timeout'),"
                " current_setting('jit')"
            )
            assert tuple(got) == ("pg_catalog", "100ms", "off")
            with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
                await conn.execute("select pg_sleep(2)")
        finally:
            await conn.close(timeout=5)
        unknown = 'unrecognized configuration parameter "nosuch"'
        with pytest.raises(asyncpg.UndefinedObjectError, match=unknown):
            await connect(gateway, server_settings={"nosuch": "1"})

    asyncio.run(main())


def test_fetchval_with_parameters_and_types(gateway: GatewayProcess) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        assert await conn.fetchval("select $1::int + $2::int", 40, 2) == 42
        assert await conn.fetchval("select $1::text || $2::text", "hé", "llo") == "héllo"
        assert await conn.fetchval("select $1::numeric * 2", Decimal("1.25")) == Decimal("2.50")
        ts = datetime.datetime(2030, 12, 31, 23, 59, 59, 999999, tzinfo=datetime.UTC)
        assert await conn.fetchval("select $1::timestamptz", ts) == ts
        blob = bytes(range(256)) * 100
        assert await conn.fetchval("select $1::bytea", blob) == blob
        assert await conn.fetchval("select $1::int[]", [3, None, 1]) == [3, None, 1]
        assert await conn.fetchval("select $1::jsonb ->> 'k'", '{"k": "v"}') == "v"
        assert await conn.fetchval("select $1::text is null", None) is True

    run(gateway, body)


def test_prepared_statements(gateway: GatewayProcess) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        stmt = await conn.prepare("select $1::int * 2 as doubled, $2::text as label")
        assert [t.name for t in stmt.get_parameters()] == ["int4", "text"]
        assert [a.name for a in stmt.get_attributes()] == ["doubled", "label"]
        for i in range(50):
            assert await stmt.fetchrow(i, f"n{i}") == (i * 2, f"n{i}")
        # The statement lives on the upstream backend under asyncpg's own name.
        names = await conn.fetch(
            "select name from pg_prepared_statements"
            " where statement like '%as doubled%' and statement not like '%pg_prepared_statements%'"
        )
        assert len(names) == 1
        # Statement cache: the same query text again reuses a prepared statement without error.
        for _ in range(5):
            assert await conn.fetchval("select 7::int8 * $1", 6) == 42

    run(gateway, body)


def test_executemany(gateway: GatewayProcess) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "drop table if exists apg_many; create table apg_many (id int primary key, v text)"
        )
        await conn.executemany(
            "insert into apg_many values ($1, $2)", [(i, f"value {i} " * 5) for i in range(3000)]
        )
        assert await conn.fetchrow("select count(*), sum(id) from apg_many") == (3000, 3000 * 2999 // 2)
        # A failing row aborts the whole batch (it runs in one implicit transaction).
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany("insert into apg_many values ($1, $2)", [(10_000, "new"), (5, "dup")])
        assert await conn.fetchval("select count(*) from apg_many") == 3000
        await conn.execute("drop table apg_many")

    run(gateway, body)


def test_copy_records_to_table_and_copy_from_query(gateway: GatewayProcess) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "drop table if exists apg_copy;"
            " create table apg_copy (id int, name text, amount numeric, at timestamp, tags text[])"
        )
        base = datetime.datetime(2021, 6, 1, 12, 0)
        records = [
            (i, f"name {i}\t\\", Decimal(i) / 8, base + datetime.timedelta(seconds=i), [f"t{i % 3}", "x"])
            for i in range(20_000)
        ]
        result = await conn.copy_records_to_table("apg_copy", records=records)
        assert result == "COPY 20000"
        back = await conn.fetch("select id, name, amount, at, tags from apg_copy order by id")
        assert [tuple(r) for r in back] == records

        buf = io.BytesIO()
        result = await conn.copy_from_query(
            "select id, name from apg_copy where id < $1 order by id", 5000, output=buf, format="csv"
        )
        assert result == "COPY 5000"
        expected = "".join(f"{i},name {i}\t\\\n" for i in range(5000))
        assert buf.getvalue().decode() == expected

        # And the other direction with a file-like source in text format.
        src = io.BytesIO("".join(f"{i}\tfrom text\n" for i in range(-1000, 0)).encode())
        result = await conn.copy_to_table("apg_copy", source=src, columns=["id", "name"])
        assert result == "COPY 1000"
        assert await conn.fetchval("select count(*) from apg_copy where name = 'from text'") == 1000
        await conn.execute("drop table apg_copy")

    run(gateway, body)


def test_transactions(gateway: GatewayProcess) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute("drop table if exists apg_tx; create table apg_tx (v int)")
        async with conn.transaction():
            await conn.execute("insert into apg_tx values (1)")
        with pytest.raises(RuntimeError, match="boom"):
            async with conn.transaction():
                await conn.execute("insert into apg_tx values (2)")
                raise RuntimeError("boom")
        async with conn.transaction():
            await conn.execute("insert into apg_tx values (3)")
            with pytest.raises(asyncpg.DivisionByZeroError):
                async with conn.transaction():  # a savepoint
                    await conn.execute("insert into apg_tx values (4)")
                    await conn.execute("select 1/0")
            assert conn.is_in_transaction()
        assert not conn.is_in_transaction()
        tx = conn.transaction(isolation="serializable", readonly=True)
        await tx.start()
        assert await conn.fetchval("show transaction_isolation") == "serializable"
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("insert into apg_tx values (5)")
        await tx.rollback()
        assert await conn.fetchval("select array_agg(v order by v) from apg_tx") == [1, 3]
        # A cursor needs a transaction; iterate in prefetch chunks.
        async with conn.transaction():
            total = 0
            async for rec in conn.cursor("select g from generate_series(1, 5000) g", prefetch=300):
                total += rec["g"]
            assert total == 5000 * 5001 // 2
        await conn.execute("drop table apg_tx")

    run(gateway, body)


def test_concurrent_connections(gateway: GatewayProcess) -> None:
    async def one(i: int) -> tuple[int, int]:
        conn = await connect(gateway)
        try:
            pid = await conn.fetchval("select pg_backend_pid()")
            val = await conn.fetchval("select sum(g) from generate_series(1, $1::int) g", 1000 + i)
            return pid, val
        finally:
            await conn.close()

    async def main() -> list[tuple[int, int]]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(10))), 30)

    results = asyncio.run(main())
    assert [v for _, v in results] == [(1000 + i) * (1001 + i) // 2 for i in range(10)]
    assert len({pid for pid, _ in results}) == 10, "each client gets its own upstream backend"
