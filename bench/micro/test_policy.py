"""Micro benchmarks of the control plane's decisions: policy evaluation and token validation.

* ``admit``: a session start against a policy of 200 grants over 200 identity matchers (globs and
  exact values) and 20 groups: which names the identity carries, which grants apply, the choice.
* ``decide``: a statement decision of a compiled session (``SessionPolicy``), read-only grant with
  statement kinds, relation globs and two guardrail packs: the per-statement cost the data path
  would pay when a new statement shape reaches Python. The target is <= 20 us.
* ``validate``: a token through ``TokenValidator`` with its keys cached (RS256 and ES256), the
  per-connection cost of a token login on top of the TLS handshake. Measured over batches of 200
  validations in one ``trio.run``; ``extra_info["us_per_token"]`` is the per-token figure.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pytest_benchmark.fixture import BenchmarkFixture

from ostiary import config
from ostiary.identity import Identity
from ostiary.identity.issuers import resolve_issuer
from ostiary.identity.jwks import JwksCache
from ostiary.identity.tokens import TokenValidator
from ostiary.policy.evaluate import CompiledPolicy, StatementAnalysis
from ostiary.policy.model import Issuer

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
GRANTS = 200


def big_policy() -> dict[str, Any]:
    identities, grants = [], []
    for i in range(GRANTS):
        identities.append(
            {
                "name": f"team{i}",
                "issuer": "github",
                "match": {"repository": f"acme/svc{i}-*", "ref": ["refs/heads/main", "refs/tags/v*"]},
            }
        )
        grants.append(
            {
                "name": f"g{i}",
                "identities": [f"team{i}" if i % 10 else f"group{i // 10}"],
                "connection": f"db{i % 20}",
                "access": "read-only" if i % 2 else "read-write",
                "networks": ["10.0.0.0/8"] if i % 3 == 0 else [],
            }
        )
    groups = [{"name": f"group{j}", "members": [f"team{j * 10}", f"team{j * 10 + 1}"]} for j in range(20)]
    connections = [
        {"name": f"db{k}", "upstream": {"host": "db", "database": f"d{k}", "user": "u", "password_env": "P"}}
        for k in range(20)
    ]
    return {
        "issuers": [{"name": "github", "preset": "github-actions", "audiences": ["ostiary"]}],
        "identities": identities,
        "groups": groups,
        "connections": connections,
        "grants": grants,
    }


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> CompiledPolicy:
    cfg = config.parse(big_policy(), "bench", tmp_path_factory.mktemp("policy"))
    return CompiledPolicy(cfg, "bench")


def identity(n: int) -> Identity:
    attrs = {"repository": f"acme/svc{n}-api", "repository_owner": "acme", "ref": "refs/heads/main"}
    return Identity(f"repo:acme/svc{n}-api:ref:refs/heads/main", "github", "token", attrs)


def test_admit_200_grants(benchmark: BenchmarkFixture, policy: CompiledPolicy) -> None:
    who = identity(157)
    verdict = benchmark(lambda: policy.admit(who, "db17", user="ci", peer="10.1.2.3", now=NOW))
    assert verdict.grant is not None and verdict.grant.name == "g157"


def test_decide_statement_compiled_session(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    data = big_policy()
    data["grants"][157].update(
        statements=["select", "insert", "update", "transaction", "set"],
        relations=["public.*", "reporting.daily_*"],
        guardrails=["no-unbounded-writes", "no-destructive-ddl"],
    )
    p = CompiledPolicy(config.parse(data, "bench", tmp_path), "bench")
    session = p.compile_session(p.grants["g157"])
    stmt = StatementAnalysis(
        kinds=frozenset({"select"}),
        reads=frozenset({"public.orders", "public.customers", "reporting.daily_sales"}),
        functions=frozenset({"count", "sum"}),
    )
    decision = benchmark(session.decide, stmt)
    assert decision.allow


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_validate_token_cached_keys(
    benchmark: BenchmarkFixture, tmp_path: Path, alg: str, mean_seconds: Callable[[Any], float | None]
) -> None:
    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    jwk.update(kid="k1", alg=alg, use="sig")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    issuer = resolve_issuer(
        Issuer(
            name="bench",
            issuer="https://idp.bench",
            audiences=["ostiary"],
            algorithms=[alg],
            jwks_file=str(jwks),
        )
    )
    cache = JwksCache(issuer)
    validator = TokenValidator([issuer], {"bench": cache})
    now = int(time.time())
    claims = {"iss": "https://idp.bench", "aud": "ostiary", "sub": "repo:x", "iat": now, "exp": now + 600}
    token = jwt.encode(claims, key, algorithm=alg, headers={"kid": "k1"})
    batch = 200

    async def run() -> None:
        async with trio.open_nursery() as n:
            await n.start(cache.run)
            for _ in range(batch):
                await validator.validate(token)
            n.cancel_scope.cancel()

    benchmark.pedantic(lambda: trio.run(run), rounds=10, iterations=1)
    if (secs := mean_seconds(benchmark)) is not None:
        benchmark.extra_info["us_per_token"] = round(secs / batch * 1e6, 1)


ANALYSED = {
    "pgbench-select": "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    "pgbench-update": "UPDATE pgbench_accounts SET abalance = abalance + -4012 WHERE aid = 77301;",
    "pgbench-insert": "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
    "VALUES (3, 1, 77301, -4012, CURRENT_TIMESTAMP);",
    "10kb-select": "select " + ", ".join(f"c{i}" for i in range(1700)) + " from a join b using (id)",
}


@pytest.mark.parametrize("name", list(ANALYSED))
def test_analyze_statement(benchmark: BenchmarkFixture, name: str) -> None:
    """``StatementAnalysis.of``: libpg_query parse, the complete walk of the tree, into Python."""
    sql = ANALYSED[name]
    [analysis] = benchmark(StatementAnalysis.of, sql)
    assert analysis.kinds
