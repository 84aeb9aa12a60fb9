"""Wiring a device's update agent from plain objects: the [updater] table, the data
folder, the repository, the engine and firmware profile, and the running server's service
(or none). The CLI, the composition root, calls ``make_agent``."""

from __future__ import annotations

from pathlib import Path


def make_agent(table: dict, data_path: Path, repo, engine, profile, *, service=None,
               socket_path: Path | None = None):
    from updater.activation import local_clock  # noqa: PLC0415
    from updater.agent import Agent  # noqa: PLC0415
    from updater.config import from_table  # noqa: PLC0415
    from updater.host import ApplianceHost  # noqa: PLC0415

    # The firmware profile's [updater] defaults (its usual link), the config's own win
    defaults = profile.updater.defaults() if profile is not None else {}
    where = "the appliance config's [updater] table" + (
        f" (with {', '.join(defaults)} from firmware profile {profile.name})"
        if defaults else "")
    ucfg = from_table({**defaults, **table}, where)
    host = ApplianceHost(repo, engine, profile, service, socket_path)
    agent = Agent(ucfg, data_path, host, clock=local_clock())
    if service is not None:  # the app's word (update_activation) reaches this agent
        service.update_agent = agent.app_word
    return agent
