"""Options shared by the commands that need the appliance config."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from appliance.config.load import load_config
from appliance.config.schema import Config


def add_config_options(p: argparse.ArgumentParser, flag: str = "--config") -> None:
    p.add_argument(flag, dest="appliance_config", type=Path,
                   help="appliance config file (TOML; default: $OUTPOST_CONFIG)")
    p.add_argument("--data-dir", help="state and models live here (overrides data_dir)")


def config_from_args(args: argparse.Namespace, **overrides) -> Config:
    values = {"data_dir": getattr(args, "data_dir", None)}
    values.update(overrides)
    path = getattr(args, "appliance_config", None)
    if path is None and os.environ.get("OUTPOST_CONFIG"):
        path = Path(os.environ["OUTPOST_CONFIG"])
    return load_config(path, values)


def add_connect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help="server's Unix socket (default: $OUTPOST_SOCKET or the "
                                    "server's default path)")
    p.add_argument("--tcp", help="connect over TCP to HOST:PORT instead")
    p.add_argument("--token", help="token for hello (default: $OUTPOST_TOKEN)")
