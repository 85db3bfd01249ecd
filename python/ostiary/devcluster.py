"""Throwaway local PostgreSQL clusters for ``ostiary demo`` and the test suite.

Rules this module follows:

* Standard library only, plus ``cryptography`` for the TLS material.
* Nothing here touches a system PostgreSQL installation: every cluster lives
  entirely under the ``base_dir`` it is given (data directory, log file,
  Unix socket, certificates), listens on 127.0.0.1 only, and on a free
  ephemeral port unless a port is given explicitly.
* There is no ``trust`` anywhere: ``pg_hba.conf`` uses the chosen password
  method (default ``scram-sha-256``) for Unix-socket and TCP connections alike.
* PostgreSQL refuses to run as root.  When this process is root, ``initdb``
  and ``pg_ctl`` run as the ``postgres`` system user, the files the server
  needs are chowned to that user, and ancestors of ``base_dir`` that the
  server user cannot traverse get the other-execute bit (``o+x``) added, and
  nothing more.  Otherwise everything runs as the current user.
* Private keys are written mode 0600.  The server key is owned by the server
  user; the client key stays owned by the calling user (libpq checks this).
* Every failure raises :class:`ClusterError` (a ``RuntimeError``) that says
  what failed, with the command's output and the tail of the server log.
* Child processes get a hermetic environment: inherited ``PG*`` variables are
  dropped so that a developer's ``PGHOST``/``PGSSLMODE``/... cannot leak in.
* A started cluster is stopped at interpreter exit if nobody stopped it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CLIENT_CERT_CN",
    "ClusterError",
    "PgCluster",
    "TlsMaterial",
    "find_pg_bin",
    "free_port",
    "make_tls_material",
]

#: Common name of the client certificate made by :func:`make_tls_material`.
CLIENT_CERT_CN = "ostiary-test-client"

#: System user that runs the server when this process is root.
SERVER_USER_WHEN_ROOT = "postgres"

_SUPPORTED_AUTH = ("scram-sha-256", "md5", "password")
_CONF_MARKER = "# ---- ostiary devcluster settings (rewritten on every start) ----"
# sun_path is 108 bytes; PostgreSQL needs "<dir>/.s.PGSQL.<port>" + NUL to fit.
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535")
_LOG_TAIL_LINES = 40
_PG_CTL_TIMEOUT_S = 60
_PSQL_TIMEOUT_S = 120
_START_ATTEMPTS = 3


class ClusterError(RuntimeError):
    """A development cluster could not be found, set up, started or queried."""


# --------------------------------------------------------------------------
# binaries and ports
# --------------------------------------------------------------------------


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin/<name>
    parts = re.findall(r"\d+", path.parent.parent.name)
    return tuple(int(p) for p in parts) if parts else (-1,)


def find_pg_bin(name: str) -> str:
    """Return the path of PostgreSQL binary *name* (``initdb``, ``pg_ctl``, ...).

    Looks in ``$PG_BINDIR`` if set, then on ``PATH``, then in the highest
    version of ``/usr/lib/postgresql/*/bin``.
    """
    bindir = os.environ.get("PG_BINDIR")
    if bindir:
        candidate = Path(bindir) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    versioned = [
        p for p in Path("/usr/lib/postgresql").glob(f"*/bin/{name}") if p.is_file() and os.access(p, os.X_OK)
    ]
    if versioned:
        return str(max(versioned, key=_version_key))
    where = f"$PG_BINDIR ({bindir}), " if bindir else ""
    raise ClusterError(
        f"PostgreSQL binary {name!r} not found (looked in {where}PATH and "
        "/usr/lib/postgresql/*/bin). Install the PostgreSQL server and client "
        "(Debian/Ubuntu: `apt-get install postgresql`; macOS: "
        "`brew install postgresql`) or set PG_BINDIR to the directory holding "
        "initdb, pg_ctl and postgres."
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------
# TLS material
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """Paths of the PEM files written by :func:`make_tls_material`."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_cn: str = CLIENT_CERT_CN


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san_entries(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in [*hostnames, "localhost", "127.0.0.1", "::1"]:
        if name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def make_tls_material(
    directory: Path,
    hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
    client_uris: Sequence[str] = (),
) -> TlsMaterial:
    """Create a throwaway CA plus a server and a client certificate signed by it.
    ``client_uris`` become URI SANs of the client certificate (a SPIFFE ID, for instance).

    Writes ``ca.pem``, ``server.pem``, ``server.key`` (0600), ``client.pem``
    and ``client.key`` (0600) into *directory* (created if needed).  The
    server certificate's SAN holds *hostnames* plus ``localhost``,
    ``127.0.0.1`` and ``::1``; the client certificate's CN is
    :data:`CLIENT_CERT_CN`.  The CA key is not written anywhere.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(days=1)
    not_after = now + datetime.timedelta(days=365)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ostiary dev cluster"),
            x509.NameAttribute(NameOID.COMMON_NAME, "ostiary-test-ca"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    leaf_usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )

    def leaf(
        common_name: str,
        usage: x509.ObjectIdentifier,
        san: list[x509.GeneralName] | None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(leaf_usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False,
            )
            .add_extension(aki, critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_cn = hostnames[0] if hostnames else "localhost"
    server_key, server_cert = leaf(server_cn, ExtendedKeyUsageOID.SERVER_AUTH, _san_entries(hostnames))
    client_san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in client_uris]
    client_key, client_cert = leaf(CLIENT_CERT_CN, ExtendedKeyUsageOID.CLIENT_AUTH, client_san or None)

    material = TlsMaterial(
        directory=directory,
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    _write_file(material.ca_cert, _cert_pem(ca_cert), 0o644)
    _write_file(material.server_cert, _cert_pem(server_cert), 0o644)
    _write_file(material.server_key, _key_pem(server_key), 0o600)
    _write_file(material.client_cert, _cert_pem(client_cert), 0o644)
    _write_file(material.client_key, _key_pem(client_key), 0o600)
    return material


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _dsn_quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(server log {path} unreadable: {exc})"
    tail = text.splitlines()[-lines:]
    if not tail:
        return f"(server log {path} is empty)"
    return "\n".join(tail)


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    parts = [s.strip() for s in (proc.stdout, proc.stderr) if s and s.strip()]
    return "\n".join(parts) if parts else "(no output)"


# --------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------


class PgCluster:
    """A throwaway PostgreSQL cluster under *base_dir*.

    Layout: ``base_dir/data`` (data directory), ``base_dir/postgres.log``,
    ``base_dir/tls/`` (when *tls*), and the Unix socket in ``base_dir`` itself
    (or in a short directory under the temp dir if ``base_dir`` is too long for
    a socket path; see :attr:`socket_dir`).  One ``PgCluster`` object per
    ``base_dir``: the superuser password only lives in this object.
    """

    host: str
    port: int
    superuser: str
    password: str
    auth: str
    base_dir: Path
    data_dir: Path
    log_file: Path
    socket_dir: Path
    tls: TlsMaterial | None
    extra_conf: dict[str, str]

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        superuser: str = "postgres",
        password: str | None = None,
        auth: str = "scram-sha-256",
        tls: bool = True,
        extra_conf: dict[str, str] | None = None,
    ) -> None:
        if auth not in _SUPPORTED_AUTH:
            raise ValueError(f"auth must be one of {_SUPPORTED_AUTH}, not {auth!r}")
        self.host = "127.0.0.1"
        self._auto_port = port is None
        self.port = free_port() if port is None else port
        self.superuser = superuser
        self.password = secrets.token_urlsafe(24) if password is None else password
        self.auth = auth
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "postgres.log"
        self.extra_conf = dict(extra_conf or {})
        self._running = False
        self._short_socket_dir: Path | None = None

        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam(SERVER_USER_WHEN_ROOT)
            except KeyError:
                raise ClusterError(
                    "running as root, but PostgreSQL refuses to run as root and "
                    f"there is no {SERVER_USER_WHEN_ROOT!r} system user to run it as; "
                    "install the server package (Debian: `apt-get install postgresql`) "
                    f"or create the user (`useradd --system {SERVER_USER_WHEN_ROOT}`)"
                ) from None

        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir = self.base_dir
        self.tls = make_tls_material(self.base_dir / "tls") if tls else None

    # -- public API -----------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether :meth:`start` succeeded and :meth:`stop` was not called since."""
        return self._running

    def start(self) -> Self:
        """initdb (first time only), write the configuration and start the server."""
        if self._running:
            return self
        if len(os.fsencode(str(self.base_dir))) > _MAX_SOCKET_DIR_LEN:
            # Too long for a Unix socket path: use a short private directory.
            self._short_socket_dir = Path(tempfile.mkdtemp(prefix="ostiary-pg-"))
            self.socket_dir = self._short_socket_dir
        try:
            self._prepare_ownership()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            self._start_server()
        except BaseException:
            self._remove_short_socket_dir()
            raise
        self._running = True
        atexit.register(self._stop_at_exit)
        return self

    def stop(self) -> None:
        """Stop the server (``pg_ctl -m fast``).  Safe to call any number of times."""
        if (self.data_dir / "postmaster.pid").exists():
            proc = self._run_server_cmd(
                [
                    find_pg_bin("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(_PG_CTL_TIMEOUT_S),
                    "stop",
                ],
                timeout=_PG_CTL_TIMEOUT_S + 30,
            )
            if proc.returncode != 0 and (self.data_dir / "postmaster.pid").exists():
                raise ClusterError(
                    f"pg_ctl stop failed for {self.data_dir} (exit {proc.returncode}):\n"
                    f"{_output(proc)}\n"
                    f"--- tail of server log {self.log_file} ---\n{_tail(self.log_file)}"
                )
        self._running = False
        atexit.unregister(self._stop_at_exit)
        self._remove_short_socket_dir()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def dsn(
        self,
        dbname: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        **kw: str | int | None,
    ) -> str:
        """A libpq ``key=value`` connection string for this cluster.

        *user*/*password* default to the superuser's.  ``sslmode`` defaults to
        ``require`` with TLS and ``disable`` without.  Extra keywords are
        added (or override); a keyword given as ``None`` is left out.
        """
        params: dict[str, str | int | None] = {
            "host": self.host,
            "port": self.port,
            "dbname": dbname,
            "user": self.superuser if user is None else user,
            "password": self.password if password is None else password,
            "sslmode": "require" if self.tls else "disable",
        }
        params.update(kw)
        return " ".join(
            f"{key}={_dsn_quote(str(value))}" for key, value in params.items() if value is not None
        )

    def psql_env(
        self,
        dbname: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        sslmode: str | None = None,
    ) -> dict[str, str]:
        """Environment (``os.environ`` minus ``PG*``, plus libpq ``PG*`` variables)
        that points libpq clients such as ``psql`` at this cluster.

        ``PGSSLMODE`` defaults to ``require`` with TLS and ``disable`` without;
        with TLS, ``PGSSLROOTCERT`` is the test CA (used by ``verify-*`` modes).
        """
        extra = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGDATABASE": dbname,
            "PGUSER": self.superuser if user is None else user,
            "PGPASSWORD": self.password if password is None else password,
            "PGSSLMODE": sslmode or ("require" if self.tls else "disable"),
            "PGCONNECT_TIMEOUT": "10",
            "PGAPPNAME": "ostiary-devcluster",
        }
        if self.tls is not None:
            extra["PGSSLROOTCERT"] = str(self.tls.ca_cert)
        return _clean_env(extra)

    def execute(
        self,
        sql: str,
        dbname: str = "postgres",
        *,
        user: str | None = None,
        password: str | None = None,
    ) -> str:
        """Run *sql* with ``psql -X -A -t -v ON_ERROR_STOP=1``; return its stdout.

        Connects as the superuser unless *user*/*password* are given.
        """
        cmd = [
            find_pg_bin("psql"),
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            "-",
        ]
        try:
            proc = subprocess.run(
                cmd,
                input=sql,
                capture_output=True,
                text=True,
                env=self.psql_env(dbname, user=user, password=password),
                timeout=_PSQL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(
                f"psql timed out after {_PSQL_TIMEOUT_S}s on {self.host}:{self.port}/{dbname}"
                f"\n--- tail of server log {self.log_file} ---\n{_tail(self.log_file)}"
            ) from exc
        if proc.returncode != 0:
            shown = sql if len(sql) <= 500 else sql[:500] + "..."
            raise ClusterError(
                f"psql failed (exit {proc.returncode}) on {self.host}:{self.port}/{dbname} "
                f"running:\n{shown}\n--- psql stderr ---\n{proc.stderr.strip()}\n"
                f"--- tail of server log {self.log_file} ---\n{_tail(self.log_file, 10)}"
            )
        return proc.stdout

    def create_role(
        self,
        name: str,
        password: str | None,
        *,
        superuser: bool = False,
        login: bool = True,
    ) -> None:
        """``CREATE ROLE`` *name*; *password* ``None`` means no password."""
        options = [
            "LOGIN" if login else "NOLOGIN",
            "SUPERUSER" if superuser else "NOSUPERUSER",
            f"PASSWORD {_sql_literal(password)}" if password is not None else "PASSWORD NULL",
        ]
        self.execute(f"CREATE ROLE {_sql_ident(name)} WITH {' '.join(options)};")

    def create_database(self, name: str, owner: str | None = None) -> None:
        """``CREATE DATABASE`` *name*, owned by *owner* (default: the superuser)."""
        sql = f"CREATE DATABASE {_sql_ident(name)}"
        if owner is not None:
            sql += f" OWNER {_sql_ident(owner)}"
        self.execute(sql + ";")

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        return f"<PgCluster {self.host}:{self.port} {state} data_dir={self.data_dir}>"

    # -- internals -------------------------------------------------------

    def _start_server(self) -> None:
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._write_config()
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            proc = self._run_server_cmd(
                [
                    find_pg_bin("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    str(_PG_CTL_TIMEOUT_S),
                    "start",
                ],
                timeout=_PG_CTL_TIMEOUT_S + 30,
            )
            if proc.returncode == 0:
                return
            new_log = _read_from(self.log_file, log_offset)
            port_clash = "could not bind" in new_log or "already in use" in new_log
            if self._auto_port and port_clash and attempt < _START_ATTEMPTS:
                self.port = free_port()
                continue
            raise ClusterError(
                f"pg_ctl start failed for {self.data_dir} on port {self.port} "
                f"(exit {proc.returncode}):\n{_output(proc)}\n"
                f"--- tail of server log {self.log_file} ---\n{_tail(self.log_file)}"
            )

    def _remove_short_socket_dir(self) -> None:
        if self._short_socket_dir is not None:
            shutil.rmtree(self._short_socket_dir, ignore_errors=True)
            self._short_socket_dir = None
            self.socket_dir = self.base_dir

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):  # best effort at interpreter exit
            self.stop()

    def _server_env(self) -> dict[str, str]:
        home = str(self.base_dir) if self._run_as is not None else os.environ.get("HOME", "/")
        return _clean_env({"HOME": home})

    def _run_server_cmd(self, cmd: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a server-side command (initdb, pg_ctl) as the server user."""
        user = self._run_as
        try:
            return subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                cwd=self.base_dir,
                env=self._server_env(),
                timeout=timeout,
                check=False,
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else os.getgrouplist(user.pw_name, user.pw_gid),
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(
                f"{Path(cmd[0]).name} timed out after {timeout}s: {' '.join(cmd)}\n"
                f"--- tail of server log {self.log_file} ---\n{_tail(self.log_file)}"
            ) from exc
        except OSError as exc:
            raise ClusterError(f"could not run {' '.join(cmd)}: {exc}") from exc

    def _chown(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _server_can_traverse(self, path: Path) -> bool:
        assert self._run_as is not None
        st = path.stat()
        if st.st_mode & stat.S_IXOTH:
            return True
        if st.st_uid == self._run_as.pw_uid:
            return bool(st.st_mode & stat.S_IXUSR)
        groups = os.getgrouplist(self._run_as.pw_name, self._run_as.pw_gid)
        return st.st_gid in groups and bool(st.st_mode & stat.S_IXGRP)

    def _prepare_ownership(self) -> None:
        """As root: hand base_dir, socket dir and server TLS files to the server user."""
        if self._run_as is None:
            return
        dirs = [self.base_dir]
        if self.socket_dir != self.base_dir:
            dirs.append(self.socket_dir)
        for directory in dirs:
            for ancestor in reversed(directory.parents):
                if not self._server_can_traverse(ancestor):
                    os.chmod(ancestor, ancestor.stat().st_mode | stat.S_IXOTH)
            self._chown(directory)
            os.chmod(directory, 0o755)
        if self.data_dir.exists():
            self._chown(self.data_dir)
        if self.log_file.exists():
            self._chown(self.log_file)
        if self.tls is not None:
            # The calling user (root) can read everything anyway; the server
            # user must own its key (0600) and be able to read the certificates.
            os.chmod(self.tls.directory, 0o755)
            for path in (self.tls.ca_cert, self.tls.server_cert, self.tls.server_key):
                self._chown(path)

    def _initdb(self) -> None:
        pwfile = self.base_dir / "initdb.pwfile"
        _write_file(pwfile, (self.password + "\n").encode(), 0o600)
        self._chown(pwfile)
        try:
            proc = self._run_server_cmd(
                [
                    find_pg_bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    f"--auth={self.auth}",
                    f"--username={self.superuser}",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                timeout=300,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise ClusterError(
                f"initdb failed for {self.data_dir} (exit {proc.returncode}):\n{_output(proc)}"
            )

    def _settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "shared_buffers": "128MB",
            "password_encryption": "md5" if self.auth == "md5" else "scram-sha-256",
            "logging_collector": "off",
            "log_connections": "on",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "ssl": "off",
        }
        if self.tls is not None:
            settings.update(
                ssl="on",
                ssl_cert_file=str(self.tls.server_cert),
                ssl_key_file=str(self.tls.server_key),
                ssl_ca_file=str(self.tls.ca_cert),
            )
        settings.update(self.extra_conf)
        return settings

    def _write_config(self) -> None:
        conf = self.data_dir / "postgresql.conf"
        try:
            text = conf.read_text()
            head = text.split(_CONF_MARKER, 1)[0].rstrip("\n")
            lines = [head, "", _CONF_MARKER]
            lines += [f"{k} = {_conf_quote(v)}" for k, v in self._settings().items()]
            conf.write_text("\n".join(lines) + "\n")
            hba = [
                "# written by ostiary.devcluster: no trust, password auth everywhere",
                "# TYPE  DATABASE  USER  ADDRESS       METHOD",
                f"local   all       all                 {self.auth}",
                f"host    all       all   127.0.0.1/32  {self.auth}",
                f"host    all       all   ::1/128       {self.auth}",
            ]
            (self.data_dir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        except OSError as exc:
            raise ClusterError(f"could not write configuration in {self.data_dir}: {exc}") from exc
