"""Statement analysis with PostgreSQL's parser (``_core.analyze_sql``) and the decisions a compiled
session takes on it: the bypass corpus of the guardrails issue, judged at the analysis level (the
data path does not enforce statement rules yet; grants that use them are refused at login)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ostiary import config
from ostiary.errors import SqlError
from ostiary.policy.evaluate import CompiledPolicy, SessionPolicy, StatementAnalysis


def session(
    tmp_path: Path,
    connection_guardrails: tuple[str, ...] = (),
    rules: tuple[dict[str, Any], ...] = (),
    approvals: tuple[dict[str, Any], ...] = (),
    **grant: Any,
) -> SessionPolicy:
    upstream = {"host": "db", "database": "app", "user": "u", "password": "p"}
    data = {
        "guardrails": list(rules),
        "approvals": list(approvals),
        "clients": [{"user": "ci", "password": "x"}, {"user": "dba", "password": "y"}],
        "connections": [{"name": "app", "upstream": upstream, "guardrails": list(connection_guardrails)}],
        "grants": [
            {
                "name": "g",
                "identities": ["ci"],
                "connection": "app",
                **({"approvals": grant.pop("approvals_names")} if "approvals_names" in grant else {}),
                **grant,
            }
        ],
    }
    p = CompiledPolicy(config.parse(data, "t", tmp_path))
    return p.compile_session(p.grants["g"])


def verdicts(s: SessionPolicy, sql: str) -> list[bool]:
    return [s.decide(a).allow for a in StatementAnalysis.of(sql)]


# Each must be refused by a read-only grant: writes or ways out, however they are written.
READ_ONLY_BYPASSES = [
    "DELETE FROM t",
    "delete/**/from t",
    "DeLeTe\n\tFROM t -- trailing",
    "/* lead */ delete /* nested /* comment */ */ from t",
    'delete from "t"',
    'delete from U&"\\0074"',
    "update t set x = 1 where true",
    "insert into t values (1)",
    "merge into t using u on t.id = u.id when matched then delete",
    "with x as (delete from t returning *) select * from x",
    "with x as (select 1) insert into t select * from x",
    "select * from (with y as (update t set x = 1 returning *) select * from y) z",
    "explain analyze delete from t",
    "explain (analyze, buffers) update t set x = 1",
    "prepare p as delete from t",
    "copy t from stdin",
    "copy t to program 'cat > /tmp/x'",
    "copy t to '/tmp/x'",
    "create table x (i int)",
    "create rule r as on select to t do instead delete from u",
    "create trigger tr before insert on t for each row execute function f()",
    "create function f() returns int language sql as $$ delete from t returning 1 $$",
    "drop table t",
    "truncate t",
    "grant all on t to public",
    "do $$ begin delete from t; end $$",
    "call p()",
    "begin read write",
    "start transaction read write",
    "set transaction read write",
    "set session characteristics as transaction read write",
    "set default_transaction_read_only = off",
    'SET "default_transaction_read_only" TO false',
    "set transaction_read_only to 0",
    "select set_config('default_transaction_read_only', 'off', false)",
    "select pg_terminate_backend(pid) from pg_stat_activity",
    "select lo_export(1, '/tmp/x')",
    "select pg_read_file('/etc/passwd')",
    "select dblink_exec('dbname=app', 'delete from t')",
    "alter system set work_mem = '1GB'",
    "create role evil superuser",
    "vacuum t",
]

READ_ONLY_ALLOWED = [
    "select * from t",
    "select 'delete from t' as text",
    "select $$ drop table t $$",
    "explain delete from t",
    "explain select * from t",
    "begin",
    "begin read only",
    "commit",
    "set search_path = app",
    "reset all",
    "discard all",
    "show transaction_read_only",
    "copy t to stdout",
    "copy (select * from t) to stdout",
    "prepare q as select * from t where id = $1",
    "execute q(1)",
    "declare c cursor for select * from t",
    "fetch 10 from c",
    "listen ch",
    "set role reporting",
]


@pytest.mark.parametrize("sql", READ_ONLY_BYPASSES)
def test_read_only_refuses(sql: str, tmp_path: Path) -> None:
    s = session(tmp_path, access="read-only")
    assert not all(verdicts(s, sql)), [(a.kinds, a.effects) for a in StatementAnalysis.of(sql)]


@pytest.mark.parametrize("sql", READ_ONLY_ALLOWED)
def test_read_only_allows(sql: str, tmp_path: Path) -> None:
    s = session(tmp_path, access="read-only")
    assert all(verdicts(s, sql)), [(a.kinds, a.effects) for a in StatementAnalysis.of(sql)]


def test_multi_statement_smuggling_is_split(tmp_path: Path) -> None:
    s = session(tmp_path, access="read-only")
    assert verdicts(s, "select 1; delete from t; select 2") == [True, False, True]
    assert verdicts(s, "select 1;;; begin read write") == [True, False]


def test_what_does_not_parse_is_an_error() -> None:
    for sql in ["DR/**/OP TABLE t", "select 'open", "selec 1"]:
        with pytest.raises(SqlError):
            StatementAnalysis.of(sql)


def test_packs_on_a_read_write_grant(tmp_path: Path) -> None:
    s = session(
        tmp_path,
        access="read-write",
        guardrails=["no-destructive-ddl", "no-unbounded-writes", "no-privilege-changes", "no-role-changes"],
    )
    decide = {
        sql: s.decide(StatementAnalysis.of(sql)[0])
        for sql in [
            "delete from t where id = 1",
            "delete from t",
            "update t set x = 1",
            "with x as (delete from t returning 1) select 1",
            "drop table t",
            "truncate t",
            "grant select on t to r",
            "set role admin",
            "set session authorization admin",
            "insert into t values (1)",
        ]
    }
    assert decide["delete from t where id = 1"].allow
    assert decide["insert into t values (1)"].allow
    for sql, rule in [
        ("delete from t", "no-unbounded-writes"),
        ("update t set x = 1", "no-unbounded-writes"),
        ("with x as (delete from t returning 1) select 1", "no-unbounded-writes"),
        ("drop table t", "no-destructive-ddl"),
        ("truncate t", "no-destructive-ddl"),
        ("grant select on t to r", "no-privilege-changes"),
        ("set role admin", "no-role-changes"),
        ("set session authorization admin", "no-role-changes"),
    ]:
        assert not decide[sql].allow and decide[sql].rule == rule, (sql, decide[sql])


def test_kinds_and_relations_of_a_grant(tmp_path: Path) -> None:
    s = session(
        tmp_path, access="read-write", statements=["select", "insert"], relations=["public.*", "orders"]
    )
    assert verdicts(s, "select * from orders") == [True]
    assert verdicts(s, "insert into public.audit values (1)") == [True]
    assert verdicts(s, "select * from secret.keys") == [False]
    assert verdicts(s, "update orders set x = 1 where id = 1") == [False]
    # A relation hidden in a subquery of a function argument is still found.
    assert verdicts(s, "select coalesce((select max(k) from secret.keys), 0)") == [False]


def test_reading_kinds_only_mean_reading_on_a_read_write_grant(tmp_path: Path) -> None:
    # statements: [select] on a read-write grant: a SELECT that writes (large objects, sequences,
    # row locks) or signals the server is refused like it is under a read-only grant.
    s = session(tmp_path, access="read-write", statements=["select", "show"])
    assert verdicts(s, "select * from orders") == [True]
    for sql in (
        "select lo_from_bytea(0, 'x')",
        "select lo_unlink(16400)",
        "select nextval('orders_id_seq')",
        "select * from orders for update",
        "select pg_terminate_backend(1)",
        "select lo_import('/etc/passwd')",
    ):
        [d] = [s.decide(a) for a in StatementAnalysis.of(sql)]
        assert not d.allow and d.rule == "g.statements" and "reading statements only" in d.message, (sql, d)
    # With a writing kind listed, those effects are the grant's to allow.
    s = session(tmp_path, access="read-write", statements=["select", "insert"])
    assert verdicts(s, "select nextval('orders_id_seq')") == [True]
    assert verdicts(s, "select lo_from_bytea(0, 'x')") == [True]
    # A function that runs SQL text runs any kind: only a grant that allows DO allows it.
    [d] = [s.decide(a) for a in StatementAnalysis.of("select query_to_xml('delete from t', true, false, '')")]
    assert not d.allow and "does not allow do" in d.message and "query_to_xml" in d.message, d
    s = session(tmp_path, access="read-write", statements=["select", "do"])
    assert verdicts(s, "select query_to_xml('select 1', true, false, '')") == [True]


def test_catalog_reads_are_not_the_grants_relations_to_list(tmp_path: Path) -> None:
    # psql's \d, psycopg's TypeInfo.fetch, asyncpg's type lookup and SQLAlchemy's connect read
    # the catalogs, often unqualified: a relations list need not (and could not usefully) name them.
    s = session(tmp_path, access="read-only", relations=["public.*"])
    assert verdicts(s, "select typname from pg_type where oid = 23") == [True]
    assert verdicts(s, "select a.attname from pg_attribute a join pg_catalog.pg_class c on true") == [True]
    assert verdicts(s, "select * from information_schema.tables") == [True]
    assert verdicts(s, "select * from pg_foo") == [False]  # not a catalog: public.pg_foo
    assert verdicts(s, "select * from secret.pg_type") == [False]
    s = session(tmp_path, access="read-write", relations=["public.*"])
    assert verdicts(s, "update pg_settings set setting = 'x' where name = 'work_mem'") == [False]


def test_writes_through_views_reach_the_rules_of_the_relations_under_them(tmp_path: Path) -> None:
    rule = {"name": "no-secrets", "action": "deny", "match": {"relations": ["secret.*"]}}
    s = session(tmp_path, rules=(rule,), access="read-write", guardrails=["no-secrets"])
    assert s.needs_views
    # As VIEWS_QUERY gives them: views of views followed to their tables.
    s.set_views(
        [
            ["api", "keys", "secret", "keys"],
            ["public", "keys_v", "api", "keys"],
            ["public", "keys_v", "secret", "keys"],
            ["api", "keys", None, None],
        ]
    )
    assert s.view_bases["public.keys_v"] == frozenset({"api.keys", "secret.keys"})
    assert verdicts(s, "update api.keys set k = 'x'") == [False]
    assert verdicts(s, "delete from keys_v") == [False]  # public.keys_v -> api.keys -> secret.keys
    assert verdicts(s, "select * from api.keys") == [True]  # reads show what the view's owner chose
    assert verdicts(s, "update other set k = 'x'") == [True]
    assert not session(tmp_path, access="read-write").needs_views


def test_upserts_and_merge_count_as_what_they_do(tmp_path: Path) -> None:
    # An INSERT-only grant (an ingest job) takes VALUES, which read nothing, but not an upsert,
    # which updates rows that exist (PostgreSQL wants the UPDATE privilege for it), nor a MERGE
    # whose actions update or delete.
    s = session(tmp_path, access="read-write", statements=["insert", "merge"])
    assert verdicts(s, "insert into t values (1), (2)") == [True]
    assert verdicts(s, "insert into t values (1) on conflict do nothing") == [True]
    assert verdicts(s, "insert into t values ((select max(id) from u))") == [False]
    [d] = [
        s.decide(a)
        for a in StatementAnalysis.of("insert into t values (1) on conflict (id) do update set x = 2")
    ]
    assert not d.allow and d.message == "grant g does not allow update", d
    assert verdicts(
        s, "merge into t using (values (1)) v(id) on t.id = v.id when not matched then insert values (v.id)"
    ) == [
        False  # the USING list is a select
    ]
    s = session(tmp_path, access="read-write", statements=["select", "insert", "merge"])
    assert verdicts(s, "merge into t using u on t.id = u.id when not matched then insert values (u.id)") == [
        True
    ]
    assert verdicts(s, "merge into t using u on t.id = u.id when matched then update set x = u.x") == [False]
    assert verdicts(s, "merge into t using u on t.id = u.id when matched then delete") == [False]
    # A rule on updates (an approval, a deny guardrail) sees an upsert and a MERGE that updates.
    rule = {"name": "no-updates", "match": {"kinds": ["update"]}}
    s = session(tmp_path, rules=(rule,), access="read-write", guardrails=["no-updates"])
    assert verdicts(s, "insert into t values (1) on conflict (id) do update set x = excluded.x") == [False]
    assert verdicts(s, "merge into t using u on t.id = u.id when matched then update set x = 1") == [False]
    assert verdicts(s, "insert into t values (1) on conflict (id) do nothing") == [True]


def test_a_10_kb_query() -> None:
    # A 10 KB statement parses; its analysis finds every relation.
    sql = "select " + ", ".join(f"c{i}" for i in range(1700)) + " from a join b using (id)"
    assert len(sql) > 10_000
    [a] = StatementAnalysis.of(sql)
    assert a.reads == {"a", "b"}


def test_connection_guardrails_apply_to_every_grant(tmp_path: Path) -> None:
    s = session(tmp_path, connection_guardrails=("no-destructive-ddl",), access="read-write")
    assert s.guarded
    assert verdicts(s, "drop table t") == [False]
    assert verdicts(s, "delete from t") == [True]
    plain = session(tmp_path, access="read-write")
    assert not plain.guarded
    assert not session(tmp_path, access="read-only").guarded


def test_unparsed_is_refused_unless_the_grant_allows_it(tmp_path: Path) -> None:
    strict = session(tmp_path, access="read-write", guardrails=["no-destructive-ddl"])
    d = strict.judge("DR/**/OP TABLE t")
    assert not d.allow and d.rule == "unparsed"
    lax = session(tmp_path, access="read-write", guardrails=["no-destructive-ddl"], allow_unparsed=True)
    d = lax.judge("DR/**/OP TABLE t")
    assert d.allow and not d.by_shape
    assert not lax.judge("drop table t").allow


def test_fingerprint_is_the_shape() -> None:
    from ostiary.hooks import statement_fingerprint

    a = statement_fingerprint("select v from t where id = 1")
    assert a == statement_fingerprint("SELECT v FROM t /* c */ WHERE id = 2")
    assert a != statement_fingerprint("select v from t where id = 1 or true")
    assert len(a) == 16


def test_read_only_pack_on_a_read_write_grant_means_read_only(tmp_path: Path) -> None:
    s = session(tmp_path, access="read-write", guardrails=["read-only"])
    assert s.guarded
    assert verdicts(s, "select * from t") == [True]
    for sql in [
        "delete from t where id = 1",
        "copy t to program 'x'",
        "select pg_terminate_backend(1)",
        "begin read write",
        "vacuum t",
    ]:
        d = s.decide(StatementAnalysis.of(sql)[0])
        assert not d.allow and d.rule == "read-only", sql


def test_rules_on_writes_hold_what_moves_or_rewrites_their_relations(tmp_path: Path) -> None:
    """Found by a hunt: ALTER TABLE public.m SET SCHEMA other (then UPDATE other.m), INHERIT or
    ATTACH PARTITION under another schema's table, a cascading foreign key to one, ALTER COLUMN
    TYPE ... USING, TRUNCATE and a renamed view changed public rows without an approval."""
    rule = {
        "name": "prod",
        "match": {"kinds": ["update", "delete"], "relations": ["public.*"]},
        "approvers": ["dba"],
    }
    s = session(tmp_path, approvals=(rule,), access="read-write", approvals_names=["prod"])
    s.set_views([["other", "ov", "public", "orders"]])
    for sql in (
        "alter table public.m1 set schema other",
        "alter table public.m2 inherit other.hp",
        "alter table other.np attach partition public.m3 for values from (0) to (100)",
        "alter table public.m4 add constraint f foreign key (id) references other.p2(id) on delete cascade",
        "alter table public.alt alter column v type text using ('x')",
        "truncate public.orders",
        "drop table orders",
        "alter view other.ov rename to ov2",
    ):
        assert s.approval_rule(sql) is not None, sql
    for sql in ("alter table other.t add column c int", "insert into public.orders values (1)", "select 1"):
        assert s.approval_rule(sql) is None, sql


def test_approval_rules_fail_closed(tmp_path: Path) -> None:
    notes = {"name": "notes", "match": {"kinds": ["update"], "relations": ["notes"]}, "approvers": ["dba"]}
    billing = {
        "name": "billing",
        "match": {"kinds": ["delete"], "relations": ["billing.*"]},
        "approvers": ["dba"],
    }
    s = session(
        tmp_path, approvals=(notes, billing), access="read-write", approvals_names=["notes", "billing"]
    )
    assert s.approval_rule("update notes set x = 1 where id = 1") is not None
    # One text that two rules hold: refused (approved under one rule, it would pass on that
    # rule's approvers alone), two statements or one.
    for text in (
        "update notes set x = 1 where id = 1; delete from billing.invoices where id = 1",
        "with d as (delete from billing.invoices returning 1) update notes set x = 1 where id = 1",
    ):
        d = s.judge(text)
        assert not d.allow and d.rule == "approvals" and "notes, billing" in d.message, (text, d)
    # A qualified name is held by a rule written without its schema (and without the database).
    assert s.approval_rule("update public.notes set x = 1 where id = 1") is not None
    assert s.approval_rule("update app.public.notes set x = 1 where id = 1") is not None
    # Relation rules pin search_path (an unqualified name must not move to billing).
    assert not s.judge("set search_path = billing").allow
    assert not s.judge("alter role app set search_path = billing").allow
    # SQL EXECUTE runs a prepared statement the text does not show (one prepared through the
    # protocol, whose executions are held there): refused.
    for text in ("execute s1('x', 1)", "explain analyze execute s1('x', 1)"):
        d = s.judge(text)
        assert not d.allow and "SQL EXECUTE" in d.message, (text, d)
    assert s.judge("select 1").allow and s.judge("delete from billing.invoices where id = 1").allow
    # A deny guardrail written without a schema refuses the qualified name too.
    rule = {"name": "no-accounts-truncate", "match": {"kinds": ["truncate"], "relations": ["accounts"]}}
    g = session(tmp_path, rules=(rule,), access="read-write", guardrails=["no-accounts-truncate"])
    assert not g.judge("truncate public.accounts").allow and not g.judge("truncate accounts").allow


def test_relation_rules_refuse_what_reaches_relations_unnamed(tmp_path: Path) -> None:
    # An allow list (public.allowed*) and a deny rule (secret.*): statements that reach relations
    # they do not name, code whose reads are out of sight, and catalog views publishing other
    # relations' values are refused; the names GRANT ... IN SCHEMA, COMMENT and sequence
    # functions act on are seen.
    allow = session(tmp_path, access="read-write", relations=["public.allowed*"])
    rule = {"name": "no-secret", "match": {"relations": ["secret.*"]}}
    deny = session(tmp_path, rules=(rule,), access="read-write", guardrails=["no-secret"])
    for s in (allow, deny):
        for text in (
            "truncate public.allowed_parent cascade",
            "drop table public.allowed_orders cascade",
            "drop owned by current_user",
            "do $$ begin raise notice '%', (select 1); end $$",
            "create function public.allowed_f() returns setof text language sql as 'select 1'",
            "select most_common_vals from pg_stats where schemaname = 'secret'",
            "grant select on all tables in schema secret to public",
            "comment on table secret.accounts is 'owned'",
            "select setval('secret.seq', 1)",
        ):
            assert not s.judge(text).allow, text
    assert allow.judge("truncate public.allowed_parent").allow
    assert deny.judge("select nextval('public.seq')").allow
