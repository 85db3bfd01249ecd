"""Keeps read-only sessions read-only until the SQL guardrails judge parsed statements.

A read-only grant logs in upstream with ``default_transaction_read_only=on``, so PostgreSQL itself
refuses writes; ``RESET`` and ``DISCARD ALL`` return to that startup value. What remains is a client
turning it off. The data path flags, in Rust and without parsing, every statement that mentions a
way to do so (``ostiary_sql::read_only``: ``READ WRITE``, the ``transaction_read_only`` settings,
``set_config``, ``DO``, ``dblink``, ``U&`` escapes, after normalising comments, quotes, case and
whitespace as PostgreSQL's lexer would), and only those reach this hook, which refuses them. Other
statements never leave Rust. For a guarantee the database enforces (functions that run dynamic SQL
are out of a text check's reach), give read-only grants a reader role (``credential``).
"""

from __future__ import annotations

from ostiary import _core
from ostiary.hooks import Consult, Decision, SessionInfo, StatementInfo


class ReadOnlyGuard:
    """The default statement hook: read-only sessions are consulted on flagged statements only."""

    def consult(self, session: SessionInfo) -> Consult:
        return "read-only-escapes" if session.access == "read-only" else "never"

    async def decide(self, session: SessionInfo, statement: StatementInfo) -> Decision:
        if _core.may_leave_read_only(statement.text):
            return Decision.denied(
                f"grant {session.grant} is read-only: statements that could turn read-only mode off "
                "(READ WRITE, transaction_read_only, set_config, DO, dblink, U&) are refused"
            )
        return Decision.allowed(remember=True)
