"""A small HTTP/1.1 server on Trio streams, for the admin API (no web framework, no dependency).

Rules of this file: one request per connection, answered with ``Connection: close``; nothing read
is unbounded. The head (request line and headers) is read in fixed-size chunks up to
``HttpLimits.max_head`` bytes, the body only with a ``Content-Length`` of at most
``HttpLimits.max_body`` (checked before reading it; ``Transfer-Encoding`` is refused), and the whole
request within ``HttpLimits.read_timeout`` seconds. At most ``max_connections`` connections are
served at once, and at most ``max_per_peer`` from one address (so that one client holding idle
connections open cannot lock approvers out); more are closed unanswered. What does not parse is
answered 400 (431 for an oversized head, 413 for an oversized body, 408 for a slow client) and the
connection closed; the server goes on serving others. Parsing (``parse_head``) is a pure function
over bytes; only ``HttpServer`` touches sockets. Handlers return a ``Response``; an exception in a
handler is logged and answered 500 without its text.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

log = logging.getLogger("ostiary.admin")

REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token (methods, header names)
_TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form, visible ASCII only


@dataclass(frozen=True)
class HttpLimits:
    """Bounds of one connection: the head, the body, the time to read both, and concurrency."""

    max_head: int = 8 * 1024
    max_body: int = 64 * 1024
    read_timeout: float = 10.0
    write_timeout: float = 10.0
    max_connections: int = 256
    max_per_peer: int = 16
    chunk: int = 4096


class HttpError(Exception):
    """A request that is answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "
    body: bytes = b""
    peer: str = ""

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (400 otherwise)."""
        try:
            data = json.loads(self.body or b"null")
        except ValueError:
            raise HttpError(400, "the body is not valid JSON") from None
        except RecursionError:
            # Arrays or objects nested deeper than the parser's recursion limit ("[" * 50000 fits
            # in max_body): a bad request, not a failure of the server.
            raise HttpError(400, "the body is nested too deeply") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the body must be a JSON object")
        return data

    def form(self) -> dict[str, str]:
        """An ``application/x-www-form-urlencoded`` body (each field once)."""
        try:
            pairs = urllib.parse.parse_qsl(
                self.body.decode("ascii"), keep_blank_values=True, strict_parsing=False, max_num_fields=20
            )
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "the form does not parse") from None
        out: dict[str, str] = {}
        for k, v in pairs:
            if k in out:
                raise HttpError(400, f"form field {k} appears twice")
            out[k] = v
        return out

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def wants_html(self) -> bool:
        accept = self.headers.get("accept", "")
        return "text/html" in accept and "application/json" not in accept


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def json(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
        return Response(status, json.dumps(data, indent=1).encode() + b"\n", headers=headers or {})

    @staticmethod
    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return Response.json(status, {"error": message}, headers)

    def encode(self) -> bytes:
        head = [
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
        ]
        head += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


def parse_head(head: bytes) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """Method, path (percent-decoded), query and headers of a request head (without its final
    blank line). Raises ``HttpError(400)`` for anything but a plain HTTP/1.0 or 1.1 request in
    origin form: obsolete line folding, bytes outside visible ASCII in the target, control
    characters in values and malformed names are refused, not repaired."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise HttpError(400, "malformed request line")
    if parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError(400, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line")
        value = value.strip(b" \t")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise HttpError(400, "control characters in a header value")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = parts[1].decode("ascii")
    raw_path, _, raw_query = target.partition("?")
    try:
        path = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise HttpError(400, "the path is not UTF-8") from None
    try:
        query = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True, max_num_fields=20))
    except ValueError:
        raise HttpError(400, "malformed query string") from None
    return parts[0].decode("ascii"), path, query, headers


def content_length(headers: dict[str, str], limits: HttpLimits) -> int:
    """The announced body length, checked against the limit before anything is read."""
    if "transfer-encoding" in headers:
        raise HttpError(400, "Transfer-Encoding is not supported: send a Content-Length")
    raw = headers.get("content-length")
    if raw is None:
        return 0
    if not raw.isdigit() or len(raw) > 12:
        raise HttpError(400, "malformed Content-Length")
    n = int(raw)
    if n > limits.max_body:
        raise HttpError(413, f"the body is larger than {limits.max_body} bytes")
    return n


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """Serves ``handler`` on ``host``:``port`` (0 picks a free port; ``port`` is the bound one once
    ``run`` has started), over TLS when an ``ssl_context`` is given."""

    def __init__(
        self,
        handler: Handler,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.limits = limits or HttpLimits()
        self._active = 0
        self._per_peer: dict[str, int] = {}

    async def run(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("admin API on %s:%d%s", self.host, self.port, " (TLS)" if self.ssl_context else "")
        async with trio.open_nursery() as handlers:
            await handlers.start(trio.serve_listeners, self._connection, listeners)
            task_status.started(self.port)

    async def _connection(self, tcp: trio.SocketStream) -> None:
        try:
            peer = tcp.socket.getpeername()[0]
        except OSError:
            peer = ""
        if (
            self._active >= self.limits.max_connections
            or self._per_peer.get(peer, 0) >= self.limits.max_per_peer
        ):
            await trio.aclose_forcefully(tcp)
            return
        self._active += 1
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        stream: trio.abc.Stream = tcp
        if self.ssl_context is not None:
            stream = trio.SSLStream(tcp, self.ssl_context, server_side=True, https_compatible=True)
        try:
            response = await self._respond(stream, peer)
            if response is not None:
                with trio.move_on_after(self.limits.write_timeout):
                    await stream.send_all(response.encode())
                    if response.status >= 400 and isinstance(stream, trio.SocketStream):
                        await self._linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            log.debug("admin API: connection from %s broken: %s", peer, e)
        finally:
            self._active -= 1
            left = self._per_peer.pop(peer, 1) - 1
            if left > 0:
                self._per_peer[peer] = left
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()
            if scope.cancelled_caught:
                await trio.aclose_forcefully(tcp)

    async def _linger(self, stream: trio.SocketStream) -> None:
        """After an error answer, read (and drop) what the client is still sending, a bounded
        amount for at most a second: closing with unread input would reset the connection, and
        the client could lose the answer before reading it."""
        await stream.send_eof()
        left = self.limits.max_head + self.limits.max_body
        with trio.move_on_after(1):
            while left > 0 and (chunk := await stream.receive_some(self.limits.chunk)):
                left -= len(chunk)

    async def _respond(self, stream: trio.abc.Stream, peer: str) -> Response | None:
        request: Request | None = None
        try:
            with trio.fail_after(self.limits.read_timeout):
                request = await self._read(stream, peer)
            if request is None:
                return None
        except trio.TooSlowError:
            return Response.error(408, f"the request was not received within {self.limits.read_timeout:g} s")
        except HttpError as e:
            return Response.error(e.status, e.message, e.headers)
        try:
            return await self.handler(request)
        except HttpError as e:
            return Response.error(e.status, e.message, e.headers)
        except Exception:
            log.exception("admin API: %s %s failed", request.method, request.path)
            return Response.error(500, "internal error (see the gateway's log)")

    async def _read(self, stream: trio.abc.Stream, peer: str) -> Request | None:
        """One request, or None when the peer closed before sending anything."""
        lim = self.limits
        buf = bytearray()
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > lim.max_head:
                raise HttpError(431, f"the request head is larger than {lim.max_head} bytes")
            chunk = await stream.receive_some(lim.chunk)
            if not chunk:
                if not buf:
                    return None
                raise HttpError(400, "the connection closed in the middle of the request head")
            buf += chunk
        if end > lim.max_head:
            raise HttpError(431, f"the request head is larger than {lim.max_head} bytes")
        method, path, query, headers = parse_head(bytes(buf[:end]))
        length = content_length(headers, lim)
        body = buf[end + 4 :]
        while len(body) < length:
            chunk = await stream.receive_some(min(lim.chunk, length - len(body)))
            if not chunk:
                raise HttpError(400, "the connection closed in the middle of the body")
            body += chunk
        return Request(method, path, query, headers, bytes(body[:length]), peer)


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ for the admin API's server side."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
