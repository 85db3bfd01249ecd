"""The ``ostiary`` command.

``ostiary serve --config FILE`` runs the gateway; ``ostiary demo`` runs it on embedded defaults in
front of a throwaway PostgreSQL cluster; ``ostiary config check FILE`` validates a file and prints
every problem; ``ostiary config schema`` prints its JSON Schema. Exit codes: 0 success, 1 runtime
failure, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from ostiary import __version__
from ostiary.config import EXAMPLE, load
from ostiary.errors import ConfigError, OstiaryError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.port is not None:
        cfg.listen.port = args.port
    _setup_logging(args.log_level)
    try:
        trio.run(Gateway(cfg).run)
    except OstiaryError as e:
        print(f"ostiary: {e}", file=sys.stderr)
        return 1
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        load(args.file)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.file}: OK")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from ostiary.config import json_schema

    print(json_schema())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ostiary.demo import run_demo

    _setup_logging(args.log_level)
    return run_demo(args.data_dir, args.port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ostiary", description="Access gateway for machines.")
    parser.add_argument("--version", action="version", version=f"ostiary {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", help="the YAML configuration file")
    serve.add_argument("--port", type=int, help="override listen.port")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file and list every problem")
    check.add_argument("file")
    check.set_defaults(func=_check)
    schema = config_sub.add_parser("schema", help="print the JSON Schema of the configuration file")
    schema.set_defaults(func=_schema)

    demo = sub.add_parser("demo", help="run the gateway in front of a throwaway local PostgreSQL")
    demo.add_argument("--data-dir", default=".ostiary/demo")
    demo.add_argument("--port", type=int, default=6432)
    demo.add_argument("--log-level", default="info")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
