"""Session recordings in an S3-compatible object store: a small client and the uploader.

Rules of this module. Only the standard library talks to the store: ``urllib.request`` for HTTP(S)
and AWS Signature Version 4 (``signature_v4``) made with ``hmac``/``hashlib``. ``ObjectStoreClient``
is blocking: the gateway calls it in worker threads (``trio.to_thread``), the CLI directly. Every
failure becomes an ``ObjectStoreError`` naming the bucket, the key, the HTTP status and the store's
error code; the secret key is read at each request (from its environment variable or file, so a
rotation needs no restart) and never appears in a message, a log line or a ``repr``.

Theory of operation of the upload. A recording is uploaded only once its session has ended (its
file has a trailer and is no longer written). The queue is the data directory itself: a closed
recording without a ``.uploaded`` marker next to it is still to upload. ``LiveRecordings`` tells the
``Uploader`` of each file it closes; at start the uploader also queues every such file already
there (a restart, or an outage that outlived the last run), and files a crash left without a
trailer once no process writes them (a writer holds an ``flock`` on its file while open). One file
at a time is sent, with exponential backoff between failed attempts; a warning is logged when an
outage starts and when it ends. After the store has taken the file (a 2xx to a PUT whose body S3
checked against ``x-amz-content-sha256``) the local file is deleted, or kept with the marker
``<file>.uploaded`` when ``keep_local`` is set. So a gateway restart or an object store outage loses
nothing: the files wait on disk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import http.client
import logging
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec
import trio

from ostiary.errors import ObjectStoreError, RecordingError
from ostiary.recording.store import RecordingInfo, check_session_ref, info_from_ends

if TYPE_CHECKING:
    from ostiary.config import ObjectStore

log = logging.getLogger("ostiary.recording")

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UPLOADED_SUFFIX = ".uploaded"
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_CHUNK = 1024 * 1024
# An error body (XML) or a listing page larger than this is not one S3 sends.
MAX_ANSWER = 16 * 1024 * 1024


# -- AWS Signature Version 4 ------------------------------------------------------------------------


def uri_encode(text: str, *, keep_slash: bool) -> str:
    """SigV4's URI encoding: every byte but ``A-Za-z0-9-_.~`` as ``%XX`` (and ``/`` too unless
    ``keep_slash``: object keys in paths keep theirs, query values do not)."""
    return urllib.parse.quote(text, safe="/~" if keep_slash else "~")


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def canonical_request(
    method: str, path: str, query: Sequence[tuple[str, str]], headers: dict[str, str], payload_hash: str
) -> tuple[str, str]:
    """The canonical request of SigV4 and its signed header names. ``path`` is already URI-encoded;
    ``headers`` are exactly the headers to sign (all sent as given)."""
    canonical_query = "&".join(
        f"{uri_encode(k, keep_slash=False)}={uri_encode(v, keep_slash=False)}" for k, v in sorted(query)
    )
    lowered = sorted((k.lower().strip(), " ".join(v.split())) for k, v in headers.items())
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in lowered)
    signed = ";".join(k for k, _ in lowered)
    return "\n".join([method, path, canonical_query, canonical_headers, signed, payload_hash]), signed


def signature_v4(
    *,
    method: str,
    path: str,
    query: Sequence[tuple[str, str]],
    headers: dict[str, str],
    payload_hash: str,
    access_key: str,
    secret_key: str,
    region: str,
    service: str,
    amz_date: str,
) -> str:
    """The ``Authorization`` header of a request signed with AWS Signature Version 4. ``amz_date``
    is the request's ``x-amz-date`` (``YYYYMMDDTHHMMSSZ``), which ``headers`` must also carry."""
    request, signed = canonical_request(method, path, query, headers, payload_hash)
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
    key = signing_key(secret_key, amz_date[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"


# -- the client -------------------------------------------------------------------------------------


def _secret_from(env: str | None, file: str | None, what: str) -> str:
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise ObjectStoreError(f"object store {what}: environment variable {env} is not set")
        return value
    if file is not None:
        try:
            return Path(file).read_text().strip()
        except OSError as e:
            raise ObjectStoreError(f"object store {what}: cannot read {file}: {e.strerror}") from None
    raise ObjectStoreError(f"object store: no {what} configured")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect from S3 means a wrong endpoint or region: an error to report, not to follow with
    a signature made for another host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class ObjectInfo(msgspec.Struct, frozen=True):
    key: str
    size: int
    etag: str = ""


class ObjectStoreClient:
    """A bucket of an S3-compatible store: ``put``/``put_file``, ``get`` (optionally a byte range),
    ``head``, ``list`` (ListObjectsV2, following continuation tokens) and ``create_bucket``.
    Blocking: call it from a worker thread in the gateway. ``credentials`` returns (access key,
    secret key) and is called for each request."""

    def __init__(
        self,
        url: str,
        bucket: str,
        credentials: Callable[[], tuple[str, str]],
        *,
        region: str = "us-east-1",
        ca: str | None = None,
        path_style: bool = True,
        timeout: float = 30.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        self.scheme = parts.scheme
        self.netloc = parts.netloc
        self.endpoint = f"{parts.scheme}://{parts.netloc}"
        self.bucket = bucket
        self.region = region
        self.path_style = path_style
        self.timeout = timeout
        self._credentials = credentials
        handlers: list[Any] = [_NoRedirect]
        if parts.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)))
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_config(cls, spec: ObjectStore) -> ObjectStoreClient:
        def credentials() -> tuple[str, str]:
            return (
                _secret_from(spec.access_key_env, spec.access_key_file, "access key"),
                _secret_from(spec.secret_key_env, spec.secret_key_file, "secret key"),
            )

        return cls(
            spec.url,
            spec.bucket,
            credentials,
            region=spec.region,
            ca=spec.ca,
            path_style=spec.path_style,
            timeout=spec.timeout,
        )

    def __repr__(self) -> str:
        return f"ObjectStoreClient({self.endpoint!r}, bucket={self.bucket!r}, region={self.region!r})"

    def url_of(self, key: str) -> str:
        """How the audit trail and the CLI name an object: ``s3://<bucket>/<key>``."""
        return f"s3://{self.bucket}/{key}"

    # -- operations --

    def put(self, key: str, data: bytes) -> None:
        self._request("PUT", key, body=data, payload_hash=hashlib.sha256(data).hexdigest())

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Uploads a file in one PUT, streamed from disk (read twice: once to hash it)."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            size = f.tell()
            f.seek(0)
            self._request("PUT", key, body=f, size=size, payload_hash=digest.hexdigest())

    def get(self, key: str, byte_range: tuple[int, int | None] | None = None) -> bytes:
        """The object's bytes; ``byte_range`` (first, last or None for the end) asks for part of
        them, and ``(-n, None)`` for the last n bytes."""
        headers = {}
        if byte_range is not None:
            first, last = byte_range
            headers["range"] = (
                f"bytes={first}" if first < 0 else f"bytes={first}-{'' if last is None else last}"
            )
        _, _, body = self._request("GET", key, headers=headers, limit=None)
        return body

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of the object, or None when there is none."""
        try:
            _, headers, _ = self._request("HEAD", key)
        except ObjectStoreError as e:
            if e.status == 404:
                return None
            raise
        return ObjectInfo(key, int(headers.get("Content-Length", "0")), headers.get("ETag", "").strip('"'))

    def list(self, prefix: str = "", *, max_keys: int = 1000) -> list[str]:
        """Every key under ``prefix``, in the store's (UTF-8 binary) order, page by page."""
        keys: list[str] = []
        token: str | None = None
        while True:
            query = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(max_keys))]
            if token is not None:
                query.append(("continuation-token", token))
            _, _, body = self._request("GET", "", query=query)
            try:
                root = ET.fromstring(body)
            except ET.ParseError as e:
                raise ObjectStoreError(self._where("GET", "", f"the listing is not XML: {e}")) from None
            for item in root.iter(f"{_S3_NS}Contents"):
                key = item.findtext(f"{_S3_NS}Key")
                if key is not None:
                    keys.append(key)
            truncated = root.findtext(f"{_S3_NS}IsTruncated") == "true"
            token = root.findtext(f"{_S3_NS}NextContinuationToken")
            if not truncated or not token:
                return keys

    def create_bucket(self) -> None:
        """Creates the bucket (outside us-east-1 with its LocationConstraint); one that this
        account already owns is fine."""
        body = b""
        if self.region != "us-east-1":
            body = (
                '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<LocationConstraint>{self.region}</LocationConstraint></CreateBucketConfiguration>"
            ).encode()
        try:
            self._request("PUT", None, body=body, payload_hash=hashlib.sha256(body).hexdigest())
        except ObjectStoreError as e:
            if e.code != "BucketAlreadyOwnedByYou":
                raise

    # -- requests --

    def _where(self, method: str, key: str | None, what: str) -> str:
        target = f"bucket {self.bucket}" + (f" key {key}" if key else "")
        return f"object store {self.endpoint} {target}: {method} failed: {what}"

    def _target(self, key: str | None) -> tuple[str, str]:
        """(host, canonical path) of ``key`` (None: the bucket itself)."""
        encoded = "" if key is None else uri_encode(key, keep_slash=True)
        if self.path_style:
            return self.netloc, f"/{self.bucket}" + ("" if key is None else f"/{encoded}")
        return f"{self.bucket}.{self.netloc}", f"/{encoded}"

    def _request(
        self,
        method: str,
        key: str | None,
        *,
        query: Sequence[tuple[str, str]] = (),
        headers: dict[str, str] | None = None,
        body: bytes | IO[bytes] | None = None,
        size: int | None = None,
        payload_hash: str = EMPTY_SHA256,
        limit: int | None = MAX_ANSWER,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        host, path = self._target(key)
        amz_date = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        signed = {
            "host": host,
            "x-amz-content-sha256": payload_hash,
            "x-amz-date": amz_date,
            **(headers or {}),
        }
        access_key, secret_key = self._credentials()
        authorization = signature_v4(
            method=method,
            path=path,
            query=query,
            headers=signed,
            payload_hash=payload_hash,
            access_key=access_key,
            secret_key=secret_key,
            region=self.region,
            service="s3",
            amz_date=amz_date,
        )
        qs = "&".join(
            f"{uri_encode(k, keep_slash=False)}={uri_encode(v, keep_slash=False)}" for k, v in query
        )
        url = f"{self.scheme}://{host}{path}" + (f"?{qs}" if qs else "")
        all_headers = {**signed, "Authorization": authorization, "User-Agent": "ostiary-recordings"}
        if body is not None:
            all_headers["Content-Type"] = "application/octet-stream"
            all_headers["Content-Length"] = str(len(body) if isinstance(body, bytes) else size)
        req = urllib.request.Request(url, data=body, headers=all_headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                data: bytes = resp.read() if limit is None else resp.read(limit)
                return resp.status, resp.headers, data
        except urllib.error.HTTPError as e:
            raw = b"" if method == "HEAD" else e.read(64 * 1024)
            e.close()
            code, message = _error_of(raw)
            what = (
                f"HTTP {e.code}"
                + (f" {code}" if code else f" {e.reason}")
                + (f": {message}" if message else "")
            )
            raise ObjectStoreError(self._where(method, key, what), e.code, code) from None
        except urllib.error.URLError as e:
            raise ObjectStoreError(self._where(method, key, str(e.reason))) from None
        except (OSError, http.client.HTTPException) as e:
            raise ObjectStoreError(self._where(method, key, f"{type(e).__name__}: {e}")) from None


def _error_of(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 error document; only those two: other elements (StringToSign,
    CanonicalRequest) are not needed to act on the error."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    return (root.findtext("Code") or "").strip(), (root.findtext("Message") or "").strip()[:300]


# -- reading recordings back (the CLI) --------------------------------------------------------------

HEAD_BYTES = 64 * 1024
TAIL_BYTES = 1024


def remote_info(client: ObjectStoreClient, key: str) -> RecordingInfo:
    """Header and trailer of a recording in the store, from ranged GETs of its first and last
    bytes (never the whole object unless its header is unusually long)."""
    where = client.url_of(key)
    head = client.get(key, (0, HEAD_BYTES - 1))
    try:
        return info_from_ends(head, client.get(key, (-TAIL_BYTES, None)), where)
    except RecordingError:
        if len(head) < HEAD_BYTES:
            raise
    whole = client.get(key)
    return info_from_ends(whole, whole, where)


def _day_of(key: str, prefix: str) -> str:
    return key[len(prefix) :].split("/", 1)[0]


def list_remote(
    client: ObjectStoreClient,
    prefix: str,
    *,
    since: dt.datetime | None = None,
    identity: str | None = None,
    limit: int = 100,
    skip: set[str] | frozenset[str] = frozenset(),
) -> list[RecordingInfo]:
    """Recordings in the store like ``list_recordings``, newest first; ``skip`` holds session refs
    already listed (local copies). Headers are read day by day, newest day first, until ``limit``
    recordings are found (keys name the day; the order inside a day needs the headers)."""
    since_utc = None if since is None else since if since.tzinfo else since.replace(tzinfo=dt.UTC)
    first_day = "" if since_utc is None else since_utc.astimezone(dt.UTC).strftime("%Y-%m-%d")
    by_day: dict[str, list[str]] = {}
    for key in client.list(prefix):
        name = key.rsplit("/", 1)[-1]
        if name.endswith(".rec") and name[: -len(".rec")] not in skip and _day_of(key, prefix) >= first_day:
            by_day.setdefault(_day_of(key, prefix), []).append(key)
    out: list[RecordingInfo] = []
    for day in sorted(by_day, reverse=True):
        if len(out) >= limit:
            break
        with ThreadPoolExecutor(max_workers=8) as pool:
            infos = list(pool.map(lambda k: _try_info(client, k), by_day[day]))
        for info in infos:
            if info is None:
                continue
            if since_utc is not None and info.header.started < since_utc:
                continue
            if identity is not None and info.header.identity != identity:
                continue
            out.append(info)
    out.sort(key=lambda i: i.header.started, reverse=True)
    return out[:limit]


def _try_info(client: ObjectStoreClient, key: str) -> RecordingInfo | None:
    """None for an object that is not a readable recording (or was deleted since the listing);
    other store errors (credentials, outage) are raised."""
    try:
        return remote_info(client, key)
    except RecordingError as e:
        log.warning("skipping %s: %s", client.url_of(key), e)
    except ObjectStoreError as e:
        if e.status not in (404, 416):
            raise
        log.warning("skipping %s: %s", client.url_of(key), e)
    return None


def find_remote(client: ObjectStoreClient, prefix: str, session_ref: str) -> str:
    """The key of ``session_ref``'s recording (an ``s3://bucket/key`` URL is taken as it is)."""
    if session_ref.startswith("s3://"):
        bucket, _, key = session_ref[len("s3://") :].partition("/")
        if bucket != client.bucket or not key:
            raise ObjectStoreError(f"{session_ref} is not in the configured bucket {client.bucket}")
        return key
    check_session_ref(session_ref)
    matches = sorted(k for k in client.list(prefix) if k.endswith(f"/{session_ref}.rec"))
    if not matches:
        raise ObjectStoreError(f"no recording {session_ref!r} in {client.url_of(prefix)}")
    return matches[-1]


# -- the uploader -----------------------------------------------------------------------------------


def object_key(prefix: str, path: Path) -> str:
    """``<prefix><day>/<session_ref>.rec`` for the local ``<data_dir>/recordings/<day>/<ref>.rec``."""
    return f"{prefix}{path.parent.name}/{path.name}"


def marker_of(path: Path) -> Path:
    return path.with_name(path.name + UPLOADED_SUFFIX)


def _is_being_written(path: Path) -> bool:
    """True while a ``RecordingWriter`` (of any process) holds the file's lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def pending_recordings(data_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Local recordings still to upload: no marker, not being written (closed, or cut by a crash),
    oldest day first."""
    root = Path(data_dir) / "recordings"
    if not root.is_dir():
        return
    for day in sorted(root.iterdir()):
        if not day.is_dir():
            continue
        for file in sorted(day.glob("*.rec")):
            if not marker_of(file).exists() and not _is_being_written(file):
                yield file


class Uploader:
    """Uploads ended sessions' recordings (see the module's theory of operation). ``closed(path)``
    queues a file; ``run`` is the gateway's task; ``flush`` makes one last pass at shutdown."""

    min_backoff = 1.0
    max_backoff = 60.0

    def __init__(
        self, data_dir: str | os.PathLike[str], client: ObjectStoreClient, prefix: str, keep_local: bool
    ) -> None:
        self.data_dir = Path(data_dir)
        self.client = client
        self.prefix = prefix
        self.keep_local = keep_local
        self.uploaded = 0
        self._queue: deque[Path] = deque()
        self._queued: set[Path] = set()
        self._wake = trio.Event()
        self._down: str | None = None
        self._failures = 0

    def url_for(self, path: Path) -> str:
        return self.client.url_of(object_key(self.prefix, path))

    def closed(self, path: Path) -> None:
        """Queues a recording its writer has just closed."""
        if path not in self._queued:
            self._queued.add(path)
            self._queue.append(path)
            self._wake.set()

    def upload(self, path: Path) -> bool:
        """Uploads one file (blocking). False when the file is gone or unreadable (nothing to
        retry); raises ``ObjectStoreError`` when the store did not take it."""
        key = object_key(self.prefix, path)
        try:
            self.client.put_file(key, path)
        except FileNotFoundError:
            return False
        if self.keep_local:
            marker_of(path).write_text(self.client.url_of(key) + "\n")
        else:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # the day's directory, once empty
        return True

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Queues what earlier runs left, then uploads forever (cancelled at shutdown)."""
        left = await trio.to_thread.run_sync(lambda: list(pending_recordings(self.data_dir)))
        for path in left:
            self.closed(path)
        if left:
            log.info("recordings: %d recording(s) left by an earlier run to upload", len(left))
        task_status.started()
        backoff = self.min_backoff
        while True:
            if not self._queue:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            path = self._queue[0]
            try:
                await trio.to_thread.run_sync(self.upload, path, abandon_on_cancel=True)
            except ObjectStoreError as e:
                self._failed(str(e))
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            except OSError as e:
                log.error("recording %s: cannot read it for upload: %s; it stays local", path, e)
            else:
                self._succeeded()
                backoff = self.min_backoff
            self._queue.popleft()
            self._queued.discard(path)

    async def flush(self, timeout: float) -> None:
        """One attempt per queued file, for at most ``timeout`` seconds (at shutdown: what is left
        is uploaded by the next run)."""
        with trio.move_on_after(timeout):
            for path in list(self._queue):
                try:
                    await trio.to_thread.run_sync(self.upload, path, abandon_on_cancel=True)
                except (ObjectStoreError, OSError) as e:
                    log.warning("recordings: %s stays local for the next run: %s", path, e)
                    return
                self._queue.remove(path)
                self._queued.discard(path)
        if self._queue:
            log.warning("recordings: %d recording(s) left local for the next run", len(self._queue))

    def _failed(self, why: str) -> None:
        self._failures += 1
        if self._down is None:
            self._down = why
            log.warning("recordings: upload failed: %s; the files stay local and are retried", why)
        else:
            log.debug("recordings: upload still failing: %s", why)

    def _succeeded(self) -> None:
        self.uploaded += 1
        if self._down is not None:
            log.warning(
                "recordings: the object store takes uploads again after %d failed attempt(s)", self._failures
            )
        self._down = None
        self._failures = 0


__all__ = [
    "ObjectInfo",
    "ObjectStoreClient",
    "Uploader",
    "find_remote",
    "list_remote",
    "object_key",
    "pending_recordings",
    "remote_info",
    "signature_v4",
]
