"""TLS on both legs of the gateway: client sslmodes, plaintext policy, client certificates, and the
upstream leg's modes (disable, require, verify-full) including a failing verification."""

from __future__ import annotations

import copy
import ssl
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import CLIENT_PASSWORD, CLIENT_USER, GatewayFactory, GatewayProcess, gateway_config, psql
from ostiary.devcluster import PgCluster, TlsMaterial, make_tls_material
from pgraw import RawConn, startup_message

UPSTREAM_SSL = "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()"


def connections(pg: PgCluster, tls: TlsMaterial, tmp: Path, **upstream_tls: Any) -> list[dict[str, Any]]:
    """The default connection list with the upstream ``tls`` section replaced."""
    conns: list[dict[str, Any]] = copy.deepcopy(gateway_config(pg, tls, 0, tmp)["connections"])
    conns[0]["upstream"]["tls"] = upstream_tls
    return conns


def client_tls(tls: TlsMaterial, **kw: Any) -> dict[str, Any]:
    return {"cert": str(tls.server_cert), "key": str(tls.server_key), "client_ca": str(tls.ca_cert), **kw}


# -- the client leg ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full", "prefer"])
def test_client_sslmodes_that_use_tls(gateway: GatewayProcess, sslmode: str) -> None:
    r = psql(gateway, "-c", "\\conninfo", sslmode=sslmode)
    assert r.returncode == 0, r.stderr
    assert "SSL connection (protocol: TLSv1.3" in r.stdout, r.stdout
    with psycopg.connect(gateway.dsn(sslmode=sslmode)) as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_direct_tls_without_sslrequest(gateway: GatewayProcess, sslmode: str) -> None:
    """libpq 17+ with sslnegotiation=direct starts TLS at once, without SSLRequest, and insists on
    the ALPN protocol postgresql (psycopg's own libpq is 18). With a client certificate too."""
    if psycopg.pq.version() < 170000:
        pytest.skip(f"libpq {psycopg.pq.version()} has no sslnegotiation")
    with psycopg.connect(gateway.dsn(sslmode=sslmode) + " sslnegotiation=direct") as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("select 'direct'").fetchone() == ("direct",)
    tls = gateway.tls
    dsn = gateway.dsn(sslcert=str(tls.client_cert), sslkey=str(tls.client_key)) + " sslnegotiation=direct"
    with psycopg.connect(dsn) as c:
        assert c.execute("select 'direct with cert'").fetchone() == ("direct with cert",)


@pytest.mark.parametrize("alpn", [None, ["h2"], ["postgresql"]], ids=["no-alpn", "other-alpn", "postgresql"])
def test_direct_tls_needs_the_postgresql_alpn(gateway: GatewayProcess, alpn: list[str] | None) -> None:
    """As PostgreSQL: direct TLS that does not name the postgresql protocol is refused (without
    ALPN: a FATAL inside TLS; with another protocol: the handshake fails); with it, the session
    works. A plaintext client's first byte can never look like a TLS record, so nothing else
    changes."""
    c = RawConn(gateway.port)
    if alpn == ["h2"]:
        with c, pytest.raises(ssl.SSLError, match=r"NO_APPLICATION_PROTOCOL|no application protocol"):
            c.start_tls(gateway.tls.ca_cert, direct=True, alpn=alpn)
        return
    c.start_tls(gateway.tls.ca_cert, direct=True, alpn=alpn)
    with c:
        if alpn is None:
            c.send(startup_message({"user": CLIENT_USER, "database": "app"}))
            out = c.outcome(5)
            assert out.closed and out.errors, out.describe()
            assert out.errors[0]["C"] == "08P01" and "ALPN" in out.errors[0]["M"], out.errors
        else:
            assert c.login(CLIENT_USER, CLIENT_PASSWORD)[-1] == (b"Z", b"I")
            assert c.query("select 'raw direct'")[1][0] == b"D"
    assert "Traceback" not in gateway.log()


def test_client_verify_full_with_wrong_root_is_refused_by_the_client(
    gateway: GatewayProcess, pg: PgCluster
) -> None:
    # The gateway's certificate does not chain to the database's CA: libpq itself refuses.
    assert pg.tls is not None
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(gateway.dsn(sslrootcert=str(pg.tls.ca_cert)))


def test_plaintext_client_refused_when_tls_required(gateway: GatewayProcess) -> None:
    r = psql(gateway, "-c", "select 1", sslmode="disable")
    assert r.returncode == 2
    assert "the gateway requires TLS" in r.stderr
    assert "sslmode=require" in r.stderr
    with pytest.raises(psycopg.OperationalError, match="FATAL:  the gateway requires TLS"):
        psycopg.connect(gateway.dsn(sslmode="disable"))
    # The password was never asked for, so it cannot have travelled in clear text.
    assert "ci-gateway-secret" not in gateway.log()


def test_plaintext_client_allowed_with_mode_allow(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    # (``tls`` cannot go through gateway_factory's keywords: it names gateway_config's argument.)
    cfg = gateway_config(pg, gateway_tls, 0, tmp_path)
    cfg["tls"] = client_tls(gateway_tls, mode="allow")
    cfg["connections"][0]["allow_plaintext"] = True
    gw = gateway_factory(config=cfg)
    with psycopg.connect(gw.dsn(sslmode="disable")) as c:
        assert not c.pgconn.ssl_in_use
        assert c.execute("select current_user").fetchone() == ("app",)
    # TLS is still offered and used by clients that ask for it.
    with psycopg.connect(gw.dsn(sslmode="verify-full")) as c:
        assert c.pgconn.ssl_in_use
    r = psql(gw, "-At", "-c", "select 40 + 2", sslmode="disable")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"


def test_client_certificate_is_accepted(gateway: GatewayProcess) -> None:
    tls = gateway.tls
    dsn = gateway.dsn(sslcert=str(tls.client_cert), sslkey=str(tls.client_key))
    with psycopg.connect(dsn) as c:
        assert c.pgconn.ssl_in_use
        assert c.execute("select 'with cert'").fetchone() == ("with cert",)
    # gw.env() sets no client certificate: give psql the connection string.
    r = psql(gateway, "-At", "-d", dsn, "-c", "select 'psql with cert'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "psql with cert"


def test_client_certificate_from_another_ca_is_refused(gateway: GatewayProcess, tmp_path: Path) -> None:
    other = make_tls_material(tmp_path / "other")
    dsn = gateway.dsn(sslcert=str(other.client_cert), sslkey=str(other.client_key))
    # The gateway verifies the certificate against tls.client_ca and ends the handshake with an
    # alert (the other CA has the same name, so the signature check is what fails).
    with pytest.raises(psycopg.OperationalError, match="SSL error: tlsv1 alert"):
        psycopg.connect(dsn)
    # And the gateway still serves others.
    with psycopg.connect(gateway.dsn()) as c:
        assert c.execute("select 1").fetchone() == (1,)


# -- the upstream leg -------------------------------------------------------------------------------


def test_upstream_verify_full_is_tls(gateway: GatewayProcess) -> None:
    with psycopg.connect(gateway.dsn()) as c:
        ssl, version = c.execute(UPSTREAM_SSL).fetchone() or (None, None)
    assert ssl is True
    assert version == "TLSv1.3"


def test_upstream_require_without_ca(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    gw = gateway_factory(connections=connections(pg, gateway_tls, tmp_path, mode="require"))
    with psycopg.connect(gw.dsn()) as c:
        assert c.execute(UPSTREAM_SSL).fetchone() == (True, "TLSv1.3")


def test_upstream_disable_is_plaintext(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path
) -> None:
    gw = gateway_factory(connections=connections(pg, gateway_tls, tmp_path, mode="disable"))
    with psycopg.connect(gw.dsn()) as c:
        # The client leg is still TLS; only the upstream session is not.
        assert c.pgconn.ssl_in_use
        assert c.execute(UPSTREAM_SSL).fetchone() == (False, None)


@pytest.mark.parametrize("problem", ["wrong CA", "wrong server name"])
def test_upstream_verify_full_failure_is_reported(
    gateway_factory: GatewayFactory, pg: PgCluster, gateway_tls: TlsMaterial, tmp_path: Path, problem: str
) -> None:
    assert pg.tls is not None
    if problem == "wrong CA":
        other = make_tls_material(tmp_path / "other-ca")
        bad_tls = {"mode": "verify-full", "ca": str(other.ca_cert), "server_name": "localhost"}
    else:
        bad_tls = {"mode": "verify-full", "ca": str(pg.tls.ca_cert), "server_name": "db.example.com"}
    conns = connections(
        pg, gateway_tls, tmp_path, mode="verify-full", ca=str(pg.tls.ca_cert), server_name="localhost"
    )
    bad = copy.deepcopy(conns[0])
    bad["name"] = "badtls"
    bad["upstream"]["tls"] = bad_tls
    gw = gateway_factory(connections=[*conns, bad])

    r = psql(gw, "-c", "select 1", dbname="badtls")
    assert r.returncode == 2
    assert "the gateway cannot open the upstream session" in r.stderr, r.stderr
    with pytest.raises(
        psycopg.OperationalError, match="FATAL:  the gateway cannot open the upstream session"
    ):
        psycopg.connect(gw.dsn(dbname="badtls"))
    # The gateway keeps serving the other connection, and is still running.
    with psycopg.connect(gw.dsn()) as c:
        assert c.execute(UPSTREAM_SSL).fetchone() == (True, "TLSv1.3")
    assert gw.proc.poll() is None
