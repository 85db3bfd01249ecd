"""psql through the gateway: -c, -f scripts, \\copy both ways, multi-statement strings, errors."""

from __future__ import annotations

from pathlib import Path

from conftest import GatewayProcess, psql


def test_several_c_options_run_in_order(gateway: GatewayProcess) -> None:
    r = psql(
        gateway,
        "-Atq",
        "-c",
        "drop table if exists psql_c_multi",
        "-c",
        "create table psql_c_multi (id int primary key, name text)",
        "-c",
        "insert into psql_c_multi values (1, 'one'), (2, 'two'), (3, 'three')",
        "-c",
        "select string_agg(id || ':' || name, ',' order by id) from psql_c_multi",
        "-c",
        "drop table psql_c_multi",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1:one,2:two,3:three"]
    assert "ERROR" not in r.stderr


def test_script_with_transactions_and_errors(gateway: GatewayProcess, tmp_path: Path) -> None:
    script = tmp_path / "script.sql"
    script.write_text(
        """\
\\set ON_ERROR_STOP 0
drop table if exists psql_script;
create table psql_script (id int primary key, v text not null);
insert into psql_script select g, 'v' || g from generate_series(1, 50) g;
select 'count1', count(*) from psql_script;

begin;
insert into psql_script values (100, 'rolled back');
delete from psql_script where id <= 10;
select 'in_tx', count(*) from psql_script;
rollback;
select 'count2', count(*) from psql_script;

begin;
insert into psql_script values (200, 'lost');
insert into psql_script values (1, 'duplicate key');
select 'after_error';
rollback;
select 'count3', count(*), count(*) filter (where id = 200) from psql_script;

begin;
update psql_script set v = 'updated' where id = 7;
commit;
select 'row7', v from psql_script where id = 7;
select 'status', pg_backend_pid() > 0;
drop table psql_script;
"""
    )
    r = psql(gateway, "-Atq", "-F", "|", "-f", str(script))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "count1|50",
        "in_tx|41",
        "count2|50",
        "count3|50|0",
        "row7|updated",
        "status|t",
    ]
    # The two errors, with psql's own line numbers: the duplicate key, then the statement skipped
    # because the transaction was aborted.
    assert 'duplicate key value violates unique constraint "psql_script_pkey"' in r.stderr
    assert "current transaction is aborted, commands ignored until end of transaction block" in r.stderr
    assert r.stderr.count("ERROR:") == 2, r.stderr


def test_copy_in_and_out_round_trip(gateway: GatewayProcess, tmp_path: Path) -> None:
    rows = []
    for i in range(10_000):
        # Tabs, backslashes, quotes, unicode and NULLs, in COPY text format.
        note = "\\N" if i % 97 == 0 else f"row {i} \\t tab \\\\ back 'q' \"dq\" é€ {i * 7 % 13}"
        rows.append(f"{i}\t{i * 3.25}\t{note}\n")
    src = tmp_path / "in.tsv"
    src.write_text("".join(rows), encoding="utf-8")
    out = tmp_path / "out.tsv"
    r = psql(
        gateway,
        "-Atq",
        "-c",
        "drop table if exists psql_copy",
        "-c",
        "create table psql_copy (id int primary key, amount numeric, note text)",
        "-c",
        f"\\copy psql_copy from '{src}'",
        "-c",
        "select count(*), count(note), sum(id) from psql_copy",
        "-c",
        f"\\copy (select * from psql_copy order by id) to '{out}'",
        "-c",
        "drop table psql_copy",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["10000|9896|49995000"]
    assert out.read_bytes() == src.read_bytes()


def test_multi_statement_query_string(gateway: GatewayProcess) -> None:
    # One simple-protocol Query message carrying three statements: psql 15 shows every result.
    r = psql(gateway, "-Atq", "-c", "select 1; select 2 as two; select 'three'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1", "2", "three"]


def test_multi_statement_string_is_one_implicit_transaction(gateway: GatewayProcess) -> None:
    # An error in the middle of one Query message rolls back the statements before it, as in
    # PostgreSQL: the whole string is one implicit transaction.
    r = psql(
        gateway,
        "-Atq",
        "-v",
        "ON_ERROR_STOP=0",
        "-c",
        "drop table if exists psql_implicit; create table psql_implicit (x int)",
        "-c",
        "insert into psql_implicit values (1); select 1/0; insert into psql_implicit values (2)",
        "-c",
        "select count(*) from psql_implicit; drop table psql_implicit",
    )
    assert "division by zero" in r.stderr
    assert r.stdout.splitlines() == ["0"]


def test_error_keeps_session_usable(gateway: GatewayProcess) -> None:
    r = psql(
        gateway,
        "-Atq",
        "-v",
        "ON_ERROR_STOP=0",
        input="select pg_backend_pid();\nselect 1/0;\nselect 'alive', pg_backend_pid();\n",
    )
    assert r.returncode == 0, r.stderr
    assert "ERROR:  division by zero" in r.stderr
    first, second = r.stdout.splitlines()
    # Same upstream backend before and after the error: the session was not reopened.
    assert second == f"alive|{first}"
