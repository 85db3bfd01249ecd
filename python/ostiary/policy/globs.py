"""Glob patterns of the policy file (identities, relations, masking columns), as RE2 patterns."""

from __future__ import annotations

import re2


def glob_to_re2(pattern: str) -> str:
    """An RE2 pattern for a glob: ``*`` any characters (``/`` included), ``?`` one, ``[...]`` and
    ``[!...]`` a class; everything else literal. Used with full-match semantics."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif (
            c == "["
            and (end := pattern.find("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)) > 0
        ):
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re2.escape(c))
        i += 1
    return "".join(out)
