"""`outpost fleet ...`: the fleet manager's commands (the updater package's fleet side).

Heavy imports happen inside the command functions; updater errors reach the one handler
in main.py and become one line on stderr, exit status 1.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

from updater.errors import UpdaterError


def _fraction(text: str) -> float:
    import argparse  # noqa: PLC0415

    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in 0..1") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in 0..1 (0.05 means 5%)")
    return value


def _versions(text: str) -> tuple[int, ...]:
    import argparse  # noqa: PLC0415

    try:
        out = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} must be versions like 6 or 6,5") from exc
    if any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"{text!r}: versions are positive integers")
    return out


def _selector(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UpdaterError(f"--selector {item!r} must look like key=value")
        out[key] = value
    return out


def _add_db(parser) -> None:
    parser.add_argument("--db", metavar="URL",
                        help="the fleet's store of reports and decisions: DIR/fleet.db "
                             "(SQLite, the default) or postgresql://user@host:port/dbname, "
                             "shared by replicas (docs/ota.md); default $OUTPOST_FLEET_DB")


def _store(args, directory: Path):
    """The fleet store --db (or $OUTPOST_FLEET_DB, which keeps a password out of ps) names."""
    import os  # noqa: PLC0415

    from updater.fleet_store import open_fleet_store  # noqa: PLC0415

    return open_fleet_store(directory, args.db or os.environ.get("OUTPOST_FLEET_DB"))


def register(sub) -> None:
    p = sub.add_parser("fleet", help="publish model releases and roll them out (TUF)")
    fs = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    fs.required = True

    init = fs.add_parser("init", help="make a fleet repository: keys and signed metadata")
    init.add_argument("dir", type=Path)
    init.add_argument("--root-key", type=Path,
                      help="write the root key here (default DIR/keys/root.pem); keep it "
                           "offline")
    for role, days in (("root", 365), ("targets", 90), ("snapshot", 7), ("timestamp", 1)):
        init.add_argument(f"--{role}-expiry-days", type=float, default=float(days))
    init.set_defaults(func=fleet_init)

    pub = fs.add_parser("publish", help="publish a release (not yet rolled out)")
    pub.add_argument("dir", type=Path)
    pub.add_argument("model", type=Path)
    pub.add_argument("--name", required=True)
    pub.add_argument("--version", type=int, required=True)
    pub.add_argument("--config", type=Path, help="the model's config.toml")
    pub.add_argument("--samples", type=Path,
                     help="validation samples .npz (inputs/<name>, outputs/<name>); expected "
                          "outputs are computed from the model when missing")
    pub.add_argument("--delta-from", type=_versions, default=(), metavar="V[,V...]",
                     help="also publish deltas of the model from these earlier versions; "
                          "devices holding one download the delta instead (docs/ota.md)")
    act = pub.add_argument_group(
        "activation", "when devices swap to it once it is ready (default: at once); the "
        "local app may defer it (docs/ota.md)")
    act.add_argument("--activate-window", metavar="HH:MM-HH:MM",
                     help="activate only inside this window of the device's local time "
                          "(comma-separated for several; 22:00-04:00 spans midnight)")
    act.add_argument("--activate", metavar="on-request",
                     help="on-request: activate when the local app allows it")
    act.add_argument("--max-deferral", metavar="DURATION",
                     help="how long after it is ready the app may hold it back: 30m, 24h, "
                          "2d (default 24h); then the device activates anyway")
    pub.set_defaults(func=fleet_publish)

    ro = fs.add_parser("rollout", help="start a rollout to a fraction of the fleet")
    ro.add_argument("dir", type=Path)
    ro.add_argument("name")
    ro.add_argument("version", type=int)
    ro.add_argument("--fraction", type=_fraction,
                    help="share of the fleet, 0..1 (or give --plan)")
    ro.add_argument("--selector", action="append", metavar="KEY=VALUE",
                    help="device labels that must match (repeat)")
    ro.add_argument("--failure-threshold", type=_fraction, default=0.1,
                    help="halt past this share of failures among executed devices")
    ro.add_argument("--min-reports", type=int, default=5,
                    help="executed (final) devices needed before a halt is judged, for "
                         "the cohort and for each stage")
    pl = ro.add_argument_group(
        "rollout plan", "stages the fleet server advances by itself (docs/ota.md)")
    pl.add_argument("--plan", metavar="PCT,PCT,...",
                    help="stages in percent of the fleet, rising, ending at 100: 1,5,25,100")
    pl.add_argument("--soak", metavar="DURATION",
                    help="how long a stage must hold its figures before it advances: "
                         "30s, 30m, 2h (default 30m)")
    pl.add_argument("--min-committed", type=float, metavar="SHARE",
                    help="share of the stage's known cohort that must have committed, "
                         "(0, 1] (default 0.95)")
    sh = ro.add_argument_group(
        "shadow phase", "a device runs the release as a shadow of its active version on "
        "its own live traffic, and answers with it only if it agrees (docs/ota.md)")
    sh.add_argument("--shadow", metavar="DURATION",
                    help="shadow window per device: 30s, 10m, 1h (no shadow phase if left "
                         "out)")
    sh.add_argument("--shadow-min-requests", type=int, metavar="N",
                    help="live requests to compare at least (default 100)")
    sh.add_argument("--max-disagreement", type=float, metavar="SHARE",
                    help="largest share of requests answered otherwise, 0..1 (default 0.01)")
    sh.add_argument("--max-latency-ratio", type=float, metavar="RATIO",
                    help="largest p50 and p99 latency against the active version's, >= 1 "
                         "(default 2)")
    sh.add_argument("--shadow-sample", type=float, metavar="SHARE",
                    help="share of live requests copied to the shadow, (0, 1] (default 1)")
    ro.set_defaults(func=fleet_rollout)

    ae = fs.add_parser("attach-engine", help="add a prebuilt TensorRT plan to a release: "
                                             "devices whose plan key matches take it "
                                             "instead of building (docs/ota.md)")
    ae.add_argument("dir", type=Path)
    ae.add_argument("name")
    ae.add_argument("version", type=int)
    ae.add_argument("plan", type=Path, help="the plan 'outpost compile' wrote (its key is "
                                            "in PLAN.json beside it)")
    ae.add_argument("--profile", required=True,
                    help="the firmware profile of the devices it is for")
    ae.set_defaults(func=fleet_attach_engine)

    pr = fs.add_parser("promote", help="raise a rollout's fraction (keeps its cohort)")
    pr.add_argument("dir", type=Path)
    pr.add_argument("name")
    pr.add_argument("version", type=int)
    pr.add_argument("--fraction", type=_fraction, required=True)
    pr.set_defaults(func=fleet_promote)

    for action, state in (("pause", "paused"), ("resume", "active"), ("halt", "halted")):
        a = fs.add_parser(action, help=f"set a rollout {state}")
        a.add_argument("dir", type=Path)
        a.add_argument("name")
        a.add_argument("version", type=int)
        a.set_defaults(func=functools.partial(fleet_state, state=state))

    st = fs.add_parser("status", help="per rollout, how many devices report each state")
    st.add_argument("dir", type=Path)
    st.add_argument("name", nargs="?")
    st.add_argument("--json", action="store_true")
    _add_db(st)
    st.set_defaults(func=fleet_status)

    dv = fs.add_parser("devices", help="each device's last report, version, labels and "
                                       "when the fleet last heard from it")
    dv.add_argument("dir", type=Path)
    dv.add_argument("--json", action="store_true")
    _add_db(dv)
    dv.set_defaults(func=fleet_devices)

    rk = fs.add_parser("rotate-key", help="give a role a new key (root N+1; devices follow)")
    rk.add_argument("dir", type=Path)
    rk.add_argument("role", choices=("root", "targets", "snapshot", "timestamp"))
    rk.add_argument("--root-key", type=Path,
                    help="the current root key (default DIR/keys/root.pem)")
    rk.add_argument("--new-root-key", type=Path,
                    help="role root: write the new root key here (default: over --root-key)")
    rk.set_defaults(func=fleet_rotate_key)

    dk = fs.add_parser("device-key", help="a device's report key (its updater.report_key_file)")
    dk.add_argument("dir", type=Path)
    dk.add_argument("device_id")
    dk.add_argument("--out", type=Path, help="write it to this file (mode 0600) instead of "
                                             "printing it")
    dk.set_defaults(func=fleet_device_key)

    sv = fs.add_parser("serve", help="serve the repository and take device reports")
    sv.add_argument("dir", type=Path)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8470)
    _add_db(sv)
    sv.add_argument("--timestamp-check-s", type=float, default=60.0,
                    help="how often to renew the timestamp when half its life is gone "
                         "(0: never; devices then stop updating when it expires)")
    sv.add_argument("--plan-check-s", type=float, default=5.0,
                    help="how often planned rollouts are judged for their next stage")
    sv.add_argument("--sync-to", metavar="DEST",
                    help="also publish the repository to this folder (as 'fleet sync') "
                         "whenever it is re-signed, for a static server in front of devices")
    sv.set_defaults(func=fleet_serve)

    sy = fs.add_parser("sync", help="publish the repository to a folder a static web "
                                    "server serves: targets, then metadata, timestamp last")
    sy.add_argument("dir", type=Path)
    sy.add_argument("dest", metavar="DEST", help="the folder (or file:///path) to publish to")
    sy.add_argument("--prune", action="store_true",
                    help="after the timestamp, remove target files the metadata no longer "
                         "names")
    sy.set_defaults(func=fleet_sync)


def fleet_init(args) -> int:
    from updater.fleet_repo import Expiry, init_repo  # noqa: PLC0415

    expiry = Expiry(args.root_expiry_days, args.targets_expiry_days,
                    args.snapshot_expiry_days, args.timestamp_expiry_days)
    root_key = init_repo(args.dir, expiry=expiry, root_key_path=args.root_key)
    print(f"fleet repository in {args.dir}\n"
          f"  devices trust {args.dir / 'metadata' / '1.root.json'} (updater.trusted_root)\n"
          f"  root key {root_key}: move it offline; it is needed only to rotate keys\n"
          f"  online keys in {args.dir / 'keys'} sign targets, snapshot and timestamp")
    return 0


def fleet_publish(args) -> int:
    from appliance.models.repository import check_model_name  # noqa: PLC0415
    from updater.fleet_repo import FleetRepo  # noqa: PLC0415
    from updater.validation import make_release_samples  # noqa: PLC0415

    check_model_name(args.name)
    if args.version < 1:
        raise UpdaterError(f"--version {args.version} must be a positive integer")
    if not args.model.is_file():
        raise UpdaterError(f"{args.model}: no such model file")
    activation = _activation_policy(args)
    repo = FleetRepo(args.dir)
    with tempfile.TemporaryDirectory() as tmp:
        config, samples = make_release_samples(args.model, args.config, args.samples,
                                               Path(tmp))
        rel = repo.publish(args.name, args.version, args.model, config, samples,
                           delta_from=args.delta_from, activation=activation)
    print(f"published {rel.model} {rel.version} as {rel.target_path}; no device takes it "
          f"until 'outpost fleet rollout'")
    if activation is not None:
        print(f"activation: {activation.describe()}")
    for d in getattr(repo, "last_deltas", []):
        sizes = ", ".join(f"{m} {n:,} B ({n / d['release_length']:.1%})"
                          for m, n in d["sizes"].items())
        kept = (f"kept {d['method']}" if min(d["sizes"].values()) < d["release_length"]
                else "not published: no smaller than the release")
        print(f"delta from {d['base_version']}: {sizes} of {d['release_length']:,} B; {kept}")
    return 0


def _activation_policy(args):
    """The release's activation policy from the publish flags (None: at once), checked."""
    from updater.activation import ActivationPolicyError, policy_from_flags  # noqa: PLC0415

    try:
        return policy_from_flags(args.activate_window, args.activate, args.max_deferral)
    except ActivationPolicyError as exc:
        raise UpdaterError(str(exc)) from None


def fleet_rollout(args) -> int:
    from updater.fleet_repo import FleetRepo  # noqa: PLC0415

    if args.min_reports < 1:
        raise UpdaterError("--min-reports must be >= 1")
    shadow = _shadow_policy(args)
    plan = _plan(args)
    if (args.fraction is None) == (plan is None):
        raise UpdaterError("give --fraction (one stage, promoted by hand) or --plan "
                           "(stages the fleet server advances), not both" if plan else
                           "give --fraction 0.05 or --plan 1,5,25,100")
    r = FleetRepo(args.dir).set_rollout(
        args.name, args.version, new=True,
        fraction=plan.stages[0] if plan else args.fraction,
        selector=_selector(args.selector), failure_threshold=args.failure_threshold,
        min_reports=args.min_reports, state="active", shadow=shadow, plan=plan)
    print(f"rollout {r.id}: {args.name} {args.version} to {r.fraction:.1%} of devices"
          + (f" matching {r.selector}" if r.selector else "")
          + (f"; {r.plan.describe()}" if r.plan else "")
          + (f"; {r.shadow.describe()}" if r.shadow else ""))
    return 0


def _plan(args):
    """The rollout's plan from --plan, --soak and --min-committed (None without --plan)."""
    from updater.plans import Plan, PlanError, parse_soak, parse_stages  # noqa: PLC0415

    if args.plan is None:
        if args.soak is not None or args.min_committed is not None:
            flag = "--soak" if args.soak is not None else "--min-committed"
            raise UpdaterError(f"{flag} belongs to a rollout plan; give --plan too "
                               f"(e.g. --plan 1,5,25,100)")
        return None
    try:
        plan = Plan(parse_stages(args.plan), parse_soak(args.soak or "30m"),
                    0.95 if args.min_committed is None else args.min_committed)
        plan.check()
    except PlanError as exc:
        raise UpdaterError(str(exc)) from exc
    return plan


_SHADOW_FLAGS = {"shadow_min_requests": ("--shadow-min-requests", "min_requests"),
                 "max_disagreement": ("--max-disagreement", "max_disagreement"),
                 "max_latency_ratio": ("--max-latency-ratio", "max_latency_ratio"),
                 "shadow_sample": ("--shadow-sample", "sample")}


def _shadow_policy(args):
    """The rollout's shadow phase from the flags (None without --shadow), checked."""
    from updater.shadow import ShadowPolicy, ShadowPolicyError, parse_duration  # noqa: PLC0415

    given = {field: getattr(args, attr) for attr, (_, field) in _SHADOW_FLAGS.items()
             if getattr(args, attr) is not None}
    if args.shadow is None:
        if given:
            flag = next(f for a, (f, _) in _SHADOW_FLAGS.items() if getattr(args, a) is not None)
            raise UpdaterError(f"{flag} is a limit of the shadow phase; give --shadow "
                               f"DURATION too (e.g. --shadow 10m)")
        return None
    flags = {field: flag for flag, field in _SHADOW_FLAGS.values()}
    try:
        policy = ShadowPolicy(window_s=parse_duration(args.shadow), **given)
        policy.check()
    except ShadowPolicyError as exc:
        text = str(exc)
        for field, flag in {"window": "--shadow", **flags}.items():
            text = text.replace(f"shadow {field} ", f"{flag} ", 1)
        raise UpdaterError(text) from exc
    return policy


def fleet_attach_engine(args) -> int:
    from appliance.config.profiles import load_profile  # noqa: PLC0415
    from engines.tensorrt.plan_key import PlanKeyError, read_plan_key  # noqa: PLC0415
    from updater.fleet_repo import FleetRepo  # noqa: PLC0415
    from updater.prebuilt import check_plan_fits  # noqa: PLC0415

    repo = FleetRepo(args.dir)
    config = repo.release_member(args.name, args.version, "config.toml")  # it exists
    profile = load_profile(args.profile)
    if not args.plan.is_file() or args.plan.stat().st_size == 0:
        raise UpdaterError(f"{args.plan}: " + ("an empty file; " if args.plan.is_file()
                                               else "no such plan file; ")
                           + "make the plan with 'outpost compile' on a reference device")
    try:
        key, meta = read_plan_key(args.plan)
    except PlanKeyError as exc:
        raise UpdaterError(str(exc)) from None
    check_plan_fits(key, config, profile, f"{args.name} {args.version}", args.plan)
    path = repo.attach_engine(args.name, args.version, args.plan, profile=profile.name,
                              key=key.as_custom(), source_sha256=meta["source_sha256"])
    print(f"attached {args.plan} to {args.name} {args.version} as {path} for "
          f"{profile.name} devices with plan key {key.describe()}; the others build")
    return 0


def fleet_promote(args) -> int:
    from updater.fleet_repo import FleetRepo  # noqa: PLC0415

    repo = FleetRepo(args.dir)
    if repo.release(args.name, args.version).rollout is None:
        raise UpdaterError(f"{args.name} {args.version} has no rollout; start one with "
                           f"'outpost fleet rollout'")
    r = repo.set_rollout(args.name, args.version, fraction=args.fraction)
    print(f"rollout {r.id}: {args.name} {args.version} now {r.fraction:.1%} ({r.state})")
    return 0


def fleet_state(args, state: str) -> int:
    from updater.fleet_repo import FleetRepo  # noqa: PLC0415

    repo = FleetRepo(args.dir)
    if repo.release(args.name, args.version).rollout is None:
        raise UpdaterError(f"{args.name} {args.version} has no rollout to change")
    r = repo.set_rollout(args.name, args.version, state=state)
    print(f"rollout {r.id}: {args.name} {args.version} is {r.state}")
    return 0


def fleet_status(args) -> int:
    from updater.fleet_repo import FleetRepo  # noqa: PLC0415
    from updater.fleet_rollouts import LiveRollouts  # noqa: PLC0415
    from updater.fleet_server import status_report  # noqa: PLC0415

    repo = FleetRepo(args.dir)
    db = _store(args, repo.dir)
    try:
        rows = [r for r in status_report(LiveRollouts(repo, db))
                if args.name in (None, r["model"])]
    finally:
        db.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no releases" + (f" of {args.name}" if args.name else ""))
    for r in rows:
        ro = r["rollout"]
        head = f"{r['model']} {r['version']}: " + (
            f"{ro['state']} at {ro['fraction']:.1%} (rollout {ro['id']})" if ro
            else "published, not rolled out")
        devices = ", ".join(f"{k} {v}" for k, v in sorted(r["devices"].items()))
        print(head + (f"; devices: {devices}" if devices else ""))
        if r.get("plan") is not None:
            print("  " + _plan_line(r["plan"]))
        if r.get("shadow") is not None:
            print("  " + _shadow_line(ro["shadow"], r["shadow"]))
        if ro:
            print("  " + _travel_line(r))
    return 0


def _travel_line(r: dict) -> str:
    """How a rollout's release travelled: bytes as deltas and as full files, devices
    waiting for a window or their app, engines prebuilt or built."""
    d, w, e = r["downloads"], r["waiting"], r["engines"]
    return (f"downloads: {d['delta']['devices']} as deltas ({d['delta']['bytes']:,} bytes), "
            f"{d['full']['devices']} as full files ({d['full']['bytes']:,} bytes); "
            f"{d['bytes']:,} bytes sent of {d['full_release_bytes']:,} as full files "
            f"({d['saved_bytes']:,} saved); waiting: {w['window']} for a window, "
            f"{w['app']} for their app; engines: {e['prebuilt']} prebuilt, "
            f"{e['built']} built")


def _plan_line(p: dict) -> str:
    """One line of a planned rollout: its stage, what it waits for, when it may advance."""
    import time  # noqa: PLC0415

    f = p["figures"]
    when = ""
    if p["may_advance_at"] is not None:
        left = p["may_advance_at"] - time.time()
        when = (f"; may advance in {left:.0f}s" if left > 0 else "; may advance now") + \
            time.strftime(" (%Y-%m-%d %H:%M:%S UTC)", time.gmtime(p["may_advance_at"]))
    nxt = f", next {p['next']:.0%}" if p["next"] is not None else ""
    return (f"plan stage {p['stage']} of {p['stages']} ({p['fraction']:.0%}{nxt}): "
            f"{p['waits_for']}{when}; stage figures: {f['known']} known, {f['committed']} "
            f"committed, {f['failed']} of {f['final']} failed ({f['stage_failed']} of "
            f"{f['stage_final']} among the devices this stage added)")


def _shadow_line(limits: dict, s: dict) -> str:
    """One line of a rollout's shadow phase: its limits and what the devices measured."""
    ratio = s["worst_p99_ratio"]
    return (f"shadow {limits['window_s']:g}s, >= {limits['min_requests']} requests, "
            f"disagreement <= {limits['max_disagreement']:.1%}: {s['devices']} devices "
            f"(passed {s['passed']}, rejected {s['rejected']}, shadowing {s['shadowing']}, "
            f"waiting for traffic {s['waiting']}, skipped {s['skipped']}); "
            f"{s['requests']} requests compared, disagreement {s['disagreement']:.1%} "
            f"(worst device {s['worst_disagreement']:.1%}), {s['errors']} errors, "
            f"{s['shed']} copies shed"
            + (f", worst p99 {ratio:.2f}x the active version's" if ratio is not None else ""))


def fleet_devices(args) -> int:
    import time  # noqa: PLC0415

    from updater.fleet_repo import FleetRepo  # noqa: PLC0415

    repo = FleetRepo(args.dir)
    with _store(args, repo.dir) as db:
        rows = db.devices()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no device has reported to this fleet yet")
    now = time.time()
    for d in rows:
        labels = ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items())) or "-"
        print(f"{d['device_id']}: {d['model']} {d['version']} {d['state']} (rollout "
              f"{d['rollout_id']}), seen {_ago(now - d['last_seen'])} ago; labels {labels}"
              + (f"; {d['detail'][:120]}" if d["detail"] else ""))
    return 0


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def fleet_rotate_key(args) -> int:
    from updater.fleet_repo import FleetRepo  # noqa: PLC0415

    version = FleetRepo(args.dir).rotate_key(args.role, args.root_key, args.new_root_key)
    where = (args.new_root_key or args.root_key or args.dir / "keys" / "root.pem"
             if args.role == "root" else args.dir / "keys" / f"{args.role}.pem")
    print(f"{args.role} has a new key ({where}); root is now version {version} and the "
          f"metadata is re-signed. Devices take it on their next refresh.")
    return 0


def fleet_device_key(args) -> int:
    from updater.fleet_repo import FleetRepo  # noqa: PLC0415
    from updater.report_auth import device_key  # noqa: PLC0415

    if not args.device_id or args.device_id != args.device_id.strip():
        raise UpdaterError("the device id must be the device's updater.device_id exactly "
                           "(not empty, no surrounding spaces)")
    key = device_key(FleetRepo(args.dir).ensure_report_secret(), args.device_id).hex()
    if args.out is None:
        print(key)
        return 0
    from engines.files import atomic_write_bytes  # noqa: PLC0415

    if args.out.parent.exists() and not args.out.parent.is_dir():
        raise UpdaterError(f"--out {args.out}: {args.out.parent} is not a folder")
    atomic_write_bytes(args.out, key.encode() + b"\n", 0o600)
    print(f"report key of {args.device_id!r} in {args.out}: copy it to the device and set "
          f"updater.report_key_file to its path")
    return 0


def fleet_serve(args) -> int:
    import os  # noqa: PLC0415

    from updater.fleet_repo import FleetRepo  # noqa: PLC0415
    from updater.fleet_server import run_fleet_server  # noqa: PLC0415

    repo = FleetRepo(args.dir)  # a wrong directory fails here, in one line
    if not args.plan_check_s > 0:
        raise UpdaterError(f"--plan-check-s {args.plan_check_s} must be above 0 seconds")
    sync_to = None
    if args.sync_to is not None:
        from updater.fleet_sync import check_dest, parse_dest  # noqa: PLC0415

        sync_to = check_dest(parse_dest(args.sync_to), repo)  # a bad DEST fails at start
    return run_fleet_server(args.dir, args.host, args.port, args.timestamp_check_s,
                            args.plan_check_s, sync_to=sync_to,
                            db_url=args.db or os.environ.get("OUTPOST_FLEET_DB"))


def fleet_sync(args) -> int:
    from updater.fleet_sync import parse_dest, sync  # noqa: PLC0415

    print(sync(args.dir, parse_dest(args.dest), prune=args.prune).describe())
    return 0


