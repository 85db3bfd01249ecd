"""Keeps read-only sessions read-only until the SQL guardrails judge parsed statements.

A read-only grant logs in upstream with ``default_transaction_read_only=on``, so PostgreSQL itself
refuses writes. What remains is a client turning that off. This hook is consulted for each new
statement text of a read-only session (the data path remembers allowed texts, so repeated statements
do not come back here) and refuses, conservatively and without parsing, any statement that mentions a
way to turn it off: ``READ WRITE`` (BEGIN / START TRANSACTION / SET TRANSACTION / SET SESSION
CHARACTERISTICS), the ``transaction_read_only`` settings, ``set_config``, ``DO`` blocks (dynamic
SQL), ``dblink`` (a second connection that is not read-only) and ``U&`` escapes (which could spell a
setting's name). Comments, quotes, case and whitespace are normalised away first, so a false positive
(a literal that contains those words) is possible, a bypass by spelling is not. A lone ``SHOW
setting`` is let through. Functions already in the database that run dynamic SQL are out of its
reach: for a guarantee the database enforces, give read-only grants a reader role (``credential``).
The statement-level guardrails replace this with a judgement on the parsed statement.
"""

from __future__ import annotations

import re

from ostiary.hooks import Decision, SessionInfo, StatementInfo

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_NOISE = re.compile(r'["\s]+')
# u& introduces Unicode escapes, which could spell a setting's name in a quoted identifier.
_SHOW = re.compile(r"^show [a-z_.]+ ?;?$")
_FORBIDDEN = re.compile(r"read write|transaction_read_only|set_config|dblink|u&|(?:^|;| )do(?: |\$|'|$)")


def turns_off_read_only(text: str) -> bool:
    flat = _COMMENTS.sub(" ", text.lower())
    # Nested comments leave "*/" behind; treat what remains as text (more, not less, is refused).
    flat = _NOISE.sub(" ", flat).strip()
    return _SHOW.match(flat) is None and _FORBIDDEN.search(flat) is not None


class ReadOnlyGuard:
    """The default statement hook: consults read-only sessions only."""

    def consult(self, session: SessionInfo) -> bool:
        return session.access == "read-only"

    async def decide(self, session: SessionInfo, statement: StatementInfo) -> Decision:
        if turns_off_read_only(statement.text):
            return Decision.denied(
                f"grant {session.grant} is read-only: statements that could turn read-only mode off "
                "(READ WRITE, transaction_read_only, set_config, DO, dblink) are refused"
            )
        return Decision.allowed(remember=True)
