"""`outpost models add|list|remove`: the model repository."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.cli.common import add_config_options, config_from_args


def register(sub) -> None:
    p = sub.add_parser("models", help="add, list and remove models in the repository")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True

    add = msub.add_parser("add", help="check an ONNX model and store it as a new version")
    add_config_options(add, flag="--appliance-config")
    add.add_argument("name")
    add.add_argument("model", type=Path, help="path to model.onnx")
    add.add_argument("--version", type=int, help="version number (default: next)")
    add.add_argument("--config", dest="model_config", type=Path,
                     help="the model's config.toml (batching, instances, tensors)")
    add.add_argument("--samples", type=Path, help="validation samples (.npz)")
    add.add_argument("--stage", action="store_true",
                     help="store it without making it the active version")
    add.set_defaults(func=add_model)

    ls = msub.add_parser("list", help="list models and versions")
    add_config_options(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--socket", help="the running server's socket, for its live figures "
                                     "(default: the config's)")
    ls.set_defaults(func=list_models)

    rm = msub.add_parser("remove", help="remove a model, or one version of it")
    add_config_options(rm)
    rm.add_argument("name")
    rm.add_argument("--version", type=int, help="remove only this version")
    rm.set_defaults(func=remove_model)

    register_admin(msub)


def _repo(args):
    from appliance.models.repository import Repository  # noqa: PLC0415

    config = config_from_args(args)
    return Repository(config.data_path), config


def add_model(args) -> int:
    from appliance.errors import InvalidArgument  # noqa: PLC0415

    if args.samples is not None and not args.samples.is_file():
        raise InvalidArgument(f"--samples {args.samples}: no such file")
    repo, config = _repo(args)
    record = repo.add(args.name, args.model, version=args.version,
                      config_path=args.model_config, samples_path=args.samples,
                      defaults=config.batching, activate=False)
    try:
        cfg = record.config()
        if cfg.ensemble is not None:
            what = _describe_ensemble(repo, cfg.ensemble)
        else:
            what = (f"max_batch_size {cfg.max_batch_size}, inputs "
                    f"{', '.join(f'{s.name}:{s.dtype}{list(s.shape)}' for s in cfg.input_specs())}"
                    f"; {_prepare_engine(repo, config, record)}")
        if not args.stage:
            repo.set_active(record.model, record.version)
    except BaseException:
        # Nothing half-added stays behind: a version nobody activated, with no engine.
        repo.remove(record.model, record.version)
        raise
    print(f"added {record.model} version {record.version} ({what})")
    return 0


def _describe_ensemble(repo, ensemble) -> str:
    """What an ensemble runs; a member the repository lacks yet is said on stderr (the
    ensemble is refused when it loads until the member is added)."""
    import sys  # noqa: PLC0415

    from appliance.errors import NotFound  # noqa: PLC0415

    def label(part) -> str:
        return part.model + (f" version {part.version}" if part.version is not None else "")

    parts = ensemble.steps if ensemble.kind == "pipeline" else ensemble.members
    for part in parts:
        try:
            if part.version is None:
                repo.model(part.model)
            else:
                repo.version(part.model, part.version)
        except NotFound:
            print(f"outpost: warning: member {label(part)} is not in the repository yet; "
                  f"the ensemble is refused when it loads until it is added",
                  file=sys.stderr)
    names = ", ".join(map(label, parts))
    kind = ("pipeline" if ensemble.kind == "pipeline"
            else f"{ensemble.combiner} of its members' {ensemble.output or 'output'}")
    return f"an ensemble, {kind}: {names}; its members run it, checked when it loads"


def _prepare_engine(repo, config, record) -> str:
    """Build (or find) the engine for this device's profile now, not at the first load.

    A model that will not build fails with one error saying why and what to try (the
    caller removes the version again).
    """
    from appliance.cli.progress import BuildProgressBar, MeasureProgress  # noqa: PLC0415
    from appliance.config.profiles import choose_engine, resolve  # noqa: PLC0415
    from appliance.errors import FailedPrecondition  # noqa: PLC0415
    from appliance.models import layout as layouts  # noqa: PLC0415
    from appliance.models.loaded import build_options  # noqa: PLC0415
    from engines import EngineError, RuntimeOptions  # noqa: PLC0415

    detection = resolve(config.profile)
    engine, _reason = choose_engine(config.engine, detection)
    bar = BuildProgressBar() if engine.kind == "tensorrt" else None
    if bar is not None:
        engine.progress = bar
    model_config = record.config()
    options = build_options(model_config, detection.profile)
    measuring = MeasureProgress(record.model)
    try:
        artifact = engine.prepare(record.model_file, options, repo.engines_dir)
        if bar is not None:
            bar.close()
            bar = None
        # Measured now, not at the server's first load: the next start finds it cached.
        runtime = RuntimeOptions(inter_op_threads=config.threads.inter_op)
        layout = layouts.resolve(engine, artifact, options, runtime,
                                 layouts.want_for(model_config, config, engine.kind),
                                 repo.engines_dir, progress=measuring)
    except EngineError as exc:
        raise FailedPrecondition(
            f"model '{record.model}' was not added: its {engine.kind} engine for profile "
            f"{detection.profile.name} could not be prepared: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
        measuring.close()
    repo.record_layout(record.model, record.version, layout.as_dict())
    return (f"{engine.kind} engine for profile {detection.profile.name}: "
            f"{artifact.path.name}; layout: {layout.describe()}")


def list_models(args) -> int:
    repo, config = _repo(args)
    models = repo.models()
    layouts = repo.layouts()
    live = _live_memory(args.socket or config.server.socket_path, config)
    serving = {(v["model"], v["version"]): v for v in (live or {}).get("versions", [])}
    if args.json:
        print(json.dumps([
            {"name": m.name, "active_version": m.active_version,
             "versions": [{"version": v.version, "state": v.state, "sha256": v.sha256,
                           "path": str(v.path), "layout": layouts.get((m.name, v.version)),
                           "serving": serving.get((m.name, v.version))}
                          for v in m.versions]}
            for m in models], indent=2))
        return 0
    if not models:
        print("no models; add one with 'outpost models add NAME model.onnx'")
    for m in models:
        versions = ", ".join(
            f"{v.version}{'*' if v.version == m.active_version else ''}"
            f"{'' if v.state == 'ready' else f' ({v.state})'}" for v in m.versions)
        print(f"{m.name:20} versions: {versions}")
        if m.active_version is not None and (m.name, m.active_version) in layouts:
            print(f"{'':20} layout: {_describe(layouts[(m.name, m.active_version)])}")
        for v in m.versions:
            live_v = serving.get((m.name, v.version))
            if live_v is not None:
                print(f"{'':20} serving: {_describe_serving(v.version, live_v)}")
    if live is not None and live["budget_bytes"]:
        print(f"memory: {_mib(live['accounted_bytes'])} of a {_mib(live['budget_bytes'])} "
              f"MiB budget accounted (the process {_mib(live['baseline_bytes'])} MiB before any "
              f"model; resident now {_mib(live['resident_bytes'])} MiB)")
    return 0


def _live_memory(socket_path, config) -> dict | None:
    """The running server's memory account (the stats op), or None where none answers."""
    from appliance.client import Client  # noqa: PLC0415
    from appliance.errors import OutpostError  # noqa: PLC0415

    try:
        with Client(socket_path, token=config.token() or None, timeout_s=5) as c:
            return c.stats().get("memory")
    except (OutpostError, OSError):
        return None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def _describe_serving(version: int, v: dict) -> str:
    if v["instances"]:
        text = (f"version {version} {v['state']}, {v['instances']} instance(s), "
                f"{_mib(v['memory_bytes'])} MiB measured ({_mib(v['instance_bytes'])} MiB "
                f"an instance)")
    else:
        text = (f"version {version} {v['state']} (held {_mib(v['last_measured_bytes'])} MiB "
                f"when last loaded)")
    if v["evictions"]:
        text += (f"; evicted {v['evictions']}x{' (out now)' if v['evicted'] else ''}: "
                 f"{v['eviction_reason']}")
    return text


def _describe(layout: dict) -> str:
    from appliance.scheduling.tuning import Layout  # noqa: PLC0415

    return Layout(**layout).describe()


def remove_model(args) -> int:
    repo, _ = _repo(args)
    gone = repo.remove(args.name, args.version)
    print(f"removed {args.name} version{'s' if len(gone) > 1 else ''} "
          f"{', '.join(map(str, gone))}")
    return 0


def register_admin(msub) -> None:
    """Commands that change what a running server serves (or, with no server, the
    pointers it will start with)."""
    from appliance.cli.common import add_connect_options

    act = msub.add_parser("activate", help="make VERSION the active version (hot swap)")
    add_config_options(act)
    add_connect_options(act)
    act.add_argument("name")
    act.add_argument("version", type=int)
    act.set_defaults(func=activate_model)

    tr = msub.add_parser("traffic", help="show or set a canary/A-B split and a shadow")
    add_config_options(tr)
    add_connect_options(tr)
    tr.add_argument("name")
    tr.add_argument("--split", action="append", metavar="VERSION=FRACTION",
                    help="a variant of the split (repeat; fractions add up to 1)")
    tr.add_argument("--sticky", action="store_true",
                    help="route by the request's routing_key, not at random")
    tr.add_argument("--shadow", type=int, metavar="VERSION",
                    help="send a copy of live requests to VERSION and compare")
    tr.add_argument("--clear", action="store_true", help="remove the run-time policy")
    tr.set_defaults(func=traffic_model)

    for verb, helptext in (("load", "load a model version into the running server"),
                           ("unload", "unload a model version from the running server")):
        p = msub.add_parser(verb, help=helptext)
        add_config_options(p)
        add_connect_options(p)
        p.add_argument("name")
        p.add_argument("--version", type=int)
        p.set_defaults(func=load_unload, verb=verb)


def _client(args, config):
    import os

    from appliance.client import Client

    return Client(args.socket or config.server.socket_path, tcp=args.tcp,
                  token=args.token or os.environ.get("OUTPOST_TOKEN") or config.token(),
                  timeout_s=600)


def activate_model(args) -> int:
    from appliance.errors import Unavailable

    repo, config = _repo(args)
    repo.version(args.name, args.version)  # NOT_FOUND before anything else
    try:
        client = _client(args, config)
    except Unavailable:
        repo.set_active(args.name, args.version)
        print(f"no server answers on {args.socket or config.server.socket_path}: "
              f"{args.name} version {args.version} is active from its next start")
        return 0
    with client:
        r = client.call("activate", model=args.name, version=args.version)
    print(f"{r['model']} version {r['version']} is active (was {r['previous']})")
    return 0


def _parse_split(items: list[str]) -> list[dict]:
    from appliance.errors import InvalidArgument

    out = []
    for item in items:
        v, sep, f = item.partition("=")
        try:
            out.append({"version": int(v), "fraction": float(f)})
        except ValueError:
            raise InvalidArgument(f"--split {item!r} must look like VERSION=FRACTION, "
                                  f"like 2=0.1") from None
        if not sep:
            raise InvalidArgument(f"--split {item!r} must look like VERSION=FRACTION")
    return out


def traffic_model(args) -> int:
    _, config = _repo(args)
    with _client(args, config) as client:
        if args.clear:
            r = client.call("traffic", model=args.name, clear=True)
        elif args.split or args.shadow is not None:
            policy = {"split": _parse_split(args.split or []), "sticky": args.sticky}
            if args.shadow is not None:
                policy["shadow"] = args.shadow
            r = client.call("traffic", model=args.name, policy=policy)
        else:
            r = client.call("traffic", model=args.name)
    print(json.dumps(r["traffic"], indent=2) if r["traffic"] else
          f"{args.name}: no traffic policy; the active version answers everything")
    return 0


def load_unload(args) -> int:
    _, config = _repo(args)
    fields = {"model": args.name}
    if args.version is not None:
        fields["version"] = args.version
    with _client(args, config) as client:
        r = client.call(args.verb, **fields)
    if args.verb == "load":
        print(f"{r['model']} version {r['version']} is {r['state']}")
    else:
        print(f"{r['model']}: unloaded version(s) {', '.join(map(str, r['unloaded']))}")
    return 0
