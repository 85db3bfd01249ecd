"""Shipped guardrail packs: rule sets a grant names without defining them.

Their enforcement needs statement analysis (the SQL guardrails), which judges statements by their
effect; these definitions say what each pack means in the policy language.
"""

from __future__ import annotations

from typing import Any

from ostiary.policy.model import READ_ONLY_KINDS, STATEMENT_KINDS, Guardrail, StatementMatch

WRITE_KINDS: list[Any] = [k for k in STATEMENT_KINDS if k not in READ_ONLY_KINDS]

PACKS: dict[str, Guardrail] = {
    # Kinds only, for explain and the schema's sake: a session applies it as a read-only grant
    # (READ_ONLY_KINDS and READ_ONLY_DENIED_EFFECTS, in SessionPolicy.decide).
    "read-only": Guardrail(
        name="read-only",
        match=StatementMatch(kinds=WRITE_KINDS),
        message="this grant is read-only",
    ),
    "no-destructive-ddl": Guardrail(
        name="no-destructive-ddl",
        match=StatementMatch(kinds=["drop", "truncate"]),
        message="destructive DDL (DROP, DROP COLUMN, TRUNCATE) is not allowed",
    ),
    "no-unbounded-writes": Guardrail(
        name="no-unbounded-writes",
        match=StatementMatch(kinds=["update", "delete", "merge"], without_where=True),
        message="UPDATE and DELETE need a WHERE clause (MERGE that updates or deletes, a join "
        "condition on a column)",
    ),
    "no-privilege-changes": Guardrail(
        name="no-privilege-changes",
        match=StatementMatch(kinds=["grant", "revoke"]),
        message="privilege changes (GRANT, REVOKE) are not allowed",
    ),
    "no-role-changes": Guardrail(
        name="no-role-changes",
        match=StatementMatch(effects=["role-change", "privileges"]),
        message="changing roles (SET ROLE, SESSION AUTHORIZATION, CREATE/ALTER ROLE) is not allowed",
    ),
}
