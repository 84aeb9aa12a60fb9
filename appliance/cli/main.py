"""`outpost`: parse, dispatch, and turn every expected error into one clear line.

Each command group lives in its own module with ``register(subparsers)``; add a module
to COMMANDS to add a command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from appliance import __version__
from appliance.errors import ConfigError, OutpostError
from engines.errors import EngineError
from updater.errors import UpdaterError

COMMANDS = (
    "appliance.cli.serve_cmd",
    "appliance.cli.models_cmd",
    "appliance.cli.infer_cmd",
    "appliance.cli.config_cmd",
    "appliance.cli.demo_cmd",
    "appliance.cli.compile_cmd",
    "appliance.cli.profiles_cmd",
    "appliance.cli.info_cmd",
    "appliance.cli.fleet_cmd",
    "appliance.cli.update_cmd",
    "appliance.cli.install_cmd",
)


# The server's messages name the socket ops that do a thing; at the command line, the
# commands that send them do
OPS_AS_COMMANDS = (
    ("the 'models' op", "'outpost models list'"),
    ("the 'load' op", "'outpost models load'"),
    ("the 'unload' op", "'outpost models unload'"),
    ("the 'activate' op", "'outpost models activate'"),
    ("the 'traffic' op", "'outpost models traffic'"),
)


def in_cli_words(message: str) -> str:
    for op, command in OPS_AS_COMMANDS:
        message = message.replace(op, command)
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outpost", description="Edge model-serving appliance.")
    parser.add_argument("--version", action="version", version=f"outpost {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # `outpost` alone: what it can do, not only that it needs it
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"outpost: config error: {exc}", file=sys.stderr)
        return 2
    except OutpostError as exc:
        print(f"outpost: {exc.code}: {in_cli_words(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except EngineError as exc:
        print(f"outpost: engine error: {exc}", file=sys.stderr)
        return 1
    except UpdaterError as exc:
        print(f"outpost: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # stdout's reader went away (`outpost models list | head`): nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # A path the system refused (a data dir, --out, --samples ...): the path and why.
        where = f": {exc.filename}" if exc.filename else ""
        print(f"outpost: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
