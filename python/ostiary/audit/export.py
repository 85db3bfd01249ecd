"""SIEM export of the audit trail: JSON lines, Splunk HEC, Elastic bulk, syslog (RFC 5424).

Theory of operation. Each configured exporter is one Trio task that follows the store by its
insertion ``id``: it reads the records after its cursor (``read_after``, in a worker thread, so it
only ever sees records already committed), delivers them in one request, and only when the
destination has acknowledged the batch does it move the cursor and write it to
``<data_dir>/audit/export-<name>.cursor`` (temporary file, fsync, rename). A failed delivery is
retried, the same batch, with exponential backoff up to ``MAX_BACKOFF`` seconds; one warning is
logged when an outage starts and one when it ends, not one per retry. While the destination is down
the backlog is simply the records after the cursor, in the store; it drains at ``batch`` records
per request when the destination returns. Nothing is skipped: a batch that keeps failing (a
destination that refuses its content) stops the exporter at that batch, loudly.

Delivery is *at least once*: a crash between the acknowledgement and the cursor's write resends
that batch, and Elastic items or syslog frames may arrive twice. Every event carries the stable id
``<writer>:<seq>`` (OCSF ``metadata.uid``, Elastic ``_id`` with ``create`` so a repeat is a 409 and
is counted as delivered, HEC indexed field ``id``, syslog structured data ``id``) so a SIEM drops
duplicates by it.

What "acknowledged" means per destination: jsonl, written, flushed and (for a file) fsync'd;
HTTP, a 2xx answer, and for Elastic no item error other than 409 (the items that failed are resent,
alone); syslog over TCP or TLS has no application acknowledgement: a frame is taken once written,
and each frame is also kept for ``SyslogExporter.resend_window`` seconds, and sent again on the new
connection if the old one is found closed (the receiver went away with what it had buffered).

Blocking I/O (the store, files, urllib, sockets) runs in worker threads, one call at a time per
exporter. Only the standard library talks to the destinations.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import datetime as dt
import fcntl
import http.client
import json
import logging
import os
import select
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import msgspec
import trio

from ostiary.audit.ocsf import event_id, to_ocsf
from ostiary.audit.records import Sealed
from ostiary.audit.store import AuditStore, StoreError

if TYPE_CHECKING:
    from ostiary.config import AuditExporter, Config

log = logging.getLogger("ostiary.audit.export")

MAX_BACKOFF = 30.0
T = TypeVar("T")


class DeliveryError(Exception):
    """The destination did not take a batch (unreachable, refused, or answered with an error)."""


class PartialDelivery(DeliveryError):
    """The destination took part of a batch; ``remaining`` must be sent again."""

    def __init__(self, message: str, remaining: list[Sealed]) -> None:
        super().__init__(message)
        self.remaining = remaining


class Cursor:
    """The id of the last record the destination acknowledged, with the store it belongs to (a
    cursor of another store is not trusted: export starts over, duplicates are dropped downstream).
    Held under an exclusive lock so two processes never run the same exporter."""

    def __init__(self, path: Path, store: str) -> None:
        self.path = path
        self.store = store
        self._lock: IO[str] | None = None

    def lock(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path.with_suffix(".lock"), "a")  # noqa: SIM115 - held while exporting
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._lock = f
        return True

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def load(self) -> int:
        try:
            saved = json.loads(self.path.read_text())
            after, store = int(saved["after"]), str(saved["store"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("audit export cursor %s is unreadable (%s): exporting from the start", self.path, e)
            return 0
        if store != self.store:
            log.warning(
                "audit export cursor %s belongs to %s, not %s: exporting from the start",
                self.path,
                store,
                self.store,
            )
            return 0
        return after

    def save(self, after: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"after": after, "store": self.store}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cursor_path(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / "audit" / f"export-{name}.cursor"


class Exporter:
    """The loop shared by every destination. Subclasses implement ``deliver`` (blocking, in a
    worker thread: returns when the destination acknowledged the whole batch, else raises
    ``DeliveryError``), and may implement ``idle`` and ``close``."""

    max_backoff = MAX_BACKOFF

    def __init__(self, spec: AuditExporter, store: AuditStore, cursor: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.store = store
        self.cursor = Cursor(cursor, store.description)
        self.after = -1  # loaded when the exporter starts
        self.kinds = set(spec.kinds) if spec.kinds is not None else None
        self.delivered = 0
        self._min_backoff = min(1.0, spec.interval)
        self._backoff = self._min_backoff
        self._down: str | None = None
        self._failures = 0

    # -- what subclasses provide (blocking) ------------------------------------------------------

    def destination(self) -> str:
        raise NotImplementedError

    def deliver(self, batch: list[Sealed]) -> None:
        raise NotImplementedError

    def idle(self) -> None:
        """Called when there is nothing new to send (syslog checks its connection here)."""

    def close(self) -> None:
        """Releases connections; the exporter may be run again after."""

    def event(self, r: Sealed) -> dict[str, Any]:
        return to_ocsf(r) if self.spec.format == "ocsf" else r.as_dict()

    # -- the loop ----------------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Exports forever (the gateway's task; cancelled at shutdown)."""
        if not await self._start():
            task_status.started()
            return
        task_status.started()
        try:
            while True:
                if not await self.step():
                    await self._retry(self.idle)
                    await trio.sleep(self.spec.interval)
        finally:
            self._stop()

    async def drain(self) -> int:
        """Exports the backlog and returns the number of records read (``audit export --once``).
        Retries while the destination is down, like ``run``."""
        if not await self._start():
            return 0
        total = 0
        try:
            while n := await self.step():
                total += n
        finally:
            self._stop()
        return total

    async def step(self) -> int:
        """Reads the batch after the cursor, delivers it until acknowledged and moves the cursor.
        Returns the number of records read (0 when there is nothing new)."""
        rows = await self._retry(self.store.read_after, self.after, self.spec.batch)
        if not rows:
            return 0
        wanted = [r for r in rows if self.kinds is None or r.kind in self.kinds]
        todo = wanted

        def attempt() -> None:
            nonlocal todo
            try:
                self.deliver(todo)
            except PartialDelivery as e:
                todo = e.remaining
                raise

        if todo:
            await self._retry(attempt)
        self.delivered += len(wanted)
        await self._retry(self.cursor.save, rows[-1].id)
        self.after = rows[-1].id
        return len(rows)

    async def _start(self) -> bool:
        if not await trio.to_thread.run_sync(self.cursor.lock):
            log.error(
                "audit export %s: another process runs this exporter (%s is locked); not starting",
                self.name,
                self.cursor.path,
            )
            return False
        self.after = await trio.to_thread.run_sync(self.cursor.load)
        log.info("audit export %s: to %s after record %d", self.name, self.destination(), self.after)
        return True

    def _stop(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        self.cursor.unlock()

    async def _retry(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn`` in a worker thread until it succeeds, backing off between attempts. Any
        exception counts as a failure: a bug must neither stop the gateway nor skip records."""
        while True:
            try:
                result = await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
            except (DeliveryError, StoreError, OSError) as e:
                self._failed(str(e) or type(e).__name__, exc=False)
            except Exception as e:
                self._failed(f"{type(e).__name__}: {e}", exc=True)
            else:
                self._succeeded()
                return result
            await trio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, self.max_backoff)

    def _failed(self, why: str, exc: bool) -> None:
        self._failures += 1
        if self._down is None:
            self._down = why
            log.warning(
                "audit export %s: %s: %s; the backlog is kept and retried",
                self.name,
                self.destination(),
                why,
                exc_info=exc,
            )
        else:
            log.debug("audit export %s: still failing: %s", self.name, why)

    def _succeeded(self) -> None:
        if self._down is not None:
            log.warning(
                "audit export %s: %s is taking records again after %d failed attempt(s)",
                self.name,
                self.destination(),
                self._failures,
            )
        self._down = None
        self._failures = 0
        self._backoff = self._min_backoff


def _json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


class JsonLinesExporter(Exporter):
    """One JSON object per line, appended to a file (reopened per batch, so log rotation by
    renaming works) or written to stdout."""

    def destination(self) -> str:
        return "stdout" if self.spec.path == "-" else f"file {self.spec.path}"

    def deliver(self, batch: list[Sealed]) -> None:
        data = b"".join(_json(self.event(r)) + b"\n" for r in batch)
        if self.spec.path == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        path = Path(self.spec.path or "")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab+") as f:
            # A line torn by a crash is ended first, so the batch resent after it starts a new line.
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST would become a GET without a body whose 2xx is no acknowledgement."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _secret_from(env: str | None, file: str | None) -> str:
    """Read at each delivery, so a rotated token needs no restart."""
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise DeliveryError(f"environment variable {env} is not set")
        return value
    if file is not None:
        try:
            return Path(file).read_text().strip()
        except OSError as e:
            raise DeliveryError(f"cannot read {file}: {e.strerror}") from None
    raise DeliveryError("no secret configured")


class HttpExporter(Exporter):
    """POSTs with urllib in the worker thread; ``ca`` verifies the server."""

    max_answer = 16 * 1024 * 1024

    def __init__(self, spec: AuditExporter, store: AuditStore, cursor: Path) -> None:
        super().__init__(spec, store, cursor)
        ctx = ssl.create_default_context(cafile=spec.ca)
        self._opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=ctx))

    def destination(self) -> str:
        return str(self.spec.url)

    def post(self, url: str, body: bytes, content_type: str, authorization: str | None) -> bytes:
        headers = {"Content-Type": content_type, "User-Agent": "ostiary-audit-export"}
        if authorization is not None:
            headers["Authorization"] = authorization
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.spec.timeout) as resp:
                answer: bytes = resp.read(self.max_answer)
                return answer
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace").strip()
            e.close()
            raise DeliveryError(f"HTTP {e.code} {e.reason}: {detail}") from None
        except urllib.error.URLError as e:
            raise DeliveryError(str(e.reason)) from None
        except (OSError, http.client.HTTPException) as e:
            raise DeliveryError(f"{type(e).__name__}: {e}") from None


class SplunkHecExporter(HttpExporter):
    """Splunk HTTP Event Collector: one request per batch, the events concatenated. 200 (and code
    0) is the acknowledgement; indexer acknowledgement (``useACK``) is not polled."""

    def __init__(self, spec: AuditExporter, store: AuditStore, cursor: Path) -> None:
        super().__init__(spec, store, cursor)
        self._host = socket.gethostname()

    def hec_event(self, r: Sealed) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "time": f"{r.ts // 1_000_000}.{r.ts % 1_000_000:06d}",
            "host": self._host,
            "source": "ostiary",
            "sourcetype": "ocsf" if self.spec.format == "ocsf" else "ostiary:audit",
            "event": self.event(r),
            "fields": {"id": event_id(r)},
        }
        if self.spec.index:
            ev["index"] = self.spec.index
        return ev

    def deliver(self, batch: list[Sealed]) -> None:
        token = _secret_from(self.spec.token_env, self.spec.token_file)
        body = b"".join(_json(self.hec_event(r)) for r in batch)
        answer = self.post(str(self.spec.url), body, "application/json", f"Splunk {token}")
        with contextlib.suppress(ValueError):
            parsed = json.loads(answer or b"{}")
            if isinstance(parsed, dict) and parsed.get("code", 0) != 0:
                raise DeliveryError(f"HEC answered code {parsed.get('code')}: {parsed.get('text')}")


class ElasticExporter(HttpExporter):
    """Elasticsearch (or OpenSearch) ``_bulk`` with ``create`` actions keyed by the stable id: a
    record indexed before is a 409, counted as delivered. Items that failed otherwise are resent."""

    def __init__(self, spec: AuditExporter, store: AuditStore, cursor: Path) -> None:
        super().__init__(spec, store, cursor)
        self.index = spec.index or "ostiary-audit"
        self.bulk_url = str(spec.url).rstrip("/") + "/_bulk"

    def destination(self) -> str:
        return f"{self.bulk_url} (index {self.index})"

    def _authorization(self) -> str | None:
        s = self.spec
        if s.token_env is not None or s.token_file is not None:
            return "ApiKey " + _secret_from(s.token_env, s.token_file)
        if s.username is not None:
            password = _secret_from(s.password_env, s.password_file)
            return "Basic " + base64.b64encode(f"{s.username}:{password}".encode()).decode()
        return None

    def document(self, r: Sealed) -> dict[str, Any]:
        doc = self.event(r)
        doc["@timestamp"] = (
            dt.datetime.fromtimestamp(r.ts / 1_000_000, dt.UTC).isoformat(timespec="microseconds")
        ).replace("+00:00", "Z")
        return doc

    def deliver(self, batch: list[Sealed]) -> None:
        lines = []
        for r in batch:
            lines.append(_json({"create": {"_index": self.index, "_id": event_id(r)}}))
            lines.append(_json(self.document(r)))
        body = b"\n".join(lines) + b"\n"
        answer = self.post(self.bulk_url, body, "application/x-ndjson", self._authorization())
        try:
            parsed = json.loads(answer)
            items = parsed["items"]
            errors = bool(parsed.get("errors"))
        except (ValueError, KeyError, TypeError):
            raise DeliveryError("the _bulk answer is not a bulk response") from None
        if not errors:
            return
        if not isinstance(items, list) or len(items) != len(batch):
            raise DeliveryError("the _bulk answer does not have one item per record")
        remaining = []
        first = ""
        for r, item in zip(batch, items, strict=True):
            result: dict[str, Any] = next(iter(item.values()), {}) if isinstance(item, dict) else {}
            status = int(result.get("status", 0))
            if 200 <= status < 300 or status == 409:
                continue
            remaining.append(r)
            if not first:
                err = result.get("error") or {}
                first = f"{status} {err.get('type', '')}: {err.get('reason', '')}".strip()
        if remaining:
            raise PartialDelivery(f"{len(remaining)} of {len(batch)} item(s) refused ({first})", remaining)


SYSLOG_FACILITY = 13  # "log audit" (RFC 5424 section 6.2.1)
SD_ID = "ostiary@32473"  # 32473: the enterprise number reserved for documentation (RFC 5612)


def _sd_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _printable(value: str, limit: int) -> str:
    out = "".join(c if 33 <= ord(c) <= 126 else "_" for c in value)[:limit]
    return out or "-"


class SyslogExporter(Exporter):
    """RFC 5424 messages, octet-counted (RFC 6587), over one TCP or TLS connection kept open and
    reopened after an error. TCP has no application acknowledgement, so before each write the
    connection is checked (a receiver that went away shows as end-of-file or a reset), and what was
    written in the last ``resend_window`` seconds is kept and written again on a new connection."""

    resend_window = 2.0
    max_kept = 20_000

    def __init__(self, spec: AuditExporter, store: AuditStore, cursor: Path) -> None:
        super().__init__(spec, store, cursor)
        self.port = spec.port or (6514 if spec.transport == "tls" else 514)
        self._ctx: ssl.SSLContext | None = None
        if spec.transport == "tls":
            self._ctx = ssl.create_default_context(cafile=spec.ca)
        self._sock: socket.socket | None = None
        self._kept: collections.deque[tuple[float, list[Sealed]]] = collections.deque()
        self._hostname = _printable(socket.gethostname(), 255)

    def destination(self) -> str:
        return f"syslog {self.spec.transport}://{self.spec.host}:{self.port}"

    def frame(self, r: Sealed) -> bytes:
        """One message, with its octet count."""
        stamp = dt.datetime.fromtimestamp(r.ts / 1_000_000, dt.UTC).isoformat(timespec="microseconds")
        severity = 4 if r.verdict in ("deny", "rejected") else 6  # warning, informational
        sd = (
            f'[{SD_ID} id="{_sd_value(event_id(r))}" kind="{_sd_value(r.kind)}" '
            f'verdict="{_sd_value(r.verdict)}" identity="{_sd_value(r.identity)}" '
            f'session="{_sd_value(r.session)}"]'
        )
        head = (
            f"<{SYSLOG_FACILITY * 8 + severity}>1 {stamp.replace('+00:00', 'Z')} {self._hostname} "
            f"ostiary - {_printable(r.kind, 32)} {sd} "
        )
        msg = head.encode() + b"\xef\xbb\xbf" + _json(self.event(r))
        return str(len(msg)).encode() + b" " + msg

    def _connect(self) -> socket.socket:
        host = str(self.spec.host)
        sock = socket.create_connection((host, self.port), timeout=self.spec.timeout)
        if self._ctx is None:
            return sock
        try:
            return self._ctx.wrap_socket(sock, server_hostname=self.spec.server_name or host)
        except BaseException:
            sock.close()
            raise

    def _alive(self, sock: socket.socket) -> bool:
        """False when the receiver closed or reset the connection. A syslog receiver sends nothing,
        so a readable socket means end-of-file (or TLS records such as session tickets, read here)."""
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True
        sock.setblocking(False)
        try:
            return all(sock.recv(4096) for _ in range(16))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(self.spec.timeout)

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def deliver(self, batch: list[Sealed]) -> None:
        now = time.monotonic()
        if self._sock is not None and not self._alive(self._sock):
            self._drop()
        resend: list[Sealed] = []
        if self._sock is None:
            resend = [r for _, rows in self._kept for r in rows]
            if not resend and not batch:
                return
            try:
                self._sock = self._connect()
            except (OSError, ssl.SSLError) as e:
                raise DeliveryError(f"cannot connect: {e}") from None
            self._kept.clear()
            if resend:
                self._kept.append((now, resend))
        else:
            while self._kept and now - self._kept[0][0] > self.resend_window:
                self._kept.popleft()
        data = b"".join(self.frame(r) for r in [*resend, *batch])
        try:
            self._sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            self._drop()
            raise DeliveryError(f"write failed: {e}") from None
        if batch:
            self._kept.append((now, batch))
        while sum(len(rows) for _, rows in self._kept) > self.max_kept and len(self._kept) > 1:
            self._kept.popleft()

    def idle(self) -> None:
        if self._kept:
            self.deliver([])

    def close(self) -> None:
        self._drop()


EXPORTERS: dict[str, type[Exporter]] = {
    "jsonl": JsonLinesExporter,
    "splunk_hec": SplunkHecExporter,
    "elastic": ElasticExporter,
    "syslog": SyslogExporter,
}


def build_exporters(config: Config, store: AuditStore, names: Sequence[str] | None = None) -> list[Exporter]:
    """The configured exporters (or those named), reading ``store``."""
    out = []
    for spec in config.audit.exporters:
        if names is None or spec.name in names:
            out.append(EXPORTERS[spec.kind](spec, store, cursor_path(config.data_dir, spec.name)))
    return out


# -- ostiary audit export ---------------------------------------------------------------------------


def _export_command(args: argparse.Namespace) -> int:
    from ostiary.audit.log import open_store
    from ostiary.cli import _load_or_exit, _setup_logging

    cfg = _load_or_exit(args.config)
    _setup_logging(args.log_level)
    names = args.name or None
    exporters_known = {e.name for e in cfg.audit.exporters}
    unknown = [n for n in names or () if n not in exporters_known]
    if unknown or not exporters_known:
        which = ", ".join(sorted(exporters_known)) or "none"
        print(
            f"ostiary audit export: no exporter {', '.join(unknown)} (configured: {which})", file=sys.stderr
        )
        return 2
    try:
        store = open_store(cfg)
    except StoreError as e:
        print(f"ostiary audit export: {e}", file=sys.stderr)
        return 1
    exporters = build_exporters(cfg, store, names)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for exp in exporters:
                nursery.start_soon(exp.drain if args.once else exp.run)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        return 130
    finally:
        store.close()
    for exp in exporters:
        print(f"{exp.name}: {exp.delivered} record(s) delivered, cursor at {exp.after}", file=sys.stderr)
    return 0


def add_export_parser(audit_sub: Any) -> None:
    """``ostiary audit export``: runs the configured exporters without a gateway (``--once``:
    deliver the backlog, then exit)."""
    p = audit_sub.add_parser("export", help="send the audit trail to the configured SIEM exporters")
    p.add_argument("--config", "-c", required=True, help="the YAML configuration file")
    p.add_argument("--name", action="append", metavar="NAME", help="only this exporter (repeatable)")
    p.add_argument("--once", action="store_true", help="deliver the backlog, then exit")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_export_command)
