"""Tests for ostiary.devcluster: a real throwaway PostgreSQL per test module."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from ostiary.devcluster import (
    CLIENT_CERT_CN,
    ClusterError,
    PgCluster,
    find_pg_bin,
    free_port,
    make_tls_material,
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    with PgCluster(tmp_path_factory.mktemp("pg")) as pg:
        yield pg


def _psql(env: dict[str, str], sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_pg_bin("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_find_pg_bin() -> None:
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(find_pg_bin(name), os.X_OK)
    with pytest.raises(RuntimeError, match="apt-get install postgresql"):
        find_pg_bin("definitely-not-a-postgres-binary")


def test_free_port() -> None:
    port = free_port()
    assert 0 < port < 65536
    assert port != 5432


def test_tls_material(tmp_path: Path) -> None:
    tls = make_tls_material(tmp_path / "tls")
    for key in (tls.server_key, tls.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    client = x509.load_pem_x509_certificate(tls.client_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "::1"} <= ips
    cn = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == CLIENT_CERT_CN


def test_select_one(cluster: PgCluster) -> None:
    assert cluster.running
    assert cluster.execute("select 1").strip() == "1"
    assert cluster.port != 5432
    assert cluster.host == "127.0.0.1"
    assert "host=127.0.0.1" in cluster.dsn()
    assert f"port={cluster.port}" in cluster.dsn()


def test_tls_is_on(cluster: PgCluster) -> None:
    assert cluster.tls is not None
    sql = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
    assert cluster.execute(sql).strip() == "t"
    # Explicitly via psql with sslmode=require, and with full verification
    # against the test CA.
    for mode in ("require", "verify-full"):
        proc = _psql(cluster.psql_env(sslmode=mode), sql)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "t"
    # The dsn form works too.
    proc = subprocess.run(
        [
            find_pg_bin("psql"),
            "-X",
            "-A",
            "-t",
            "-c",
            sql,
            cluster.dsn(sslmode="require"),
        ],
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "t"


def test_client_certificate_accepted(cluster: PgCluster) -> None:
    assert cluster.tls is not None
    env = cluster.psql_env(sslmode="verify-ca")
    env["PGSSLCERT"] = str(cluster.tls.client_cert)
    env["PGSSLKEY"] = str(cluster.tls.client_key)
    proc = _psql(env, "select client_dn from pg_stat_ssl where pid = pg_backend_pid()")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"/CN={CLIENT_CERT_CN}"


def test_wrong_password_refused(cluster: PgCluster) -> None:
    proc = _psql(cluster.psql_env(password="not-the-password"), "select 1")
    assert proc.returncode != 0
    assert "password authentication failed" in proc.stderr
    with pytest.raises(ClusterError, match="password authentication failed"):
        cluster.execute("select 1", password="not-the-password")


def test_plaintext_needs_password_too(cluster: PgCluster) -> None:
    # pg_hba uses "host", not "hostssl": plaintext works, but only with the
    # right password.
    proc = _psql(cluster.psql_env(sslmode="disable"), "select 1")
    assert proc.returncode == 0, proc.stderr
    proc = _psql(cluster.psql_env(sslmode="disable", password="wrong"), "select 1")
    assert proc.returncode != 0


def test_create_role_and_database(cluster: PgCluster) -> None:
    cluster.create_role("app_user", "app pass 'quoted'")
    cluster.create_role("app_admin", "s3cret", superuser=True)
    cluster.create_role("app_group", None, login=False)
    cluster.create_database("app_db", "app_user")
    owner = cluster.execute("select pg_get_userbyid(datdba) from pg_database where datname = 'app_db'")
    assert owner.strip() == "app_user"
    who = cluster.execute(
        "select current_user, current_database()",
        dbname="app_db",
        user="app_user",
        password="app pass 'quoted'",
    )
    assert who.strip() == "app_user|app_db"
    assert cluster.execute("select rolsuper from pg_roles where rolname = 'app_admin'").strip() == "t"
    assert cluster.execute("select rolcanlogin from pg_roles where rolname = 'app_group'").strip() == "f"
    # The dsn carries the role's credentials.
    dsn = cluster.dsn("app_db", user="app_user", password="app pass 'quoted'")
    proc = subprocess.run(
        [find_pg_bin("psql"), "-X", "-A", "-t", "-c", "select current_user", dsn],
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "app_user"


def test_execute_error_mentions_failure(cluster: PgCluster) -> None:
    with pytest.raises(ClusterError, match="psql failed") as info:
        cluster.execute("select * from no_such_table")
    assert "no_such_table" in str(info.value)
    assert "server log" in str(info.value)


def test_stop_is_idempotent_and_restart(tmp_path: Path) -> None:
    pg = PgCluster(tmp_path / "c", tls=False, extra_conf={"work_mem": "8MB"})
    assert pg.tls is None
    pg.stop()  # never started: no-op
    pg.start()
    try:
        assert pg.execute("show work_mem").strip() == "8MB"
        assert pg.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").strip() == "f"
        assert "sslmode=disable" in pg.dsn()
    finally:
        pg.stop()
    assert not pg.running
    assert not (pg.data_dir / "postmaster.pid").exists()
    pg.stop()
    pg.stop()
    # The same object can start the existing data directory again.
    with pg:
        assert pg.execute("select 1").strip() == "1"
    assert not pg.running


def test_start_failure_includes_log_tail(tmp_path: Path) -> None:
    pg = PgCluster(tmp_path / "bad", tls=False, extra_conf={"shared_buffers": "not-a-size"})
    with pytest.raises(ClusterError) as info:
        pg.start()
    message = str(info.value)
    assert "pg_ctl start failed" in message
    assert "tail of server log" in message
    assert "shared_buffers" in message
    pg.stop()


def test_long_base_dir_uses_short_socket_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    with PgCluster(deep, tls=False) as pg:
        assert pg.socket_dir != pg.base_dir
        assert pg.execute("select 1").strip() == "1"
        socket_dir = pg.socket_dir
    assert not socket_dir.exists()
