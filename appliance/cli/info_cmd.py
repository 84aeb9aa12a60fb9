"""`outpost info`: version, the detected profile, the engine that would serve and why, and
how it builds the profile's precision (TensorRT: weakly typed flags or a strongly typed
network from a converted graph, and why)."""

from __future__ import annotations

import json
import platform
import sys

from appliance import __version__
from appliance.cli.common import add_config_options, config_from_args


def register(sub) -> None:
    p = sub.add_parser("info", help="show version, firmware profile and engine choice")
    add_config_options(p)
    p.add_argument("--engine", help="auto | onnxruntime | tensorrt (as serve would use)")
    p.add_argument("--profile", help="firmware profile name (default: detect)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=show_info)


def gather(config) -> dict:
    from appliance.config.cpus import usable_cpus  # noqa: PLC0415
    from appliance.config.profiles import choose_engine, resolve  # noqa: PLC0415

    detection = resolve(config.profile)
    engine, reason = choose_engine(config.engine, detection)
    cpus = usable_cpus()
    return {
        "outpost": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "data_dir": config.data_dir,
        "profile": detection.profile.name,
        "profile_source": detection.source,
        "profile_reason": detection.reason,
        "engine": engine.kind,
        "engine_version": engine.version(),
        "engine_reason": reason,
        "precision": _precision(engine, detection.profile),
        "cpus": {**cpus.as_dict(), "profile_cores": detection.profile.device.cpu_cores},
        "layout_policy": {"threads": config.threads.intra_op,
                          "spinning": config.threads.spinning,
                          "instances": config.batching.instances,
                          "preferred_batch": "auto" if config.batching.auto_preferred_batch
                          else "none"},
        "layouts": _layouts(config),
    }


def _precision(engine, profile) -> str:
    """How ``engine`` builds the profile's precision, in one line."""
    from engines import BuildOptions, EngineError  # noqa: PLC0415

    precision = profile.engine.precision
    if engine.kind != "tensorrt":
        note = "" if precision == "fp32" else f" (the profile's {precision} is for TensorRT)"
        return f"fp32: {engine.kind} runs the graph as it is{note}"
    try:
        return engine.precision_path(BuildOptions(precision=precision)).describe()
    except EngineError as exc:
        return f"{precision}: cannot be built here: {exc}"


def _layouts(config) -> list[dict]:
    """The layout each model's active version last ran with here (models list shows the
    same); none when the data folder holds no repository yet."""
    from pathlib import Path  # noqa: PLC0415

    if not (Path(config.data_dir) / "state.db").exists():
        return []
    from appliance.models.repository import Repository  # noqa: PLC0415

    repo = Repository(config.data_path)
    try:
        layouts = repo.layouts()
        return [{"model": m.name, "version": m.active_version,
                 **layouts[(m.name, m.active_version)]}
                for m in repo.models() if (m.name, m.active_version) in layouts]
    finally:
        repo.close()


def show_info(args) -> int:
    config = config_from_args(args, engine=args.engine, profile=args.profile)
    info = gather(config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"outpost {info['outpost']} (Python {info['python']}, {info['platform']})")
    print(f"data dir: {info['data_dir']}")
    how = {"none": "no device profile matched, so the CPU one: ",
           "device-tree": "detected from the ", "gpu": "detected from the "}
    print(f"profile:  {info['profile']} ({how.get(info['profile_source'], '')}"
          f"{info['profile_reason']})")
    print(f"engine:   {info['engine']} {info['engine_version']} ({info['engine_reason']})")
    print(f"precision: {info['precision']}")
    cpus, policy = info["cpus"], info["layout_policy"]
    print(f"cpus:     {cpus['count']} usable ({cpus['reason']})"
          + (f"; the profile's board has {cpus['profile_cores']}" if cpus["profile_cores"]
             else ""))
    print(f"layouts:  threads {policy['threads']}, spinning {policy['spinning']}, instances "
          f"{policy['instances']}, preferred batch {policy['preferred_batch']} "
          f"(auto: measured per model at its first load)")
    from appliance.scheduling.tuning import Layout  # noqa: PLC0415

    for row in info["layouts"]:
        layout = Layout(**{k: v for k, v in row.items() if k not in ("model", "version")})
        print(f"  {row['model']} v{row['version']}: {layout.describe()}")
    return 0
