"""SQL guardrails end to end: grants with statement rules, enforced on live sessions through psql and
psycopg against real PostgreSQL. The bypass corpus: each attempt is refused with 42501 and the rule's
name, the session stays usable, and the database is unchanged afterwards.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import GatewayFactory, GatewayProcess, gateway_config, psql
from ostiary.devcluster import PgCluster, TlsMaterial
from pgraw import (
    INT4PL,
    SYNC,
    RawConn,
    bind,
    data_rows,
    errors_in,
    execute,
    function_call,
    parse,
    query_message,
    typed,
)

OPS, ANALYST, READER = "ops", "analyst", "reader"
SETUP = """
create table if not exists guard_canary(id int primary key, v text);
create table if not exists guard_other(id int primary key);
create schema if not exists secret;
create table if not exists secret.keys(k text);
truncate guard_canary, guard_other, secret.keys;
insert into guard_canary values (1, 'a'), (2, 'b'), (3, 'c');
insert into secret.keys values ('k1');
create sequence if not exists secret.seq;
create sequence if not exists guard_seq;
create or replace view guard_keys_v as select k from secret.keys;
"""


@pytest.fixture(scope="module")
def canary(pg: PgCluster) -> None:
    from conftest import APP_PASSWORD

    pg.execute(SETUP, dbname="app", user="app", password=APP_PASSWORD)


def guard_config(pg: PgCluster, tls: TlsMaterial, tmp: Path) -> dict[str, Any]:
    cfg = gateway_config(pg, tls, 0, tmp, grants=[])
    cfg["clients"] = [
        {"user": OPS, "password": "ops-pw"},
        {"user": ANALYST, "password": "analyst-pw"},
        {"user": READER, "password": "reader-pw"},
        {"user": "dev", "password": "dev-pw"},
    ]
    cfg["guardrails"] = [
        {
            "name": "no-secrets",
            "match": {"relations": ["secret.*"]},
            "message": "the secret schema is off limits",
        },
        {"name": "no-canary-function", "match": {"functions": ["pg_sleep"]}, "message": "no sleeping"},
    ]
    cfg["grants"] = [
        {
            "name": "ops-writes",
            "identities": [OPS],
            "connection": "app",
            "access": "read-write",
            "guardrails": [
                "no-destructive-ddl",
                "no-unbounded-writes",
                "no-privilege-changes",
                "no-role-changes",
                "no-secrets",
                "no-canary-function",
            ],
        },
        {
            "name": "analyst-reads",
            "identities": [ANALYST],
            "connection": "app",
            "access": "read-only",
            "statements": ["select", "set", "reset", "transaction", "show", "explain", "prepare", "execute"],
            "relations": ["guard_*", "public.guard_*", "pg_catalog.*"],
        },
        # Read-only without statement rules: the database enforces it, the data path only flags
        # ways out of read-only mode.
        {"name": "plain-reads", "identities": [READER], "connection": "app", "access": "read-only"},
        # Judged, without relation rules (which refuse DO blocks): code the statement check cannot see into.
        {
            "name": "dev-writes",
            "identities": ["dev"],
            "connection": "app",
            "access": "read-write",
            "guardrails": ["no-destructive-ddl"],
        },
    ]
    return cfg


@pytest.fixture
def gw(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, canary: None
) -> GatewayProcess:
    return gateway_factory(config=guard_config(pg, gateway_tls, tmp_path))


@pytest.fixture
def unchanged(pg: PgCluster, canary: None) -> Iterator[None]:
    """Asserts after the test that the guarded tables and the roles are as SETUP left them."""
    from conftest import APP_PASSWORD

    def state() -> str:
        return pg.execute(
            "select (select string_agg(id || v, ',' order by id) from guard_canary),"
            " (select count(*) from guard_other), (select count(*) from secret.keys),"
            " (select count(*) from pg_roles where rolname = 'evil'),"
            " has_table_privilege('public', 'guard_canary', 'select'),"
            " (select count(*) from pg_tables where tablename = 'guard_new')",
            dbname="app",
            user="app",
            password=APP_PASSWORD,
        )

    before = state()
    yield
    assert state() == before


def conn(gw: GatewayProcess, user: str) -> psycopg.Connection[Any]:
    return psycopg.connect(gw.dsn(user=user, password=f"{user}-pw"), autocommit=True)


OPS_REFUSED = {
    # statement: rule that refuses it
    "drop table guard_other": "no-destructive-ddl",
    "DR/**/OP TABLE guard_other": "unparsed",
    "dRoP\n\t TaBlE /* c */ guard_other": "no-destructive-ddl",
    'drop table "guard_other"': "no-destructive-ddl",
    'drop table U&"guard\\005fother"': "no-destructive-ddl",
    "truncate guard_canary": "no-destructive-ddl",
    "delete from guard_canary": "no-unbounded-writes",
    "update guard_canary set v = 'x'": "no-unbounded-writes",
    "with d as (delete from guard_canary returning *) select count(*) from d": "no-unbounded-writes",
    "explain analyze delete from guard_canary": "no-unbounded-writes",
    "select 1; delete from guard_canary": "no-unbounded-writes",
    "select 1; drop table guard_other; select 2": "no-destructive-ddl",
    "prepare p as delete from guard_canary": "no-unbounded-writes",
    "grant select on guard_canary to public": "no-privilege-changes",
    "create role evil": "no-role-changes",
    "set role app": "no-role-changes",
    "set session authorization app": "no-role-changes",
    "select * from secret.keys": "no-secrets",
    "select (select max(k) from secret.keys)": "no-secrets",
    "copy secret.keys to stdout": "no-secrets",
    "select pg_sleep(0)": "no-canary-function",
    "set standard_conforming_strings = off": "standard-conforming-strings",
    "select set_config('standard_conforming_strings', 'off', false)": "standard-conforming-strings",
    "create rule r as on insert to guard_other do instead delete from guard_canary": "no-unbounded-writes",
    # Found by a hunt for bypasses (each ran before):
    "select set_config('role', 'app', false)": "no-role-changes",
    "select set_config('session_authorization', 'app', false)": "no-role-changes",
    # Defaults of later sessions, judged as the SET they amount to.
    "alter database app set role = 'app'": "no-role-changes",
    "alter database app set search_path = secret, public": "search-path",
    "alter database app set standard_conforming_strings = off": "standard-conforming-strings",
    "merge into guard_canary t using (select 1) s on true when matched then delete": "no-unbounded-writes",
    "merge into guard_canary t using guard_other s on 1 = 1 when matched then update set v = 'x'": (
        "no-unbounded-writes"
    ),
    "alter table guard_canary drop column v": "no-destructive-ddl",
    "alter schema secret rename to notsecret": "no-secrets",
    "select query_to_xml('select * from secret.keys', false, false, '')": "dynamic-sql",
    "select table_to_xml('secret.keys'::regclass, false, false, '')": "dynamic-sql",
    # Found by the hunts of 2026-12-04 (a REPLICATION or superuser upstream role, dblink or
    # postgres_fdw installed): rows of secret.keys through a slot, another connection, a foreign
    # table, or the relation's file.
    "select data from pg_logical_slot_peek_changes('s', null, null)": "dynamic-sql",
    "select * from dblink('dbname=app', 'select k from secret.keys') as t(k text)": "dynamic-sql",
    "select pg_read_binary_file('base/16384/16385')": "dynamic-sql",
    "select lo_import('/var/lib/postgresql/data/base/16384/16385')": "dynamic-sql",
    "create extension if not exists dblink": "code",
    "create server s foreign data wrapper postgres_fdw options (dbname 'app')": "code",
    "create foreign table public.harmless (k text) server s options (schema_name 'secret')": "code",
    "import foreign schema secret from server s into public": "code",
}

ANALYST_REFUSED = {
    "insert into guard_other values (9)": "read-only",
    "update guard_canary set v = 'x' where id = 1": "read-only",
    "with d as (delete from guard_canary where id = 1 returning *) select * from d": "read-only",
    "explain analyze delete from guard_canary where id = 1": "read-only",
    "begin read write": "read-only",
    "set default_transaction_read_only = off": "read-only",
    "select set_config('default_transaction_read_only', 'off', false)": "read-only",
    "copy guard_canary to stdout": "analyst-reads.statements",
    "select * from secret.keys": "analyst-reads.relations",
    "do $$ begin delete from guard_canary; end $$": "read-only",
    "create table guard_new(i int)": "read-only",
    "select lo_from_bytea(0, 'x')": "read-only",
    "select * from ts_stat('select k::tsvector from secret.keys')": "dynamic-sql",
}


@pytest.mark.parametrize(("user", "corpus"), [(OPS, OPS_REFUSED), (ANALYST, ANALYST_REFUSED)])
def test_corpus_is_refused_and_changes_nothing(
    gw: GatewayProcess, unchanged: None, subtests: pytest.Subtests, user: str, corpus: dict[str, str]
) -> None:
    with conn(gw, user) as c:
        for sql, rule in corpus.items():
            with subtests.test(sql):
                # What does not parse is a syntax error (42601) as on the server; refusals 42501.
                expected = (
                    psycopg.errors.SyntaxError if rule == "unparsed" else psycopg.errors.InsufficientPrivilege
                )
                with pytest.raises(expected) as e:
                    c.execute(sql)
                message = e.value.diag.message_primary or ""
                assert message.startswith(f"{rule}:"), message
                # The session stays usable.
                assert c.execute("select count(*) from guard_canary").fetchone() == (3,)


def test_allowed_statements_run(gw: GatewayProcess, unchanged: None) -> None:
    with conn(gw, OPS) as c:
        c.execute("insert into guard_other values (100)")
        c.execute("delete from guard_other where id = 100")
        assert c.execute("select v from guard_canary where id = 2").fetchone() == ("b",)
        c.execute("set standard_conforming_strings = on")
    with conn(gw, ANALYST) as c:
        assert c.execute("select count(*) from guard_canary where v like %s", ["%"]).fetchone() == (3,)
        assert c.execute("show default_transaction_read_only").fetchone() == ("on",)
        c.execute("begin")
        c.execute("select * from public.guard_canary")
        c.execute("commit")


def test_refusal_inside_a_transaction_aborts_it_as_postgres_would(
    gw: GatewayProcess, unchanged: None
) -> None:
    with psycopg.connect(gw.dsn(user=OPS, password="ops-pw")) as c:
        c.execute("insert into guard_other values (200)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("drop table guard_canary")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            c.execute("select 1")
        c.rollback()
        assert c.execute("select count(*) from guard_other where id = 200").fetchone() == (0,)


def test_extended_protocol_refusal_answers_until_sync(gw: GatewayProcess, unchanged: None) -> None:
    with conn(gw, OPS) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-secrets"):
            c.execute("select * from secret.keys where k = %s", ["k1"], prepare=True)
        with c.pipeline():
            c.execute("select %s::int", [1])
            cur = c.execute("select count(*) from guard_canary where id > %s", [0])
        assert cur.fetchone() == (3,)


def test_pipelined_refusals_each_get_their_own_error(gw: GatewayProcess, unchanged: None) -> None:
    """Statements judged before are refused in the data path without asking the control plane
    again. Several in one write (simple queries, fast-path calls, extended blocks each with its
    Sync) each get their 42501; before, the first block's ReadyForQuery forgot the refusals of the
    blocks after it and the client got the stand-in statement's syntax error instead."""
    refused = "select * from secret.keys"
    extended = parse("", refused) + bind("", "") + execute() + SYNC
    call = function_call(INT4PL, ("1", "2"))
    c = RawConn(gw.port)
    c.start_tls(gw.tls.ca_cert)
    with c:
        c.login(OPS, "ops-pw")
        for first in (query_message(refused), call, extended):  # judged once, then remembered
            c.send(first)
            assert [e["C"] for e in errors_in(c.until_ready())] == ["42501"]
        c.send((query_message(refused) + call + extended) * 2 + query_message("select 'after'"))
        got: list[tuple[bytes, bytes]] = []
        for _ in range(7):
            got += c.until_ready()
    errors = errors_in(got)
    assert [e["C"] for e in errors] == ["42501"] * 6, errors
    assert [e["M"].split(":")[0] for e in errors] == ["no-secrets", "function-call", "no-secrets"] * 2, errors
    assert data_rows(got) == [["after"]]


def test_a_read_only_session_without_rules_refuses_ways_out_that_carry_no_sql_it_checks(
    gw: GatewayProcess, pg: PgCluster, unchanged: None
) -> None:
    """A fast-path FunctionCall of set_config turned default_transaction_read_only off and the next
    INSERT ran; large objects can be written in read-only transactions. Both are refused now; the
    large-object reads libpq's lo_* functions make through the fast path still work."""
    set_config = 2078  # pg_catalog.set_config(text, text, boolean)
    c = RawConn(gw.port)
    c.start_tls(gw.tls.ca_cert)
    with c:
        c.login(READER, "reader-pw")
        c.send(function_call(set_config, ("default_transaction_read_only", "off", "false")))
        errors = errors_in(c.until_ready())
        assert [e["C"] for e in errors] == ["42501"] and "fast-path function calls" in errors[0]["M"], errors
        c.send(query_message("show default_transaction_read_only"))
        assert data_rows(c.until_ready()) == [["on"]]
        c.send(query_message("insert into guard_other values (777)"))
        assert [e["C"] for e in errors_in(c.until_ready())] == ["25006"]  # read-only transaction
        c.send(function_call(INT4PL, ("1", "2")))  # any other function: refused as well
        assert [e["C"] for e in errors_in(c.until_ready())] == ["42501"]
    with conn(gw, READER) as r:
        for sql in ("select lo_from_bytea(0, 'x')", "select lo_create(0)", "select lo_unlink(1)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="large-object-write"):
                r.execute(sql)
        assert r.execute("select count(*) from pg_largeobject_metadata").fetchone() == (0,)
    # The reads of libpq's large-object API (lo_open, loread, lo_close through the fast path).
    from conftest import APP_PASSWORD

    def upstream(sql: str) -> str:
        return pg.execute(sql, dbname="app", user="app", password=APP_PASSWORD).strip()

    loid = upstream("select lo_from_bytea(0, 'large object body')")
    try:
        out = gw.log_path.parent / "lo-export.bin"
        r2 = psql(gw, "-c", f"\\lo_export {loid} '{out}'", user=READER, password="reader-pw")
        assert r2.returncode == 0, r2.stderr
        assert out.read_bytes() == b"large object body"
    finally:
        upstream(f"select lo_unlink({loid})")


def test_a_read_only_session_without_rules_refuses_what_read_only_transactions_allow(
    gw: GatewayProcess, unchanged: None
) -> None:
    """PostgreSQL allows COPY to a program or a server file, ALTER SYSTEM, pg_reload_conf, signals,
    WAL messages and replication slots in a read-only transaction: with a privileged upstream role
    a plain read-only grant ran commands on the database host and turned statement logging off.
    Such statements are analysed now and refused; COPY TO STDOUT and catalog reads still work."""
    with conn(gw, READER) as r:
        for sql, why in (
            ("copy (select 1) to program 'true'", "program"),
            ("copy guard_other to '/tmp/ostiary-never-written'", "server-files"),
            ("alter system set log_statement = 'none'", "alter"),
            ("select pg_reload_conf()", "server-control"),
            ("select pg_logical_emit_message(false, 'p', 'x')", "server-control"),
            ("select pg_cancel_backend(pg_backend_pid())", "server-control"),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=rf"read-only \({why}\)"):
                r.execute(sql)
        with r.cursor().copy("copy (select 1 as x) to stdout") as copy:
            assert b"".join(bytes(b) for b in copy) == b"1\n"
        assert r.execute("select count(*) > 0 from pg_proc where proname = 'pg_reload_conf'").fetchone() == (
            True,
        )


def test_a_read_only_session_without_rules_judges_flagged_text_with_the_parser(
    gw: GatewayProcess, unchanged: None
) -> None:
    """Words that may lead out of read-only mode were refused wherever they stood (`select 'to
    do'`, asyncpg's `set_config('jit', 'off', false)` before every type lookup); and query_to_xml
    ran `set_config` spelled in pieces, VACUUM FULL and UPDATE pg_settings passed. Text that
    mentions such a way is now judged by what the parser finds in it."""
    with conn(gw, READER) as r:
        for sql, expected in (
            ("select 'Do it now', 1 /* do */", ("Do it now", 1)),
            (
                "select 'READ WRITE', 'u&x', 'set_config', 'please dblink me'",
                ("READ WRITE", "u&x", "set_config", "please dblink me"),
            ),
            # asyncpg's, before its type lookups (jit's old value depends on the server).
            ("select set_config('jit', 'off', false) as new", ("off",)),
            ("select current_setting('transaction_read_only')", ("on",)),
            ("select 'standard_conforming_strings'", ("standard_conforming_strings",)),
        ):
            assert r.execute(sql).fetchone() == expected, sql
        for sql, why in (
            (
                "select query_to_xml('select pg_catalog.set_con'||'fig(''default_transaction_read_o''"
                "||''nly'', ''off'',false)', true, false, '')",
                "runs-sql",
            ),
            (
                "update pg_catalog.pg_settings set setting = 'off' "
                "where name = 'default_transaction_read_only'",
                "update",
            ),
            ("vacuum full guard_other", "utility"),
            ("cluster guard_other", "utility"),
            ("set standard_conforming_strings = off", "standard_conforming_strings"),
            ("set client_encoding = 'SJIS'", "standard_conforming_strings"),
            ("select set_config('default_transaction_read_only', 'off', false)", "read-only-change"),
            ("do $$ begin perform 1; end $$", "do"),
            ("prepare transaction 'px'", "server-control"),
            ("commit prepared 'px'", "server-control"),
            ("lock table guard_other in access exclusive mode", "utility"),
            ("load 'plpgsql'", "utility"),
            ("select pg_read_file_old('/etc/hostname', 0, 100)", "server-files"),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=rf"read-only \({why}"):
                r.execute(sql)
        assert r.execute("show default_transaction_read_only").fetchone() == ("on",)
        assert r.execute("show standard_conforming_strings").fetchone() == ("on",)
        # pg_dump's steps: a shared lock and search_path set through set_config.
        with r.transaction():
            r.execute("lock table guard_other in access share mode")
            r.execute("select pg_catalog.set_config('search_path', '', false)")


def test_relation_rules_hold_against_pg_settings_views_and_sequence_names(
    gw: GatewayProcess, unchanged: None
) -> None:
    """Found by a black-box hunt: UPDATE pg_settings moved search_path (so `keys` meant
    secret.keys), a view created in the session let writes reach relations the rules name without
    naming them, and `nextval('secret.seq')` took the verdict of `nextval('guard_seq')` (the same
    shape). Now: refused, refused, and judged per text."""
    with conn(gw, OPS) as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("update pg_catalog.pg_settings set setting = 'secret' where name = 'search_path'")
        assert c.execute("show search_path").fetchone() == ('"$user", public',)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="views"):
            c.execute("create view guard_v as select id from guard_other")
        assert c.execute("select nextval('guard_seq') > 0").fetchone() == (True,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-secrets"):
            c.execute("select nextval('secret.seq')")
    with conn(gw, OPS) as c:
        # A view made by the database's owner: reading through it is what it shows; a write
        # through it writes secret.keys, which no-secrets refuses (found through the catalog).
        assert c.execute("select count(*) from guard_keys_v").fetchone() == (1,)
        for sql in (
            "update guard_keys_v set k = 'x' where k = 'k1'",
            "delete from public.guard_keys_v where k = 'k1'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-secrets"):
                c.execute(sql)
    with conn(gw, ANALYST) as c:
        # A function that runs SQL text (any statement: set_config, a write).
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="query_to_xml"):
            c.execute("select query_to_xml('select 1', true, false, '')")
        # Catalog reads are not the relations list's to name (drivers write them unqualified).
        assert c.execute("select typname from pg_type where oid = 23").fetchone() == ("int4",)
        assert c.execute("select count(*) > 0 from information_schema.tables").fetchone() == (True,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="does not cover"):
            c.execute("select * from secret.keys")


STARTUP_SETTINGS = [
    # (user, startup parameters, the rule that refuses them or None)
    (OPS, {"role": "app"}, "no-role-changes"),
    (OPS, {"session_authorization": "app"}, "no-role-changes"),
    (OPS, {"search_path": "secret, public"}, "search-path"),  # no-secrets names relations
    (OPS, {"statement_timeout": "150", "lock_timeout": "2s"}, None),
    (ANALYST, {"search_path": "secret"}, "search-path"),
    (ANALYST, {"default_transaction_read_only": "off"}, "read-only"),
    (ANALYST, {"transaction_read_only": "off"}, "read-only"),
    (ANALYST, {"statement_timeout": "150", "DateStyle": "German"}, None),
    (READER, {"default_transaction_read_only": "off"}, "read-only"),
    (READER, {"Default_Transaction_Read_Only": "0"}, "read-only"),
    (READER, {"transaction_read_only": "no"}, "read-only"),
    (READER, {"statement_timeout": "150", "my.custom": "x"}, None),
]


def assert_login_refused(gw: GatewayProcess, user: str, params: dict[str, str], name: str, rule: str) -> None:
    """The login ends with one FATAL 42501 naming the startup parameter and the rule."""
    c = RawConn(gw.port)
    c.start_tls(gw.tls.ca_cert)
    with c:
        with pytest.raises(EOFError):
            c.login(user, f"{user}-pw", **params)
        errors = errors_in(c.before_eof)
    assert [(e["S"], e["C"]) for e in errors] == [("FATAL", "42501")], errors
    assert f"startup parameter {name}=" in errors[0]["M"], errors
    assert f"refused by {rule}:" in errors[0]["M"], errors


@pytest.mark.parametrize(("user", "params", "rule"), STARTUP_SETTINGS)
def test_startup_parameters_are_judged_as_the_set_they_amount_to(
    gw: GatewayProcess, unchanged: None, user: str, params: dict[str, str], rule: str | None
) -> None:
    """A setting in the StartupMessage is `SET name TO 'value'` before the first statement: the
    session's policy judges it as that statement. What it would refuse ends the login with 42501
    naming the parameter and the rule (a role change past no-role-changes, read-only turned off,
    search_path moved under relation rules); the rest reaches the server, as with PostgreSQL."""
    if rule is not None:
        assert_login_refused(gw, user, params, next(iter(params)).lower(), rule)
        return
    c = RawConn(gw.port)
    c.start_tls(gw.tls.ca_cert)
    with c:
        c.login(user, f"{user}-pw", **params)
        names = ", ".join(f"current_setting('{k}')" for k in params)
        # (Split, or the read-only sessions' escape check would flag the query itself.)
        got = c.query(f"select {names}, current_user, current_setting('transaction' || '_read_only')")
        rows = data_rows(got)
    assert not errors_in(got), errors_in(got)
    assert rows[0][0] == "150ms", rows
    assert rows[0][-2] == "app", rows  # the grant's upstream role, whatever was asked
    assert rows[0][-1] == ("off" if user == OPS else "on"), rows


@pytest.mark.parametrize(
    ("user", "params", "refused"),
    [
        (
            READER,
            {"options": "-c default_transaction_read_only=off"},
            ("default_transaction_read_only", "read-only"),
        ),
        (
            READER,
            {"options": r"-c statement_timeout=150 --transaction-read-only=no"},
            ("transaction_read_only", "read-only"),
        ),
        (OPS, {"options": "-crole=app"}, ("role", "no-role-changes")),
        (OPS, {"options": "--statement-timeout=150 -c lock_timeout=2s"}, None),
        # One given on its own as well wins, as in PostgreSQL.
        (ANALYST, {"options": "-c statement_timeout=999", "statement_timeout": "150"}, None),
    ],
)
def test_settings_in_options_are_judged_like_the_others(
    gw: GatewayProcess,
    unchanged: None,
    user: str,
    params: dict[str, str],
    refused: tuple[str, str] | None,
) -> None:
    """libpq's PGOPTIONS and pgJDBC's `options` carry `-c name=value` settings in one string: each
    becomes a startup parameter of its own, judged as the SET it amounts to."""
    if refused is not None:
        assert_login_refused(gw, user, params, *refused)
        return
    c = RawConn(gw.port)
    c.start_tls(gw.tls.ca_cert)
    with c:
        c.login(user, f"{user}-pw", **params)
        got = c.query("select current_setting('statement_timeout')")
    assert not errors_in(got), errors_in(got)
    assert data_rows(got)[0][0] == "150ms"


def test_a_client_encoding_that_can_hide_a_backslash_is_refused(gw: GatewayProcess, unchanged: None) -> None:
    """In SJIS (BIG5, GBK ...) a character's second byte can be 0x5C: PostgreSQL converts the text
    before lexing, so `E'<0x95 0x5C>'` is a one-character string to it, while the bytes read as
    UTF-8 hold an escaped quote and the string goes on: `E'..'; drop table guard_other; -- '` was
    judged a SELECT and the DROP ran. Such encodings are refused in judged sessions: at login
    (the client's parameter, or the upstream role's default), by SET and set_config, and a session
    whose server reports one anyway is ended."""
    exploit = b"select E'\x95\x5c'; drop table guard_other; -- '"
    c = RawConn(gw.port)
    c.start_tls(gw.tls.ca_cert)
    with c:
        with pytest.raises(EOFError):
            c.login(OPS, "ops-pw", client_encoding="SJIS")
            c.send(typed(b"Q", exploit + b"\0"))  # (only if the login was let through)
            c.until_ready()
        errors = errors_in(c.before_eof)
        refused = [(e["C"], "client_encoding SJIS is not allowed" in e["M"]) for e in errors]
        assert refused == [("42501", True)], errors
    with conn(gw, OPS) as c2:
        for sql in (
            "set client_encoding = 'SJIS'",
            "set names 'big5'",
            "select set_config('client_encoding', 'GBK', false)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="client_encoding must not"):
                c2.execute(sql)
        assert c2.execute("show client_encoding").fetchone() == ("UTF8",)


def test_a_database_default_that_turns_standard_conforming_strings_off_is_refused_at_login(
    gw: GatewayProcess, pg: PgCluster, unchanged: None
) -> None:
    """Set outside the gateway (or before these rules), the database default made the next judged
    session lex backslashes in strings, unlike the analysis: `select 'x\\''; drop table ...; --'`
    was judged one SELECT and the DROP ran. Judged sessions are now refused at login."""
    from conftest import APP_PASSWORD

    def upstream(sql: str) -> None:
        pg.execute(sql, dbname="app", user="app", password=APP_PASSWORD)

    upstream("alter database app set standard_conforming_strings = off")
    try:
        # Read-only sessions too: the text they flag is judged by the parser.
        for user in (OPS, ANALYST, READER):
            with pytest.raises(psycopg.OperationalError, match="standard_conforming_strings is off"):
                conn(gw, user).close()
    finally:
        upstream("alter database app reset standard_conforming_strings")
    with conn(gw, OPS) as c:
        assert c.execute("show standard_conforming_strings").fetchone() == ("on",)


def test_a_search_path_default_is_refused_at_login_under_relation_rules(
    gw: GatewayProcess, pg: PgCluster, unchanged: None
) -> None:
    """Set outside the gateway, a database default search_path of `secret, public` made `keys`
    mean secret.keys in sessions whose deny rule covers secret.*: refused at login now."""
    from conftest import APP_PASSWORD

    def upstream(sql: str) -> None:
        pg.execute(sql, dbname="app", user="app", password=APP_PASSWORD)

    upstream("alter database app set search_path = secret, public")
    try:
        for user in (OPS, ANALYST):
            with pytest.raises(psycopg.OperationalError, match="search_path is secret, public"):
                conn(gw, user).close()
        with conn(gw, READER) as r:  # no relation rules: the default stands
            assert r.execute("show search_path").fetchone() == ("secret, public",)
    finally:
        upstream("alter database app reset search_path")
    with conn(gw, OPS) as c:
        assert c.execute("select count(*) from guard_canary").fetchone() == (3,)


def test_pg_dump_works_through_read_only_and_relation_rules(gw: GatewayProcess, unchanged: None) -> None:
    """pg_dump sets restrict_nonsystem_relation_kind with `set_config(name, ...) FROM pg_settings
    WHERE name = '...'` and search_path to '' with set_config: both were refused (any setting
    could be meant; search_path cannot change under relation rules), so no grant but a plain
    read-write one could take a backup."""
    for user, password in ((READER, "reader-pw"), (OPS, "ops-pw")):
        r = subprocess.run(
            ["pg_dump", "-t", "guard_canary"],
            env=gw.env(user=user, password=password),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, (user, r.stderr)
        assert "CREATE TABLE public.guard_canary" in r.stdout and "COPY public.guard_canary" in r.stdout


def test_psql_sees_the_rule_and_goes_on(gw: GatewayProcess, unchanged: None) -> None:
    r = psql(
        gw,
        "-v",
        "ON_ERROR_STOP=0",
        "-At",
        "-c",
        "truncate guard_canary",
        "-c",
        "select count(*) from guard_canary",
        user=OPS,
        password="ops-pw",
    )
    refusal = "ERROR:  no-destructive-ddl: destructive DDL (DROP, DROP COLUMN, TRUNCATE) is not allowed"
    assert refusal in r.stderr
    assert r.stdout.strip() == "3"
    # The refusal is in the log with the statement's fingerprint.
    refusals = [line for line in gw.log().splitlines() if "refused (no-destructive-ddl" in line]
    assert refusals and "fingerprint " in refusals[-1] and "truncate guard_canary" in refusals[-1]


def test_session_ends_when_dynamic_sql_turns_standard_conforming_strings_off(
    gw: GatewayProcess, unchanged: None
) -> None:
    """A DO block may pass the rules and still change how later statements are lexed: the gateway
    sees the server's ParameterStatus and ends the session rather than misjudge what follows."""
    with conn(gw, "dev") as c:
        with pytest.raises(psycopg.Error, match="standard_conforming_strings was turned off"):
            c.execute("do $$ begin execute 'set standard_conforming_strings = off'; end $$")
        with pytest.raises(psycopg.OperationalError):
            c.execute("select 1")
    with conn(gw, "dev") as c:
        assert c.execute("show standard_conforming_strings").fetchone() == ("on",)
    # Under relation rules, DO itself is refused.
    with conn(gw, OPS) as c, pytest.raises(psycopg.errors.InsufficientPrivilege, match="DO blocks"):
        c.execute("do $$ begin execute 'set standard_conforming_strings = off'; end $$")


def test_verdicts_are_cached_per_shape_but_not_across_constants_that_matter(
    gw: GatewayProcess, unchanged: None
) -> None:
    with conn(gw, ANALYST) as c:
        # The same statement with other constants is decided from the cache (no new decision).
        for i in range(1, 4):
            assert c.execute(f"select v from guard_canary where id = {i}").fetchone() is not None
        # SET values take part in the decision: allowed with 'on', refused with 'off', same shape.
        c.execute("set default_transaction_read_only = 'on'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="read-only"):
            c.execute("set default_transaction_read_only = 'off'")
        # search_path is pinned under relation rules: unqualified names must not move.
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="search-path"):
            c.execute("set search_path = secret, public")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="search-path"):
            c.execute("select set_config('search_path', 'secret', false)")
        # Verdicts that hold per text only are still remembered for their text: a transaction's
        # BEGIN and COMMIT are decided once, not once per transaction.
        c.autocommit = False
        for _ in range(3):
            c.execute("select v from guard_canary where id = 2")
            c.commit()
        # The same refusal, asked again, is answered from the cache too.
        c.autocommit = True
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="read-only"):
            c.execute("set default_transaction_read_only = 'off'")
    log = gw.log()
    decided = [line for line in log.splitlines() if "decided" in line and "guard_canary where id" in line]
    assert len(decided) == 1, decided
    for text in ("BEGIN", "COMMIT", "default_transaction_read_only = 'off'"):
        decided = [line for line in log.splitlines() if "decided" in line and text in line]
        assert len(decided) == 1, (text, decided)


def test_corpus_through_psql(gw: GatewayProcess, unchanged: None, subtests: pytest.Subtests) -> None:
    for sql, rule in OPS_REFUSED.items():
        with subtests.test(sql):
            r = psql(
                gw, "-v", "ON_ERROR_STOP=0", "-At", "-c", sql, "-c", "select 42", user=OPS, password="ops-pw"
            )
            assert f"ERROR:  {rule}:" in r.stderr, r.stderr
            assert r.stdout.strip().endswith("42"), r.stdout


def test_a_malformed_constant_does_not_poison_its_shape(gw: GatewayProcess, unchanged: None) -> None:
    with conn(gw, OPS) as c:
        # Refused as the server would (42601), by the gateway, which cannot parse it either.
        with pytest.raises(psycopg.errors.SyntaxError, match="unparsed"):
            c.execute("select 0x from guard_canary")  # shape: select ? from guard_canary
        assert c.execute("select 1 from guard_canary limit 1").fetchone() == (1,)
