"""`outpost install`: install this executable as a systemd service on a device.

Copies the build to /opt/outpost/<version>, links /usr/local/bin/outpost, writes a
default /etc/outpost/config.toml (an existing one is kept), the system user's sysusers.d
entry and the systemd unit; on a live system creates the user and reloads systemd.
`--root DIR` installs into a folder instead (nothing on this system changes);
`--dry-run` prints the steps and does none of them. `--from` also takes a release tarball
(build/release.sh), installed only when it matches the .sha256 beside it.
"""

from __future__ import annotations

from pathlib import Path

from appliance.errors import FailedPrecondition


def register(sub) -> None:
    p = sub.add_parser("install", help="install outpost as a systemd service on this device")
    p.add_argument("--root", type=Path, default=Path("/"),
                   help="install into this folder instead of / (for images and tests)")
    p.add_argument("--dry-run", action="store_true", help="print the steps; change nothing")
    p.add_argument("--from", dest="source", type=Path, metavar="BUILD",
                   help="the build to install: dist/outpost, or a release "
                        "outpost-VERSION-linux-ARCH.tar.gz with its .sha256 beside it "
                        "(default: this executable, when it is a frozen build)")
    p.add_argument("--user", default="outpost", help="the service's system user")
    p.add_argument("--force-config", action="store_true",
                   help="replace an existing /etc/outpost/config.toml with the default")
    p.add_argument("--enable", action="store_true",
                   help="also run 'systemctl enable --now outpost' (live installs)")
    p.add_argument("--print-unit", action="store_true",
                   help="print the systemd unit for the installed executable and stop")
    p.set_defaults(func=install)


def install(args) -> int:
    from appliance.deploy.release_archive import is_release_archive, unpacked

    if args.source is None or not is_release_archive(args.source):
        return _install(args)
    with unpacked(args.source) as (folder, digest):  # refused unless its SHA-256 matches
        print(f"outpost install: {args.source} matches its .sha256 ({digest[:16]}...)")
        args.source = folder
        return _install(args)


def _install(args) -> int:
    from appliance.deploy.install import (
        PREFIX,
        Options,
        check_can_apply,
        next_steps,
        plan,
        render_unit,
    )

    if args.print_unit:
        print(render_unit(str(PREFIX / "current" / "outpost"), args.user), end="")
        return 0
    options = Options(root=args.root.absolute(), user=args.user, source=args.source,
                      force_config=args.force_config, enable=args.enable)
    steps = plan(options)
    if args.dry_run:
        print(f"outpost install --dry-run: {len(steps)} steps, none done")
        for i, step in enumerate(steps, 1):
            print(f"  {i}. {step.describe()}")
        return 0
    check_can_apply(options)
    for step in steps:
        print(f"  {step.describe()}")
        try:
            step.apply()
        except OSError as exc:
            raise FailedPrecondition(f"install stopped at '{step.describe()}': {exc}; the "
                                     "steps before it are done, and rerunning is safe") from exc
    for line in next_steps(options):
        print(f"outpost install: {line}")
    return 0
