"""The effective appliance config: defaults, then the TOML file, then flags (dotted keys),
then the firmware profile's defaults where the config is silent."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from appliance.config.profiles import host_memory_mb, resolve
from appliance.config.schema import Config
from appliance.config.settings import from_mapping, read_toml
from appliance.errors import ConfigError
from appliance.paths import default_data_dir, default_socket_path


def load_config(path: Path | None = None, overrides: dict | None = None) -> Config:
    """The effective config: defaults, then the file, then ``overrides`` (dotted keys)."""
    data: dict = read_toml(path) if path else {}
    where = str(path) if path else "config"
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    config = from_mapping(Config, data, where)
    config = _with_profile_defaults(config, data, where)
    data_dir = Path(config.data_dir).expanduser() if config.data_dir else default_data_dir()
    socket_path = (
        Path(config.server.socket_path).expanduser()
        if config.server.socket_path
        else default_socket_path(data_dir)
    )
    return dataclasses.replace(
        config,
        data_dir=str(data_dir.absolute()),
        server=dataclasses.replace(config.server, socket_path=str(socket_path.absolute())),
    )


def _with_profile_defaults(config: Config, data: dict, where: str) -> Config:
    """Batching, thread, memory and busy-poll defaults from the firmware profile, where
    the config is silent."""
    try:
        profile = resolve(config.profile).profile
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    given_b, given_t = data.get("batching", {}), data.get("threads", {})
    batching = dataclasses.replace(config.batching, **{
        k: v for k, v in dataclasses.asdict(profile.batching).items() if k not in given_b})
    threads = dataclasses.replace(config.threads, **{
        k: v for k, v in dataclasses.asdict(profile.threads).items() if k not in given_t})
    residency = config.residency
    if "memory_budget_mb" not in data.get("residency", {}):
        residency = dataclasses.replace(
            residency, memory_budget_mb=profile.memory.budget_mb(host_memory_mb()))
    elif residency.memory_budget_mb <= 0:
        raise ConfigError(f"{where}: residency.memory_budget_mb = "
                          f"{residency.memory_budget_mb}: a budget is a positive number of "
                          f"MiB (the whole process's memory); leave the key out for the "
                          f"firmware profile's default ({profile.name}: "
                          f"{_profile_budget(profile)})")
    server = config.server
    if "busy_poll_us" not in data.get("server", {}):
        server = dataclasses.replace(server, busy_poll_us=profile.server.busy_poll_us)
    warmup = dataclasses.replace(config.warmup, **{
        k: v for k, v in dataclasses.asdict(profile.warmup).items()
        if k not in data.get("warmup", {})})
    return dataclasses.replace(config, batching=batching, threads=threads,
                               residency=residency, server=server, warmup=warmup)


def _profile_budget(profile) -> str:
    m = profile.memory
    if m.model_budget_mb:
        return f"{m.model_budget_mb} MiB"
    return f"{m.budget_percent}% of this device's memory" if m.budget_percent else "none"
