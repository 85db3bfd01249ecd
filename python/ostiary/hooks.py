"""The control plane's hooks: authentication attempts, policy versions and established sessions.

The data path asks ``StatementHook.decide`` about a statement only when the hook says it wants to be
consulted (``consult(session)``) and the statement is not in the data path's verdict cache;
otherwise statements never leave Rust. The default hook enforces the session's grant
(``ostiary.policy.enforce.PolicyHook``). ``SessionObserver`` hears of every authentication attempt
(allowed or refused), every policy version applied or rejected, every statement the control plane
decided (with its fingerprint), session starts, per-statement reports (when ``report`` is true) and
ends. Observers are for integrations; the audit trail (``ostiary.audit``) is fed by the gateway directly,
statements included (their entries come from the data path in batches).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ostiary.identity import Identity

if TYPE_CHECKING:
    from ostiary.policy.evaluate import SessionPolicy
    from ostiary.policy.model import ApprovalRule


@dataclass
class SessionInfo:
    id: int
    identity: Identity
    connection: str
    grant: str
    access: str
    upstream_user: str
    peer: str
    client_tls: tuple[str, str] | None
    upstream_process_id: int
    started: float
    policy_version: str = ""
    policy: SessionPolicy | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    # The client's startup parameters passed on to the server (application_name, statement_timeout ...).
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def peer_ip(self) -> str:
        return peer_ip(self.peer)


def peer_ip(peer: str) -> str:
    """The address of a ``host:port`` peer string (IPv6 with or without brackets)."""
    return peer.rsplit(":", 1)[0].strip("[]")


@dataclass(frozen=True)
class AuthAttempt:
    """One authentication attempt. ``outcome`` is "allowed" or "refused"; ``reason`` says which check
    failed (never the secret); ``chain`` is the policy's reasoning when it got that far."""

    time: float
    peer: str
    user: str
    connection: str
    method: str
    outcome: str
    code: str = ""
    reason: str = ""
    identity: Identity | None = None
    grant: str = ""
    chain: tuple[str, ...] = ()
    policy_version: str = ""
    # The first 32 hex digits of the SHA-256 of the token presented (never the token; empty for
    # static passwords and certificates).
    credential_id: str = ""


@dataclass(frozen=True)
class StatementInfo:
    seq: int
    kind: str  # "query", "parse", "function_call", or "execute" (of a Parse whose executions are held)
    name: str
    text: str
    params: tuple[str | None, ...] = ()

    @property
    def fingerprint(self) -> str:
        """16 hex digits naming the statement's shape (its text with constants replaced): the same
        for every statement the data path decides from one remembered verdict."""
        return statement_fingerprint(self.text)


def statement_fingerprint(text: str) -> str:
    from ostiary import _core

    return hashlib.sha256(_core.statement_shape(text).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Decision:
    """``allow``; or deny with a SQLSTATE and message. ``remember`` lets the data path apply the same
    decision again in this session without asking: True for every statement with the same key (the
    text; in "shapes" sessions the shape, so other constants too), "text" for the same text only."""

    allow: bool
    code: str = "42501"
    message: str = ""
    remember: bool | Literal["text"] = False
    # What decided it (a guardrail, the grant's access ...), for the audit trail.
    rule: str = ""
    # Allowed by the rules, but an approval rule holds it for people to decide (see
    # ``ostiary.approvals``); the gateway then decides, never remembering the verdict.
    approval: ApprovalRule | None = None
    # For a Parse: allow it, and put each of its executions (with their parameters) to the hook.
    hold_executions: bool = False

    @staticmethod
    def allowed(remember: bool | Literal["text"] = True) -> Decision:
        return Decision(True, remember=remember)

    @staticmethod
    def denied(message: str, code: str = "42501", rule: str = "") -> Decision:
        return Decision(False, code=code, message=message, rule=rule)


# Which statements of a session reach ``StatementHook.decide``: none, every one (verdicts can be
# remembered per text, or per shape: the same statement with other constants), or only those that
# could turn a read-only session writable.
Consult = Literal["never", "always", "shapes", "read-only-escapes", "copy", "read-only-escapes+copy"]


class StatementHook(Protocol):
    def consult(self, session: SessionInfo) -> Consult: ...

    async def decide(self, session: SessionInfo, statement: StatementInfo) -> Decision: ...


class SessionObserver(Protocol):
    report: bool

    def authentication(self, attempt: AuthAttempt) -> None: ...

    def policy_changed(self, version: str, source: str, applied: bool, detail: str) -> None: ...

    def statement_decided(self, session: SessionInfo, statement: StatementInfo, decision: Decision) -> None:
        """A statement the control plane decided (the data path decides repeats from its cache)."""

    def session_started(self, session: SessionInfo) -> None: ...

    def statement_event(self, session: SessionInfo, event: tuple[Any, ...]) -> None: ...

    def session_ended(self, session: SessionInfo, reason: str, detail: str) -> None: ...


class NoObserver:
    report = False

    def authentication(self, attempt: AuthAttempt) -> None:
        pass

    def policy_changed(self, version: str, source: str, applied: bool, detail: str) -> None:
        pass

    def statement_decided(self, session: SessionInfo, statement: StatementInfo, decision: Decision) -> None:
        pass

    def session_started(self, session: SessionInfo) -> None:
        pass

    def statement_event(self, session: SessionInfo, event: tuple[Any, ...]) -> None:
        pass

    def session_ended(self, session: SessionInfo, reason: str, detail: str) -> None:
        pass
