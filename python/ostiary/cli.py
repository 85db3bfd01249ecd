"""The ``ostiary`` command.

``ostiary serve --config FILE`` runs the gateway; ``ostiary demo`` runs it on embedded defaults in
front of a throwaway PostgreSQL cluster; ``ostiary policy check FILE`` validates a policy (file or
directory) and prints every problem; ``ostiary policy explain`` prints the decision for given claims
and the rules behind it; ``ostiary policy diff OLD NEW`` shows who gains or loses access;
``ostiary config schema`` prints the JSON Schema; ``ostiary token mint --dev`` signs a development
token; ``ostiary sessions list`` and ``ostiary sessions replay ID`` show session recordings (local,
or in the configuration's object store). Exit codes: 0 success, 1 runtime failure (or an
``--expect`` not met), 2 bad usage, policy or configuration (also a setting found wrong when the
gateway starts: a port in use, a TLS key that is not the certificate's, an unusable data_dir).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ostiary import __version__
from ostiary import config as configmod
from ostiary.approvals.cli import add_approvals_parser
from ostiary.audit.export import add_export_parser
from ostiary.config import EXAMPLE, Config, load
from ostiary.errors import ConfigError, ObjectStoreError, OstiaryError
from ostiary.evidence.cli import add_evidence_parser

if TYPE_CHECKING:
    from ostiary.recording.objectstore import ObjectStoreClient


class _OneLineFormatter(logging.Formatter):
    """Escapes line breaks and other control characters in messages: they carry client-controlled
    text (user names, token claims), which must not be able to forge log lines. Tracebacks, added
    after the message, keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in record.message
        )
        return super().formatMessage(record)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def _serve(args: argparse.Namespace) -> int:
    from ostiary.proxy.server import Gateway

    if not args.config:
        print(
            "ostiary serve needs a configuration file: ostiary serve --config ostiary.yaml\n"
            "Write one like this (or run `ostiary demo` to try the gateway on embedded defaults):\n\n"
            + EXAMPLE,
            file=sys.stderr,
        )
        return 2
    from ostiary.policy.check import policy_warnings
    from ostiary.policy.evaluate import policy_version

    try:
        data, marks, raw = configmod.read(args.config)
        path = Path(args.config)
        cfg = configmod.parse(data, args.config, path if path.is_dir() else path.parent, marks)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.port is not None:
        cfg.listen.port = args.port
    _setup_logging(args.log_level)
    log = logging.getLogger("ostiary")
    for where, msg in policy_warnings(cfg) + configmod.secret_warnings(cfg):
        log.warning("policy: %s: %s", where, msg)
    version = policy_version(raw)
    log.info("policy version %s loaded from %s", version[:12], args.config)
    try:
        trio.run(Gateway(cfg, config_path=args.config, policy_version=version).run)
    except (OstiaryError, BaseExceptionGroup) as e:
        errors = _start_errors(e)
        if errors is None:
            raise
        for err in errors:
            if isinstance(err, ConfigError):
                # Settings the file check cannot see (a port in use, a key that is not the
                # certificate's): one line each, naming the setting to fix.
                for where, msg in err.problems:
                    print(f"ostiary serve: {err.source}: {where}: {msg}", file=sys.stderr)
            else:
                print(f"ostiary: {err}", file=sys.stderr)
        return 2 if all(isinstance(err, ConfigError) for err in errors) else 1
    return 0


def _start_errors(e: BaseException) -> list[OstiaryError] | None:
    """The Ostiary errors a failed run ended with, out of the exception groups of Trio's nurseries;
    None when anything else is among them (a bug: its traceback is shown)."""
    if isinstance(e, OstiaryError):
        return [e]
    if isinstance(e, BaseExceptionGroup):
        found: list[OstiaryError] = []
        for inner in e.exceptions:
            errors = _start_errors(inner)
            if errors is None:
                return None
            found += errors
        return found
    return None


def _check(args: argparse.Namespace) -> int:
    from ostiary.policy.check import policy_warnings

    worst = 0
    for file in args.files:
        try:
            cfg = load(file)
        except ConfigError as e:
            print(e, file=sys.stderr)
            worst = 2
            continue
        warnings = policy_warnings(cfg) + configmod.secret_warnings(cfg)
        issuers = len(cfg.issuers) + (1 if cfg.dev.issuer else 0)  # the development issuer counts
        print(f"{file}: OK ({len(cfg.grants)} grant(s), {issuers} issuer(s))")
        for where, msg in warnings:
            print(f"  warning: {where}: {msg}")
    return worst


def _load_or_exit(file: str) -> Config:
    try:
        return load(file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None


def _explain(args: argparse.Namespace) -> int:
    from ostiary.identity import Identity
    from ostiary.policy.evaluate import CompiledPolicy
    from ostiary.policy.explain import ExplainError, explain, identity_from_claims

    if args.diff:
        return _diff_files(args.diff[0], args.diff[1])
    if not args.file or not args.connection:
        print("ostiary policy explain: give FILE and --connection (or --diff OLD NEW)", file=sys.stderr)
        return 2
    cfg = _load_or_exit(args.file)
    try:
        if args.claims:
            try:
                claims: Any = json.loads(Path(args.claims).read_text())
            except (OSError, ValueError) as e:
                raise ExplainError(f"cannot read claims from {args.claims}: {e}") from None
            if not isinstance(claims, dict):
                raise ExplainError("the claims file must hold a JSON object")
            identity = identity_from_claims(cfg, claims, args.issuer)
        elif args.certificate:
            from cryptography import x509
            from cryptography.hazmat.primitives.serialization import Encoding

            from ostiary.identity.certificates import certificate_identity

            cert = x509.load_pem_x509_certificate(Path(args.certificate).read_bytes())
            identity = certificate_identity([cert.public_bytes(Encoding.DER)])
        elif args.client:
            identity = Identity(args.client, "password", "password", {"user": args.client})
        else:
            raise ExplainError("give the identity: --claims FILE, --certificate PEM or --client USER")
        now = dt.datetime.fromisoformat(args.at) if args.at else dt.datetime.now(dt.UTC)
        if now.tzinfo is None:
            now = now.replace(tzinfo=dt.UTC)
        allowed, lines = explain(
            CompiledPolicy(cfg),
            identity,
            args.connection,
            user=args.user,
            peer=args.peer,
            now=now,
            statement=args.statement,
        )
    except (ExplainError, ValueError, OSError) as e:
        print(f"ostiary policy explain: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if args.expect and (args.expect == "allow") != allowed:
        print(f"expected {args.expect}", file=sys.stderr)
        return 1
    return 0


def _diff_files(old_file: str, new_file: str) -> int:
    from ostiary.policy.explain import diff

    lines = diff(_load_or_exit(old_file), _load_or_exit(new_file))
    print("\n".join(lines) if lines else "no change in who may use what")
    return 0


def _diff(args: argparse.Namespace) -> int:
    return _diff_files(args.old, args.new)


def _mint(args: argparse.Namespace) -> int:
    from ostiary.identity.dev import mint

    if not args.dev:
        print(
            "ostiary token mint only signs development tokens: pass --dev (real workloads use their "
            "platform's tokens)",
            file=sys.stderr,
        )
        return 2
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = _load_or_exit(args.config).data_dir if args.config else ".ostiary"
    claims: dict[str, object] = {}
    for item in args.claim:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"--claim takes key=value, not {item!r}", file=sys.stderr)
            return 2
        try:
            claims[key] = json.loads(value) if value[:1] in "[{" or value in ("true", "false") else value
        except ValueError:
            claims[key] = value
    print(mint(data_dir, args.subject, claims, audience=args.audience, lifetime=args.lifetime))
    return 0


def _schema(args: argparse.Namespace) -> int:
    from ostiary.config import json_schema

    print(json_schema())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ostiary.demo import run_demo

    _setup_logging(args.log_level)
    return run_demo(args.data_dir, args.port)


def _data_dir(args: argparse.Namespace) -> str:
    """``--data-dir``, else the ``data_dir`` of ``--config``, else the configuration's default."""
    if args.data_dir is not None:
        return str(args.data_dir)
    if args.config:
        return _load_or_exit(args.config).data_dir
    import msgspec

    default = next(f.default for f in msgspec.structs.fields(Config) if f.name == "data_dir")
    return str(default)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _sessions_list(args: argparse.Namespace) -> int:
    from ostiary.recording.format import Column
    from ostiary.recording.render import aligned_table
    from ostiary.recording.store import list_recordings

    since = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since)
        except ValueError:
            print(f"--since takes an ISO date or time, not {args.since!r}", file=sys.stderr)
            return 2
    infos = list_recordings(_data_dir(args), since=since, identity=args.identity, limit=args.limit)
    remote = _object_store(args)
    if remote is not None:
        from ostiary.recording.objectstore import list_remote

        client, prefix = remote
        local = {i.header.session_ref for i in infos}
        try:
            found = list_remote(
                client, prefix, since=since, identity=args.identity, limit=args.limit, skip=local
            )
        except ObjectStoreError as e:
            print(f"ostiary sessions list: {e}", file=sys.stderr)
            return 1
        infos = sorted(infos + found, key=lambda i: i.header.started, reverse=True)[: args.limit]
    if args.json:
        for info in infos:
            h, t = info.header, info.trailer
            duration = info.duration
            print(
                json.dumps(
                    {
                        "session_ref": h.session_ref,
                        "started": h.started.isoformat(),
                        "identity": h.identity,
                        "connection": h.connection,
                        "grant": h.grant,
                        "peer": h.peer,
                        "statements": None if t is None else t.statements,
                        "duration_s": None if duration is None else duration.total_seconds(),
                        "ended_reason": None if t is None else t.ended_reason,
                        "path": info.path,
                    }
                )
            )
        return 0
    names = ["session_ref", "started", "identity", "connection", "grant", "statements", "duration"]
    rows = []
    for info in infos:
        h, t = info.header, info.trailer
        duration = info.duration
        rows.append(
            [
                h.session_ref,
                h.started.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S+00"),
                h.identity,
                h.connection,
                h.grant,
                "" if t is None else str(t.statements),
                "" if duration is None else _duration(duration.total_seconds()),
            ]
        )
    right = [False] * 5 + [True, True]
    print("\n".join(aligned_table([Column(n, 25) for n in names], rows, right=right)))
    return 0


def _object_store(args: argparse.Namespace) -> tuple[ObjectStoreClient, str] | None:
    """The object store of ``--config`` (its client and key prefix), if it has one."""
    if not args.config:
        return None
    from ostiary.recording.objectstore import ObjectStoreClient

    spec = _load_or_exit(args.config).audit.recordings.object_store
    return None if spec is None else (ObjectStoreClient.from_config(spec), spec.prefix)


def _sessions_replay(args: argparse.Namespace) -> int:
    import tempfile

    from ostiary.errors import RecordingError
    from ostiary.recording.objectstore import find_remote
    from ostiary.recording.render import replay
    from ostiary.recording.store import find_recording

    def show(path: str | Path) -> None:
        replay(path, realtime=args.realtime, speed=args.speed, json=args.json)

    try:
        try:
            if args.id.startswith("s3://"):
                raise RecordingError(f"{args.id} is not a local recording")
            path = find_recording(_data_dir(args), args.id)
        except RecordingError:
            # Not here: fetch it from the object store, when the configuration has one.
            remote = _object_store(args)
            if remote is None:
                raise
            client, prefix = remote
            key = find_remote(client, prefix, args.id)
            with tempfile.TemporaryDirectory(prefix="ostiary-replay-") as tmp:
                fetched = Path(tmp) / key.rsplit("/", 1)[-1]
                fetched.write_bytes(client.get(key))
                show(fetched)
            return 0
        show(path)
    except (RecordingError, ObjectStoreError, ValueError) as e:
        print(f"ostiary sessions replay: {e}", file=sys.stderr)
        return 1
    return 0


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{n} is not a positive number of seconds")
    return n


def _tcp_port(lowest: int) -> Callable[[str], int]:
    """An argparse ``type`` for a port from ``lowest`` to 65535. Checked here because the socket
    layer does not: it takes 99999 modulo 65536 (and 65536 as 0, any free port) and calls -1 a
    resolution error; the demo would fail only after initdb, its directory left behind."""

    def port(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lowest <= n <= 65535:
            raise argparse.ArgumentTypeError(f"{n} is not a TCP port ({lowest}-65535)")
        return n

    return port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ostiary", description="Access gateway for machines.")
    parser.add_argument("--version", action="version", version=f"ostiary {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", help="the YAML configuration file")
    # 0 (any free port) as in the file's listen.port
    serve.add_argument("--port", type=_tcp_port(0), help="override listen.port")
    serve.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    serve.set_defaults(func=_serve)

    policy = sub.add_parser("policy", help="check, explain and compare policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate policy files (or directories); list every problem")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(func=_check)
    explain = policy_sub.add_parser(
        "explain", help="print the decision for an identity and the chain of rules behind it"
    )
    explain.add_argument("file", nargs="?", metavar="FILE", help="the policy file or directory")
    explain.add_argument("--claims", help="a JSON file with the token's claims")
    explain.add_argument("--certificate", help="a PEM client certificate instead of claims")
    explain.add_argument("--client", help="a static client's user name instead of claims")
    explain.add_argument("--issuer", help="the issuer's policy name (default: found by the iss claim)")
    explain.add_argument("--connection", help="the connection (dbname) asked for")
    explain.add_argument("--user", help="the user name the client sends (chooses among several grants)")
    explain.add_argument("--peer", help="the client's IP address (for grants with networks)")
    explain.add_argument("--at", help="ISO time of the attempt (for time windows); default now")
    explain.add_argument("--statement", help="SQL to judge under the grant (each statement of it)")
    explain.add_argument("--expect", choices=("allow", "deny"), help="exit 1 unless the decision is this")
    explain.add_argument("--diff", nargs=2, metavar=("OLD", "NEW"), help="who gains or loses access")
    explain.set_defaults(func=_explain)
    pdiff = policy_sub.add_parser("diff", help="who gains or loses access between two policy versions")
    pdiff.add_argument("old")
    pdiff.add_argument("new")
    pdiff.set_defaults(func=_diff)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    ccheck = config_sub.add_parser("check", help="the same as `ostiary policy check`")
    ccheck.add_argument("files", nargs="+", metavar="FILE")
    ccheck.set_defaults(func=_check)
    schema = config_sub.add_parser("schema", help="print the JSON Schema of the configuration file")
    schema.set_defaults(func=_schema)

    token = sub.add_parser("token", help="development tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    mint = token_sub.add_parser("mint", help="sign a token with the development issuer's key")
    mint.add_argument("--dev", action="store_true", help="required: these tokens are for development only")
    mint.add_argument("--subject", required=True)
    mint.add_argument("--claim", action="append", default=[], metavar="KEY=VALUE")
    mint.add_argument("--audience", default="ostiary")
    mint.add_argument("--lifetime", type=_positive_int, default=600, help="seconds (default 600)")
    mint.add_argument("--config", help="take data_dir from this configuration file")
    mint.add_argument("--data-dir", help="where the development key lives (default .ostiary)")
    mint.set_defaults(func=_mint)

    demo = sub.add_parser("demo", help="run the gateway in front of a throwaway local PostgreSQL")
    demo.add_argument("--data-dir", default=".ostiary/demo")
    # not 0: the demo prints the port to connect to
    demo.add_argument("--port", type=_tcp_port(1), default=6432)
    demo.add_argument("--log-level", default="info", type=str.lower, choices=LOG_LEVELS)
    demo.set_defaults(func=_demo)

    from ostiary.audit.cli import add_audit_parser

    add_export_parser(add_audit_parser(sub))
    add_approvals_parser(sub)
    add_evidence_parser(sub)

    sessions = sub.add_parser("sessions", help="list and replay session recordings")
    sessions_sub = sessions.add_subparsers(dest="sessions_command", required=True)
    slist = sessions_sub.add_parser("list", help="recorded sessions, newest first")
    slist.add_argument("--since", help="ISO date or time: sessions started at or after it")
    slist.add_argument("--identity", help="only this identity's sessions")
    slist.add_argument("--limit", type=int, default=100)
    slist.add_argument("--json", action="store_true", help="one JSON object per line")
    slist.set_defaults(func=_sessions_list)
    sreplay = sessions_sub.add_parser("replay", help="show a session as its client saw it")
    sreplay.add_argument("id", metavar="ID", help="the session ref (or a .rec file)")
    sreplay.add_argument("--realtime", action="store_true", help="wait between events as recorded")
    sreplay.add_argument("--speed", type=float, default=1.0, help="with --realtime: this many times faster")
    sreplay.add_argument("--json", action="store_true", help="one JSON object per event")
    sreplay.set_defaults(func=_sessions_replay)
    for p in (slist, sreplay):
        p.add_argument(
            "--config",
            help="take data_dir from this configuration file (and its object store, if it has one)",
        )
        p.add_argument("--data-dir", help="the data directory (default: the configuration's, .ostiary)")

    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
    except BrokenPipeError:
        # `ostiary ... | head`: the reader went away; stop quietly, as other tools do.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    return result


if __name__ == "__main__":
    sys.exit(main())
