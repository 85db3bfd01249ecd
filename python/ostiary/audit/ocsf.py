"""Audit records as OCSF events (Open Cybersecurity Schema Framework, schema 1.1.0).

Rules of this module: pure mapping, no I/O. Every event keeps the whole original record under
``unmapped`` (so nothing is lost to the mapping) and its stable id ``<writer>:<seq>`` as
``metadata.uid`` (what a SIEM de-duplicates on: the store's ``id`` differs between stores, the
writer and sequence number never do).

Classes, by record kind:

- ``auth`` -> Authentication [3002] (Identity & Access Management), activity Logon.
- ``session_start``, ``session_end``, ``statement``, ``result`` -> Datastore Activity [6005]
  (Application Activity, added in OCSF 1.1.0): the nearest class for a database session and its
  statements. Connect for a session's start, Query for a statement and its result; OCSF has no
  Disconnect activity in this class, so a session's end is Other with ``activity_name``
  "Disconnect".
- ``policy``, ``approval``, ``admin``, ``purge`` -> API Activity [6003]: an action on the gateway's
  configuration or trail (``api.operation`` names it): Update for a policy version, Delete for a
  purge, Other otherwise.
- ``writer_start``, ``writer_stop`` -> Application Lifecycle [6002], activity Start, Stop.

``status_id`` is Failure (2) for a denied or rejected verdict and for a statement that ended in an
error, else Success (1). ``severity_id`` is Medium (3) for failures, High (4) for lost
records, else Informational (1).
"""

from __future__ import annotations

from typing import Any

from ostiary import __version__
from ostiary.audit.records import Sealed

OCSF_VERSION = "1.1.0"

PRODUCT = {"name": "Ostiary", "vendor_name": "Ostiary", "version": __version__}

# kind -> (category_uid, category_name, class_uid, class_name, activity_id, activity_name)
_CLASSES: dict[str, tuple[int, str, int, str, int, str]] = {
    "auth": (3, "Identity & Access Management", 3002, "Authentication", 1, "Logon"),
    "session_start": (6, "Application Activity", 6005, "Datastore Activity", 3, "Connect"),
    "session_end": (6, "Application Activity", 6005, "Datastore Activity", 99, "Disconnect"),
    "statement": (6, "Application Activity", 6005, "Datastore Activity", 4, "Query"),
    "result": (6, "Application Activity", 6005, "Datastore Activity", 4, "Query"),
    "policy": (6, "Application Activity", 6003, "API Activity", 3, "Update"),
    "approval": (6, "Application Activity", 6003, "API Activity", 99, "Other"),
    "admin": (6, "Application Activity", 6003, "API Activity", 99, "Other"),
    "purge": (6, "Application Activity", 6003, "API Activity", 4, "Delete"),
    "writer_start": (6, "Application Activity", 6002, "Application Lifecycle", 3, "Start"),
    "writer_stop": (6, "Application Activity", 6002, "Application Lifecycle", 4, "Stop"),
}
_OTHER = (6, "Application Activity", 6003, "API Activity", 99, "Other")

SUCCESS, FAILURE = 1, 2
INFORMATIONAL, MEDIUM, HIGH = 1, 3, 4
_SEVERITY_NAMES = {INFORMATIONAL: "Informational", MEDIUM: "Medium", HIGH: "High"}


def event_id(r: Sealed) -> str:
    """The stable id of a record in every store and every export: ``<writer>:<seq>``."""
    return f"{r.writer}:{r.seq}"


def _failed(rec: dict[str, Any]) -> str | None:
    """The reason a record stands for a failure, or None."""
    data = rec["data"]
    if rec["verdict"] in ("deny", "rejected"):
        denied = data.get("denied")
        if isinstance(denied, dict):
            return str(denied.get("message", "denied"))
        return str(data.get("reason") or data.get("detail") or rec["verdict"])
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message", "error"))
    return None


def _endpoint(peer: Any) -> dict[str, Any] | None:
    if not isinstance(peer, str) or not peer:
        return None
    host, sep, port = peer.rpartition(":")
    if not sep:
        return {"ip": peer}
    out: dict[str, Any] = {"ip": host.strip("[]")}
    if port.isdigit():
        out["port"] = int(port)
    return out


def to_ocsf(r: Sealed) -> dict[str, Any]:
    """One record as an OCSF event (a plain mapping, ready for JSON)."""
    rec = r.as_dict()
    data: dict[str, Any] = rec["data"]
    kind = r.kind
    cat, cat_name, cls, cls_name, act, act_name = _CLASSES.get(kind, _OTHER)
    reason = _failed(rec)
    lost = kind == "admin" and data.get("action") == "records_lost"
    severity = HIGH if lost else MEDIUM if reason is not None else INFORMATIONAL
    ev: dict[str, Any] = {
        "category_uid": cat,
        "category_name": cat_name,
        "class_uid": cls,
        "class_name": cls_name,
        "activity_id": act,
        "activity_name": act_name,
        "type_uid": cls * 100 + act,
        "type_name": f"{cls_name}: {act_name}",
        "time": r.ts // 1000,
        "severity_id": severity,
        "severity": _SEVERITY_NAMES[severity],
        "status_id": FAILURE if reason is not None else SUCCESS,
        "status": "Failure" if reason is not None else "Success",
        "message": f"{kind} {r.verdict}".strip(),
        "metadata": {
            "uid": event_id(r),
            "version": OCSF_VERSION,
            "product": dict(PRODUCT),
            "sequence": r.seq,
            "log_name": "audit",
            "log_provider": r.writer,
        },
        "unmapped": rec,
    }
    if reason is not None:
        ev["status_detail"] = reason
    if r.session:
        ev["metadata"]["correlation_uid"] = r.session
    if r.identity:
        ev["actor"] = {"user": {"name": r.identity}}
    src = _endpoint(data.get("peer"))
    if src is not None:
        ev["src_endpoint"] = src
    if r.rule:
        ev["policy"] = {"name": r.rule}

    if cls == 3002:
        ev["user"] = {"name": str(data.get("user", ""))}
        if data.get("method"):
            ev["auth_protocol"] = str(data["method"])
            ev["auth_protocol_id"] = 99
        if r.connection:
            ev["service"] = {"name": r.connection}
    elif cls == 6005:
        ev["type_id"] = 1  # Database
        ev["database"] = {"name": r.connection, "type": "PostgreSQL", "type_id": 1}  # Relational
        if kind in ("statement", "result"):
            query: dict[str, Any] = {"uid": f"{r.session}:{data.get('seq', '')}"}
            if "text" in data:
                query["query_string"] = data["text"]
            elif data.get("fingerprint"):
                query["query_string"] = data.get("shape") or data["fingerprint"]
            if "duration_us" in data:
                query["query_time"] = int(data["duration_us"]) // 1000
            if "bytes" in data:
                query["bytes"] = data["bytes"]
            ev["query_info"] = query
        if "duration_us" in data:
            ev["duration"] = int(data["duration_us"]) // 1000
        elif "duration_s" in data:
            ev["duration"] = int(float(data["duration_s"]) * 1000)
    elif cls == 6003:
        ev["api"] = {"operation": str(data.get("action") or kind), "service": {"name": "ostiary"}}
    elif cls == 6002:
        ev["app"] = {"name": "Ostiary", "vendor_name": "Ostiary", "version": str(data.get("version", ""))}
    return ev
