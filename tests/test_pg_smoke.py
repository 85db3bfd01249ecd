"""The first ring of end to end: psql through the gateway, TLS on both legs."""

from __future__ import annotations

from conftest import GatewayProcess, psql


def test_psql_select_through_gateway(gateway: GatewayProcess) -> None:
    r = psql(gateway, "-At", "-c", "select current_user, current_database(), 40 + 2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "app|app|42"


def test_upstream_leg_is_tls(gateway: GatewayProcess) -> None:
    r = psql(gateway, "-At", "-c", "select ssl from pg_stat_ssl where pid = pg_backend_pid()")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "t"


def test_wrong_password_is_refused_with_28p01(gateway: GatewayProcess) -> None:
    r = psql(gateway, "-c", "select 1", password="not-the-password")
    assert r.returncode != 0
    assert 'password authentication failed for user "ci"' in r.stderr
    assert "not-the-password" not in r.stderr + gateway.log()
