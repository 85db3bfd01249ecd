"""The control plane's hooks on established sessions.

The data path asks ``StatementHook.decide`` about a statement only when the hook says it wants to be
consulted (``consult(session)``); otherwise statements never leave Rust. Guardrails, approvals and
audit (later issues) implement these; the default allows everything and consults nothing.
``SessionObserver`` hears of session starts, per-statement reports (when ``report`` is true) and ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ostiary.auth import Identity


@dataclass
class SessionInfo:
    id: int
    identity: Identity
    connection: str
    peer: str
    client_tls: tuple[str, str] | None
    upstream_process_id: int
    started: float
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StatementInfo:
    seq: int
    kind: str  # "query", "parse" or "function_call"
    name: str
    text: str


@dataclass(frozen=True)
class Decision:
    """``allow``; or deny with a SQLSTATE and message. ``remember`` lets the data path apply the same
    decision to the same statement text in this session without asking again."""

    allow: bool
    code: str = "42501"
    message: str = ""
    remember: bool = False

    @staticmethod
    def allowed(remember: bool = True) -> Decision:
        return Decision(True, remember=remember)

    @staticmethod
    def denied(message: str, code: str = "42501") -> Decision:
        return Decision(False, code=code, message=message)


class StatementHook(Protocol):
    def consult(self, session: SessionInfo) -> bool: ...

    async def decide(self, session: SessionInfo, statement: StatementInfo) -> Decision: ...


class SessionObserver(Protocol):
    report: bool

    def session_started(self, session: SessionInfo) -> None: ...

    def statement_event(self, session: SessionInfo, event: tuple[Any, ...]) -> None: ...

    def session_ended(self, session: SessionInfo, reason: str, detail: str) -> None: ...


class AllowAll:
    """The default: statements are not sent to Python at all."""

    def consult(self, session: SessionInfo) -> bool:
        return False

    async def decide(self, session: SessionInfo, statement: StatementInfo) -> Decision:
        return Decision.allowed()


class NoObserver:
    report = False

    def session_started(self, session: SessionInfo) -> None:
        pass

    def statement_event(self, session: SessionInfo, event: tuple[Any, ...]) -> None:
        pass

    def session_ended(self, session: SessionInfo, reason: str, detail: str) -> None:
        pass
