"""`outpost update check`: one OTA update pass on this device (the updater package), and
the wiring of a device's update agent from the appliance config (``device_agent``), which
`outpost serve` uses too."""

from __future__ import annotations

from appliance.cli.common import add_config_options, config_from_args
from updater.errors import UpdaterError


def register(sub) -> None:
    p = sub.add_parser("update", help="the device's OTA updater")
    us = p.add_subparsers(dest="update_command", metavar="ACTION")
    us.required = True
    chk = us.add_parser("check", help="one update pass against the configured fleet")
    add_config_options(chk)
    chk.set_defaults(func=update_check)


def update_check(args) -> int:
    import asyncio  # noqa: PLC0415

    from appliance.observe.logs import setup_logging  # noqa: PLC0415

    config = config_from_args(args)
    setup_logging(config.logging.level, config.logging.format)
    agent = device_agent(config)
    if agent is None:
        raise UpdaterError("no [updater] section in the appliance config; add one with "
                           "fleet_url and trusted_root (docs/ota.md)")

    async def one_pass() -> list[str]:
        return [*await agent.recover(), *await agent.check_once()]

    try:
        lines = asyncio.run(one_pass())
    finally:
        agent.close()
        agent.host.repo.close()
    for line in lines:
        print(line)
    if not lines:
        print("up to date")
    return 1 if any(f": {bad}" in line for line in lines
                    for bad in ("failed", "rolled_back", "rejected_in_shadow")) else 0


def device_agent(config, repo=None, engine=None, service=None):
    """The update agent for an appliance config, or None when it has no [updater] table.

    ``service``: the running server's (hot swaps go through it); None: no server in this
    process, so a running one is told over its socket, or the pointer moves."""
    if not config.updater:
        return None
    from appliance.config.profiles import choose_engine, resolve  # noqa: PLC0415
    from appliance.models.repository import Repository  # noqa: PLC0415
    from updater.wiring import make_agent  # noqa: PLC0415

    detection = resolve(config.profile)
    if engine is None:
        engine, _ = choose_engine(config.engine, detection)
    return make_agent(config.updater, config.data_path,
                      repo if repo is not None else Repository(config.data_path), engine,
                      detection.profile, service=service,
                      socket_path=None if service is not None else config.socket)
