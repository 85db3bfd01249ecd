"""One documented pump for the startup phase.

Theory of operation. Until a session is handed to the engine, the control plane reads and writes
its sockets itself: a few small messages per connection (SSLRequest, StartupMessage, the password,
the upstream login). A ``Channel`` is a Trio stream plus, once TLS is started, a ``_core.TlsSession``
driven sans-IO: raw bytes read from the socket go into the TLS session, whatever TLS wants to send
(handshake flights, alerts) is written straight back, and plaintext comes out of ``receive``. The
handshake needs no call of its own: ``receive`` and ``send`` drive it. ``detach`` gives up the
socket's descriptor (and the TLS state goes with the session) so the engine can own them; after it
the channel must not be used. Reads are fixed-size; nothing here buffers more than one read.
"""

from __future__ import annotations

import socket

import trio

from ostiary import _core

READ_SIZE = 16 * 1024


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """Connects to the first address of ``host`` that accepts. Cheaper than
    ``trio.open_tcp_stream`` (no happy-eyeballs nursery per connection), which matters because the
    gateway opens an upstream connection for every client session."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address found for {host}")
    for family, type_, proto, _, addr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await sock.connect(addr)
        except OSError as e:
            sock.close()
            error = e
            continue
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    raise error


class ChannelClosed(Exception):
    """The peer closed the connection."""


class Channel:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.tls: _core.TlsSession | None = None

    def start_tls(self, tls: _core.TlsSession) -> None:
        self.tls = tls

    async def send_raw(self, data: bytes) -> None:
        """Bytes outside TLS (the one-byte answer to SSLRequest)."""
        await self.stream.send_all(data)

    async def receive_raw(self, max_bytes: int = READ_SIZE) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        if not data:
            raise ChannelClosed("the peer closed the connection")
        return data

    async def _flush_tls(self) -> None:
        assert self.tls is not None
        out = self.tls.take_raw()
        if out:
            await self.stream.send_all(out)

    async def send(self, data: bytes) -> None:
        if self.tls is None:
            await self.stream.send_all(data)
            return
        self.tls.write_plain(data)
        await self._flush_tls()

    async def receive(self) -> bytes:
        """Plaintext, at least one byte; raises ``ChannelClosed`` at EOF."""
        if self.tls is None:
            return await self.receive_raw()
        while True:
            plain, closed = self.tls.read_plain()
            if plain:
                return plain
            if closed:
                raise ChannelClosed("the peer closed its TLS session")
            await self._flush_tls()
            self.tls.receive_raw(await self.receive_raw())
            await self._flush_tls()

    async def handshake(self) -> None:
        """Completes a TLS handshake now (a client-side TLS session must speak first)."""
        assert self.tls is not None
        await self._flush_tls()
        while self.tls.handshaking:
            self.tls.receive_raw(await self.receive_raw())
            await self._flush_tls()

    def leftover_plaintext(self) -> bytes:
        """Plaintext that arrived with the last read and was not consumed yet."""
        if self.tls is None:
            return b""
        plain, _ = self.tls.read_plain()
        return plain

    def detach(self) -> int:
        """Gives up the socket's descriptor; the channel is unusable afterwards."""
        fd: int = self.stream.socket.detach()
        return fd

    async def aclose(self) -> None:
        try:
            if self.tls is not None:
                if not self.tls.handshaking:
                    self.tls.send_close_notify()
                await self._flush_tls()
        except (trio.BrokenResourceError, trio.ClosedResourceError, _core.TlsError, OSError):
            pass
        await self.stream.aclose()
