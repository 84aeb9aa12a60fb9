"""A release's validation samples: make them, store them, check a session against them.

``samples.npz`` holds ``inputs/<name>`` arrays and ``outputs/<name>`` expected arrays.
A version passes when every output is finite and within the model config's tolerance
(``[validation] rtol, atol``) of the expected one.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from updater.errors import ReleaseError

SAMPLE_BATCH = 2


def read_samples(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"{path}: not a samples .npz file: {exc}") from exc
    inputs = {k.removeprefix("inputs/"): v for k, v in arrays.items() if k.startswith("inputs/")}
    outputs = {k.removeprefix("outputs/"): v for k, v in arrays.items()
               if k.startswith("outputs/")}
    if not inputs:
        raise ReleaseError(f"{path}: holds no 'inputs/<name>' arrays")
    return inputs, outputs


def write_samples(path: Path, inputs: dict[str, np.ndarray],
                  outputs: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **{f"inputs/{k}": v for k, v in inputs.items()},
             **{f"outputs/{k}": v for k, v in outputs.items()})
    Path(path).write_bytes(buf.getvalue())


def random_inputs(specs, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs shaped by the specs (dynamic dims: SAMPLE_BATCH for dim 0, else 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = [d if d >= 0 else (SAMPLE_BATCH if i == 0 else 1)
                 for i, d in enumerate(spec.shape)]
        if spec.dtype.startswith("float"):
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            out[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            out[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
    return out


# The least (rtol, atol) a reduced-precision engine is held to against expected outputs
# computed in fp32: fp16 keeps ~3 significant digits and errors add up through layers.
PRECISION_FLOOR = {"fp32": (0.0, 0.0), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 5e-2),
                   "int8": (1e-1, 5e-2)}


def tolerances(rtol: float, atol: float, engine_kind: str, precision: str
               ) -> tuple[float, float]:
    """The model's [validation] tolerances, widened to what the engine's precision can
    meet: ONNX Runtime on the CPU runs fp32 whatever the profile says."""
    if engine_kind != "tensorrt":
        return rtol, atol
    floor_rtol, floor_atol = PRECISION_FLOOR.get(precision, (0.0, 0.0))
    return max(rtol, floor_rtol), max(atol, floor_atol)


def compare(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], rtol: float,
            atol: float, where: str) -> None:
    """Raise ReleaseError naming the first output that is not finite or out of tolerance."""
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            raise ReleaseError(f"{where}: the model gave no output '{name}'")
        if have.dtype.kind == "f" and not np.all(np.isfinite(have)):
            raise ReleaseError(f"{where}: output '{name}' has non-finite values (NaN/inf)")
        if have.shape != want.shape:
            raise ReleaseError(f"{where}: output '{name}' has shape {list(have.shape)}, the "
                               f"samples expect {list(want.shape)}")
        if not np.allclose(have, want, rtol=rtol, atol=atol):
            worst = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
            raise ReleaseError(f"{where}: output '{name}' differs from the expected values "
                               f"by up to {worst:.3g} (rtol {rtol}, atol {atol})")


def run_session(session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the samples one row at a time if the session caps the batch below theirs."""
    mbs = session.max_batch_size
    rows = next(iter(inputs.values())).shape[0] if mbs else 0
    if not mbs or rows <= mbs:
        return session.run(inputs)
    parts = [session.run({k: v[i:i + mbs] for k, v in inputs.items()})
             for i in range(0, rows, mbs)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def make_release_samples(model: Path, config_path: Path | None, samples: Path | None,
                         out_dir: Path) -> tuple[Path, Path]:
    """The completed config.toml and a samples.npz with expected outputs, under out_dir.

    Expected outputs given in ``samples`` are kept; missing ones come from running the
    model with ONNX Runtime on the CPU (the reference the devices are compared against).
    """
    from appliance.config.schema import BatchingConfig  # noqa: PLC0415
    from appliance.models.loaded import build_options  # noqa: PLC0415
    from appliance.models.model_config import complete, load_model_config, model_config_to_toml
    from appliance.models.repository import check_onnx  # noqa: PLC0415
    from engines import RuntimeOptions  # noqa: PLC0415
    from engines.onnxruntime_engine import OnnxRuntimeEngine  # noqa: PLC0415

    check_onnx(model)
    config = complete(load_model_config(config_path), model, BatchingConfig(),
                      str(config_path or model))
    config_out = out_dir / "config.toml"
    config_out.write_text(model_config_to_toml(config))
    if samples is not None:
        inputs, outputs = read_samples(samples)
    else:
        inputs, outputs = random_inputs(config.input_specs()), {}
    if not outputs:
        engine = OnnxRuntimeEngine()
        opts = build_options(config)
        artifact = engine.prepare(model, opts, out_dir / "cache")
        outputs = run_session(engine.load(artifact, opts, RuntimeOptions()), inputs)
    samples_out = out_dir / "samples.npz"
    write_samples(samples_out, inputs, outputs)
    return config_out, samples_out
