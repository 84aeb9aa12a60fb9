"""`outpost info`: version, the detected profile, and the engine that would serve, and why."""

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
    from appliance.config.profiles import choose_engine, resolve  # noqa: PLC0415

    detection = resolve(config.profile)
    engine, reason = choose_engine(config.engine, detection)
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
    }


def show_info(args) -> int:
    config = config_from_args(args, engine=args.engine, profile=args.profile)
    info = gather(config)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"outpost {info['outpost']} (Python {info['python']}, {info['platform']})")
    print(f"data dir: {info['data_dir']}")
    print(f"profile:  {info['profile']} (from {info['profile_source']}: "
          f"{info['profile_reason']})")
    print(f"engine:   {info['engine']} {info['engine_version']} ({info['engine_reason']})")
    return 0
