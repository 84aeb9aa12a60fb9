"""`outpost config show`: the effective config, file and flags applied."""

from __future__ import annotations

from appliance.cli.common import add_config_options, config_from_args
from appliance.config.settings import to_mapping


def register(sub) -> None:
    p = sub.add_parser("config", help="show the effective appliance config")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    csub.required = True
    show = csub.add_parser("show", help="print the effective config as TOML")
    add_config_options(show)
    show.set_defaults(func=show_config)


def show_config(args) -> int:
    import tomli_w  # noqa: PLC0415

    data = to_mapping(config_from_args(args))
    if data["server"]["token"]:
        data["server"]["token"] = "<set, not shown>"
    for section in ("http", "grpc"):
        if data[section]["admin_token"]:
            data[section]["admin_token"] = "<set, not shown>"
    print(tomli_w.dumps(data), end="")
    return 0
