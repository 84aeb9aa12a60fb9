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
    ls.set_defaults(func=list_models)

    rm = msub.add_parser("remove", help="remove a model, or one version of it")
    add_config_options(rm)
    rm.add_argument("name")
    rm.add_argument("--version", type=int, help="remove only this version")
    rm.set_defaults(func=remove_model)


def _repo(args):
    from appliance.repository import Repository  # noqa: PLC0415

    config = config_from_args(args)
    return Repository(config.data_path), config


def add_model(args) -> int:
    repo, config = _repo(args)
    record = repo.add(args.name, args.model, version=args.version,
                      config_path=args.model_config, samples_path=args.samples,
                      defaults=config.batching, activate=False)
    engine_note = _prepare_engine(repo, config, record)
    if not args.stage:
        repo.set_active(record.model, record.version)
    cfg = record.config()
    print(f"added {record.model} version {record.version} "
          f"(max_batch_size {cfg.max_batch_size}, inputs "
          f"{', '.join(f'{s.name}:{s.dtype}{list(s.shape)}' for s in cfg.input_specs())}; "
          f"{engine_note})")
    return 0


def _prepare_engine(repo, config, record) -> str:
    """Build (or find) the engine for this device's profile now, not at the first load.

    A model that will not build is removed again, with one error saying why and what to try.
    """
    from appliance.cli.progress import BuildProgressBar  # noqa: PLC0415
    from appliance.errors import FailedPrecondition  # noqa: PLC0415
    from appliance.models import build_options  # noqa: PLC0415
    from appliance.profiles import choose_engine, resolve  # noqa: PLC0415
    from engines import EngineError  # noqa: PLC0415

    detection = resolve(config.profile)
    engine, _reason = choose_engine(config.engine, detection)
    bar = BuildProgressBar() if engine.kind == "tensorrt" else None
    if bar is not None:
        engine.progress = bar
    try:
        artifact = engine.prepare(record.model_file,
                                  build_options(record.config(), detection.profile),
                                  repo.engines_dir)
    except EngineError as exc:
        repo.remove(record.model, record.version)
        raise FailedPrecondition(
            f"model '{record.model}' was not added: its {engine.kind} engine for profile "
            f"{detection.profile.name} could not be prepared: {exc}") from exc
    finally:
        if bar is not None:
            bar.close()
    return f"{engine.kind} engine for profile {detection.profile.name}: {artifact.path.name}"


def list_models(args) -> int:
    repo, _ = _repo(args)
    models = repo.models()
    if args.json:
        print(json.dumps([
            {"name": m.name, "active_version": m.active_version,
             "versions": [{"version": v.version, "state": v.state, "sha256": v.sha256,
                           "path": str(v.path)} for v in m.versions]}
            for m in models], indent=2))
        return 0
    if not models:
        print("no models; add one with 'outpost models add NAME model.onnx'")
    for m in models:
        versions = ", ".join(
            f"{v.version}{'*' if v.version == m.active_version else ''}"
            f"{'' if v.state == 'ready' else f' ({v.state})'}" for v in m.versions)
        print(f"{m.name:20} versions: {versions}")
    return 0


def remove_model(args) -> int:
    repo, _ = _repo(args)
    gone = repo.remove(args.name, args.version)
    print(f"removed {args.name} version{'s' if len(gone) > 1 else ''} "
          f"{', '.join(map(str, gone))}")
    return 0
