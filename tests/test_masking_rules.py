"""Masking rules in Python: compilation, column globs resolved from catalog rows, strategies through
the compiled engine (the detectors' hits and near-misses are tested in rust/mask)."""

from __future__ import annotations

import re

import pytest

from ostiary import _core
from ostiary.policy.masking import compile_rules, rule_problems
from ostiary.policy.model import DETECTORS, MaskingRule


def test_every_detector_the_policy_names_exists_in_the_engine() -> None:
    # One catalogue: the policy's Literal (for the schema) is the engine's list, both ways.
    assert list(DETECTORS) == _core.MASK_DETECTORS
    for name in DETECTORS:
        _core.MaskSet([{"name": name, "detectors": [name]}])
    with pytest.raises(_core.MaskError, match="passport"):
        _core.MaskSet([{"name": "x", "detectors": ["passport"]}])


def test_column_globs_resolve_by_schema_table_and_column() -> None:
    rules = [
        MaskingRule(name="a", columns=["ssn"]),
        MaskingRule(name="b", columns=["customers.card*"]),
        MaskingRule(name="c", columns=["billing.accounts.iban"]),
    ]
    m = compile_rules(rules, b"k" * 32)
    sql = m.catalog_query()
    assert sql is not None and "~*" in sql
    rows: list[list[str | None]] = [
        ["10", "public", "people", "3", "SSN"],
        ["11", "public", "customers", "2", "card_no"],
        ["12", "public", "orders", "2", "card_no"],
        ["13", "billing", "accounts", "4", "iban"],
        ["14", "public", "accounts", "4", "iban"],
        ["9999", None, None, None, None],
    ]
    maskset, columns, names, late, max_oid = m.plan(rows)
    assert maskset is m.maskset
    assert columns == {(10, 3): 0, (11, 2): 1, (13, 4): 2}
    assert names == [("ssn", 0)]
    assert late == [("card*", 1), ("iban", 2)]
    assert max_oid == 9999


@pytest.mark.parametrize(
    ("rule", "value", "expected"),
    [
        ({"strategy": "redact"}, b"pay 4111111111111111 now", b"pay **** now"),
        ({"strategy": "redact", "replacement": "[card]"}, b"4111111111111111", b"[card]"),
        ({"strategy": "mask", "mask_char": "#"}, b"4111-1111-1111-1111", b"###################"),
        ({"strategy": "partial", "keep_last": 4}, b"4111 1111 1111 1111", b"***************1111"),
        ({"strategy": "null"}, b"x 4111111111111111", None),
    ],
)
def test_strategies(rule: dict[str, object], value: bytes, expected: bytes | None) -> None:
    m = _core.MaskSet([{"name": "cards", "detectors": ["card"], **rule}])
    masked, counts = m.mask(value)
    assert masked == expected
    assert counts == [1]


def test_keyed_hash_is_stable_and_keyed_and_email_partial_keeps_the_domain() -> None:
    def h(key: bytes, v: bytes) -> bytes | None:
        return _core.MaskSet([{"name": "e", "detectors": ["email"], "strategy": "hash", "key": key}]).mask(v)[
            0
        ]

    a = h(b"a" * 32, b"bob@example.com")
    assert a is not None and re.fullmatch(rb"[0-9a-f]{32}", a)
    assert h(b"a" * 32, b"bob@example.com") == a
    assert h(b"b" * 32, b"bob@example.com") != a
    assert h(b"a" * 32, b"eve@example.com") != a
    m = _core.MaskSet([{"name": "e", "detectors": ["email"], "strategy": "partial", "keep_domain": True}])
    assert m.mask(b"bob@example.com")[0] == b"***@example.com"


def test_rule_problems() -> None:
    assert rule_problems(MaskingRule(name="x")) == [("", "give columns, detectors, a pattern, or several")]
    assert [f for f, _ in rule_problems(MaskingRule(name="x", pattern="(?=a)b"))] == ["pattern"]
    assert [f for f, _ in rule_problems(MaskingRule(name="x", pattern="a?"))] == ["pattern"]
    assert [f for f, _ in rule_problems(MaskingRule(name="x", columns=["a..b"]))] == ["columns"]
    assert [f for f, _ in rule_problems(MaskingRule(name="x", columns=["card_[0-9]"]))] == ["columns"]
    assert [f for f, _ in rule_problems(MaskingRule(name="x", detectors=["card"], mask_char="\\"))] == [
        "mask_char"
    ]
    assert rule_problems(MaskingRule(name="x", pattern="TICKET-[0-9]+", validator="luhn")) == []
