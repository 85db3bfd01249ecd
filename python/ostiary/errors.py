"""Every exception Ostiary raises on purpose, in one tree.

``OstiaryError`` is the root. Errors that come from the Rust core are re-exported here so callers
never import ``ostiary._core`` to catch them.
"""

from __future__ import annotations

from ostiary._core import CoreError, ProtocolError, SqlError, TlsError, UpstreamAuthError


class OstiaryError(Exception):
    """Base class of Ostiary's own errors."""


class ConfigError(OstiaryError):
    """The configuration file is missing or wrong. ``problems`` lists every problem found, each as
    ``(path inside the file, message)``; ``str()`` shows them all with a hint of what to write."""

    def __init__(
        self, source: str, problems: list[tuple[str, str]], marks: dict[str, str] | None = None
    ) -> None:
        self.source = source
        self.problems = problems
        self.locations = [_locate(path, marks or {}) for path, _ in problems]
        lines = [f"{source}: {len(problems)} problem(s)"]
        for (path, msg), where in zip(problems, self.locations, strict=True):
            at = f" ({where})" if where else ""
            lines.append(f"  {path or '<top>'}{at}: {msg}")
        super().__init__("\n".join(lines))


def _locate(path: str, marks: dict[str, str]) -> str:
    """The ``file:line`` of the longest prefix of ``path`` that has a mark."""
    while path:
        if path in marks:
            return marks[path]
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            break
        path = path[:cut]
    return marks.get(path, "")


class AuthenticationFailed(OstiaryError):
    """A client failed authentication. ``code`` is the SQLSTATE sent to it (28P01 or 28000);
    ``reason`` says which check failed and never contains the secret presented."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


class UpstreamUnavailable(OstiaryError):
    """The gateway could not reach or log in to the upstream server."""


class RecordingError(OstiaryError):
    """A session recording cannot be read: not a recording, an unknown format version, or a frame
    or block that does not decode. The message names the file and the offset."""


class ObjectStoreError(OstiaryError):
    """An object store request failed. The message names the endpoint, bucket and key, and the
    HTTP status with the store's error code (``NoSuchKey``, ``SignatureDoesNotMatch``, ...) or the
    network error; never a secret. ``status`` is 0 when no HTTP answer came (connection refused,
    timeout, TLS failure); ``code`` is "" when the answer carried none."""

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        self.status = status
        self.code = code
        super().__init__(message)


__all__ = [
    "AuthenticationFailed",
    "ConfigError",
    "CoreError",
    "ObjectStoreError",
    "OstiaryError",
    "ProtocolError",
    "RecordingError",
    "SqlError",
    "TlsError",
    "UpstreamAuthError",
    "UpstreamUnavailable",
]
