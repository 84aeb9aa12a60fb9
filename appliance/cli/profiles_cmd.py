"""`outpost profiles list|show|detect`: the firmware profiles and which fits this host."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.config.settings import to_mapping


def register(sub) -> None:
    p = sub.add_parser("profiles", help="list, show and detect firmware profiles")
    psub = p.add_subparsers(dest="profiles_command", metavar="ACTION")
    psub.required = True
    ls = psub.add_parser("list", help="list the known profiles")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=list_profiles)
    show = psub.add_parser("show", help="print one profile's file (checked first)")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print the parsed profile as JSON")
    show.set_defaults(func=show_profile)
    det = psub.add_parser("detect", help="say which profile fits this host, and why")
    det.add_argument("--device-tree", type=Path,
                     help="read the board model from this file instead of "
                          "/proc/device-tree/model")
    det.add_argument("--json", action="store_true", help="print JSON")
    det.set_defaults(func=detect_profile)


def list_profiles(args) -> int:
    from appliance.config.profiles import all_profiles  # noqa: PLC0415

    profiles = all_profiles()
    if args.json:
        print(json.dumps([to_mapping(p) for p in profiles], indent=2))
        return 0
    print(f"{'NAME':22} {'ENGINE':11} {'PRECISION':9} {'WORKSPACE':>9} {'DLA':>3}  DESCRIPTION")
    for p in profiles:
        e = p.engine
        ws = f"{e.workspace_mb} MiB" if e.kind == "tensorrt" else "-"
        print(f"{p.name:22} {e.kind:11} {e.precision:9} {ws:>9} {p.device.dla_cores:>3}  "
              f"{p.device.description}")
    return 0


def show_profile(args) -> int:
    from appliance.config.profiles import load_profile  # noqa: PLC0415

    profile = load_profile(args.name)  # refuses an invalid file with file, key and fix
    if args.json:
        print(json.dumps(to_mapping(profile), indent=2))
    else:
        print(f"# {profile.path}")
        print(Path(profile.path).read_text(), end="")
    return 0


def detect_profile(args) -> int:
    from appliance.config.profiles import detect  # noqa: PLC0415
    from appliance.errors import InvalidArgument  # noqa: PLC0415

    if args.device_tree is not None and not args.device_tree.is_file():
        # Read as "no board model" it would answer for this host, not the board named.
        raise InvalidArgument(f"--device-tree {args.device_tree}: no such file; give a copy "
                              f"of the board's /proc/device-tree/model")
    d = detect(device_tree=args.device_tree)
    if args.json:
        print(json.dumps({"profile": d.profile.name, "source": d.source, "reason": d.reason}))
    else:
        print(f"{d.profile.name} (from {d.source}: {d.reason})")
    return 0
