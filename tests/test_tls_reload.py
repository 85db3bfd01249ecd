"""Certificate rotation without a restart: the gateway reads its TLS files again when they change
(cert-manager, certbot, a Kubernetes secret mount) or on SIGHUP. New connections get the new
certificate, established sessions keep theirs, and files that do not make a valid pair leave the
previous certificate in use."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import psycopg
import pytest

from conftest import GatewayFactory, GatewayProcess, gateway_config
from ostiary.devcluster import PgCluster, TlsMaterial, make_tls_material


def connects(gw: GatewayProcess, ca: Path) -> bool:
    try:
        with psycopg.connect(gw.dsn(sslrootcert=str(ca), connect_timeout=5)) as c:
            return c.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def eventually(check: object, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def live_files(tmp_path: Path) -> tuple[Path, TlsMaterial, TlsMaterial]:
    """A directory ``live`` holding the server certificate and key of ``old`` (one CA), and the
    material of another CA (``new``) to rotate to."""
    old = make_tls_material(tmp_path / "old")
    new = make_tls_material(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(old.directory / name, live / name)
    return live, old, new


def rotate(live: Path, new: TlsMaterial) -> None:
    """As certbot does: written elsewhere, then renamed over the old files."""
    for name in ("server.pem", "server.key"):
        shutil.copy(new.directory / name, live / f"{name}.new")
        (live / f"{name}.new").rename(live / name)


@pytest.fixture
def rotating(
    gateway_factory: GatewayFactory, pg: PgCluster, tmp_path: Path, gateway_tls: TlsMaterial
) -> tuple[GatewayProcess, Path, TlsMaterial, TlsMaterial]:
    """A gateway whose certificate files live in a directory of their own (``live``), with the
    material it starts with (``old``) and a second CA's (``new``)."""
    live, old, new = live_files(tmp_path)
    cfg = gateway_config(pg, gateway_tls, 0, tmp_path)
    cfg["tls"] = {"cert": str(live / "server.pem"), "key": str(live / "server.key")}
    gw = gateway_factory(cfg)
    assert connects(gw, old.ca_cert) and not connects(gw, new.ca_cert)
    return gw, live, old, new


def test_replaced_certificate_files_are_used_for_new_connections(
    rotating: tuple[GatewayProcess, Path, TlsMaterial, TlsMaterial],
) -> None:
    gw, live, old, new = rotating
    with psycopg.connect(gw.dsn(sslrootcert=str(old.ca_cert))) as kept:
        rotate(live, new)
        assert eventually(lambda: connects(gw, new.ca_cert)), gw.log()[-2000:]
        assert not connects(gw, old.ca_cert)
        # The session opened before goes on with the certificate it has.
        assert kept.execute("select 2").fetchone() == (2,)
    assert "TLS files reloaded" in gw.log()


def test_a_certificate_without_its_key_leaves_the_old_pair_in_use(
    rotating: tuple[GatewayProcess, Path, TlsMaterial, TlsMaterial],
) -> None:
    gw, live, old, new = rotating
    shutil.copy(new.directory / "server.pem", live / "server.pem")  # the key comes later
    assert eventually(lambda: "TLS files changed but cannot be used" in gw.log()), gw.log()[-2000:]
    assert "is not the private key of the certificate" in gw.log()
    assert connects(gw, old.ca_cert)
    shutil.copy(new.directory / "server.key", live / "server.key")
    assert eventually(lambda: connects(gw, new.ca_cert)), gw.log()[-2000:]


def test_files_rewritten_in_place_with_their_old_mtime_are_read_on_sighup(
    rotating: tuple[GatewayProcess, Path, TlsMaterial, TlsMaterial],
) -> None:
    """Rewritten in place with the old mtime kept (a copy that preserves times): SIGHUP finds them
    whatever the files' stamps say."""
    gw, live, _, new = rotating
    for name in ("server.pem", "server.key"):
        st = (live / name).stat()
        (live / name).write_bytes((new.directory / name).read_bytes())
        os.utime(live / name, ns=(st.st_atime_ns, st.st_mtime_ns))
    gw.proc.send_signal(signal.SIGHUP)
    assert eventually(lambda: connects(gw, new.ca_cert)), gw.log()[-2000:]


def test_the_admin_api_certificate_is_reloaded_too(
    gateway_factory: GatewayFactory, pg: PgCluster, tmp_path: Path, gateway_tls: TlsMaterial
) -> None:
    import ssl
    import urllib.request

    from ostiary.devcluster import free_port

    live, old, new = live_files(tmp_path)
    port = free_port()
    cfg = gateway_config(pg, gateway_tls, 0, tmp_path)
    cfg["admin"] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"cert": str(live / "server.pem"), "key": str(live / "server.key")},
    }
    gw = gateway_factory(cfg)

    def healthy(ca: Path) -> bool:
        ctx = ssl.create_default_context(cafile=str(ca))
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    assert eventually(lambda: healthy(old.ca_cert)) and not healthy(new.ca_cert)
    rotate(live, new)
    assert eventually(lambda: healthy(new.ca_cert)), gw.log()[-2000:]
    assert not healthy(old.ca_cert)


def test_a_kubernetes_secret_mount_rotation_is_picked_up(
    gateway_factory: GatewayFactory, pg: PgCluster, tmp_path: Path, gateway_tls: TlsMaterial
) -> None:
    """The kubelet writes a new timestamped directory, swaps the `..data` symlink to it in one
    rename and removes the old one; the configured paths go through `..data`."""
    old = make_tls_material(tmp_path / "old")
    new = make_tls_material(tmp_path / "new")
    mount = tmp_path / "mount"
    (mount / "..2026_01").mkdir(parents=True)
    for name in ("server.pem", "server.key"):
        shutil.copy(old.directory / name, mount / "..2026_01" / name)
        (mount / name).symlink_to(Path("..data") / name)
    (mount / "..data").symlink_to("..2026_01")
    cfg = gateway_config(pg, gateway_tls, 0, tmp_path)
    cfg["tls"] = {"cert": str(mount / "server.pem"), "key": str(mount / "server.key")}
    gw = gateway_factory(cfg)
    assert connects(gw, old.ca_cert)
    (mount / "..2026_02").mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(new.directory / name, mount / "..2026_02" / name)
    (mount / "..data_tmp").symlink_to("..2026_02")
    (mount / "..data_tmp").rename(mount / "..data")
    shutil.rmtree(mount / "..2026_01")
    assert eventually(lambda: connects(gw, new.ca_cert)), gw.log()[-2000:]
    assert "..2026_01" not in gw.log()


def test_a_broken_upstream_ca_file_keeps_the_previous_one(
    gateway_factory: GatewayFactory, pg: PgCluster, tmp_path: Path, gateway_tls: TlsMaterial
) -> None:
    """The upstream leg's files are checked like the client leg's: a CA file caught half-written
    leaves the previous configuration in use, and new sessions go on verifying the server."""
    assert pg.tls is not None
    ca = tmp_path / "db-ca.pem"
    shutil.copy(pg.tls.ca_cert, ca)
    cfg = gateway_config(pg, gateway_tls, 0, tmp_path)
    cfg["connections"][0]["upstream"]["tls"]["ca"] = str(ca)
    gw = gateway_factory(cfg)
    assert connects(gw, gateway_tls.ca_cert)
    ca.write_bytes(ca.read_bytes()[:100])
    assert eventually(lambda: "TLS files changed but cannot be used" in gw.log()), gw.log()[-2000:]
    assert "upstream.tls" in gw.log()
    assert connects(gw, gateway_tls.ca_cert)


def expired_pair(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost that expired yesterday, and its key."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    c, k = directory / "server.pem", directory / "server.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return c, k


def test_rotating_to_an_expired_certificate_keeps_the_valid_one(
    rotating: tuple[GatewayProcess, Path, TlsMaterial, TlsMaterial], tmp_path: Path
) -> None:
    gw, live, old, _ = rotating
    cert, key = expired_pair(tmp_path / "expired")
    shutil.copy(key, live / "server.key.new")
    shutil.copy(cert, live / "server.pem.new")
    (live / "server.key.new").rename(live / "server.key")
    (live / "server.pem.new").rename(live / "server.pem")
    assert eventually(lambda: "expired on" in gw.log()), gw.log()[-2000:]
    assert connects(gw, old.ca_cert)


def test_policy_check_warns_of_an_expired_certificate(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    cert, key = expired_pair(tmp_path / "expired")
    data = {
        "tls": {"cert": str(cert), "key": str(key)},
        "clients": [{"user": "ci", "password": "x"}],
        "connections": [
            {
                "name": "app",
                "upstream": {"host": "127.0.0.1", "database": "app", "user": "u", "password": "p"},
            }
        ],
        "grants": [{"name": "g", "identities": ["ci"], "connection": "app"}],
    }
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    r = subprocess.run(
        [sys.executable, "-m", "ostiary.cli", "policy", "check", str(f)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"tls.cert: the certificate {cert} expired on" in r.stdout, r.stdout + r.stderr
