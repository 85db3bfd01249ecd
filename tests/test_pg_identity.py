"""Workload identity end to end: psql and psycopg present GitHub-shaped OIDC tokens as their password;
the gateway fetches the issuer's JWKS over HTTPS (a local IdP with trustme certificates), validates
them, and the policy's grants decide what each may do. Also: client-certificate identities, per-grant
upstream roles, read-only grants, refusals with protocol-native errors, max_session, policy reload
under live sessions.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
import yaml

from conftest import APP_PASSWORD, READER_PASSWORD, GatewayFactory, GatewayProcess, gateway_config, psql
from idp import LocalIdp, github_claims
from ostiary.devcluster import PgCluster, TlsMaterial, free_port, make_tls_material
from pgraw import RawConn, password_message, startup_message

SPIFFE_ID = "spiffe://acme.test/ns/payments/sa/ledger"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIdp]:
    p = LocalIdp(tmp_path_factory.mktemp("idp"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def client_cert_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls_material(tmp_path_factory.mktemp("svid"), client_uris=[SPIFFE_ID])


def policy(pg: PgCluster, tls: TlsMaterial, idp: LocalIdp, tmp: Path, **changes: Any) -> dict[str, Any]:
    cfg = gateway_config(pg, tls, 0, tmp, grants=[])
    cfg.pop("clients")
    cfg["issuers"] = [
        {
            "name": "github",
            "preset": "github-actions",
            "audiences": ["ostiary-test"],
            "jwks_url": f"{idp.url}/jwks",
            "ca": str(idp.ca_path),
            "jwks_refresh_min_interval": 1,
            "algorithms": ["RS256", "ES256"],  # GitHub signs with RS256; the EC key tests ES256
        }
    ]
    cfg["identities"] = [
        {
            "name": "shop-deploy",
            "issuer": "github",
            "match": {"repository": "acme/shop", "ref": "refs/heads/main", "environment": "production"},
        },
        {"name": "reporting", "issuer": "github", "match": {"repository": ["acme/reports", "acme/bi-*"]}},
        {"name": "any-acme", "issuer": "github", "match": {"repository_owner": "acme"}},
        {
            "name": "ledger",
            "issuer": "certificate",
            "match": {"spiffe_id": "spiffe://acme.test/ns/payments/*"},
        },
    ]
    cfg["groups"] = [{"name": "readers", "members": ["reporting"]}]
    conn = cfg["connections"][0]
    conn["credentials"] = {"reader": {"user": "app_reader", "password": READER_PASSWORD}}
    cfg["grants"] = [
        {"name": "shop-writes", "identities": ["shop-deploy"], "connection": "app", "access": "read-write"},
        {
            "name": "reports-read",
            "identities": ["readers"],
            "connection": "app",
            "access": "read-only",
            "credential": "reader",
        },
        {"name": "ledger-reads", "identities": ["ledger"], "connection": "app", "access": "read-only"},
        {
            "name": "acme-dev",
            "identities": ["any-acme"],
            "connection": "app",
            "access": "read-only",
            "networks": ["10.0.0.0/8"],
        },
    ]
    cfg.update(changes)
    return cfg


class Configured:
    """``configured()`` is the test policy as a dict; ``configured.start(cfg)`` runs a gateway on it."""

    def __init__(
        self, factory: GatewayFactory, pg: PgCluster, tls: TlsMaterial, idp: LocalIdp, tmp: Path
    ) -> None:
        self.factory, self.pg, self.tls, self.idp, self.tmp = factory, pg, tls, idp, tmp

    def __call__(self) -> dict[str, Any]:
        return policy(self.pg, self.tls, self.idp, self.tmp)

    def start(self, cfg: dict[str, Any]) -> GatewayProcess:
        return self.factory(config=cfg)


@pytest.fixture
def configured(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    gateway_tls: TlsMaterial,
    idp: LocalIdp,
    tmp_path: Path,
    reader_role: str,
) -> Configured:
    return Configured(gateway_factory, pg, gateway_tls, idp, tmp_path)


@pytest.fixture
def gw(configured: Configured) -> GatewayProcess:
    return configured.start(configured())


def connect(gw: GatewayProcess, token: str, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(gw.dsn(password=token, **kw), autocommit=True)


def refused(gw: GatewayProcess, token: str, **kw: Any) -> str:
    """The error a psql client gets for this token; asserts it was refused and the token is not echoed."""
    r = psql(gw, "-c", "select 1", password=token, **kw)
    assert r.returncode == 2, r.stdout
    assert token not in r.stderr and token not in gw.log()
    sig = token.rsplit(".", 1)[-1]
    assert not sig or sig not in r.stderr
    return r.stderr


# -- allowed -------------------------------------------------------------------------------------


def test_github_token_through_psql_gets_its_grant(gw: GatewayProcess, idp: LocalIdp) -> None:
    token = idp.mint(github_claims())
    r = psql(
        gw,
        "-At",
        "-c",
        "select current_user, current_setting('default_transaction_read_only')",
        password=token,
    )
    assert r.returncode == 0, r.stderr + gw.log()[-2000:]
    assert r.stdout.strip() == "app|off"
    r = psql(
        gw,
        "-c",
        "create table if not exists deploy_log(at timestamptz default now())",
        "-c",
        "insert into deploy_log default values",
        password=token,
    )
    assert r.returncode == 0, r.stderr
    assert "under grant shop-writes" in gw.log()


def test_ec_key_and_key_rotation(gw: GatewayProcess, idp: LocalIdp) -> None:
    with connect(gw, idp.mint(github_claims(), kid="ec-1")) as c:
        assert c.execute("select 1").fetchone() == (1,)
    idp.rotate()
    time.sleep(1.1)  # past jwks_refresh_min_interval since the last fetch
    # A kid the gateway has not seen makes it refetch the JWKS.
    with connect(gw, idp.mint(github_claims(), kid="rsa-2")) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_read_only_grant_uses_reader_role_and_stays_read_only(gw: GatewayProcess, idp: LocalIdp) -> None:
    token = idp.mint(github_claims("acme/reports"))
    with connect(gw, token) as c:
        assert c.execute("select current_user").fetchone() == ("app_reader",)
        assert c.execute("show default_transaction_read_only").fetchone() == ("on",)
        assert c.execute("select item from shop_orders").fetchone() == ("book",)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            c.execute("create table nope(x int)")
        for attempt in (
            "set default_transaction_read_only = off",
            'SET "default_transaction_read_only" TO 0',
            "begin read write",
            "start transaction /* x */ READ\n WRITE",
            "set session characteristics as transaction read write",
            "select set_config('default_transaction_read_only', 'off', false)",
            "do $$ begin perform 1; end $$",
            'set U&"default_transaction\\005fread_only" = off',
            "select '/*'; begin read/*x*/write; select '*/'",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="read-only"):
                c.execute(attempt)
        # RESET and DISCARD ALL return to the startup value: still read-only.
        c.execute("reset all")
        c.execute("discard all")
        assert c.execute("show default_transaction_read_only").fetchone() == ("on",)
        assert c.execute("select count(*) from shop_orders").fetchone() == (1,)


def test_networks_narrow_and_the_user_name_chooses_among_grants(
    configured: Configured, idp: LocalIdp
) -> None:
    token = idp.mint(github_claims())  # acme/shop on main: shop-writes, and acme-dev from 10/8 only
    cfg = configured()
    gw = configured.start(cfg)
    with connect(gw, token) as c:  # from 127.0.0.1 only shop-writes applies
        assert c.execute("show default_transaction_read_only").fetchone() == ("off",)
    cfg = configured()
    cfg["grants"][3]["networks"] = []  # now both apply
    gw = configured.start(cfg)
    assert "several grants apply (shop-writes, acme-dev)" in refused(gw, token)
    with connect(gw, token, user="acme-dev") as c:
        assert c.execute("show default_transaction_read_only").fetchone() == ("on",)
    with connect(gw, token, user="shop-writes") as c:
        assert c.execute("show default_transaction_read_only").fetchone() == ("off",)


def test_client_certificate_identity(
    gateway_factory: GatewayFactory,
    pg: PgCluster,
    idp: LocalIdp,
    client_cert_tls: TlsMaterial,
    tmp_path: Path,
) -> None:
    gw = gateway_factory(config=policy(pg, client_cert_tls, idp, tmp_path))
    env = gw.env()
    del env["PGPASSWORD"]
    env.update(
        PGSSLCERT=str(client_cert_tls.client_cert),
        PGSSLKEY=str(client_cert_tls.client_key),
        PGSSLROOTCERT=str(client_cert_tls.ca_cert),
    )
    r = subprocess.run(
        ["psql", "-X", "-At", "-w", "-c", "select current_user"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr + gw.log()[-2000:]
    assert r.stdout.strip() == "app"
    assert f"{SPIFFE_ID} (certificate via certificate)" in gw.log()


# -- refused -------------------------------------------------------------------------------------


def test_every_token_rejection_reaches_psql_with_its_reason(
    gw: GatewayProcess, idp: LocalIdp, subtests: pytest.Subtests
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    good = github_claims()
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pub_pem = idp.rsa.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT","kid":"rsa-1"}').decode()
    now = int(time.time())
    body = jwt.utils.base64url_encode(
        json.dumps(
            {"iss": idp.issuer, "aud": "ostiary-test", "sub": "x", "iat": now, "exp": now + 60}
        ).encode()
    ).decode()
    cases: dict[str, tuple[str, str, str]] = {
        "expired": (idp.mint(good, issued_at=time.time() - 900, lifetime=300), "28P01", "expired"),
        "not yet valid": (idp.mint(good, issued_at=time.time() + 900), "28P01", "not valid yet"),
        "wrong audience": (idp.mint(good, audience="someone-else"), "28P01", "audience"),
        "bad signature": (idp.mint(good, key=stranger), "28P01", "signature"),
        "unknown kid": (idp.mint(good, kid="nobody", key=stranger, alg="RS256"), "28P01", "kid"),
        "alg none": (f"{header}.{body}.", "28P01", "none"),
        "hmac with the public key": (_hs256(idp, rsa_pub_pem), "28P01", "HMAC"),
        "lifetime too long": (idp.mint(good, lifetime=7 * 24 * 3600), "28P01", "lifetime"),
        "no grant": (idp.mint(github_claims("acme/other")), "28000", "no grant"),
        "untrusted issuer": (_other_issuer(idp, good), "28P01", "issuer"),
    }
    for name, (token, code, words) in cases.items():
        with subtests.test(name):
            err = refused(gw, token)
            assert words.lower() in err.lower(), err
            err_fields = raw_login_error(gw, token)
            assert err_fields["S"] == "FATAL" and err_fields["C"] == code, err_fields


def raw_login_error(gw: GatewayProcess, token: str) -> dict[str, str]:
    """The fields of the ErrorResponse a raw TLS client gets after sending ``token`` as password."""
    with RawConn(gw.port) as c:
        c.start_tls(gw.tls.ca_cert)
        c.send(startup_message({"user": "ci", "database": "app"}))
        m = c.recv_message()
        assert m is not None and m[0] == b"R", m
        c.send(password_message(token))
        out = c.outcome(10)
    assert out.closed and len(out.errors) == 1, out.describe()
    return out.errors[0]


def _hs256(idp: LocalIdp, secret: bytes) -> str:
    # pyjwt refuses a PEM as an HMAC secret, so sign by hand: the classic RS/HS confusion token.
    import hashlib
    import hmac
    import json

    h = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    now = int(time.time())
    claims = {"iss": idp.issuer, "aud": "ostiary-test", "iat": now, "exp": now + 60, **github_claims()}
    b = jwt.utils.base64url_encode(json.dumps(claims).encode())
    sig = jwt.utils.base64url_encode(hmac.new(secret, h + b"." + b, hashlib.sha256).digest())
    return (h + b"." + b + b"." + sig).decode()


def _other_issuer(idp: LocalIdp, claims: dict[str, Any]) -> str:
    now = int(time.time())
    body = {"iss": "https://evil.example", "aud": "ostiary-test", "iat": now, "exp": now + 60, **claims}
    return jwt.encode(body, idp.rsa, algorithm="RS256", headers={"kid": "rsa-1"})


def test_plaintext_refused_before_the_token_is_asked_for(configured: Configured, idp: LocalIdp) -> None:
    cfg = configured()
    cfg["tls"]["mode"] = "allow"  # the gateway accepts plaintext, but connection app does not
    gw = configured.start(cfg)
    token = idp.mint(github_claims())
    r = psql(gw, "-c", "select 1", password=token, sslmode="disable")
    assert r.returncode == 2
    assert "requires TLS" in r.stderr


def test_replayed_token_refused_when_policy_asks(configured: Configured, idp: LocalIdp) -> None:
    cfg = configured()
    cfg["issuers"][0]["reject_reused_jti"] = True
    gw = configured.start(cfg)
    token = idp.mint(github_claims())
    with connect(gw, token) as c:
        assert c.execute("select 1").fetchone() == (1,)
    err = refused(gw, token)
    assert "reused" in err or "jti" in err, err


def test_a_token_is_used_up_by_a_session_not_by_a_refused_login(
    configured: Configured, idp: LocalIdp
) -> None:
    """With reject_reused_jti a token opens one session: a login refused for reasons that are not
    the token's (several grants apply and none was chosen, the upstream unreachable) leaves it
    usable for the corrected try, which then uses it up."""
    cfg = configured()
    cfg["issuers"][0]["reject_reused_jti"] = True
    down = copy.deepcopy(cfg["connections"][0])
    down["name"] = "down"
    down["upstream"]["port"] = free_port()  # nothing listens there
    cfg["connections"].append(down)
    cfg["grants"] += [
        {"name": "shop-reads", "identities": ["shop-deploy"], "connection": "app", "access": "read-only"},
        {"name": "shop-down", "identities": ["shop-deploy"], "connection": "down", "access": "read-only"},
    ]
    gw = configured.start(cfg)
    token = idp.mint(github_claims())
    assert "several grants apply" in refused(gw, token)
    assert "cannot open the upstream session" in refused(gw, token, dbname="down")
    with connect(gw, token, user="shop-reads") as c:
        assert c.execute("select 1").fetchone() == (1,)
    assert "token was already used" in refused(gw, token, user="shop-reads")


def test_admin_api_calls_do_not_use_up_a_token(configured: Configured, idp: LocalIdp) -> None:
    """The README's pipeline with reject_reused_jti: approvals request, polls of wait, then psql with
    the same token. API calls open no session: only the database login uses the token up; an
    approver's token is not used up by listing and then approving either."""
    cfg = configured()
    cfg["issuers"][0]["reject_reused_jti"] = True
    admin_port = free_port()
    cfg["admin"] = {"listen": {"host": "127.0.0.1", "port": admin_port}}
    cfg["approvals"] = [{"name": "prod-writes", "match": {"kinds": ["update"]}, "approvers": ["readers"]}]
    cfg["grants"][0]["approvals"] = ["prod-writes"]
    gw = configured.start(cfg)
    url = f"http://127.0.0.1:{admin_port}"

    def call(method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    ci = idp.mint(github_claims())
    ask = {"connection": "app", "statement": "update t set v = 1", "reason": "release 42"}
    status, req = call("POST", "/approvals", ci, ask)
    assert status == 201, req
    for _ in range(2):  # approvals wait polls
        status, body = call("GET", f"/approvals/{req['id']}", ci)
        assert status == 200 and body["state"] == "pending", body
    approver = idp.mint(github_claims("acme/reports"))
    assert call("GET", "/approvals", approver)[0] == 200
    status, body = call("POST", f"/approvals/{req['id']}/approve", approver, {"reason": "ok"})
    assert status == 200 and body["state"] == "approved", body
    with connect(gw, ci) as c:
        assert c.execute("select 1").fetchone() == (1,)
    assert "token was already used" in refused(gw, ci)
    assert call("GET", f"/approvals/{req['id']}", ci)[0] == 200


# -- session lifetime and reload -----------------------------------------------------------------


def test_token_expiring_mid_session_does_not_end_it_but_max_session_does(
    configured: Configured, idp: LocalIdp
) -> None:
    cfg = configured()
    cfg["grants"][0]["max_session"] = 4
    cfg["issuers"][0]["clock_skew"] = 0
    gw = configured.start(cfg)
    token = idp.mint(github_claims(), lifetime=2)
    with connect(gw, token) as c:
        time.sleep(2.5)
        # The token has expired; the session it opened goes on (documented behaviour) ...
        assert c.execute("select 1").fetchone() == (1,)
        time.sleep(2.5)
        # ... until the grant's max_session.
        with pytest.raises(psycopg.OperationalError, match="maximum duration of grant shop-writes"):
            c.execute("select 1")
    assert "expired" in refused(gw, token)


def test_ending_a_session_cancels_the_statement_it_is_running(
    configured: Configured, idp: LocalIdp, pg: PgCluster
) -> None:
    """max_session (and revocation, and shutdown) end a session while PostgreSQL runs a statement
    of it: closing the connection would not stop that statement, which would run on and commit
    after the session was ended. The gateway cancels it upstream too: the write after the sleep
    never happens, and the client is told at once, not when the statement would have ended."""
    pg.execute(
        "drop table if exists after_the_end; create table after_the_end(id int);"
        " grant all on after_the_end to public",
        dbname="app",
    )
    cfg = configured()
    cfg["grants"][0]["max_session"] = 2
    gw = configured.start(cfg)
    with connect(gw, idp.mint(github_claims())) as c:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="maximum duration of grant shop-writes"):
            c.execute("select pg_sleep(8); insert into after_the_end values (1)")
        ended = time.monotonic() - started
    assert ended < 6, f"the client was told after {ended:.1f} s"
    time.sleep(8 - ended)
    assert pg.execute("select count(*) from after_the_end", dbname="app").strip() == "0"
    assert "cancel forwarded to upstream pid" in gw.log()


def test_reload_revokes_one_grant_and_leaves_another_untouched(configured: Configured, idp: LocalIdp) -> None:
    cfg = configured()
    gw = configured.start(cfg)
    writer = connect(gw, idp.mint(github_claims()))
    reader = connect(gw, idp.mint(github_claims("acme/reports")))
    assert reader.execute("select 1").fetchone() == (1,)

    # A broken policy is refused and the running one stays in force.
    gw.config_path.write_text("grants: [oops\n")
    gw.proc.send_signal(signal.SIGHUP)
    _wait_for(gw, "policy reload rejected")
    assert writer.execute("select 1").fetchone() == (1,)
    assert reader.execute("select 1").fetchone() == (1,)

    new = copy.deepcopy(cfg)
    new["listen"]["port"] = gw.port
    new["grants"] = [g for g in new["grants"] if g["name"] != "reports-read"]
    gw.config_path.write_text(yaml.safe_dump(new))
    gw.proc.send_signal(signal.SIGHUP)
    _wait_for(gw, "access revoked: grant reports-read was removed")
    with pytest.raises(psycopg.OperationalError, match="access revoked"):
        reader.execute("select 1")
    assert writer.execute("select 1").fetchone() == (1,)
    writer.close()
    # New sessions follow the new policy.
    assert "no grant" in refused(gw, idp.mint(github_claims("acme/reports")))
    assert "policy version" in gw.log()


def _wait_for(gw: GatewayProcess, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in gw.log():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the gateway log:\n{gw.log()[-3000:]}")


def test_file_change_is_picked_up_without_a_signal(configured: Configured, idp: LocalIdp) -> None:
    cfg = configured()
    gw = configured.start(cfg)
    token = idp.mint(github_claims("acme/bi-dashboards"))
    with connect(gw, token) as c:
        assert c.execute("select current_user").fetchone() == ("app_reader",)
    new = copy.deepcopy(cfg)
    new["listen"]["port"] = gw.port
    new["identities"][1]["match"]["repository"] = ["acme/reports"]
    gw.config_path.write_text(yaml.safe_dump(new))
    _wait_for(gw, "applied")
    assert "no grant" in refused(gw, idp.mint(github_claims("acme/bi-dashboards")))


def test_issuer_outage_within_bound_keeps_working(configured: Configured, idp: LocalIdp) -> None:
    cfg = configured()
    gw = configured.start(cfg)
    with connect(gw, idp.mint(github_claims())) as c:
        c.execute("select 1")
    idp.up = False
    try:
        with connect(gw, idp.mint(github_claims())) as c:
            assert c.execute("select 1").fetchone() == (1,)
        # An unknown kid cannot be fetched while the issuer is down.
        assert "kid" in refused(gw, idp.mint(github_claims(), kid="rsa-9", key=idp.rsa, alg="RS256"))
    finally:
        idp.up = True


def test_reload_during_an_issuer_outage_keeps_its_keys(configured: Configured, idp: LocalIdp) -> None:
    """A reload that changes an issuer entry (one more audience) but not where its keys come from
    keeps the keys it has: during an outage its tokens go on working for jwks_max_stale."""
    cfg = configured()
    gw = configured.start(cfg)
    with connect(gw, idp.mint(github_claims())) as c:
        c.execute("select 1")
    idp.up = False
    try:
        new = copy.deepcopy(cfg)
        new["listen"]["port"] = gw.port
        new["issuers"][0]["audiences"].append("another-service")
        gw.config_path.write_text(yaml.safe_dump(new))
        gw.proc.send_signal(signal.SIGHUP)
        _wait_for(gw, "applied")
        for audience in ("ostiary-test", "another-service"):
            with connect(gw, idp.mint(github_claims(), audience=audience)) as c:
                assert c.execute("select 1").fetchone() == (1,)
    finally:
        idp.up = True


def test_slow_issuer_gets_a_login_28000_within_the_startup_timeout(
    configured: Configured, idp: LocalIdp
) -> None:
    """With the default fetch_timeout and startup_timeout (10 s each), a token naming a kid the
    gateway has not fetched, while the issuer is slow, is answered 28000 "keys unavailable" after a
    short wait, not cut off by the startup timeout (08P01)."""
    gw = configured.start(configured())
    with connect(gw, idp.mint(github_claims())) as c:
        c.execute("select 1")
    time.sleep(1.1)  # past jwks_refresh_min_interval since the first fetch
    idp.server.delay = 20
    try:
        started = time.monotonic()
        err = refused(gw, idp.mint(github_claims(), kid="rsa-rotated", key=idp.rsa, alg="RS256"))
        took = time.monotonic() - started
    finally:
        idp.server.delay = 0
    assert "keys of issuer github are unavailable" in err and "kid 'rsa-rotated'" in err, err
    assert took < 8, f"refused after {took:.1f} s"
    # Tokens with the keys the gateway holds are not held up meanwhile.
    with connect(gw, idp.mint(github_claims())) as c:
        assert c.execute("select 1").fetchone() == (1,)


def test_a_connection_s_login_settings_change_without_ending_sessions(
    configured: Configured, idp: LocalIdp
) -> None:
    """Moving the upstream password (to a file: a rotation), a longer connect_timeout or
    require_auth are for the next login: open sessions go on. Another upstream role ends them."""
    cfg = configured()
    gw = configured.start(cfg)
    writer = connect(gw, idp.mint(github_claims()))
    conn = next(c for c in cfg["connections"] if c["name"] == "app")
    pw_file = gw.config_path.parent / "app.pw"
    pw_file.write_text(APP_PASSWORD)
    new = copy.deepcopy(cfg)
    new["listen"]["port"] = gw.port
    up = next(c for c in new["connections"] if c["name"] == "app")["upstream"]
    up.pop("password_env", None)
    up["password_file"] = str(pw_file)
    up["connect_timeout"] = conn["upstream"].get("connect_timeout", 10) + 1
    up["require_auth"] = ["scram-sha-256"]
    gw.config_path.write_text(yaml.safe_dump(new))
    gw.proc.send_signal(signal.SIGHUP)
    _wait_for(gw, "applied")
    assert writer.execute("select 1").fetchone() == (1,)
    with connect(gw, idp.mint(github_claims())) as c:  # the new settings log in
        assert c.execute("select 2").fetchone() == (2,)
    new2 = copy.deepcopy(new)
    next(c for c in new2["connections"] if c["name"] == "app")["upstream"]["database"] = "postgres"
    gw.config_path.write_text(yaml.safe_dump(new2))
    gw.proc.send_signal(signal.SIGHUP)
    _wait_for(gw, "its connection or its rules changed")
    with pytest.raises(psycopg.OperationalError):
        writer.execute("select 1")
