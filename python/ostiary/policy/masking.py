"""Masking rules compiled for sessions: the content engine (``_core.MaskSet``, one per rule set and
policy version, shared by every session that uses it) and the column rules, which a session resolves
through the upstream catalog when it starts.

Rules of this module: no I/O (the catalog query is sent by the proxy, which passes the rows back).

Column globs: ``column`` (any table, and any result column of that name), ``table.column`` and
``schema.table.column``. They are matched case-insensitively against the catalog, so a column is
covered by table oid and attribute number (what RowDescription carries), whatever alias a query gives
it; name globs also cover result columns by name (expressions such as ``card || ''`` have no table).
Tables created after the session read the catalog are covered by the column part of every rule,
by name. Values computed from a column are left to the content detectors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import re2

from ostiary import _core
from ostiary.policy.globs import glob_to_re2
from ostiary.policy.model import MaskingRule

# A stored view query's target entries in pg_node_tree text: result column number, origin table
# oid and column (0 and 0 for a computed column; the table and 0 for a whole row). The column
# name is one token, whatever it holds (PostgreSQL's outToken backslashes blanks, brackets and
# backslashes: a name like "e:x", or one that spells out ":resorigtbl 1", stays inside it). An
# escape string literal, read the same in either string mode.
_VIEW_ORIGINS_RE = (
    r":resno (\d+) :resname (?:[^ \n\t\\]|\\.)* :ressortgroupref \d+ :resorigtbl (\d+) :resorigcol (\d+)"
)
_VIEW_ORIGINS = "E'" + _VIEW_ORIGINS_RE.replace("\\", "\\\\").replace("'", "''") + "'"

# Relations whose columns can appear in results: tables, partitioned tables, views, materialized
# views, foreign tables.
_RELKINDS = "'r','p','v','m','f'"


def _glob_posix(glob: str) -> str:
    """A PostgreSQL (POSIX) regular expression for a glob: ``*`` any run, ``?`` one character."""
    out = []
    for c in glob:
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c.isalnum() or c == "_":
            out.append(c)
        else:
            out.append("\\" + c)
    return "^(" + "".join(out) + ")$"


@functools.lru_cache(maxsize=1024)
def _glob_re2(glob: str) -> Any:
    # Column globs take * and ? only (rule_problems), as the data path's name matching does.
    return re2.compile("(?i)" + glob_to_re2(glob))


# What Engine.adopt(mask=...) takes.
MaskPlanArg = tuple[
    _core.MaskSet, dict[tuple[int, int], int], list[tuple[str, int]], list[tuple[str, int]], int
]


@dataclass(frozen=True)
class ColumnGlob:
    schema: str | None
    table: str | None
    column: str
    rule: int

    def matches_column(self, name: str) -> bool:
        """Whether a column called ``name`` (in any table) is covered by this glob's column part."""
        return _glob_re2(self.column).fullmatch(name) is not None

    def matches_table(self, relation: str) -> bool:
        """Whether a whole row of ``relation`` (``schema.table``, ``table`` or ``*`` for any) may
        hold a column this glob covers: any relation for a column-only glob."""
        if self.table is None or relation == "*":
            return True
        schema, _, table = relation.rpartition(".")
        if _glob_re2(self.table).fullmatch(table) is None:
            return False
        return self.schema is None or not schema or _glob_re2(self.schema).fullmatch(schema) is not None

    @staticmethod
    def parse(text: str, rule: int) -> ColumnGlob:
        parts = text.split(".")
        if len(parts) == 1:
            return ColumnGlob(None, None, parts[0], rule)
        if len(parts) == 2:
            return ColumnGlob(None, parts[0], parts[1], rule)
        return ColumnGlob(parts[0], parts[1], ".".join(parts[2:]), rule)


def column_glob_problem(text: str) -> str | None:
    parts = text.split(".")
    if not text or any(not p for p in parts) or len(parts) > 3:
        return "a column glob is column, table.column or schema.table.column"
    if "[" in text or "]" in text:
        return "column globs take * and ? (no [...] classes)"
    return None


@dataclass
class SessionMasking:
    """What one session masks: the engine plus its column globs, resolved per session."""

    rules: list[MaskingRule]
    maskset: _core.MaskSet
    globs: list[ColumnGlob] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def rule_name(self, g: ColumnGlob) -> str:
        return self.rules[g.rule].name if 0 <= g.rule < len(self.rules) else "?"

    @property
    def has_content(self) -> bool:
        return any(r.detectors or r.pattern for r in self.rules)

    def catalog_query(self) -> str | None:
        """The catalog query that finds the columns the globs cover (None without column rules).
        Its last row carries the highest relation oid (``max_oid``) in the first column.

        It runs in the client's session, whose search_path and standard_conforming_strings the
        client may have set in its startup parameters: every type, operator and function is
        qualified with pg_catalog (a schema placed before pg_catalog cannot redefine them), and
        the pattern is an escape string literal, read the same with either string mode."""
        if not self.globs:
            return None
        pattern = "|".join(_glob_posix(g.column) for g in self.globs)
        literal = "E'" + pattern.replace("\\", "\\\\").replace("'", "''") + "'"
        eq = "OPERATOR(pg_catalog.=)"
        return (
            # The target entries of every user view's stored query (materialized ones too).
            "WITH RECURSIVE te AS (SELECT v.oid AS rule, v.ev_class AS view, "
            "m.g[1]::pg_catalog.int4 AS resno, m.g[2]::pg_catalog.oid AS otbl, "
            "m.g[3]::pg_catalog.int4 AS ocol "
            "FROM pg_catalog.pg_rewrite v "
            "CROSS JOIN LATERAL pg_catalog.regexp_matches("
            f"v.ev_action::pg_catalog.text, {_VIEW_ORIGINS}, 'g') AS m(g) "
            f"WHERE v.ev_type {eq} '1' AND v.ev_class OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid), "
            # Where a view column's values come from: a plain reference to its origin (a whole row:
            # column 0, any column of it); a computed column from every column the view's query
            # uses (pg_depend of its rewrite rule, 2618 = pg_rewrite, 1259 = pg_class), since which
            # of them it computes from is not recorded: strict, a view that uses a masked column
            # anywhere has its computed columns masked.
            "edge AS (SELECT view, resno, otbl AS src, ocol AS srccol FROM te "
            "WHERE otbl OPERATOR(pg_catalog.<>) 0::pg_catalog.oid "
            "UNION ALL SELECT te.view, te.resno, d.refobjid, d.refobjsubid FROM te "
            f"JOIN pg_catalog.pg_depend d ON d.classid {eq} 2618::pg_catalog.oid "
            f"AND d.objid {eq} te.rule AND d.refclassid {eq} 1259::pg_catalog.oid "
            "AND d.refobjsubid OPERATOR(pg_catalog.>) 0 "
            f"WHERE te.otbl {eq} 0::pg_catalog.oid), "
            # Columns whose names the globs may cover, then the view columns fed by them, through
            # views of views: each with the names of the column it comes from (matched against the
            # globs like that column).
            "masked(oid, attnum, nspname, relname, attname) AS ("
            "SELECT c.oid, a.attnum::pg_catalog.int4, n.nspname, c.relname, a.attname "
            "FROM pg_catalog.pg_attribute a "
            f"JOIN pg_catalog.pg_class c ON c.oid {eq} a.attrelid "
            f"JOIN pg_catalog.pg_namespace n ON n.oid {eq} c.relnamespace "
            "WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped "
            f'AND c.relkind {eq} ANY (ARRAY[{_RELKINDS}]::pg_catalog."char"[]) '
            f"AND a.attname OPERATOR(pg_catalog.~*) {literal} "
            "UNION SELECT e.view, e.resno, m.nspname, m.relname, m.attname FROM edge e "
            f"JOIN masked m ON e.src {eq} m.oid "
            f"AND (e.srccol {eq} m.attnum OR e.srccol {eq} 0)) "
            # With each view column its own names (what statements call it by).
            "SELECT m.oid::pg_catalog.int8, m.nspname, m.relname, m.attnum, m.attname, "
            "n.nspname, c.relname, a.attname FROM masked m "
            f"JOIN pg_catalog.pg_class c ON c.oid {eq} m.oid "
            f"JOIN pg_catalog.pg_namespace n ON n.oid {eq} c.relnamespace "
            f"LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid {eq} m.oid AND a.attnum {eq} m.attnum "
            "UNION ALL SELECT (SELECT pg_catalog.max(oid)::pg_catalog.int8 FROM pg_catalog.pg_class), "
            "NULL, NULL, NULL, NULL, NULL, NULL, NULL"
        )

    def plan(self, rows: list[list[str | None]]) -> MaskPlanArg:
        """The engine's mask plan from the catalog rows (``Engine.adopt(mask=...)``)."""
        return self.resolve(rows)[0]

    def resolve(self, rows: list[list[str | None]]) -> tuple[MaskPlanArg, list[ColumnGlob]]:
        """The engine's mask plan from the catalog rows (``Engine.adopt(mask=...)``), and the view
        columns masked by what they come from, as globs of their own names (schema, view, column):
        statements name them so, and ``SessionPolicy.column_rule_refusal`` must know them."""
        columns: dict[tuple[int, int], int] = {}
        views: list[ColumnGlob] = []
        max_oid = 0
        compiled = [
            (
                g,
                _glob_re2(g.schema) if g.schema else None,
                _glob_re2(g.table) if g.table else None,
                _glob_re2(g.column),
            )
            for g in self.globs
        ]
        for row in rows:
            oid, schema, table, attnum, column = row[:5]
            if schema is None:
                max_oid = int(oid) if oid is not None else 0
                continue
            assert oid is not None and table is not None and attnum is not None and column is not None
            key = (int(oid), int(attnum))
            for g, s, t, c in compiled:
                if key in columns:
                    break
                if (
                    c.fullmatch(column)
                    and (s is None or s.fullmatch(schema))
                    and (t is None or t.fullmatch(table))
                ):
                    columns[key] = g.rule
                    own = row[5:8]
                    if len(own) == 3 and all(own) and tuple(own) != (schema, table, column):
                        # (A name with * or ? in it, as a glob, covers more: strict.)
                        views.append(ColumnGlob(str(own[0]), str(own[1]), str(own[2]), g.rule))
        names = [(g.column, g.rule) for g in self.globs if g.table is None]
        late = [(g.column, g.rule) for g in self.globs if g.table is not None]
        return (self.maskset, columns, names, late, min(max_oid, 0xFFFFFFFF)), views

    def content_plan(self) -> MaskPlanArg:
        """The plan of a session without column rules (no catalog query needed)."""
        return (self.maskset, {}, [], [], 0)


def rule_dict(rule: MaskingRule, key: bytes) -> dict[str, Any]:
    return {
        "name": rule.name,
        "detectors": list(rule.detectors),
        "pattern": rule.pattern,
        "validator": rule.validator,
        "strategy": rule.strategy,
        "replacement": rule.replacement,
        "mask_char": rule.mask_char,
        "keep_last": rule.keep_last,
        "keep_domain": rule.keep_domain,
        "key": key,
    }


def compile_rules(rules: list[MaskingRule], key: bytes) -> SessionMasking:
    """Raises ``_core.MaskError`` when the engine refuses a rule (``policy check`` reports these)."""
    maskset = _core.MaskSet([rule_dict(r, key) for r in rules])
    globs = [ColumnGlob.parse(c, i) for i, r in enumerate(rules) for c in r.columns]
    return SessionMasking(rules, maskset, globs)


def rule_problems(rule: MaskingRule) -> list[tuple[str, str]]:
    """What the engine or the policy refuses in one rule (field, message)."""
    problems: list[tuple[str, str]] = []
    if not (rule.columns or rule.detectors or rule.pattern):
        problems.append(("", "give columns, detectors, a pattern, or several"))
    for c in rule.columns:
        if err := column_glob_problem(c):
            problems.append(("columns", f"{c!r}: {err}"))
    if rule.pattern is not None and (err := _core.mask_pattern_problem(rule.pattern)):
        problems.append(("pattern", err))
    if rule.validator is not None and rule.pattern is None:
        problems.append(("validator", "a validator confirms a custom pattern's matches: give a pattern"))
    if len(rule.mask_char) != 1 or not rule.mask_char.isascii() or rule.mask_char in '\t\n\r\\\0,"':
        problems.append(("mask_char", "one printable ASCII character other than \\ , and quotes"))
    if any(c in rule.replacement for c in '\t\n\r\\\0"'):
        problems.append(
            ("replacement", "tabs, newlines, backslashes, quotes and NUL would break COPY output")
        )
    if rule.keep_last < 0:
        problems.append(("keep_last", "must be 0 or more"))
    return problems
