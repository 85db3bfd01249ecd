"""The policy file: `policy check` on broken files (every problem, with its path and line), pure
evaluation (matchers, globs, groups, networks, windows, one grant per session, fail closed on rules
not enforceable yet), statement decisions of a compiled session, `policy explain` and `policy diff`."""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ostiary import config
from ostiary.errors import ConfigError
from ostiary.identity import Identity
from ostiary.policy.evaluate import CompiledPolicy, StatementAnalysis

MONDAY_NOON = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def base_policy() -> dict[str, Any]:
    return {
        "issuers": [{"name": "github", "preset": "github-actions", "audiences": ["ostiary"]}],
        "identities": [
            {
                "name": "shop-main",
                "issuer": "github",
                "match": {"repository": "acme/shop", "ref": "refs/heads/main"},
            },
            {"name": "acme-any", "issuer": "github", "match": {"repository": "acme/*"}},
            {"name": "reports", "issuer": "github", "match": {"repository": ["acme/reports", "acme/bi-*"]}},
        ],
        "groups": [{"name": "readers", "members": ["reports"]}, {"name": "everyone", "members": ["readers"]}],
        "connections": [
            {
                "name": "orders",
                "upstream": {"host": "db", "database": "orders", "user": "rw", "password_env": "P"},
                "credentials": {"reader": {"user": "ro", "password_env": "R"}},
            },
            {
                "name": "billing",
                "upstream": {"host": "db2", "database": "billing", "user": "b", "password_env": "B"},
            },
        ],
        "grants": [
            {
                "name": "shop-writes",
                "identities": ["shop-main"],
                "connection": "orders",
                "access": "read-write",
            },
            {
                "name": "readers-read",
                "identities": ["everyone"],
                "connection": "orders",
                "credential": "reader",
            },
            {
                "name": "office-hours",
                "identities": ["acme-any"],
                "connection": "billing",
                "windows": [{"days": ["mon", "tue", "wed", "thu", "fri"], "start": "08:00", "end": "18:00"}],
                "networks": ["10.0.0.0/8"],
            },
        ],
    }


def compiled(data: dict[str, Any], tmp_path: Path) -> CompiledPolicy:
    return CompiledPolicy(config.parse(data, "test.yaml", tmp_path), "v1")


def gh(repository: str, ref: str = "refs/heads/main") -> Identity:
    owner = repository.split("/")[0]
    attrs = {"repository": repository, "repository_owner": owner, "ref": ref, "subject": f"repo:{repository}"}
    return Identity(f"repo:{repository}:ref:{ref}", "github", "token", attrs)


# -- check -------------------------------------------------------------------------------------


BROKEN: dict[str, tuple[Any, str, str]] = {
    # name: (change applied to base_policy, path of the problem, words of the message)
    "grant names unknown connection": (
        lambda d: d["grants"][0].update(connection="nope"),
        "grants[0].connection",
        "unknown connection 'nope'",
    ),
    "grant names unknown identity": (
        lambda d: d["grants"][0].update(identities=["ghost"]),
        "grants[0].identities",
        "unknown identity, group or client 'ghost'",
    ),
    "grant names unknown credential": (
        lambda d: d["grants"][1].update(credential="admin"),
        "grants[1].credential",
        "no credential 'admin'",
    ),
    "issuer without audiences": (
        lambda d: d["issuers"][0].update(audiences=[]),
        "issuers[0].audiences",
        "audiences",
    ),
    "issuer over http": (
        lambda d: d["issuers"].append({"name": "x", "issuer": "http://idp.example", "audiences": ["a"]}),
        "issuers[1]",
        "https",
    ),
    "kubernetes preset without issuer": (
        lambda d: d["issuers"].append({"name": "k8s", "preset": "kubernetes", "audiences": ["a"]}),
        "issuers[1]",
        "issuer",
    ),
    "two issuers with one URL": (
        lambda d: d["issuers"].append({"name": "gh2", "preset": "github-actions", "audiences": ["b"]}),
        "issuers[1].issuer",
        "already trusted",
    ),
    "HMAC algorithm": (
        lambda d: d["issuers"][0].update(algorithms=["HS256"]),
        "issuers[0].algorithms[0]",
        "'HS256' is never accepted: tokens must be signed with an asymmetric key",
    ),
    "identity of unknown issuer": (
        lambda d: d["identities"][0].update(issuer="gitlab"),
        "identities[0].issuer",
        "unknown issuer 'gitlab'",
    ),
    "certificate identities without client_ca": (
        lambda d: d["identities"].append(
            {"name": "svid", "issuer": "certificate", "match": {"spiffe_id": "x"}}
        ),
        "identities[3].issuer",
        "client_ca",
    ),
    "identity that matches everything": (
        lambda d: d["identities"][0].update(match={}),
        "identities[0].match",
        "every token",
    ),
    "regex RE2 will not compile": (
        lambda d: d.update(guardrails=[{"name": "g", "match": {"pattern": "(?<=x)y"}}]),
        "guardrails[0].match.pattern",
        "RE2",
    ),
    "masking regex RE2 will not compile": (
        lambda d: d.update(masking=[{"name": "m", "pattern": "a(b"}]),
        "masking[0].pattern",
        "RE2",
    ),
    "duplicate grant": (
        lambda d: d["grants"].append(copy.deepcopy(d["grants"][0])),
        "grants[3].name",
        "defined twice",
    ),
    "group cycle": (
        lambda d: d["groups"][0]["members"].append("everyone"),
        "groups[0].members",
        "contains itself",
    ),
    "bad network": (
        lambda d: d["grants"][2].update(networks=["10.0.0.300/8"]),
        "grants[2].networks[0]",
        "not an address",
    ),
    "bad window time": (
        lambda d: d["grants"][2]["windows"][0].update(start="8am"),
        "grants[2].windows[0].start",
        "HH:MM",
    ),
    "bad time zone": (
        lambda d: d["grants"][2]["windows"][0].update(timezone="Mars/Olympus"),
        "grants[2].windows[0].timezone",
        "unknown time zone",
    ),
    "unknown connection guardrail": (
        lambda d: d["connections"][1].update(guardrails=["no-such-pack"]),
        "connections[1].guardrails",
        "unknown guardrails rule 'no-such-pack'",
    ),
    "unknown guardrail": (
        lambda d: d["grants"][0].update(guardrails=["no-fun"]),
        "grants[0].guardrails",
        "unknown guardrails rule 'no-fun'",
    ),
    "secret manager reference": (
        lambda d: d["connections"][0]["upstream"].update(password_env=None, password_ref="gcp-sm://p/s"),
        "connections[0].upstream.password_ref",
        "not resolved by this release",
    ),
    "two secret sources": (
        lambda d: d["connections"][0]["credentials"]["reader"].update(password="x"),
        "connections[0].credentials.reader",
        "exactly one of",
    ),
    "unknown field": (lambda d: d["grants"][0].update(acess="read-write"), "grants[0]", "acess"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_policy_check_reports_each_broken_file(case: str, tmp_path: Path) -> None:
    change, path, words = BROKEN[case]
    data = base_policy()
    change(data)
    f = tmp_path / "policy.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    r = run_cli("policy", "check", str(f))
    assert r.returncode == 2, r.stdout
    assert words in r.stderr, r.stderr
    with pytest.raises(ConfigError) as e:
        config.load(f)
    found = {p: m for p, m in e.value.problems}
    assert any(p == path or p.startswith(path) for p in found), (path, found)
    # Where the problem is, with file and line.
    assert f"{f}:" in str(e.value)


def test_every_problem_at_once_with_lines(tmp_path: Path) -> None:
    data = base_policy()
    data["grants"][0]["connection"] = "nope"
    data["grants"][1]["identities"] = ["ghost"]
    data["issuers"][0]["audiences"] = []
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert len(e.value.problems) == 3
    text = f.read_text().splitlines()
    for (path, _), where in zip(e.value.problems, e.value.locations, strict=True):
        line = int(where.rsplit(":", 1)[1])
        leaf = path.rsplit(".", 1)[-1].split("[")[0]
        assert leaf in text[line - 1], (path, where, text[line - 1])


def test_type_problems_all_at_once_with_what_to_write(tmp_path: Path) -> None:
    # Wrong types, unknown fields and enum values anywhere in the file: each reported (msgspec
    # alone stops at the first), with the allowed values or the field meant, at its own line.
    data = base_policy()
    data["grants"][0]["access"] = "readwrite"
    data["grants"][1]["acess"] = "read-only"
    data["grants"][1]["statements"] = ["select", "upsert"]
    data["connections"][0]["credentials"]["reader"]["sslmod"] = "x"
    data["listen"] = {"port": "x"}
    data["clients"] = ["bob"]
    data["approval"] = []
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        config.load(f)
    found = dict(e.value.problems)
    assert found == {
        "listen.port": "Expected `int`, got `str`",
        "clients[0]": "Expected `object`, got `str`",
        "connections[0].credentials.reader.sslmod": (
            "Object contains unknown field `sslmod`"
            " (known: user, password, password_env, password_file, password_ref)"
        ),
        "grants[0].access": "Invalid enum value 'readwrite' (one of: read-only, read-write)",
        "grants[1].acess": "Object contains unknown field `acess` (did you mean `access`?)",
        "grants[1].statements[1]": found["grants[1].statements[1]"],
        "approval": "Object contains unknown field `approval` (did you mean `approvals`?)",
    }, found
    assert found["grants[1].statements[1]"].startswith(
        "Invalid enum value 'upsert' (one of: select, insert, update,"
    )
    text = f.read_text().splitlines()
    for (path, _), where in zip(e.value.problems, e.value.locations, strict=True):
        line = int(where.rsplit(":", 1)[1])
        leaf = path.rsplit(".", 1)[-1].split("[")[0]
        assert leaf in text[line - 1] or path.endswith("]"), (path, where, text[line - 1])


def test_policy_directory_merges_lists_and_names_the_file(tmp_path: Path) -> None:
    data = base_policy()
    d = tmp_path / "policy.d"
    d.mkdir()
    (d / "10-identity.yaml").write_text(
        yaml.safe_dump({k: data[k] for k in ("issuers", "identities", "groups")})
    )
    (d / "20-connections.yaml").write_text(yaml.safe_dump({"connections": data["connections"]}))
    (d / "30-grants.yaml").write_text(yaml.safe_dump({"grants": data["grants"][:2]}))
    (d / "40-more-grants.yml").write_text(yaml.safe_dump({"grants": data["grants"][2:]}))
    (d / "README.txt").write_text("not a policy file")
    cfg = config.load(d)
    assert [g.name for g in cfg.grants] == ["shop-writes", "readers-read", "office-hours"]
    bad = copy.deepcopy(data["grants"][2])
    bad["name"], bad["connection"] = "late", "nope"
    (d / "40-more-grants.yml").write_text(yaml.safe_dump({"grants": [data["grants"][2], bad]}))
    with pytest.raises(ConfigError) as e:
        config.load(d)
    [(path, _)] = e.value.problems
    assert path == "grants[3].connection"
    assert e.value.locations[0].startswith(str(d / "40-more-grants.yml") + ":")
    (d / "50-dup.yaml").write_text(yaml.safe_dump({"listen": {"port": 1}}))
    (d / "60-dup.yaml").write_text(yaml.safe_dump({"listen": {"port": 2}}))
    with pytest.raises(ConfigError, match="defined in both"):
        config.load(d)


def test_published_example_policy_checks(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    r = run_cli("policy", "check", str(root / "deploy/ostiary.example.yaml"))
    # The example names files that do not exist here; the check says exactly that and nothing else.
    assert r.returncode == 2
    assert all("does not exist" in line for line in r.stderr.splitlines()[1:]), r.stderr


# -- evaluation --------------------------------------------------------------------------------


def test_admission_by_attributes_globs_and_groups(tmp_path: Path) -> None:
    p = compiled(base_policy(), tmp_path)
    v = p.admit(gh("acme/shop"), "orders", now=MONDAY_NOON)
    # shop-main and acme-any name it; only shop-writes is on orders for those names.
    assert v.grant is not None and v.grant.name == "shop-writes"
    v = p.admit(gh("acme/bi-sales"), "orders", now=MONDAY_NOON, trace=True)
    assert v.grant is not None and v.grant.name == "readers-read"
    assert "is in group 'everyone'" in v.chain
    v = p.admit(gh("acme/shop", "refs/heads/feature"), "orders", now=MONDAY_NOON, trace=True)
    assert v.grant is None and v.code == "28000"
    assert any("ref is 'refs/heads/feature', expected 'refs/heads/main'" in c for c in v.chain)
    v = p.admit(gh("evil/shop"), "orders", now=MONDAY_NOON)
    assert v.grant is None and "no grant" in v.reason


def test_fast_path_and_explained_path_agree(tmp_path: Path) -> None:
    data = base_policy()
    data["identities"] += [
        {
            "name": "odd",
            "issuer": "github",
            "match": {"repository": "acme/[!a-m]?x*", "ref": ["refs/tags/v*", "x"]},
        },
        {"name": "dots", "issuer": "github", "match": {"repository": "a.b/(c)+"}},
        {
            "name": "cls",
            "issuer": "github",
            "match": {"repository": "acme/[a-c]*", "repository_owner": "acme"},
        },
    ]
    p = compiled(data, tmp_path)
    repos = [
        "acme/shop",
        "acme/zyx1",
        "acme/byx",
        "acme/nyxz",
        "a.b/(c)+",
        "axb/cc",
        "acme/bi-",
        "acme/",
        "x",
    ]
    refs = ["refs/heads/main", "refs/tags/v1.2", "x", "refs/heads/mainx"]
    for repo in repos:
        for ref in refs:
            who = gh(repo, ref)
            assert p.names_of(who) == p.names_of(who, []), (repo, ref)


def test_glob_needs_the_whole_value(tmp_path: Path) -> None:
    p = compiled(base_policy(), tmp_path)
    assert p.admit(gh("acme/bi-"), "orders", now=MONDAY_NOON).grant is not None
    assert p.admit(gh("xacme/bi-x"), "orders", now=MONDAY_NOON).grant is None
    assert p.admit(gh("acme/reports-old"), "orders", now=MONDAY_NOON).grant is None


def test_other_issuer_with_same_attributes_is_not_matched(tmp_path: Path) -> None:
    p = compiled(base_policy(), tmp_path)
    fake = Identity("x", "gitlab", "token", gh("acme/shop").attributes)
    assert p.admit(fake, "orders", now=MONDAY_NOON).grant is None


def test_networks_and_windows(tmp_path: Path) -> None:
    p = compiled(base_policy(), tmp_path)
    who = gh("acme/anything")
    assert p.admit(who, "billing", peer="10.1.2.3", now=MONDAY_NOON).grant is not None
    v = p.admit(who, "billing", peer="192.168.1.1", now=MONDAY_NOON, trace=True)
    assert v.grant is None and any("outside its networks" in c for c in v.chain)
    assert p.admit(who, "billing", peer=None, now=MONDAY_NOON).grant is None
    saturday = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
    v = p.admit(who, "billing", peer="10.1.2.3", now=saturday, trace=True)
    assert v.grant is None and any("outside its time windows" in c for c in v.chain)
    late = dt.datetime(2026, 11, 30, 18, 0, tzinfo=dt.UTC)
    assert p.admit(who, "billing", peer="10.1.2.3", now=late).grant is None


def test_window_across_midnight_in_a_time_zone(tmp_path: Path) -> None:
    data = base_policy()
    data["grants"][2]["windows"] = [
        {"days": ["fri"], "start": "22:00", "end": "02:00", "timezone": "Europe/Berlin"}
    ]
    p = compiled(data, tmp_path)
    who = gh("acme/x")
    fri_2330_berlin = dt.datetime(2026, 12, 4, 22, 30, tzinfo=dt.UTC)
    sat_0130_berlin = dt.datetime(2026, 12, 5, 0, 30, tzinfo=dt.UTC)
    sat_0230_berlin = dt.datetime(2026, 12, 5, 1, 30, tzinfo=dt.UTC)
    assert p.admit(who, "billing", peer="10.0.0.1", now=fri_2330_berlin).grant is not None
    assert p.admit(who, "billing", peer="10.0.0.1", now=sat_0130_berlin).grant is not None
    assert p.admit(who, "billing", peer="10.0.0.1", now=sat_0230_berlin).grant is None


def test_several_grants_need_a_choice(tmp_path: Path) -> None:
    data = base_policy()
    data["grants"].append({"name": "acme-reads-orders", "identities": ["acme-any"], "connection": "orders"})
    p = compiled(data, tmp_path)
    v = p.admit(gh("acme/shop"), "orders", now=MONDAY_NOON)
    assert v.grant is None and "several grants apply (shop-writes, acme-reads-orders)" in v.reason
    v = p.admit(gh("acme/shop"), "orders", user="acme-reads-orders", now=MONDAY_NOON)
    assert v.grant is not None and v.grant.name == "acme-reads-orders"
    # A user name that is not an applying grant does not pick one.
    assert p.admit(gh("acme/shop"), "orders", user="readers-read", now=MONDAY_NOON).grant is None


def test_grant_with_approval_rules_is_admitted_and_its_statements_held(tmp_path: Path) -> None:
    data = base_policy()
    who = data["grants"][0]["identities"][0]
    data["approvals"] = [{"name": "deletes", "match": {"kinds": ["delete"]}, "approvers": [who]}]
    data["grants"][0]["approvals"] = ["deletes"]
    p = compiled(data, tmp_path)
    v = p.admit(gh("acme/shop"), "orders", now=MONDAY_NOON)
    assert v.grant is not None
    session = p.compile_session(v.grant)
    assert session.guarded
    rule = session.approval_rule("select 1; delete from orders where id = 1")
    assert rule is not None and rule.name == "deletes" and rule.scope == "statement"
    assert session.approval_rule("select * from orders") is None
    assert session.approval_rule("this is not sql") is None


def test_static_client_identity(tmp_path: Path) -> None:
    data = base_policy()
    data["clients"] = [{"user": "legacy", "password_env": "L"}]
    data["grants"].append({"name": "legacy-reads", "identities": ["legacy"], "connection": "billing"})
    p = compiled(data, tmp_path)
    legacy = Identity("legacy", "password", "password", {"user": "legacy"})
    assert p.admit(legacy, "billing", now=MONDAY_NOON).grant is not None
    impostor = Identity("legacy", "github", "token", {"user": "legacy"})
    assert p.admit(impostor, "billing", now=MONDAY_NOON).grant is None


def test_statement_decisions_of_a_compiled_session(tmp_path: Path) -> None:
    data = base_policy()
    data["grants"][0]["statements"] = ["select", "insert", "update", "delete", "transaction"]
    data["grants"][0]["relations"] = ["public.*"]
    data["grants"][0]["guardrails"] = ["no-unbounded-writes"]
    p = compiled(data, tmp_path)
    writer = p.compile_session(p.grants["shop-writes"])
    ok = writer.decide(StatementAnalysis(frozenset({"select"}), reads=frozenset({"public.orders"})))
    assert ok.allow
    d = writer.decide(StatementAnalysis(frozenset({"drop"}), writes=frozenset({"public.orders"})))
    assert not d.allow and "does not allow drop" in d.message
    d = writer.decide(StatementAnalysis(frozenset({"select"}), reads=frozenset({"secret.keys"})))
    assert not d.allow and "secret.keys" in d.message
    d = writer.decide(
        StatementAnalysis(frozenset({"delete"}), writes=frozenset({"public.o"}), unbounded_write=True)
    )
    assert not d.allow and d.rule == "no-unbounded-writes"
    reader = p.compile_session(p.grants["readers-read"])
    d = reader.decide(StatementAnalysis(frozenset({"select", "delete"})))
    assert not d.allow and d.rule == "read-only"


# -- explain and diff --------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ostiary.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_explain_prints_decision_and_chain(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text(yaml.safe_dump(base_policy()))
    claims = tmp_path / "claims.json"
    claims.write_text(
        json.dumps(
            {
                "iss": "https://token.actions.githubusercontent.com",
                "sub": "repo:acme/shop:ref:refs/heads/main",
                "repository": "acme/shop",
                "repository_owner": "acme",
                "ref": "refs/heads/main",
            }
        )
    )
    r = run_cli(
        "policy", "explain", str(f), "--claims", str(claims), "--connection", "orders", "--expect", "allow"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == (
        "ALLOW repo:acme/shop:ref:refs/heads/main on orders under grant shop-writes: read-write, "
        "as database role rw"
    )
    assert "  matches identity 'shop-main': ref='refs/heads/main', repository='acme/shop'" in lines
    assert (
        "  does not match identity 'reports': repository is 'acme/shop', "
        "expected 'acme/reports' or 'acme/bi-*'" in lines
    )
    r = run_cli(
        "policy",
        "explain",
        str(f),
        "--claims",
        str(claims),
        "--connection",
        "billing",
        "--peer",
        "10.0.0.9",
        "--at",
        "2026-11-28T12:00:00+00:00",
        "--expect",
        "allow",
    )
    assert r.returncode == 1
    assert r.stdout.startswith("DENY repo:acme/shop:ref:refs/heads/main on billing: no grant")
    assert "outside its time windows" in r.stdout
    r = run_cli("policy", "explain", str(f), "--claims", str(claims), "--connection", "nope")
    assert r.returncode == 2 and "no connection named 'nope'" in r.stderr


def test_diff_shows_who_gains_and_loses(tmp_path: Path) -> None:
    old, new = base_policy(), base_policy()
    new["grants"][0]["access"] = "read-only"
    new["grants"] = [g for g in new["grants"] if g["name"] != "office-hours"]
    new["identities"][2]["match"]["repository"] = "acme/reports"
    a, b = tmp_path / "old.yaml", tmp_path / "new.yaml"
    a.write_text(yaml.safe_dump(old))
    b.write_text(yaml.safe_dump(new))
    r = run_cli("policy", "diff", str(a), str(b))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "+ shop-main gains read-only as rw (grant shop-writes) on orders" in out
    assert "- shop-main loses read-write as rw (grant shop-writes) on orders" in out
    assert "- acme-any loses read-only as b (grant office-hours) on billing" in out
    assert any(
        line.startswith("~ identity reports now matches github {'repository': 'acme/reports'}")
        for line in out
    )
    r2 = run_cli("policy", "explain", "--diff", str(a), str(a))
    assert r2.stdout.strip() == "no change in who may use what"
    # Connections: where they lead ends sessions; login settings do not.
    moved, login = base_policy(), base_policy()
    moved["connections"][0]["upstream"]["host"] = "db-new"
    login["connections"][0]["upstream"]["connect_timeout"] = 30
    for changed, expected in (
        (
            moved,
            "~ connection orders now leads to rw@db-new:5432/orders (was rw@db:5432/orders)",
        ),
        (login, "~ connection orders: login settings changed"),
    ):
        b.write_text(yaml.safe_dump(changed))
        out = run_cli("policy", "diff", str(a), str(b)).stdout.splitlines()
        assert any(line.startswith(expected) for line in out), out


def test_explain_judges_statements_under_the_grant(tmp_path: Path) -> None:
    data = base_policy()
    who = data["grants"][1]["identities"][0]
    data["approvals"] = [{"name": "deletes", "match": {"kinds": ["delete"]}, "approvers": [who]}]
    data["grants"][1]["approvals"] = ["deletes"]
    f = tmp_path / "policy.yaml"
    f.write_text(yaml.safe_dump(data))
    claims = tmp_path / "claims.json"
    claims.write_text(
        json.dumps(
            {"iss": "https://token.actions.githubusercontent.com", "sub": "x", "repository": "acme/reports"}
        )
    )
    sql = "select * from orders; with d as (delete from orders returning 1) select 1; set role admin"
    r = run_cli(
        "policy", "explain", str(f), "--claims", str(claims), "--connection", "orders", "--statement", sql
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    # Guardrails and access first: the read-only grant refuses the delete before any approval.
    assert out[0].startswith("ALLOW x on orders")
    assert "statement 1: ALLOW" in out
    assert "statement 2: DENY by read-only: grant readers-read is read-only (delete)" in out
    assert "statement 3: ALLOW" in out
    assert out[-1] == "DENY statements: 1 of 3 refused under grant readers-read"
    r = run_cli(
        "policy",
        "explain",
        str(f),
        "--claims",
        str(claims),
        "--connection",
        "orders",
        "--statement",
        "DR/**/OP TABLE orders",
        "--expect",
        "deny",
    )
    assert r.returncode == 0
    assert "what cannot be parsed is refused" in r.stdout
    # On a grant that may write, a statement an approval rule matches is held.
    data["grants"][1]["access"] = "read-write"
    f.write_text(yaml.safe_dump(data))
    r = run_cli(
        "policy",
        "explain",
        str(f),
        "--claims",
        str(claims),
        "--connection",
        "orders",
        "--statement",
        "delete from orders where id = 7",
    )
    assert "statement 1: HOLD for approval by rule deletes (1 of" in r.stdout, r.stdout


def test_what_a_session_depends_on_after_a_reload(tmp_path: Path) -> None:
    """A reload ends the sessions whose grant_terms changed: the approval rules a grant names are
    among them (an open session went on unheld under a changed rule); a connection's login-only
    settings and where its password is read from are not."""
    data = base_policy()
    data["approvals"] = [
        {"name": "holds", "match": {"relations": ["public.branches"]}, "approvers": ["reports"]}
    ]
    data["grants"][0]["approvals"] = ["holds"]
    before = compiled(data, tmp_path)
    changed = copy.deepcopy(data)
    changed["approvals"][0]["match"]["relations"] = ["public.tellers"]
    assert compiled(changed, tmp_path).grant_terms("shop-writes") != before.grant_terms("shop-writes")
    login_only = copy.deepcopy(data)
    up = login_only["connections"][0]["upstream"]
    up.update(connect_timeout=30, require_auth=["scram-sha-256"], password_env="OTHER")
    assert compiled(login_only, tmp_path).grant_terms("shop-writes") == before.grant_terms("shop-writes")
    moved = copy.deepcopy(data)
    moved["connections"][0]["upstream"]["host"] = "db-replica"
    assert compiled(moved, tmp_path).grant_terms("shop-writes") != before.grant_terms("shop-writes")
