"""PostgreSQL startup: from an accepted socket to a session handed to the engine.

Rules of this module: it runs once per connection and never per statement. Order of a connection:
SSLRequest (answered 'S' when TLS is configured, else 'N'), GSSENCRequest (always 'N'), then either
CancelRequest (forwarded to the right upstream backend, then the connection closes, as PostgreSQL
does) or StartupMessage; then authentication (a verified client certificate when the policy has
certificate identities, else a cleartext password request whose answer is a token or a static
password), the policy's admission (one grant, or a refusal with its reason), upstream login with the
grant's credential (read-only grants make the upstream session read-only), and the welcome
(AuthenticationOk, the server's ParameterStatus, the gateway's own BackendKeyData, ReadyForQuery).
Every refusal is a FATAL ErrorResponse with a SQLSTATE that says why (28P01 a bad credential, 28000
no access); the secret a client sent never appears in one. Every attempt is reported to the observer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ostiary import _core
from ostiary.audit.log import token_id
from ostiary.config import resolve_secret
from ostiary.errors import AuthenticationFailed, UpstreamUnavailable
from ostiary.hooks import AuthAttempt, SessionInfo, peer_ip
from ostiary.identity import ClientHello, Identity, printable
from ostiary.identity.tokens import looks_like_jwt
from ostiary.policy.enforce import read_only_refusal
from ostiary.policy.evaluate import CompiledPolicy, SessionPolicy
from ostiary.policy.masking import MaskPlanArg
from ostiary.policy.model import Connection, Credential, Grant
from ostiary.proxy.channel import Channel, ChannelClosed, open_tcp

if TYPE_CHECKING:
    from ostiary.proxy.server import Gateway

log = logging.getLogger("ostiary.postgres")

# Startup parameters. A client's other parameters (statement_timeout, search_path, custom
# settings ...) are settings of its session as `SET name TO 'value'` would be: judged as that
# statement by the session's policy (guardrails, read-only), then passed on, so the server applies
# them or refuses an unknown or invalid one itself, as it would directly. `options` would hide
# settings from that judgement inside one string, and `replication` asks for another protocol.
# What drivers send on their own (psql, libpq, pgJDBC, asyncpg) describes how the client reads
# results, not what it may do: passed on without judgement, so a grant whose `statements` leave out
# SET still admits them.
GATEWAY_PARAMS = frozenset({"user", "database"})
DRIVER_PARAMS = frozenset(
    {"application_name", "client_encoding", "datestyle", "timezone", "intervalstyle", "extra_float_digits"}
)
# PostgreSQL's spellings of false (parse_bool): replication=false is an ordinary session.
FALSE_WORDS = frozenset({"false", "f", "fa", "fal", "fals", "off", "of", "no", "n", "0"})
TLS_HANDSHAKE_RECORD = b"\x16"  # the first byte of a TLS ClientHello


class Refusal(Exception):
    """End the connection with a FATAL ErrorResponse."""

    def __init__(self, code: str, message: str, hint: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.detail = detail


@dataclass(frozen=True)
class CancelTarget:
    """Where a CancelRequest for (process_id, secret_key) goes: the real key of that backend."""

    session: int
    secret_key: int
    connection: Connection
    process_id: int
    upstream_key: int


def fatal(code: str, message: str, hint: str | None = None, detail: str | None = None) -> bytes:
    return _core.error_response("FATAL", code, message, detail=detail, hint=hint)


def startup_options(text: str) -> list[tuple[str, str]]:
    """The settings in a startup ``options`` string (libpq's PGOPTIONS, pgJDBC's ``options``), split
    as PostgreSQL splits it (whitespace, a backslash escapes the next character): ``-c name=value``,
    ``-cname=value`` and ``--name=value``, ``-`` in a name read as ``_``. Other switches (the
    postmaster's ``-B``, ``-d``, ``-D`` ...) raise ``Refusal``: the gateway passes settings, which it
    judges one by one, never the server's command line."""
    words: list[str] = []
    word: list[str] = []
    escaped = False
    for c in text:
        if escaped:
            word.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(c)
    if word:
        words.append("".join(word))
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            arg = w[2:]
        elif w == "-c" and i + 1 < len(words):
            i += 1
            arg = words[i]
        elif w.startswith("-c") and len(w) > 2:
            arg = w[2:]
        else:
            raise Refusal(
                "08P01",
                f"startup parameter options: {printable(w)!r} is not passed through the gateway; "
                "only settings are (-c name=value or --name=value)",
            )
        name, eq, value = arg.partition("=")
        name = name.replace("-", "_").lower()
        if not eq or not name or name in GATEWAY_PARAMS or name in ("options", "replication"):
            raise Refusal(
                "08P01", f"startup parameter options: {printable(arg)!r} is not a setting (name=value)"
            )
        out.append((name, value))
        i += 1
    return out


def set_statement(name: str, value: str) -> str:
    """The SET statement a startup parameter amounts to (what the session's policy judges)."""
    return "SET \"{}\" TO '{}'".format(name.replace('"', '""'), value.replace("'", "''"))


def startup_settings(params: dict[str, str], policy: SessionPolicy) -> list[tuple[str, str]]:
    """The client's startup parameters to pass on, each judged as the SET statement it amounts to.
    Raises ``AuthenticationFailed`` (42501, the rule and the parameter named) for one the grant's
    policy would refuse as a statement, or that an approval rule would hold: a login cannot wait."""
    out: list[tuple[str, str]] = []
    for name, value in params.items():
        if name in GATEWAY_PARAMS:
            continue
        if name in DRIVER_PARAMS:
            out.append((name, value))
            continue
        text = set_statement(name, value)
        why: str | None = None
        if policy.guarded:
            d = policy.judge(text)
            if not d.allow:
                why = f"{d.rule}: {d.message}"
            elif (rule := policy.approval_rule(text)) is not None:
                why = f"{rule.name}: needs approval; set it with SET after connecting"
        elif policy.read_only and _core.may_leave_read_only(text) and (ro := read_only_refusal(text)):
            why = f"read-only: grant {policy.grant.name} is read-only ({ro})"
        if why is not None:
            raise AuthenticationFailed("42501", f"startup parameter {name}={value!r} refused by {why}")
        out.append((name, value))
    return out


def grant_credential(conn: Connection, grant: Grant) -> Credential:
    """The upstream role a grant's sessions log in as."""
    return conn.credentials[grant.credential] if grant.credential is not None else conn.upstream


async def _connect_upstream(
    gw: Gateway, conn: Connection, settings: list[tuple[str, str]], grant: Grant
) -> tuple[Channel, tuple[object, ...], bytes]:
    """Connects and logs in to the upstream with the grant's credential. Returns the channel, the
    ``ready`` step and leftover plaintext. Raises ``UpstreamUnavailable`` or ``Refusal``."""
    up = conn.upstream
    cred = grant_credential(conn, grant)
    try:
        password = resolve_secret(cred)
    except (OSError, KeyError) as e:
        raise UpstreamUnavailable(
            f"the upstream password of connection {conn.name!r} ({cred.user}) is unavailable: {e}"
        ) from None
    # One deadline for the connection and the login together (a server that answers each step
    # just in time must not hold the client for several timeouts).
    deadline = trio.current_time() + up.connect_timeout
    try:
        with trio.fail_at(deadline):
            stream = await open_tcp(up.host, up.port)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            # The gateway's own limit, not the upstream's fault: PostgreSQL's code for too many
            # connections, and the log says which limit.
            log.error("no descriptor left for an upstream connection: %s", e)
            raise Refusal(
                "53300", "the gateway has no room for another session (out of file descriptors)"
            ) from None
        raise UpstreamUnavailable(f"cannot reach {up.host}:{up.port}: {e}") from None
    except trio.TooSlowError:
        raise UpstreamUnavailable(f"cannot reach {up.host}:{up.port}: timed out") from None
    ch = Channel(stream)
    try:
        with trio.fail_at(deadline):
            if up.tls.mode != "disable":
                await ch.send_raw(_core.ssl_request())
                answer = await ch.receive_raw(1)
                if answer != b"S":
                    raise UpstreamUnavailable(
                        f"{up.host}:{up.port} does not accept TLS (tls.mode is {up.tls.mode})"
                    )
                ch.start_tls(_core.TlsSession.client(gw.upstream_tls(conn), up.tls.server_name or up.host))
                await ch.handshake()
            params = [("user", cred.user), ("database", up.database)]
            params += settings
            if grant.access == "read-only":
                # The session default; RESET and DISCARD ALL return to it. Statements that would turn
                # it off are the guardrails' to refuse.
                params.append(("default_transaction_read_only", "on"))
            machine = _core.UpstreamHandshake(params, password, list(up.require_auth))
            await ch.send(machine.start())
            while True:
                step = machine.step()
                if step[0] == "need_data":
                    machine.receive_data(await ch.receive())
                elif step[0] == "send":
                    await ch.send(step[1])
                elif step[0] == "derive":
                    # PBKDF2 with the server's iteration count (up to 10,000,000: about a second):
                    # in a worker thread, so the event loop serves every other session meanwhile.
                    await trio.to_thread.run_sync(machine.derive, abandon_on_cancel=True)
                elif step[0] == "failed":
                    fields: dict[str, str] = {k: _without_secret(v, password) for k, v in step[1].items()}
                    code = fields.get("code", "08006")
                    if code.startswith("28"):
                        # The gateway's credentials were refused: not the client's fault, nor the
                        # client's to read (the server names the upstream role); the log says why.
                        log.warning(
                            "the upstream of connection %r refused the login of %s: %s %s",
                            conn.name,
                            cred.user,
                            code,
                            printable(fields.get("message", "")),
                        )
                        raise UpstreamUnavailable(
                            f"the upstream refused the gateway's credentials for connection {conn.name!r}"
                        )
                    # The server's own refusal (an unknown or invalid setting, too many
                    # connections ...), as it would reach a client connected directly.
                    if not _is_sqlstate(code):
                        raise _core.ProtocolError(f"an ErrorResponse with SQLSTATE {printable(code)!r}")
                    raise Refusal(
                        code,
                        fields.get("message", "the upstream refused the session"),
                        hint=fields.get("hint"),
                        detail=fields.get("detail"),
                    )
                else:
                    return ch, step, machine.take_remaining() + ch.leftover_plaintext()
    except _core.TlsError as e:
        await ch.aclose()
        raise UpstreamUnavailable(f"TLS with {up.host}:{up.port} failed: {e}") from None
    except _core.UpstreamAuthError as e:
        await ch.aclose()
        raise UpstreamUnavailable(f"cannot log in to {up.host}:{up.port}: {e}") from None
    except _core.ProtocolError as e:
        await ch.aclose()
        raise UpstreamUnavailable(f"{up.host}:{up.port} broke the protocol during login: {e}") from None
    except (ChannelClosed, trio.BrokenResourceError, OSError) as e:
        await ch.aclose()
        raise UpstreamUnavailable(f"{up.host}:{up.port} closed the connection during login: {e}") from None
    except trio.TooSlowError:
        await ch.aclose()
        raise UpstreamUnavailable(f"{up.host}:{up.port} did not complete the login in time") from None
    except BaseException:
        await ch.aclose()
        raise


def _without_secret(text: str, secret: str) -> str:
    """The upstream's text with the gateway's password blanked out (a server that echoes it must not
    hand it to the client or the log); short passwords are left, they would blank ordinary words."""
    return text.replace(secret, "****") if len(secret) >= 6 else text


def _unreadable_catalog(conn: Connection, purpose: str, e: Exception) -> UpstreamUnavailable:
    """Rows of a catalog query that are not what PostgreSQL answers (fails closed, as 08006)."""
    log.warning("the catalog of connection %r answered rows the gateway cannot read: %r", conn.name, e)
    return UpstreamUnavailable(
        f"cannot read the catalog of connection {conn.name!r} {purpose}: its answer is not a catalog's"
    )


def _is_sqlstate(code: str) -> bool:
    return len(code) == 5 and code.isascii() and code.isalnum() and code.upper() == code


class PostgresStartup:
    """One client connection's startup phase."""

    def __init__(
        self, gw: Gateway, stream: trio.SocketStream, peer: str, refuse: Refusal | None = None
    ) -> None:
        self.gw = gw
        # Refused once the client has negotiated TLS and sent its startup packet (as PostgreSQL
        # reports "too many clients": a TLS client cannot read an error sent in clear).
        self.refuse = refuse
        self.ch = Channel(stream)
        self.peer = peer
        self.machine = _core.ClientHandshake(gw.config.limits.max_startup)
        self.params: dict[str, str] = {}
        # Filled in as the startup proceeds, for the authentication report.
        self.method = ""
        self.connection = ""
        self.identity: Identity | None = None
        self.chain: tuple[str, ...] = ()
        self.credential_id = ""
        self.policy: CompiledPolicy = gw.policy
        # Set when a grant admits the session: its compiled policy, the startup parameters to pass on.
        self.session_policy: SessionPolicy | None = None
        self.settings: list[tuple[str, str]] = []

    def _report(self, outcome: str, code: str = "", reason: str = "", grant: str = "") -> None:
        if not self.method:
            return  # not an authentication attempt (cancel request, protocol error before startup)
        self.gw.report_authentication(
            AuthAttempt(
                time=time.time(),
                peer=self.peer,
                user=self.params.get("user", ""),
                connection=self.connection,
                method=self.method,
                outcome=outcome,
                code=code,
                reason=reason,
                identity=self.identity,
                grant=grant,
                chain=self.chain,
                policy_version=self.policy.version,
                credential_id=self.credential_id,
            )
        )

    async def _next_event(self) -> tuple[object, ...]:
        while True:
            ev = self.machine.next_event()
            if ev is not None:
                return ev
            self.machine.receive_data(await self.ch.receive())

    async def run(self) -> None:
        try:
            await self._run()
        except Refusal as r:
            # (The upstream's own refusals too: a missing database, too many connections ...)
            log.info("connection from %s refused: %s %s", self.peer, r.code, r.message)
            await self._refuse(r.code, r.message, r.hint, detail=r.detail)
        except AuthenticationFailed as e:
            log.info("authentication failed from %s: %s", self.peer, e.reason)
            self._report("refused", e.code, e.reason)
            await self._refuse(e.code, e.reason)
        except UpstreamUnavailable as e:
            log.warning("upstream unavailable for %s: %s", self.peer, e)
            await self._refuse("08006", f"the gateway cannot open the upstream session: {e}")
        except _core.StartupRefused as e:
            code, message, protocol_2 = e.args
            log.info("startup refused from %s: %s", self.peer, message)
            # Protocol 2's ErrorResponse is one string, as PostgreSQL sends it to such a client.
            await self._refuse(
                code, message, raw=b"EFATAL:  " + message.encode() + b"\n\0" if protocol_2 else None
            )
        except _core.ProtocolError as e:
            log.info("protocol violation from %s during startup: %s", self.peer, e)
            await self._refuse("08P01", f"protocol violation: {e}")
        except _core.TlsError as e:
            log.info("TLS failure from %s: %s", self.peer, e)
            await self.ch.aclose()
        except (ChannelClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.ch.aclose()
        except Exception:
            # A bug must not look like a dropped connection: the client is told, the attempt recorded.
            log.exception("connection from %s failed unexpectedly during startup", self.peer)
            self._report("refused", "XX000", "internal error in the gateway")
            await self._refuse("XX000", "the gateway failed while starting this session; see its log")

    async def _refuse(
        self,
        code: str,
        message: str,
        hint: str | None = None,
        raw: bytes | None = None,
        detail: str | None = None,
    ) -> None:
        with trio.move_on_after(2):
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, _core.TlsError, OSError
            ):
                await self.ch.send(raw if raw is not None else fatal(code, message, hint, detail))
        await self.ch.aclose()

    async def _run(self) -> None:
        try:
            admitted = await self._admit_and_connect()
        finally:
            # With reject_reused_jti the token's jti is held from its validation: committed below
            # once the session is admitted and logged in upstream, free again for a login that
            # failed for another reason (a no-op once committed).
            if self.identity is not None:
                self.gw.validator.release(self.identity)
        if admitted is None:
            return
        identity, conn, grant, session_policy, upstream, ready, upstream_prefix = admitted
        try:
            await self._welcome(identity, conn, grant, session_policy, upstream, ready, upstream_prefix)
        except BaseException:
            await upstream.aclose()
            raise

    async def _admit_and_connect(
        self,
    ) -> tuple[Identity, Connection, Grant, SessionPolicy, Channel, tuple[object, ...], bytes] | None:
        cfg = self.gw.config
        try:
            with trio.fail_after(cfg.limits.startup_timeout):
                admitted = await self._client_phase()
        except trio.TooSlowError:
            raise Refusal(
                "08P01", f"startup did not complete within {cfg.limits.startup_timeout:g} s"
            ) from None
        if admitted is None:
            return None
        identity, conn, grant = admitted
        if self.gw.draining:
            raise Refusal("57P03", "the gateway is shutting down")

        session_policy = self.session_policy
        assert session_policy is not None
        upstream, ready, upstream_prefix = await _connect_upstream(self.gw, conn, self.settings, grant)
        self.gw.validator.commit(identity)
        return identity, conn, grant, session_policy, upstream, ready, upstream_prefix

    async def _authenticate(self, conn: Connection) -> Identity:
        certs = tuple(self.ch.tls.peer_certificates()) if self.ch.tls is not None else ()
        hello = ClientHello(
            user=self.params["user"],
            database=conn.name,
            peer=self.peer,
            tls=self.ch.tls is not None,
            peer_certificates=certs,
        )
        auth = self.gw.authenticator
        self.method = "certificate"
        identity = auth.by_certificate(hello)
        if identity is None:
            self.method = "password"
            await self.ch.send(_core.auth_cleartext_password())
            self.machine.expect_password()
            ev = await self._next_event()
            secret = ev[1]
            assert ev[0] == "password" and isinstance(secret, bytes)
            if looks_like_jwt(secret):
                # A JWT (three base64url segments, a JSON header with alg): the trail keeps its
                # hash, never a static password's (a dotted password is not one).
                self.credential_id = token_id(secret)
            identity = await auth.by_password(hello, secret)
            self.method = identity.method
            if identity.method != "token":
                self.credential_id = ""
        self.identity = identity
        return identity

    def _admit(self, identity: Identity, conn: Connection) -> Grant:
        user, peer, now = (
            self.params.get("user"),
            peer_ip(self.peer),
            dt.datetime.now(dt.UTC),
        )
        verdict = self.policy.admit(identity, conn.name, user=user, peer=peer, now=now)
        if verdict.grant is None:
            # Refusals are rarer: evaluate again with the chain of rules, for the audit record.
            self.chain = self.policy.admit(
                identity, conn.name, user=user, peer=peer, now=now, trace=True
            ).chain
            raise AuthenticationFailed(verdict.code, verdict.reason)
        # The client's startup parameters are part of what it asked for: judged before the login
        # is recorded as allowed.
        self.session_policy = self.policy.compile_session(verdict.grant)
        self.settings = startup_settings(self.params, self.session_policy)
        self._report("allowed", grant=verdict.grant.name)
        return verdict.grant

    async def _direct_tls(self) -> _core.TlsSession | None:
        """Reads the client's first bytes. A TLS handshake record there is a client that starts TLS
        at once, without SSLRequest (libpq's ``sslnegotiation=direct``, PostgreSQL 17): TLS starts
        now with those bytes (no StartupMessage can begin with this byte: its length would be
        over 350 MB). Otherwise they go to the startup machine. Returns the direct TLS session."""
        first = await self.ch.receive_raw()
        if first[:1] != TLS_HANDSHAKE_RECORD or self.gw.client_tls is None:
            self.machine.receive_data(first)
            return None
        tls = _core.TlsSession.server(self.gw.client_tls)
        self.ch.start_tls(tls)
        tls.receive_raw(first)
        return tls

    async def _client_phase(self) -> tuple[Identity, Connection, Grant] | None:
        direct_tls = await self._direct_tls()
        while True:
            ev = await self._next_event()
            kind = ev[0]
            if kind == "ssl_request":
                if self.ch.tls is not None:
                    raise Refusal("08P01", "SSLRequest received inside TLS")
                if self.gw.client_tls is None:
                    await self.ch.send_raw(b"N")
                else:
                    await self.ch.send_raw(b"S")
                    self.ch.start_tls(_core.TlsSession.server(self.gw.client_tls))
            elif kind == "gssenc_request":
                await self.ch.send_raw(b"N")
            elif kind == "cancel_request":
                pid, key = ev[1], ev[2]
                assert isinstance(pid, int) and isinstance(key, int)
                await self.gw.forward_cancel(pid, key, self.peer)
                await self.ch.aclose()
                return None
            elif kind == "startup":
                params, negotiate = ev[1], ev[2]
                assert isinstance(params, list) and isinstance(negotiate, bytes)
                if direct_tls is not None and direct_tls.alpn_protocol != _core.ALPN_POSTGRESQL:
                    # As PostgreSQL: direct TLS is for clients that say they speak its protocol.
                    raise Refusal(
                        "08P01",
                        "direct TLS connection without the ALPN protocol postgresql "
                        "(use sslnegotiation=postgres, or a client that sends ALPN)",
                    )
                if negotiate:
                    # A newer protocol minor version or protocol options (``_pq_.*``, left out of
                    # ``params``) were asked for: the gateway speaks 3.0 and says so first, as
                    # PostgreSQL does, and the client carries on with 3.0.
                    await self.ch.send(negotiate)
                if self.refuse is not None:
                    raise self.refuse
                self.params = {str(k).lower(): str(v) for k, v in params}
                conn = self._check_startup()
                identity = await self._authenticate(conn)
                if self.gw.audit is not None and not self.gw.audit.accepting:
                    raise AuthenticationFailed(
                        "57P03",
                        "the gateway's audit trail is unavailable; sessions are refused until it is back",
                    )
                grant = self._admit(identity, conn)
                return identity, conn, grant
            else:
                raise Refusal("08P01", f"unexpected {kind} during startup")

    def _check_startup(self) -> Connection:
        cfg = self.policy.config
        replication = self.params.pop("replication", None)
        if replication is not None and replication.lower() not in FALSE_WORDS:
            # A replication connection (physical, or logical: "database") streams WAL or decoded
            # changes of every relation, outside any statement the gateway could judge.
            raise Refusal(
                "08P01",
                f"startup parameter 'replication' is not allowed through the gateway "
                f"(replication={printable(replication)!r})",
            )
        options = self.params.pop("options", None)
        if options is not None:
            # Each setting becomes a startup parameter of its own, judged like the others; one
            # given on its own as well wins, as in PostgreSQL (it applies options first).
            for name, value in startup_options(options):
                self.params.setdefault(name, value)
        dbname = self.params.get("database") or self.params["user"]
        conn = cfg.connection(dbname)
        if conn is None:
            names = ", ".join(c.name for c in cfg.connections)
            raise Refusal(
                "3D000", f'no connection named "{dbname}" on this gateway', hint=f"dbname is one of: {names}"
            )
        self.connection = conn.name
        if self.ch.tls is None and (
            (cfg.tls is not None and cfg.tls.mode == "require") or not conn.allow_plaintext
        ):
            if cfg.tls is None:
                # Asking for TLS would not help: this gateway has none to offer.
                raise Refusal(
                    "28000",
                    f"connection {conn.name} needs TLS (tokens travel as passwords) and this gateway "
                    "has none configured",
                    hint="the operator sets tls: {cert, key} in the gateway's file, or "
                    f"allow_plaintext: true on connection {conn.name} for a trusted network",
                )
            raise Refusal(
                "28000",
                "the gateway requires TLS, because tokens travel as passwords: connect with "
                "sslmode=require (or verify-full)",
            )
        return conn

    async def _mask_plan(
        self, policy: SessionPolicy, conn: Connection, upstream: Channel, prefix: bytes
    ) -> tuple[MaskPlanArg | None, bytes]:
        """The session's mask plan; column rules are resolved through the upstream's catalog now,
        as the session's own role. Fails closed: no catalog, no session."""
        masking = policy.masking
        if masking is None:
            return None, prefix
        sql = masking.catalog_query()
        if sql is None:
            return masking.content_plan(), prefix
        rows, prefix = await self._catalog(sql, conn, upstream, prefix, "to apply its masking rules")
        try:
            plan, policy.view_globs = masking.resolve(rows)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            raise _unreadable_catalog(conn, "to apply its masking rules", e) from None
        return plan, prefix

    async def _views(
        self, policy: SessionPolicy, conn: Connection, upstream: Channel, prefix: bytes
    ) -> bytes:
        """The database's views and the relations under them, for the rules that refuse or hold
        relations (a write through a view reaches what it is over). Fails closed like masking."""
        if not policy.needs_views:
            return prefix
        from ostiary.policy.evaluate import VIEWS_QUERY

        rows, prefix = await self._catalog(VIEWS_QUERY, conn, upstream, prefix, "to follow its views")
        try:
            policy.set_views(rows)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            raise _unreadable_catalog(conn, "to follow its views", e) from None
        return prefix

    async def _catalog(
        self, sql: str, conn: Connection, upstream: Channel, prefix: bytes, purpose: str
    ) -> tuple[list[list[str | None]], bytes]:
        """The rows of a catalog query run in the session before the client's first statement."""
        query = _core.SimpleQuery(sql, self.gw.config.limits.max_statement)
        try:
            with trio.fail_after(conn.upstream.connect_timeout):
                await upstream.send(query.message())
                if prefix:
                    query.receive_data(prefix)
                while (result := query.result()) is None:
                    query.receive_data(await upstream.receive())
        except (
            trio.TooSlowError,
            _core.ProtocolError,
            ChannelClosed,
            trio.BrokenResourceError,
            OSError,
        ) as e:
            raise UpstreamUnavailable(
                f"cannot read the catalog of connection {conn.name!r} {purpose}: {str(e) or 'timed out'}"
            ) from None
        if result[0] == "failed":
            raise UpstreamUnavailable(
                f"cannot read the catalog of connection {conn.name!r} {purpose}: {result[2]} ({result[1]})"
            )
        rows = result[1]
        assert isinstance(rows, list)
        return rows, query.take_remaining()

    async def _welcome(
        self,
        identity: Identity,
        conn: Connection,
        grant: Grant,
        session_policy: SessionPolicy,
        upstream: Channel,
        ready: tuple[object, ...],
        upstream_prefix: bytes,
    ) -> None:
        _, params, process_id, upstream_key, status, notices = ready
        assert isinstance(params, list) and isinstance(notices, list)
        assert isinstance(process_id, int) and isinstance(upstream_key, int) and isinstance(status, str)
        gw = self.gw
        encoding = next((v for k, v in params if k == "client_encoding"), "")
        # Read-only sessions judge flagged text with the parser too.
        judged = session_policy.guarded or session_policy.read_only
        if judged and _core.client_encoding_splits_bytes(str(encoding)):
            # Asked for by the client or set for the upstream role: PostgreSQL lexes the text after
            # converting it, the analysis the bytes as sent; in these encodings a character can end
            # in a backslash (E'<lead>\'; ...), so the two could disagree on where a string ends.
            raise Refusal(
                "42501",
                f"client_encoding {encoding} is not allowed under grant {grant.name}, whose "
                "statements the gateway judges (its characters can hide quotes and backslashes)",
                hint="use UTF8",
            )
        conforming = next((v for k, v in params if k == "standard_conforming_strings"), "on")
        if judged and conforming != "on":
            # A database or role default (ALTER DATABASE ... SET standard_conforming_strings = off):
            # PostgreSQL would then end strings at a backslash, the analysis does not.
            raise Refusal(
                "42501",
                f"standard_conforming_strings is {conforming} for this session (a database or role "
                f"default); grant {grant.name}'s statements are judged with it on",
                hint="ALTER DATABASE ... RESET standard_conforming_strings (and the same for the role)",
            )
        mask, upstream_prefix = await self._mask_plan(session_policy, conn, upstream, upstream_prefix)
        upstream_prefix = await self._views(session_policy, conn, upstream, upstream_prefix)
        if session_policy.pins_search_path:
            # Relation rules read unqualified names as "$user", public would resolve them, and
            # search_path cannot change in the session; a database or role default that says
            # otherwise (set outside the gateway) would move them before the first statement.
            rows, upstream_prefix = await self._catalog(
                "SELECT pg_catalog.current_setting('search_path')",
                conn,
                upstream,
                upstream_prefix,
                "to check its search_path",
            )
            path = str(rows[0][0]) if rows and rows[0] and rows[0][0] is not None else ""
            if path.replace(" ", "").lower() not in ('"$user",public', "$user,public"):
                raise Refusal(
                    "42501",
                    f"search_path is {path} for this session (a database or role default); grant "
                    f'{grant.name}\'s relation rules read unqualified names with "$user", public',
                    hint="ALTER ROLE ... RESET search_path (and the same for the database)",
                )
        session_id = gw.new_session_id()
        # The client sees the real backend pid (so pg_backend_pid() and the pid in notifications
        # match what libpq reports) but a secret key of the gateway's: the real key never leaves it.
        gateway_key = secrets.randbits(32) - (1 << 31)
        welcome = [_core.auth_ok()]
        welcome += [_core.parameter_status(k, v) for k, v in params]
        welcome += list(notices)
        welcome.append(_core.backend_key_data(process_id, gateway_key))
        welcome.append(_core.ready_for_query(status))
        await self.ch.send(b"".join(welcome))

        tls_desc = self.ch.tls.describe() if self.ch.tls is not None else None
        info = SessionInfo(
            id=session_id,
            identity=identity,
            connection=conn.name,
            grant=grant.name,
            access=grant.access,
            upstream_user=grant_credential(conn, grant).user,
            peer=self.peer,
            client_tls=tls_desc,
            upstream_process_id=process_id,
            started=time.time(),
            policy_version=self.policy.version,
            policy=session_policy,
            settings=tuple(self.settings),
        )
        client_prefix = self.machine.take_remaining() + self.ch.leftover_plaintext()
        gw.register_session(
            info, CancelTarget(session_id, gateway_key, conn, process_id, upstream_key), grant.max_session
        )
        try:
            gw.engine.adopt(
                session_id,
                self.ch.detach(),
                self.ch.tls,
                client_prefix,
                upstream.detach(),
                upstream.tls,
                upstream_prefix,
                consult=gw.statement_hook.consult(info),
                report=gw.observer.report,
                mask=mask,
                audit=gw.audit_spec,
                record=gw.record_spec,
            )
        except BaseException:
            gw.forget_session(session_id)
            raise
        log.info(
            "session %d: %s on %s under grant %s (%s) from %s (upstream pid %d)",
            session_id,
            identity.name,
            conn.name,
            grant.name,
            grant.access,
            self.peer,
            process_id,
        )
