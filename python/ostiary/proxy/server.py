"""The gateway process: listeners, the engine's event loop, identity keys, policy reloads, cancel
forwarding and shutdown.

Start: settings only the machine can judge raise ``ConfigError`` naming the setting to fix, never a
traceback: ``data_dir`` and the TLS files before the audit trail opens, the listen address before
any task runs (the admin API's when it starts). Structured concurrency: ``Gateway.run`` owns one
nursery whose children are the listener (accepting, with its own handler nursery so startup handlers
can be cancelled apart from it), the engine event loop, the signal watchers, the policy watcher, and
a background nursery for the issuers' JWKS caches and the sessions' maximum-duration timers. Reload
(SIGHUP, or a change of the policy files seen by polling): the files are read and validated; an
invalid policy leaves the running one in force; a valid one is swapped in whole (new startups see
only the new version), recorded with its sha256, and live sessions are re-checked: a session whose
grant was removed, changed or no longer admits its identity is ended with a clear error. Established
sessions do not live here: they run on the engine's worker threads, and this module hears of them
through events. Shutdown (SIGTERM or SIGINT): stop accepting, let sessions end by themselves up to
``shutdown.grace`` seconds (with ``close_idle`` they are also ended as soon as they are idle), then
end the rest with 57P01.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import functools
import itertools
import logging
import os
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ostiary import _core
from ostiary import config as configmod
from ostiary.admin.api import AdminApi, admin_server
from ostiary.admin.http import HttpServer, server_ssl_context
from ostiary.approvals.service import Approvals
from ostiary.approvals.store import ApprovalError, ApprovalStore
from ostiary.approvals.webhooks import webhook_notifier
from ostiary.audit.export import build_exporters
from ostiary.audit.log import AuditEvents, AuditLog
from ostiary.audit.store import StoreError
from ostiary.config import Config
from ostiary.errors import ConfigError, UpstreamUnavailable
from ostiary.hooks import (
    AuthAttempt,
    Decision,
    NoObserver,
    SessionInfo,
    SessionObserver,
    StatementHook,
    StatementInfo,
)
from ostiary.identity.authenticator import Authenticator
from ostiary.identity.dev import resolved_issuers
from ostiary.identity.issuers import ResolvedIssuer
from ostiary.identity.jwks import JwksCache, same_key_source
from ostiary.identity.tokens import TokenValidator
from ostiary.policy.check import expiry_problem
from ostiary.policy.enforce import PolicyHook
from ostiary.policy.evaluate import CompiledPolicy, policy_version
from ostiary.policy.model import Connection
from ostiary.proxy.channel import Channel, open_tcp
from ostiary.proxy.postgres import CancelTarget, PostgresStartup, Refusal, fatal
from ostiary.recording.live import LiveRecordings
from ostiary.recording.objectstore import ObjectStoreClient, Uploader

log = logging.getLogger("ostiary.server")

SHUTDOWN_MESSAGE = "terminating connection because the gateway is shutting down"
# At shutdown, recordings still queued for the object store get this many seconds; the rest are
# uploaded by the next start.
UPLOAD_AT_SHUTDOWN = 10.0


def load_mask_key(config: Config) -> bytes:
    """The secret of keyed-hash masking: ``masking_key_file`` (share it across a fleet so hashes
    agree), else ``<data_dir>/masking.key``, created with 32 random bytes on first use."""
    if config.masking_key_file is not None:
        try:
            key = Path(config.masking_key_file).read_bytes().strip()
        except OSError as e:
            problem = ("masking_key_file", f"cannot read it: {e}")
            raise ConfigError(config.masking_key_file, [problem]) from None
        if len(key) < 16:
            raise ConfigError(config.masking_key_file, [("masking_key_file", "needs at least 16 bytes")])
        return key
    path = Path(config.data_dir) / "masking.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key


def prepare_data_dir(config: Config, source: str) -> None:
    """Creates ``data_dir`` if needed. Raises ``ConfigError`` naming it when it cannot be created or
    written (a regular file there, a parent that is not a directory, no permission): everything the
    gateway keeps (keys, the audit trail, recordings) lives there, so it is checked first."""
    d = Path(config.data_dir)
    why = ""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        why = f"{d} is a file, not a directory"
    except NotADirectoryError:
        why = f"cannot create the directory {d}: a part of its path is a file"
    except OSError as e:
        why = f"cannot create the directory {d}: {e.strerror or e}"
    else:
        if not os.access(d, os.W_OK | os.X_OK):
            why = f"cannot write to the directory {d}"
    if why:
        raise ConfigError(source, [("data_dir", f"{why}; set data_dir to a directory the gateway can write")])


# What one session holds: the client's socket, the upstream's and its recording file.
DESCRIPTORS_PER_SESSION = 3


def raise_descriptor_limit(max_connections: int) -> int:
    """Raises the soft limit on open files to the hard one (a login shell's 1,024 allows about
    330 sessions) and warns when even that cannot hold ``max_connections`` sessions. Returns the
    limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open-file limit raised from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("open-file limit stays at %d: %s", soft, e)
    limit = hard if soft == resource.RLIM_INFINITY else soft
    needed = DESCRIPTORS_PER_SESSION * max_connections + 64
    if limit < needed:
        log.warning(
            "the open-file limit (%d) holds about %d sessions, fewer than limits.max_connections (%d); "
            "connections beyond it are refused: raise it (LimitNOFILE= in systemd, ulimit -n)",
            limit,
            max(0, (limit - 64) // DESCRIPTORS_PER_SESSION),
            max_connections,
        )
    return limit


class _AcceptCapacity(logging.Filter):
    """Trio logs a traceback every 0.1 s while accept() fails for lack of descriptors or memory:
    one line, at most every 10 s, saying how many were skipped."""

    def __init__(self) -> None:
        super().__init__()
        self._last = 0.0
        self._skipped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last < 10:
            self._skipped += 1
            return False
        self._last = now
        code = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        why = record.args[1] if isinstance(record.args, tuple) and len(record.args) > 1 else ""
        record.msg = "cannot accept connections: %s (%s); retrying (%d such failure(s) not logged)"
        record.args = (code, why, self._skipped)
        record.exc_info = None
        record.exc_text = None
        self._skipped = 0
        return True


_accept_filter = _AcceptCapacity()
logging.getLogger("trio.serve_listeners").addFilter(_accept_filter)


def upstream_tls_config(conn: Connection) -> _core.TlsClientConfig:
    t = conn.upstream.tls
    return _core.TlsClientConfig(t.ca, t.mode == "verify-full", t.cert, t.key)


def client_tls_config(config: Config, source: str) -> _core.TlsServerConfig | None:
    """The client leg's TLS from ``tls``. Raises ``ConfigError`` naming the setting when a file is
    not what it should be (a key that is not the certificate's, a file that is not PEM)."""
    tls = config.tls
    if tls is None:
        return None
    try:
        return _core.TlsServerConfig(tls.cert, tls.key, tls.client_ca)
    except _core.TlsError as e:
        msg = str(e).removeprefix("TLS configuration: ")
        if "KeyMismatch" in msg:
            problem = ("tls.key", f"{tls.key} is not the private key of the certificate {tls.cert}")
        elif "private key" in msg:
            problem = ("tls.key", f"{tls.key} holds no PEM private key" if "no items found" in msg else msg)
        elif tls.client_ca is not None and tls.client_ca in msg:
            problem = ("tls.client_ca", msg)
        elif tls.cert in msg:
            problem = ("tls.cert", msg)
        else:
            problem = ("tls", msg)
        raise ConfigError(source, [problem]) from None


def check_admin_tls(config: Config, source: str) -> None:
    """Loads the admin API's certificate and key once, so a key that is not the certificate's (or a
    file that is not PEM) stops the start with ``ConfigError`` before anything else is opened."""
    tls = config.admin.tls if config.admin is not None else None
    if tls is None:
        return
    try:
        server_ssl_context(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            problem = ("admin.tls.key", f"{tls.key} is not the private key of the certificate {tls.cert}")
        else:
            problem = ("admin.tls", f"cannot use the certificate {tls.cert} with the key {tls.key}: {e}")
        raise ConfigError(source, [problem]) from None


def listen_problem(e: OSError, setting: str, host: str, port: int, source: str) -> ConfigError:
    """What to fix when ``setting`` (``listen``, ``admin.listen``) cannot be bound: a port in use, a
    host that is not this machine's, a privileged port."""
    if e.errno == errno.EADDRINUSE:
        where, msg = (
            "port",
            f"{host}:{port} is already in use by another process; stop it or choose another port",
        )
    elif e.errno == errno.EADDRNOTAVAIL:
        where, msg = "host", f"{host} is not an address of this machine (0.0.0.0 listens on all of them)"
    elif isinstance(e, socket.gaierror):
        where, msg = "host", f"cannot resolve {host}: {e.strerror}"
    elif e.errno == errno.EACCES:
        where, msg = "port", f"not allowed to listen on port {port} (below 1024 needs privileges)"
    else:
        where, msg = "", f"cannot listen on {host}:{port}: {e.strerror or e}"
    return ConfigError(source, [(f"{setting}.{where}" if where else setting, msg)])


def key_wait(config: Config) -> float:
    """How long a login waits at most for a refresh of an issuer's keys (its token names a key not
    fetched yet): well within ``limits.startup_timeout``, so that a slow issuer gets the client 28000
    "keys unavailable" rather than a startup timeout (08P01). The fetch goes on in the background
    (bounded by the issuer's ``fetch_timeout``) and a retry finds its keys."""
    return min(5.0, config.limits.startup_timeout / 4)


# Connections over max_connections that are told so inside their TLS session at once; beyond,
# the error goes out in clear at once (a flood must not buy TLS handshakes).
REFUSING_AT_ONCE = 32


class Throttle:
    """Says when to log a repeated event: the first time, then at most once per ``interval``
    seconds, with how many happened since the last time it said so (those in between are counted,
    not logged; a last burst is reported with the next occurrence after the interval)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None
        self._count = 0

    def hit(self) -> int | None:
        """Counts one; the count to log, or None to stay quiet."""
        now = self._clock()
        self._count += 1
        if self._last is not None and now - self._last < self.interval:
            return None
        count, self._count, self._last = self._count, 0, now
        return count


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        policy_version: str = "",
        statement_hook: StatementHook | None = None,
        observer: SessionObserver | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        # The policy files as they were when the configuration was read: the watcher compares
        # with this, so a change made while the gateway starts is not taken as the baseline.
        self._policy_stamp = self._stamp_policy()
        self._admin_http: HttpServer | None = None
        # What /metrics counts (gauges are read from the state itself).
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "sessions",
                "logins_allowed",
                "logins_refused",
                "reloads_applied",
                "reloads_rejected",
                "tls_applied",
                "tls_rejected",
            ),
            0,
        )
        self._tls_stamp = self._stamp_tls()
        # Settings that can only be checked against the machine, checked before the audit trail or
        # anything else is opened: a wrong one stops the start with ConfigError naming it.
        source = config_path or "<config>"
        prepare_data_dir(config, source)
        self.client_tls = client_tls_config(config, source)
        check_admin_tls(config, source)
        self.mask_key = load_mask_key(config)
        self.policy = CompiledPolicy(config, policy_version, self.mask_key)
        self._background: trio.Nursery | None = None
        self.caches: dict[ResolvedIssuer, JwksCache] = {}
        self._cache_scopes: dict[ResolvedIssuer, trio.CancelScope] = {}
        self.validator = TokenValidator([], {}, key_wait=key_wait(config))
        self.authenticator = Authenticator(config, self.validator)
        self._apply_identity(config)
        self.statement_hook: StatementHook = statement_hook or PolicyHook()
        self.observer: SessionObserver = observer or NoObserver()
        self._timers: dict[int, trio.CancelScope] = {}
        self._reload_requested = trio.Event()
        self._reload_forced = False
        lim = config.limits
        fault_spin = int(os.environ.get("OSTIARY_FAULT_SPIN_US", "0") or 0)
        if fault_spin:
            log.warning(
                "fault injection: the data path burns %d us of CPU per chunk (OSTIARY_FAULT_SPIN_US); "
                "this exists to test the perf gate, never run it in production",
                fault_spin,
            )
        self.engine = _core.Engine(
            workers=config.effective_workers(),
            max_message=lim.max_message,
            max_statement=lim.max_statement,
            fault_spin_us=fault_spin,
        )
        self._ids = itertools.count(1)
        self.sessions: dict[int, SessionInfo] = {}
        # The audit trail (None when ``audit.enabled`` is false). Opening it fails the start when
        # its store cannot be opened: a gateway that cannot record does not serve.
        self.audit: AuditLog | None = None
        self.audit_events: AuditEvents | None = None
        self.audit_spec: tuple[int, bool] | None = None
        self.recordings: LiveRecordings | None = None
        self.record_spec: tuple[int, int, int] | None = None
        if config.audit.enabled and config.audit.recordings.enabled:
            r = config.audit.recordings
            uploader = None
            if r.object_store is not None:
                client = ObjectStoreClient.from_config(r.object_store)
                uploader = Uploader(config.data_dir, client, r.object_store.prefix, r.object_store.keep_local)
            self.recordings = LiveRecordings(config.data_dir, uploader)
            self.record_spec = (r.max_rows, r.max_field, 1 << 20)
        if config.audit.enabled:
            self.audit = AuditLog(config)
            self.audit.engine = self.engine
            self.audit.sessions = self.sessions
            self.audit_events = AuditEvents(self.audit)
            self.audit_spec = (config.audit.max_text, config.audit.mode == "sync")
            self.audit_events.policy(self.policy.version, config_path or "", True, "", "start", config)
        # Approvals live in the audit trail's store (the fleet's PostgreSQL database, or SQLite in
        # the data directory), so a decision taken through any gateway releases a held statement.
        self.approvals = Approvals(
            self._approval_store(config),
            self.audit.writer if self.audit is not None else "",
            lambda: self.policy,
            self.audit_events,
            store_timeout=config.audit.store_timeout,
        )
        self._deciding: dict[int, set[trio.CancelScope]] = {}
        self.admin_port: int | None = None
        self._upstream_tls: dict[str, _core.TlsClientConfig] = {}
        self._cancel: dict[tuple[int, int], CancelTarget] = {}
        self._cancel_by_session: dict[int, tuple[int, int]] = {}
        # Sessions whose statement waits for approval: the wait's scope (a CancelRequest ends it).
        self._approval_waits: dict[int, trio.CancelScope] = {}
        # A client guessing cancel keys sends thousands: one log line a minute says how many.
        self._unknown_cancels = Throttle(60.0)
        self._refused_full = Throttle(60.0)
        self._refusing = 0
        self._startups = 0
        self.draining = False
        self.listen_port: int | None = None
        self._stop = trio.Event()
        # A second SIGTERM/SIGINT during the drain: end the sessions now instead of after the grace.
        self._hurry = trio.Event()

    def metrics_text(self) -> str:
        """The gateway's counters and gauges in Prometheus' text format (``GET /metrics``)."""
        c = self.counters
        audit = self.audit
        lines = [
            (
                "ostiary_ready",
                "gauge",
                "1 when new sessions are accepted (see /readyz)",
                [("", int(self.not_ready() is None))],
            ),
            ("ostiary_sessions_open", "gauge", "sessions established now", [("", len(self.sessions))]),
            ("ostiary_sessions_started_total", "counter", "sessions established", [("", c["sessions"])]),
            (
                "ostiary_logins_total",
                "counter",
                "authentication attempts by outcome",
                [('{outcome="allowed"}', c["logins_allowed"]), ('{outcome="refused"}', c["logins_refused"])],
            ),
            (
                "ostiary_policy_reloads_total",
                "counter",
                "policy reloads by result",
                [
                    ('{result="applied"}', c["reloads_applied"]),
                    ('{result="rejected"}', c["reloads_rejected"]),
                ],
            ),
            (
                "ostiary_tls_reloads_total",
                "counter",
                "TLS file reloads by result",
                [('{result="applied"}', c["tls_applied"]), ('{result="rejected"}', c["tls_rejected"])],
            ),
            (
                "ostiary_policy_info",
                "gauge",
                "the policy version in force",
                [('{version="' + self.policy.version[:12] + '"}', 1)],
            ),
        ]
        if audit is not None:
            lines += [
                (
                    "ostiary_audit_accepting",
                    "gauge",
                    "1 while the audit trail takes records",
                    [("", int(audit.accepting))],
                ),
                (
                    "ostiary_audit_pending_records",
                    "gauge",
                    "records sealed, not yet stored",
                    [("", len(audit.pending))],
                ),
                (
                    "ostiary_audit_dropped_records_total",
                    "counter",
                    "records lost (max_pending)",
                    [("", audit.dropped)],
                ),
            ]
        out: list[str] = []
        for name, kind, doc, samples in lines:
            out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
            out += [f"{name}{labels} {value}" for labels, value in samples]
        return "\n".join(out) + "\n"

    def not_ready(self) -> str | None:
        """Why new sessions would be refused now (for ``/readyz``), or None."""
        if self.draining:
            return "the gateway is shutting down"
        if self.audit is not None and not self.audit.accepting:
            return "the audit trail is unavailable; sessions are refused until it is back"
        return None

    def _admin(self) -> HttpServer:
        """The admin API (approvals) and its webhooks, as ``admin`` configures them."""
        admin = self.config.admin
        assert admin is not None
        base = admin.base_url()
        self.approvals.approve_url = base
        self.approvals.notifiers = [webhook_notifier(h, base) for h in admin.webhooks]
        # API calls open no session: they neither use up a token's jti (reject_reused_jti) nor are
        # refused for one a session used (the documented flow: approvals request, wait, then psql).
        api = AdminApi(
            self.approvals,
            lambda: self.policy,
            lambda token: self.validator.validate(token, remember=False),
            base,
            ready=self.not_ready,
            metrics=self.metrics_text,
        )
        tls = admin.tls
        self._admin_http = admin_server(
            api,
            admin.listen.host,
            admin.listen.port,
            cert=tls.cert if tls is not None else None,
            key=tls.key if tls is not None else None,
        )
        return self._admin_http

    @staticmethod
    def _approval_store(config: Config) -> ApprovalStore:
        from ostiary.audit.log import sqlite_path, store_dsn

        if config.audit.enabled and config.audit.store == "postgres":
            return ApprovalStore.postgres(store_dsn(config))
        return ApprovalStore.sqlite(sqlite_path(config))

    async def _hold_for_approval(self, info: SessionInfo, statement: StatementInfo, rule: Any) -> Decision:
        ref = self.audit.session_ref(info.id) if self.audit is not None else str(info.id)
        # The client's CancelRequest ends the wait (forward_cancel), as PostgreSQL cancels a
        # running statement: the statement fails with 57014 and never runs; the request stays
        # pending (approved later, the same statement run again passes once).
        scope = trio.CancelScope()
        self._approval_waits[info.id] = scope
        try:
            with scope:
                ok, why, rid = await self.approvals.hold(
                    info,
                    ref,
                    rule,
                    statement.text,
                    lambda msg: self.engine.notice(info.id, msg, held=True),
                    params=list(statement.params),
                )
            if scope.cancelled_caught:
                return Decision(
                    False, code="57014", message="canceling statement due to user request", rule=rule.name
                )
        except ApprovalError as e:
            return Decision(False, message=f"approval: {e}", rule=rule.name)
        except StoreError as e:
            log.error("session %d: approvals unavailable: %s", info.id, e)
            return Decision(False, message="approval: the approval store is unavailable", rule=rule.name)
        finally:
            if self._approval_waits.get(info.id) is scope:
                del self._approval_waits[info.id]
        if self.audit is not None and ok:
            self.audit.note_approval(info.id, statement.text, rid)
        return Decision(ok, message=why, rule=rule.name, remember=False)

    # -- used by the startup handler -------------------------------------------------------------

    def upstream_tls(self, conn: Connection) -> _core.TlsClientConfig:
        cfg = self._upstream_tls.get(conn.name)
        if cfg is None:
            try:
                cfg = upstream_tls_config(conn)
            except _core.TlsError as e:
                # The operator's files, not the client's business: the log says which and why.
                log.error("connection %s: its upstream TLS files cannot be used: %s", conn.name, e)
                raise UpstreamUnavailable(
                    f"the gateway's TLS files for connection {conn.name!r} cannot be used (its log says why)"
                ) from None
            self._upstream_tls[conn.name] = cfg
        return cfg

    def new_session_id(self) -> int:
        return next(self._ids)

    def register_session(self, info: SessionInfo, cancel: CancelTarget, max_session: float | None) -> None:
        self.sessions[info.id] = info
        self.counters["sessions"] += 1
        key = (cancel.process_id, cancel.secret_key)
        self._cancel[key] = cancel
        self._cancel_by_session[info.id] = key
        recording = ""
        if self.recordings is not None and self.audit is not None:
            recording = self.recordings.start(info, self.audit.session_ref(info.id))
        if self.audit_events is not None:
            self.audit_events.session_started(info, recording)
        self.observer.session_started(info)
        if max_session is not None and self._background is not None:
            scope = trio.CancelScope()
            self._timers[info.id] = scope
            self._background.start_soon(self._end_at_max_session, info, max_session, scope)

    async def _end_at_max_session(self, info: SessionInfo, seconds: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(seconds)
            log.info("session %d: reached max_session of grant %s (%g s)", info.id, info.grant, seconds)
            if self.audit_events is not None and self.audit is not None:
                self.audit_events.admin(
                    "session_ended_max_duration",
                    session=self.audit.session_ref(info.id),
                    grant=info.grant,
                    max_session_s=seconds,
                )
            self.end_session(
                info.id,
                "57P01",
                f"terminating connection: the session reached the maximum duration of grant "
                f"{info.grant} ({seconds:g} s); reconnect with a fresh token",
            )

    def forget_session(self, session: int) -> SessionInfo | None:
        key = self._cancel_by_session.pop(session, None)
        if key is not None:
            self._cancel.pop(key, None)
        timer = self._timers.pop(session, None)
        if timer is not None:
            timer.cancel()
        return self.sessions.pop(session, None)

    def report_authentication(self, attempt: AuthAttempt) -> None:
        self.counters["logins_allowed" if attempt.outcome == "allowed" else "logins_refused"] += 1
        if attempt.identity is not None:
            who = attempt.identity.name
        else:
            # No identity was established (an expired or forged token, a wrong password): say what
            # the client presented, never the secret: its user name and the token's digest.
            who = f"user {attempt.user!r}"
            if attempt.credential_id:
                who += f" token {attempt.credential_id}"
        if attempt.outcome == "allowed":
            log.info(
                "auth allowed: %s (%s via %s) from %s on %s under grant %s",
                who,
                attempt.identity.issuer if attempt.identity is not None else "?",
                attempt.method,
                attempt.peer,
                attempt.connection,
                attempt.grant,
            )
        else:
            log.info(
                "auth refused: %s via %s from %s on %s: %s %s",
                who,
                attempt.method,
                attempt.peer,
                attempt.connection or "?",
                attempt.code,
                attempt.reason,
            )
        if self.audit_events is not None:
            self.audit_events.authentication(attempt)
        self.observer.authentication(attempt)

    # -- identity and policy -----------------------------------------------------------------------

    def _apply_identity(self, cfg: Config) -> None:
        """Brings JWKS caches, the token validator and the authenticator in line with ``cfg``.
        Caches of unchanged issuers (and the validator's memory of used token ids) carry over; an
        issuer whose entry changed gets a new cache, which keeps the old one's keys when they come
        from the same place (during an issuer outage, a reload must not throw away keys that
        ``jwks_max_stale`` still allows)."""
        issuers = resolved_issuers(cfg)
        previous = dict(self.caches)
        for issuer in issuers:
            if issuer not in self.caches:
                same = next((c for i, c in previous.items() if same_key_source(i, issuer)), None)
                self.caches[issuer] = JwksCache(issuer, keys_from=same)
                if self._background is not None:
                    self._background.start_soon(self._run_cache, issuer)
        for gone in [i for i in self.caches if i not in issuers]:
            del self.caches[gone]
            scope = self._cache_scopes.pop(gone, None)
            if scope is not None:
                scope.cancel()
        self.validator.configure(issuers, {i.name: self.caches[i] for i in issuers})
        self.authenticator = Authenticator(cfg, self.validator)

    async def _run_cache(self, issuer: ResolvedIssuer) -> None:
        cache = self.caches.get(issuer)
        if cache is None:
            return
        with trio.CancelScope() as scope:
            self._cache_scopes[issuer] = scope
            await cache.run()

    def request_reload(self) -> None:
        self._reload_requested.set()

    def reload(self) -> bool:
        """Reads, validates and applies the policy files. Returns whether the running policy is the
        file's (unchanged or applied); an invalid file leaves the previous version in force."""
        if self.config_path is None:
            return False
        path = self.config_path
        try:
            data, marks, raw = configmod.read(path)
            version = policy_version(raw)
            if version == self.policy.version:
                return True
            base = Path(path) if Path(path).is_dir() else Path(path).parent
            new = configmod.parse(data, path, base, marks)
        except ConfigError as e:
            self.counters["reloads_rejected"] += 1
            log.error("policy reload rejected; version %s stays in force:\n%s", self.policy.version[:12], e)
            if self.audit_events is not None:
                self.audit_events.policy("", path, False, str(e), "reload")
            self.observer.policy_changed("", path, False, str(e))
            return False
        restart = [k for k in configmod.PROCESS_SECTIONS if getattr(new, k) != getattr(self.config, k)]
        for k in configmod.PROCESS_SECTIONS:
            setattr(new, k, getattr(self.config, k))
        if restart:
            log.warning("policy reload: changes to %s take effect after a restart", ", ".join(restart))
        old = self.policy
        self._apply_identity(new)
        self.config = new
        self.policy = CompiledPolicy(new, version, self.mask_key)
        self._upstream_tls.clear()
        self.counters["reloads_applied"] += 1
        log.info("policy version %s applied (was %s)", version[:12], old.version[:12])
        if self.audit_events is not None:
            detail = f"was {old.version}" + (f"; needs a restart: {', '.join(restart)}" if restart else "")
            self.audit_events.policy(version, path, True, detail, "reload", new)
        self.observer.policy_changed(version, path, True, "")
        self._recheck_sessions(old)
        return True

    def _recheck_sessions(self, old: CompiledPolicy) -> None:
        now = dt.datetime.now(dt.UTC)
        for info in list(self.sessions.values()):
            if info.grant not in self.policy.grants:
                why = f"access revoked: grant {info.grant} was removed from the policy"
            elif self.policy.grant_terms(info.grant) != old.grant_terms(info.grant):
                why = (
                    f"grant {info.grant}, its connection or its rules changed: reconnect under the new policy"
                )
            elif not self.policy.grant_still_applies(
                info.identity, info.connection, info.grant, peer=info.peer_ip, now=now
            ):
                why = f"access revoked: grant {info.grant} no longer admits {info.identity.name}"
            else:
                continue
            log.info("session %d: %s", info.id, why)
            if self.audit_events is not None and self.audit is not None:
                self.audit_events.admin(
                    "session_ended_by_policy", session=self.audit.session_ref(info.id), reason=why
                )
            self.end_session(info.id, "28000", f"terminating connection: {why}")

    def _stamp_policy(self) -> tuple[tuple[str, int, int], ...]:
        """Names, mtimes and sizes of the policy files (empty without a config path)."""
        if self.config_path is None:
            return ()
        try:
            files = configmod.policy_files(Path(self.config_path))
            return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        except OSError:
            return ()

    def _tls_files(self) -> list[str]:
        """The certificate, key and CA files of both legs (the client leg's and every upstream's)."""
        files: list[str] = []
        if self.config.tls is not None:
            t = self.config.tls
            files += [f for f in (t.cert, t.key, t.client_ca) if f]
        for conn in self.config.connections:
            u = conn.upstream.tls
            files += [f for f in (u.ca, u.cert, u.key) if f]
        if self.config.admin is not None and self.config.admin.tls is not None:
            files += [self.config.admin.tls.cert, self.config.admin.tls.key]
        return files

    def _stamp_tls(self) -> tuple[tuple[str, int, int, int], ...]:
        """Identity, mtime and size of each TLS file, through symlinks (a Kubernetes secret mount
        swaps a symlink; cert-manager and certbot replace the files)."""
        out = []
        for f in self._tls_files():
            try:
                st = os.stat(f)
                out.append((f, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((f, 0, 0, 0))
        return tuple(out)

    def reload_tls(self) -> bool:
        """Reads the TLS files again (the same paths: the ``tls`` section itself is read at start).
        New connections get the new certificate; established sessions keep theirs. Files that do
        not make a valid configuration (a certificate replaced before its key) leave the previous
        one in use, and the next change is tried again. Returns whether the new files are in use."""
        source = self.config_path or "<config>"
        upstream: dict[str, _core.TlsClientConfig] = {}
        try:
            for conn in self.config.connections:
                if conn.upstream.tls.mode != "disable":
                    try:
                        upstream[conn.name] = upstream_tls_config(conn)
                    except _core.TlsError as e:
                        raise ConfigError(
                            source, [(f"connection {conn.name}: upstream.tls", str(e))]
                        ) from None
            tls = client_tls_config(self.config, source)
            admin = self.config.admin.tls if self.config.admin is not None else None
            for setting, t in (("tls.cert", self.config.tls), ("admin.tls.cert", admin)):
                # Rotating to an expired certificate would fail every verifying client.
                problem = expiry_problem(t.cert, soon_days=0) if t is not None else None
                if problem is not None:
                    raise ConfigError(source, [(setting, problem)])
            if admin is not None and self._admin_http is not None:
                check_admin_tls(self.config, source)
                admin_ctx = server_ssl_context(admin.cert, admin.key)
        except ConfigError as e:
            log.error("TLS files changed but cannot be used; the previous certificate stays in use:\n%s", e)
            self.counters["tls_rejected"] += 1
            return False
        self.counters["tls_applied"] += 1
        self.client_tls = tls
        self._upstream_tls = upstream
        if admin is not None and self._admin_http is not None:
            self._admin_http.ssl_context = admin_ctx
        log.info("TLS files reloaded: new connections use them")
        return True

    async def _watch_policy(self) -> None:
        """Reloads on SIGHUP and when the policy files change (polled every 2 s); reads the TLS
        files again when they change."""
        if self.config_path is None:
            return

        seen = self._policy_stamp
        while True:
            with trio.move_on_after(2.0):
                await self._reload_requested.wait()
            self._reload_requested = trio.Event()
            tls_now = self._stamp_tls()
            # (A failed attempt is tried again when the files change again, not at every poll.)
            changed = tls_now != self._tls_stamp
            if (changed or self._reload_forced) and (self.reload_tls() or changed):
                self._tls_stamp = tls_now
            current = self._stamp_policy()
            if current != seen or self._reload_forced:
                self._reload_forced = False
                seen = current
                try:
                    self.reload()
                except Exception:
                    # A bug in reading a new policy must not take the gateway down (invalid files
                    # are ConfigError, handled in reload).
                    log.exception("policy reload failed; version %s stays in force", self.policy.version[:12])

    async def _hangups(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                log.info("received SIGHUP: reloading the policy")
                self._reload_forced = True
                self.request_reload()

    def end_session(self, session: int, code: str, message: str) -> None:
        """Ends a session with a FATAL error (at the next message boundary of its result, or after
        the engine's grace period), and cancels what its backend is running: closing the connection
        does not stop a statement PostgreSQL is executing (it would run on, and commit, after the
        session was revoked)."""
        self.engine.terminate(session, code, message)
        self._cancel_running(session)

    def _cancel_running(self, session: int) -> None:
        key = self._cancel_by_session.get(session)
        target = self._cancel.get(key) if key is not None else None
        if target is not None and self._background is not None:
            self._background.start_soon(self._send_cancel, target)

    async def forward_cancel(self, process_id: int, secret_key: int, peer: str = "?") -> None:
        """Sends the client's CancelRequest to the backend its session uses. Unknown or wrong keys
        are ignored without a word to the client, as PostgreSQL does; the log says so at most once
        a minute, with how many there were (a flood of them is someone guessing keys)."""
        target = self._cancel.get((process_id, secret_key))
        if target is None:
            count = self._unknown_cancels.hit()
            if count is not None:
                log.warning(
                    "cancel request with an unknown key from %s ignored (%d such request(s) since "
                    "the last message)",
                    peer,
                    count,
                )
            return
        wait = self._approval_waits.get(target.session)
        if wait is not None:
            # The statement waits for approval at the gateway; the backend runs nothing of it (a
            # cancel sent there could hit the client's next statement instead).
            log.info("session %d: cancel ends the wait for approval", target.session)
            wait.cancel()
            return
        await self._send_cancel(target)

    async def _send_cancel(self, target: CancelTarget) -> None:
        up = target.connection.upstream
        try:
            with trio.fail_after(up.connect_timeout):
                stream = await open_tcp(up.host, up.port)
                ch = Channel(stream)
                try:
                    if up.tls.mode != "disable":
                        await ch.send_raw(_core.ssl_request())
                        if await ch.receive_raw(1) != b"S":
                            # As at login: never in plaintext when TLS is asked for (the backend's
                            # key is the upstream's secret, and an impostor would collect it).
                            log.warning(
                                "session %d: cancel not forwarded: %s:%d does not accept TLS "
                                "(tls.mode is %s)",
                                target.session,
                                up.host,
                                up.port,
                                up.tls.mode,
                            )
                            return
                        ch.start_tls(
                            _core.TlsSession.client(
                                self.upstream_tls(target.connection), up.tls.server_name or up.host
                            )
                        )
                        await ch.handshake()
                    await ch.send(_core.cancel_request(target.process_id, target.upstream_key))
                finally:
                    await ch.aclose()
            log.info("session %d: cancel forwarded to upstream pid %d", target.session, target.process_id)
        except (
            OSError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            _core.TlsError,
            UpstreamUnavailable,
        ) as e:
            log.warning("session %d: cancel could not be forwarded: %s", target.session, e)

    # -- accepting ---------------------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            peer_addr = stream.socket.getpeername()
            peer = f"{peer_addr[0]}:{peer_addr[1]}"
        except OSError:
            peer = "?"
        if self.draining:
            await _refuse_now(stream, "57P03", "the gateway is shutting down")
            return
        refuse: Refusal | None = None
        if self._startups + self.engine.session_count() >= self.config.limits.max_connections:
            # Said after the client's TLS handshake and startup packet, so that TLS clients can
            # read it (and a cancel request still gets through); a flood beyond a few dozen such
            # handshakes at once gets the error in clear straight away.
            if self._refusing >= REFUSING_AT_ONCE:
                if (count := self._refused_full.hit()) is not None:
                    log.warning(
                        "%d connection(s) refused: too many clients (max_connections %d)",
                        count,
                        self.config.limits.max_connections,
                    )
                await _refuse_now(stream, "53300", "sorry, too many clients already")
                return
            refuse = Refusal("53300", "sorry, too many clients already")
            self._refusing += 1
        else:
            self._startups += 1
        try:
            await PostgresStartup(self, stream, peer, refuse=refuse).run()
        except Exception:
            # A bug in one connection's handling must not take the gateway down.
            log.exception("connection from %s failed unexpectedly", peer)
            with contextlib.suppress(Exception):
                await stream.aclose()
        finally:
            if refuse is None:
                self._startups -= 1
            else:
                self._refusing -= 1

    async def _open_listeners(self) -> list[trio.SocketListener]:
        """Binds ``listen``; raises ``ConfigError`` naming the setting to fix when it cannot be."""
        lst = self.config.listen
        try:
            listeners = await trio.open_tcp_listeners(lst.port, host=lst.host, backlog=lst.backlog)
        except OSError as e:
            raise listen_problem(e, "listen", lst.host, lst.port, self.config_path or "<config>") from None
        self.listen_port = listeners[0].socket.getsockname()[1]
        return listeners

    async def _listen(
        self,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as accept:
                await accept.start(
                    functools.partial(trio.serve_listeners, self._handle, listeners, handler_nursery=handlers)
                )
                task_status.started()
                await self._stop.wait()
                accept.cancel_scope.cancel()
            # Startup handlers still running get until the grace deadline, then are cancelled.
            handlers.cancel_scope.deadline = trio.current_time() + self.config.shutdown.grace

    # -- the engine's events -------------------------------------------------------------------

    async def _events(self) -> None:
        fd = self.engine.event_fd
        async with trio.open_nursery() as deciders:
            while True:
                await trio.lowlevel.wait_readable(fd)
                for ev in self.engine.poll_events():
                    self._dispatch(ev, deciders.start_soon)

    def _dispatch(self, ev: tuple[Any, ...], spawn: Callable[[Callable[[], Awaitable[None]]], None]) -> None:
        kind, session = ev[0], ev[1]
        if kind == "audit":
            if self.audit is not None:
                self.audit.engine_batch(session, ev[2], ev[3])
            return
        if kind == "recording":
            if self.recordings is not None:
                self.recordings.frames(session, ev[2])
            return
        info = self.sessions.get(session)
        if kind == "ended":
            _, _, reason, detail, stats = ev
            for scope in self._deciding.pop(session, set()):
                scope.cancel()  # a statement held for approval waits no more
            gone = self.forget_session(session)
            if gone is not None:
                masking = gone.policy.masking if gone.policy is not None else None
                stats["masked"] = dict(zip(masking.names, stats["masked"], strict=True)) if masking else {}
                gone.stats = stats
                extra = self.recordings.end(session, reason) if self.recordings is not None else {}
                if self.audit_events is not None:
                    self.audit_events.session_ended(gone, reason, detail, extra)
                self.observer.session_ended(gone, reason, detail)
                log.info(
                    "session %d ended: %s%s (%.1f s, %d statements, %d rows%s)",
                    session,
                    reason,
                    f" ({detail})" if detail else "",
                    time.time() - gone.started,
                    stats["statements"],
                    stats["rows"],
                    "".join(f", {n} masked by {r}" for r, n in stats["masked"].items() if n),
                )
            return
        if info is None:
            return
        if kind == "statement":
            statement = StatementInfo(seq=ev[2], kind=ev[3], name=ev[4], text=ev[5], params=tuple(ev[6]))

            async def decide() -> None:
                scope = trio.CancelScope()
                self._deciding.setdefault(session, set()).add(scope)
                try:
                    with scope:
                        await decide_in_scope()
                finally:
                    self._deciding.get(session, set()).discard(scope)

            async def decide_in_scope() -> None:
                try:
                    d = await self.statement_hook.decide(info, statement)
                    if d.allow and d.approval is not None:
                        d = await self._hold_for_approval(info, statement, d.approval)
                except Exception:
                    # Fail closed: a hook that breaks denies.
                    log.exception("session %d: statement hook failed; denying", session)
                    self.engine.verdict(
                        session,
                        statement.seq,
                        False,
                        "42501",
                        "the gateway could not decide on this statement",
                    )
                    return
                self.engine.verdict(
                    session,
                    statement.seq,
                    d.allow,
                    d.code,
                    d.message,
                    d.remember,
                    rule=d.rule,
                    hold_executions=d.hold_executions,
                )
                log.log(
                    logging.DEBUG if d.allow else logging.INFO,
                    "session %d: statement %d (fingerprint %s) decided: %s%s: %s",
                    session,
                    statement.seq,
                    statement.fingerprint,
                    "allowed" if d.allow else f"refused ({d.message})",
                    {True: ", remembered", "text": ", remembered for this text"}.get(d.remember, ""),
                    statement.text[:200],
                )
                self.observer.statement_decided(info, statement, d)

            spawn(decide)
        else:
            self.observer.statement_event(info, ev)

    async def _drain_events(self, spawn: Callable[[Callable[[], Awaitable[None]]], None]) -> None:
        quiet = 0
        with trio.move_on_after(5):
            while quiet < 3:
                events = self.engine.poll_events()
                for ev in events:
                    self._dispatch(ev, spawn)
                quiet = 0 if events or self.engine.session_count() else quiet + 1
                await trio.sleep(0.02)

    # -- lifecycle -------------------------------------------------------------------------------

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.draining:
                    log.info("received %s: shutting down", name)
                    self.stop()
                else:
                    # Still handled here (not Python's default, which killed the process with
                    # sessions and their backends left as they were): the grace is cut short.
                    log.info("received %s again: ending the remaining sessions now", name)
                    self._hurry.set()

    def stop(self) -> None:
        """Begins a graceful shutdown (idempotent)."""
        if not self.draining and self.audit_events is not None:
            self.audit_events.admin("shutdown", sessions=self.engine.session_count())
        self.draining = True
        self._stop.set()

    async def _shutdown(self) -> None:
        await self._stop.wait()
        grace = self.config.shutdown.grace
        if self.config.shutdown.close_idle:
            self.engine.drain(None, "57P01", SHUTDOWN_MESSAGE)
        drain_started = trio.current_time()
        with trio.move_on_after(grace):
            while (self.engine.session_count() > 0 or self._startups > 0) and not self._hurry.is_set():
                await trio.sleep(0.05)
        self.approvals.farewell("the gateway is shutting down")
        waited = trio.current_time() - drain_started
        left = self.engine.terminate(None, "57P01", SHUTDOWN_MESSAGE)
        for session in list(self._cancel_by_session):
            self._cancel_running(session)
        if left:
            log.info(
                "ended %d session(s) still open after %.0f s%s",
                left,
                waited,
                " (a second signal cut the grace short)" if self._hurry.is_set() else "",
            )
        with trio.move_on_after(5):
            while self.engine.session_count() > 0:
                await trio.sleep(0.02)

    async def run(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED, *, handle_signals: bool = True
    ) -> None:
        # Bound first: a port in use or a wrong host stops the start before anything runs.
        listeners = await self._open_listeners()
        raise_descriptor_limit(self.config.limits.max_connections)
        try:
            await self._run(listeners, task_status, handle_signals)
        finally:
            for listener in listeners:
                listener.socket.close()  # idempotent; those that served are closed already

    async def _run(
        self, listeners: list[trio.SocketListener], task_status: trio.TaskStatus[None], handle_signals: bool
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._background = await nursery.start(_background_nursery)
            for issuer in list(self.caches):
                self._background.start_soon(self._run_cache, issuer)
            nursery.start_soon(self._events)
            nursery.start_soon(self._watch_policy)
            await nursery.start(self.approvals.run)
            if self.config.admin is not None:
                admin = self.config.admin.listen
                try:
                    self.admin_port = await nursery.start(self._admin().run)
                except OSError as e:
                    raise listen_problem(
                        e, "admin.listen", admin.host, admin.port, self.config_path or "<config>"
                    ) from None
            if self.audit is not None:
                await nursery.start(self.audit.run)
                for exp in build_exporters(self.config, self.audit.store):
                    nursery.start_soon(exp.run)
            if self.recordings is not None:
                await nursery.start(self.recordings.run)
                if self.recordings.uploader is not None:
                    await nursery.start(self.recordings.uploader.run)
            if handle_signals:
                nursery.start_soon(self._signals)
                nursery.start_soon(self._hangups)
            async with trio.open_nursery() as serving:
                await serving.start(self._listen, listeners)
                task_status.started()
                log.info(
                    "listening on %s:%d with %d data-path worker(s)",
                    self.config.listen.host,
                    self.listen_port,
                    self.engine.workers,
                )
                if self.audit is not None:
                    # The log says "session 7"; the audit trail names it with this run's id.
                    log.info(
                        "audit trail: writer %s; session N of this run is %s in audit records",
                        self.audit.writer,
                        self.audit.session_ref(0)[:-1] + "N",
                    )
                await self._shutdown()
            # Every session has ended: take the engine's last events (their final audit entries,
            # recordings and "ended") before the event loop stops, however busy the machine is.
            await self._drain_events(nursery.start_soon)
            nursery.cancel_scope.cancel()
        if self.recordings is not None:
            await self.recordings.close()
            if self.recordings.uploader is not None:
                await self.recordings.uploader.flush(UPLOAD_AT_SHUTDOWN)
        if self.audit is not None:
            await self.audit.close()


async def _background_nursery(task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


async def _refuse_now(stream: trio.SocketStream, code: str, message: str) -> None:
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(fatal(code, message))
    await stream.aclose()
