"""The default statement hook: the session's grant, enforced on its statements.

Three shapes of session, decided once when it starts (``consult``):

* A grant with statement rules (``statements``, ``relations``, ``guardrails``; ``guarded``) has every
  new statement shape judged here: analysed by PostgreSQL's parser (``ostiary_sql::analyze``), each
  statement of it decided by the compiled ``SessionPolicy``; the first refusal is sent to the client
  as 42501 with the rule's name and message. The verdict is remembered in the data path for the
  statement's shape (``ostiary_sql::shape``: the text with constants replaced), so the same statement
  with other values is decided without Python, unless constants took part in the decision (SET
  values, set_config arguments; then per text) or a rule has an RE2 pattern (then every verdict is
  per text). What does not parse, fast-path FunctionCall
  messages (which carry no SQL) and turning ``standard_conforming_strings`` off are refused.
* A read-only grant without such rules logs in upstream with ``default_transaction_read_only=on``,
  so PostgreSQL itself refuses writes. The data path flags, in Rust and without parsing, every
  statement that mentions a way out of read-only mode (``ostiary_sql::read_only``: ``READ WRITE``,
  the ``transaction_read_only`` settings, ``set_config``, ``DO``, ``dblink``, ``U&`` escapes, after
  normalising comments, quotes, case and whitespace as PostgreSQL's lexer would, under both string
  modes); only those reach this hook, which refuses them, and so do fast-path FunctionCall
  messages (no SQL to check), of which only large-object reads are let through. Other statements
  never leave Rust.
* A session with masking rules has the statements that mention COPY judged (``SessionPolicy.copy_check``):
  COPY TO a server file or program, COPY TO under column rules (COPY names no columns) and binary
  COPY TO under content rules are refused, since masking cannot cover them. With column rules,
  every statement shape is judged there: a masked column used where its values would leave
  without the origin the data path matches (an expression, a cast, a set operation, a renamed
  subquery, RETURNING, a copy into another relation, a whole row) is refused.
* Any other session is not consulted at all.

For a guarantee the database enforces whatever the gateway misjudges (functions that run dynamic
SQL are out of any statement check's reach), give read-only grants a reader role (``credential``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from ostiary import _core
from ostiary.hooks import Consult, Decision, SessionInfo, StatementInfo

# Built-in function oids (stable across PostgreSQL versions): lo_open, lo_close, loread,
# lo_lseek, lo_tell, lo_lseek64, lo_tell64, lo_get (both forms). Writes (lowrite, lo_creat,
# lo_unlink ...) are not among them.
READ_ONLY_FAST_PATH = frozenset({"952", "953", "954", "956", "958", "3170", "3171", "3458", "3459"})


class PolicyHook:
    def consult(self, session: SessionInfo) -> Consult:
        if session.policy is not None and session.policy.guarded:
            return "always" if session.policy.by_text else "shapes"
        # Column rules: every statement shape is checked for masked columns used where their
        # values would leave without their origin (SessionPolicy.column_rule_refusal).
        masking = session.policy.masking if session.policy is not None else None
        if masking is not None and masking.globs:
            return "shapes"
        # Masked sessions have COPY statements checked (COPY TO that masking cannot cover).
        copy = masking is not None
        if session.access == "read-only":
            return "read-only-escapes+copy" if copy else "read-only-escapes"
        return "copy" if copy else "never"

    async def decide(self, session: SessionInfo, statement: StatementInfo) -> Decision:
        policy = session.policy
        if policy is not None and policy.guarded:
            if statement.kind == "function_call":
                return Decision.denied(
                    "function-call: fast-path function calls carry no SQL to judge and are refused",
                    rule="function-call",
                )
            if statement.kind == "execute":
                # The Parse was judged; this execution carries its parameters to the approvers.
                rule = policy.approval_rule(statement.text)
                if rule is None:
                    return Decision.allowed(remember=False)
                if any(p is not None and p.startswith(_core.BINARY_MARK) for p in statement.params):
                    return Decision.denied(
                        f"{rule.name}: a statement that approval rule {rule.name} holds cannot take a "
                        "binary parameter whose type the gateway cannot show (undeclared, or not one "
                        "it renders): approvers could not tell its value; declare the parameter types "
                        "in Parse or send the parameters in text format",
                        rule=rule.name,
                    )
                if undecodable(statement.text, statement.params):
                    return _undecodable(rule.name)
                return Decision(True, remember=False, rule=rule.name, approval=rule)
            d = policy.judge(statement.text)
            # Remembered per shape in "shapes" sessions only when the verdict holds for every text of
            # the shape; otherwise for this text (BEGIN, SET x = 1: the same text, the same verdict).
            remember: bool | Literal["text"] = True if d.by_shape or policy.by_text else "text"
            if d.allow:
                rule = policy.approval_rule(statement.text)
                if rule is not None and undecodable(statement.text, ()):
                    return _undecodable(rule.name)
                if rule is not None and statement.kind == "parse":
                    # Approval binds the parameters too: each execution is held, not the Parse.
                    return Decision(True, remember=False, rule=rule.name, hold_executions=True)
                if rule is not None:
                    return Decision(True, remember=False, rule=rule.name, approval=rule)
                return Decision.allowed(remember=remember)
            return Decision(
                False, code=d.code, message=f"{d.rule}: {d.message}", remember=remember, rule=d.rule
            )
        if statement.kind == "function_call":
            # Fast-path calls carry a function's oid, no SQL: the read-only text check cannot see
            # them (set_config through one turns read-only mode off), so a read-only session
            # keeps only the large-object reads libpq's lo_* functions make.
            oid = statement.text.rpartition(" ")[2]
            if session.access == "read-only" and oid not in READ_ONLY_FAST_PATH:
                return Decision.denied(
                    f"read-only: grant {session.grant} is read-only: fast-path function calls other than "
                    "large-object reads are refused",
                    rule="read-only",
                )
            return Decision.allowed(remember=True)
        # Verdicts are remembered per shape when the session is consulted by shape (column
        # rules); the read-only check below reads constants too, so those sessions keep its
        # verdicts per text.
        keep: bool | Literal["text"] = True
        if policy is not None and policy.masking is not None:
            d = policy.copy_check(statement.text)
            if not d.allow:
                return Decision(
                    False, code="42501", message=f"{d.rule}: {d.message}", remember=True, rule=d.rule
                )
            if session.access != "read-only":
                return Decision.allowed(remember=True)
            if policy.masking.globs:
                keep = "text"
        # Text that mentions a way out of read-only mode (READ WRITE, the read-only settings,
        # set_config, DO, dblink, U&, large-object writes, the lexer's settings), or what
        # PostgreSQL allows in a read-only transaction but a read-only grant must not do (COPY to
        # a file or program, ALTER SYSTEM, VACUUM, reload, signals, WAL messages, slots, functions
        # that run SQL text ...): judged by what the parser finds in it, so a word in a string or
        # a comment (`select 'to do'`, asyncpg's `set_config('jit', 'off', false)`) passes.
        if _core.may_leave_read_only(statement.text) or (
            session.access == "read-only" and _core.may_act_on_server(statement.text)
        ):
            if why := read_only_refusal(statement.text):
                return Decision.denied(
                    f"read-only: grant {session.grant} is read-only ({why})", rule="read-only"
                )
            return Decision.allowed(remember="text")
        return Decision.allowed(remember=keep)


def undecodable(text: str, params: Iterable[str | None]) -> bool:
    """Whether a statement's text or parameters held bytes that are not UTF-8: the data path
    shows them as U+FFFD, so two different statements would read the same to approvers and to the
    approval that binds the text."""
    return "\ufffd" in text or any(p is not None and "\ufffd" in p for p in params)


def _undecodable(rule: str) -> Decision:
    return Decision.denied(
        f"{rule}: a statement that approval rule {rule} holds must be valid UTF-8 (text and "
        "parameters): approvers would see, and the approval would bind, a text with bytes "
        "replaced; use client_encoding UTF8",
        rule=rule,
    )


def read_only_refusal(text: str) -> str | None:
    """Why a read-only grant refuses ``text`` by what the parser finds (kinds other than reads,
    effects a read-only grant denies), or None. Text that does not parse is refused."""
    from ostiary.errors import SqlError
    from ostiary.policy.evaluate import StatementAnalysis, read_only_violation

    try:
        analyses = StatementAnalysis.of(text)
    except SqlError as e:
        return f"the gateway cannot analyse this statement: {e}"
    for a in analyses:
        if why := read_only_violation(a):
            return why
        if "lexer-change" in a.effects:
            # The parser reads text with standard-conforming strings in UTF-8; the server must too.
            return "standard_conforming_strings must stay on and client_encoding must not split characters"
    return None
