"""The gateway process: listeners, the engine's event loop, cancel forwarding and shutdown.

Structured concurrency: ``Gateway.run`` owns one nursery with three kinds of children: the listener
(accepting, with its own handler nursery so startup handlers can be cancelled apart from it), the
engine event loop, and the signal watcher. Established sessions do not live here: they run on the
engine's worker threads, and this module hears of them through events. Shutdown (SIGTERM or SIGINT):
stop accepting, let sessions end by themselves up to ``shutdown.grace`` seconds (with
``close_idle`` they are also ended as soon as they are idle), then end the rest with 57P01.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ostiary import _core
from ostiary.auth import Authenticator, StaticPasswords
from ostiary.config import Config, Connection
from ostiary.hooks import AllowAll, NoObserver, SessionInfo, SessionObserver, StatementHook, StatementInfo
from ostiary.proxy.channel import Channel, open_tcp
from ostiary.proxy.postgres import CancelTarget, PostgresStartup, fatal

log = logging.getLogger("ostiary.server")

SHUTDOWN_MESSAGE = "terminating connection because the gateway is shutting down"


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        authenticator: Authenticator | None = None,
        statement_hook: StatementHook | None = None,
        observer: SessionObserver | None = None,
    ) -> None:
        self.config = config
        self.authenticator: Authenticator = authenticator or StaticPasswords(config.clients)
        self.statement_hook: StatementHook = statement_hook or AllowAll()
        self.observer: SessionObserver = observer or NoObserver()
        lim = config.limits
        self.engine = _core.Engine(
            workers=config.effective_workers(), max_message=lim.max_message, max_statement=lim.max_statement
        )
        self.client_tls: _core.TlsServerConfig | None = None
        if config.tls is not None:
            self.client_tls = _core.TlsServerConfig(config.tls.cert, config.tls.key, config.tls.client_ca)
        self._upstream_tls: dict[str, _core.TlsClientConfig] = {}
        self._ids = itertools.count(1)
        self.sessions: dict[int, SessionInfo] = {}
        self._cancel: dict[tuple[int, int], CancelTarget] = {}
        self._cancel_by_session: dict[int, tuple[int, int]] = {}
        self._startups = 0
        self.draining = False
        self.listen_port: int | None = None
        self._stop = trio.Event()

    # -- used by the startup handler -------------------------------------------------------------

    def upstream_tls(self, conn: Connection) -> _core.TlsClientConfig:
        cfg = self._upstream_tls.get(conn.name)
        if cfg is None:
            t = conn.upstream.tls
            cfg = _core.TlsClientConfig(t.ca, t.mode == "verify-full", t.cert, t.key)
            self._upstream_tls[conn.name] = cfg
        return cfg

    def new_session_id(self) -> int:
        return next(self._ids)

    def register_session(self, info: SessionInfo, cancel: CancelTarget) -> None:
        self.sessions[info.id] = info
        key = (cancel.process_id, cancel.secret_key)
        self._cancel[key] = cancel
        self._cancel_by_session[info.id] = key
        self.observer.session_started(info)

    def forget_session(self, session: int) -> SessionInfo | None:
        key = self._cancel_by_session.pop(session, None)
        if key is not None:
            self._cancel.pop(key, None)
        return self.sessions.pop(session, None)

    async def forward_cancel(self, process_id: int, secret_key: int) -> None:
        """Sends the client's CancelRequest to the backend its session uses. Unknown or wrong keys
        are ignored silently, as PostgreSQL does."""
        target = self._cancel.get((process_id, secret_key))
        if target is None:
            log.info("cancel request with an unknown key ignored")
            return
        up = target.connection.upstream
        try:
            with trio.fail_after(up.connect_timeout):
                stream = await open_tcp(up.host, up.port)
                ch = Channel(stream)
                try:
                    if up.tls.mode != "disable":
                        await ch.send_raw(_core.ssl_request())
                        if await ch.receive_raw(1) == b"S":
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
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, _core.TlsError) as e:
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
        if self._startups + self.engine.session_count() >= self.config.limits.max_connections:
            await _refuse_now(stream, "53300", "sorry, too many clients already")
            return
        self._startups += 1
        try:
            await PostgresStartup(self, stream, peer).run()
        except Exception:
            # A bug in one connection's handling must not take the gateway down.
            log.exception("connection from %s failed unexpectedly", peer)
            with contextlib.suppress(Exception):
                await stream.aclose()
        finally:
            self._startups -= 1

    async def _listen(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        lst = self.config.listen
        listeners = await trio.open_tcp_listeners(lst.port, host=lst.host, backlog=lst.backlog)
        self.listen_port = listeners[0].socket.getsockname()[1]
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
        info = self.sessions.get(session)
        if kind == "ended":
            _, _, reason, detail, stats = ev
            gone = self.forget_session(session)
            if gone is not None:
                gone.stats = stats
                self.observer.session_ended(gone, reason, detail)
                log.info(
                    "session %d ended: %s%s (%.1f s, %d statements, %d rows)",
                    session,
                    reason,
                    f" ({detail})" if detail else "",
                    time.time() - gone.started,
                    stats["statements"],
                    stats["rows"],
                )
            return
        if info is None:
            return
        if kind == "statement":
            statement = StatementInfo(seq=ev[2], kind=ev[3], name=ev[4], text=ev[5])

            async def decide() -> None:
                try:
                    d = await self.statement_hook.decide(info, statement)
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
                self.engine.verdict(session, statement.seq, d.allow, d.code, d.message, d.remember)

            spawn(decide)
        else:
            self.observer.statement_event(info, ev)

    # -- lifecycle -------------------------------------------------------------------------------

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: shutting down", signal.Signals(signum).name)
                self.stop()
                return

    def stop(self) -> None:
        """Begins a graceful shutdown (idempotent)."""
        self.draining = True
        self._stop.set()

    async def _shutdown(self) -> None:
        await self._stop.wait()
        grace = self.config.shutdown.grace
        if self.config.shutdown.close_idle:
            self.engine.drain(None, "57P01", SHUTDOWN_MESSAGE)
        with trio.move_on_after(grace):
            while self.engine.session_count() > 0 or self._startups > 0:
                await trio.sleep(0.05)
        left = self.engine.terminate(None, "57P01", SHUTDOWN_MESSAGE)
        if left:
            log.info("ended %d session(s) still open after %g s", left, grace)
        with trio.move_on_after(5):
            while self.engine.session_count() > 0:
                await trio.sleep(0.02)

    async def run(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED, *, handle_signals: bool = True
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._events)
            if handle_signals:
                nursery.start_soon(self._signals)
            async with trio.open_nursery() as serving:
                await serving.start(self._listen)
                task_status.started()
                log.info(
                    "listening on %s:%d with %d data-path worker(s)",
                    self.config.listen.host,
                    self.listen_port,
                    self.engine.workers,
                )
                await self._shutdown()
            # Let the final "ended" events be seen, then stop the event loop.
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()


async def _refuse_now(stream: trio.SocketStream, code: str, message: str) -> None:
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(fatal(code, message))
    await stream.aclose()
