"""`outpost compile model.onnx --profile NAME [-o out.plan]`: build a TensorRT plan.

The plan is built on this host's GPU with the profile's build fields (precision,
workspace, optimisation level, DLA core) and the model's batch range; it runs on GPUs of
the same model and TensorRT version (or later ones, with version_compatible). It says how
the precision was built: weakly typed with builder flags (TensorRT before 10.12), or
strongly typed from a graph converted to fp16 (10.12 and later), and why. A conversion that
would break the model is refused with the fp32 build offered (``--precision fp32``).
Beside the plan it writes ``PLAN.json``, the plan's key (engines/tensorrt/plan_key.py:
TensorRT can't read it from the plan itself), which it prints and ``--key-of PLAN`` shows
again; `outpost fleet attach-engine` signs the plan and its key into a release.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import threading
import time
from pathlib import Path

from appliance.cli.common import add_config_options, config_from_args
from appliance.cli.progress import BuildProgressBar
from appliance.config.profiles import PRECISIONS
from appliance.errors import FailedPrecondition, InvalidArgument
from engines.errors import ConversionRefused


def register(sub) -> None:
    p = sub.add_parser("compile", help="build a TensorRT engine (plan) for a firmware profile")
    add_config_options(p, flag="--appliance-config")
    p.add_argument("model", type=Path, nargs="?", help="path to model.onnx")
    p.add_argument("--profile",
                   help="firmware profile whose build settings to use ('outpost profiles "
                        "list' shows them)")
    p.add_argument("--key-of", type=Path, metavar="PLAN",
                   help="print the plan key of PLAN (from PLAN.json, written beside it by "
                        "compile or the engine cache) and build nothing")
    p.add_argument("-o", "--output", type=Path,
                   help="where to write the plan (default: MODEL.PROFILE.plan beside it)")
    p.add_argument("--config", dest="model_config", type=Path,
                   help="the model's config.toml (max_batch_size, tensor dims)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="build in this precision instead of the profile's (fp32: when the "
                        "fp16 conversion is refused)")
    p.add_argument("--no-progress", action="store_true", help="print no progress bar")
    p.set_defaults(func=compile_model)


def compile_model(args, engine=None) -> int:
    from appliance.config.profiles import load_profile  # noqa: PLC0415
    from appliance.models.loaded import build_options  # noqa: PLC0415
    from appliance.models.model_config import complete, load_model_config  # noqa: PLC0415
    from engines.base import file_sha256  # noqa: PLC0415
    from engines.cache import write_meta  # noqa: PLC0415
    from engines.files import atomic_write_bytes  # noqa: PLC0415
    from engines.tensorrt.plan_key import plan_key, read_plan_key  # noqa: PLC0415

    if args.key_of is not None:
        if args.model is not None:
            raise InvalidArgument("--key-of reads an existing plan's key; give no model")
        print(f"plan key {read_plan_key(args.key_of)[0].describe()}")
        return 0
    if args.model is None or args.profile is None:
        raise InvalidArgument("give the model and --profile (or --key-of PLAN)")
    profile = load_profile(args.profile)
    if profile.engine.kind != "tensorrt":
        raise FailedPrecondition(
            f"profile {profile.name} serves with {profile.engine.kind}; there is no TensorRT "
            f"plan to compile for it: pick a TensorRT profile ('outpost profiles list')")
    model = Path(args.model)
    if not model.is_file():
        raise InvalidArgument(f"{model}: no such model file")
    config = config_from_args(args, profile=profile.name)
    model_config = complete(load_model_config(args.model_config), model, config.batching,
                            str(args.model_config or model))
    options = build_options(model_config, profile)
    if args.precision:
        options = dataclasses.replace(options, precision=args.precision)
    if engine is None:
        engine = _tensorrt_here()
    _warn_other_gpu(engine.gpu, profile)
    out = args.output or model.with_name(f"{model.stem}.{profile.name}.plan")
    cache = Path(config.data_dir) / "engines"  # the timing cache, a converted graph
    cache.mkdir(parents=True, exist_ok=True)
    path = engine.precision_path(options)
    bar = None if args.no_progress else BuildProgressBar()
    t0 = time.monotonic()
    try:
        plan = _build_interruptibly(engine, model, options, engine.timing_cache_path(cache),
                                    cache, bar)
    except ConversionRefused as exc:
        raise ConversionRefused(f"{exc} (here: add --precision {exc.fallback})") from exc
    atomic_write_bytes(out, plan)
    # its key beside it, as the engine cache keeps one: TensorRT can't read it from the plan
    meta = engine.plan_meta(file_sha256(model), options, path)
    write_meta(out, meta, hashlib.sha256(plan).hexdigest(), len(plan))
    print(f"wrote {out} ({len(plan) / (1 << 20):.1f} MiB): {model.name} for {engine.gpu.name} "
          f"({engine.gpu.sm}) with TensorRT {engine.version()}, profile {profile.name} "
          f"(precision {options.precision}, batch 1..{options.max_batch_size or 1}), "
          f"built in {time.monotonic() - t0:.1f} s")
    print(f"precision {path.describe()}")
    print(f"plan key {plan_key(meta).describe()} (in {out}.json; 'outpost fleet "
          f"attach-engine' signs it into a release)")
    return 0


def _tensorrt_here():
    from engines import EngineUnavailable  # noqa: PLC0415
    from engines.tensorrt import TensorRTEngine, probe  # noqa: PLC0415

    ok, reason = probe()
    if not ok:
        raise EngineUnavailable(f"TensorRT can't build on this host: {reason}; run "
                                f"'outpost compile' on the target device (or one with the "
                                f"same GPU and TensorRT version)")
    return TensorRTEngine()


def _warn_other_gpu(gpu, profile) -> None:
    want = profile.device.compute_capability
    have = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
    if want and want != have:
        print(f"outpost: warning: profile {profile.name} is for compute capability {want} but "
              f"this GPU ({gpu.name}) is {have}; the plan will only run on GPUs like this one",
              file=sys.stderr)


def _build_interruptibly(engine, model, options, timing, cache, bar) -> bytes:
    """Build in a worker thread, so Ctrl-C asks TensorRT to cancel instead of killing it."""
    result: dict = {}

    def work():
        try:
            result["plan"] = engine.build(model, options, timing_cache=timing, progress=bar,
                                          cache_dir=cache)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=work, name="trt-build", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        if bar is not None:
            bar.cancelled = True
        worker.join()
        raise
    finally:
        if bar is not None:
            bar.close()
    if "error" in result:
        raise result["error"]
    return result["plan"]
