"""Is a graph converted to fp16 still the model? Checked before TensorRT builds it.

fp16's largest finite value is 65504, so a constant or an intermediate tensor past it
becomes inf (and then NaN) in the converted graph. Three checks, each refusal a
``ConversionRefused`` that names the tensor and offers fp32:

1. constants (initializers, Constant nodes) past 65504, before converting;
2. the fp32 graph run in ONNX Runtime with every intermediate tensor exposed: one that the
   converted graph holds in fp16 and that passes 65504 on the check inputs overflows. This
   is the check that finds overflows: ONNX Runtime's CPU provider runs many fp16 ops in
   fp32 (it inserts casts and removes the pairs), so running the converted graph there can
   hide them;
3. the converted graph run in ONNX Runtime: an output that turns inf/NaN where fp32 is
   finite, or one that is off by more than a tenth of its range (deliberately loose: the
   release's samples hold a version to its real tolerance in the updater's validation).

The check inputs: zeros and seeded normal values shaped by the declared ranges (open dims
as 1, the batch too), and the inputs of a ``samples.npz`` beside the model (a repository
version's own samples) where there is one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engines.base import BuildOptions
from engines.errors import ConversionRefused

log = logging.getLogger("outpost.engines")

FP16_MAX = 65504.0
GROSS_ERROR = 0.1  # of the output's largest magnitude
_FLOATS = (1, 11)  # onnx.TensorProto.FLOAT, DOUBLE
_FP32_FALLBACK = "set precision = \"fp32\" in the profile to build it in fp32"


def check_constants(model, where: str) -> None:
    """Refuse constants past fp16's range (the converter would clamp them silently)."""
    from onnx import numpy_helper  # noqa: PLC0415

    found = []
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    for name, tensor in tensors:
        if tensor.data_type not in _FLOATS:
            continue
        values = numpy_helper.to_array(tensor)
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        if peak > FP16_MAX:
            found.append(f"'{name}' holds {peak:.4g}")
    if found:
        raise ConversionRefused(
            f"{where} cannot be converted to fp16: {len(found)} constant(s) lie beyond "
            f"fp16's largest value {FP16_MAX:g} ({'; '.join(found[:3])}), and in fp16 they "
            f"would be clamped or become inf; {_FP32_FALLBACK}, or scale them into range "
            f"when exporting")


def check_converted(model, converted, options: BuildOptions, model_path: Path) -> None:
    """Refuse a converted graph that overflows or breaks on the check inputs."""
    import onnxruntime as ort  # noqa: PLC0415

    where = str(model_path)
    feeds = check_inputs(model, options, Path(model_path))
    probe, intermediate = _with_intermediates(model)
    try:
        reference = _session(ort, probe)
        runs = [(label, dict(zip([o.name for o in reference.get_outputs()],
                                 reference.run(None, f), strict=True)))
                for label, f in feeds]
    except Exception as exc:  # inputs made up from shapes may not suit every model
        log.warning("fp16 check skipped: the fp32 graph did not run on the check inputs",
                    extra={"model": where, "reason": f"{type(exc).__name__}: {exc}"})
        return
    _refuse_overflows(model, converted, runs, intermediate, where)
    try:
        half = _session(ort, converted)
        outputs = [o.name for o in half.get_outputs()]
        got = [(label, dict(zip(outputs, half.run(None, f), strict=True)))
               for label, f in feeds]
    except Exception as exc:
        raise ConversionRefused(
            f"the fp16 conversion of {where} does not run in ONNX Runtime "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"{_FP32_FALLBACK}") from exc
    for (label, want), (_, have) in zip(runs, got, strict=True):
        for name in outputs:
            _compare(where, name, label, want[name], have[name])


def check_inputs(model, options: BuildOptions, model_path: Path) -> list[tuple[str, dict]]:
    """(label, feeds): zeros, seeded normal values, and the samples beside the model."""
    from onnx import helper  # noqa: PLC0415

    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        declared = options.shape_ranges.get(vi.name)
        if declared is not None and len(declared.opt) == len(dims):
            dims = list(declared.opt)
        # open dims (the batch among them) as 1: whether a value overflows does not
        # depend on how many rows there are
        dims = [1 if d < 0 else d for d in dims]
        specs.append((vi.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    rng = np.random.default_rng(0)
    zeros = {n: np.zeros(s, d) for n, s, d in specs}
    normal = {n: (rng.standard_normal(s).astype(d) if d.kind == "f" else
                  rng.integers(0, 2 if d.kind == "b" else 10, s).astype(d))
              for n, s, d in specs}
    feeds = [("zero", zeros), ("random", normal)]
    samples = model_path.with_name("samples.npz")
    if samples.is_file():
        try:
            with np.load(samples, allow_pickle=False) as npz:
                given = {k.removeprefix("inputs/"): npz[k] for k in npz.files
                         if k.startswith("inputs/")}
        except (OSError, ValueError):
            given = {}
        if given and set(given) == {n for n, _, _ in specs}:
            feeds.append(("sample", given))
    return feeds


def _session(ort, model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _with_intermediates(model):
    """A copy of ``model`` whose every float intermediate is also an output."""
    import onnx  # noqa: PLC0415

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # without types the intermediates can't be exposed; outputs still are
        return model, []
    outputs = {o.name for o in model.graph.output}
    extra = [v for v in inferred.graph.value_info
             if v.type.tensor_type.elem_type in _FLOATS and v.name not in outputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(extra)
    return probe, [v.name for v in extra]


def _refuse_overflows(model, converted, runs, intermediate: list[str], where: str) -> None:
    import onnx  # noqa: PLC0415

    try:
        typed = onnx.shape_inference.infer_shapes(converted).graph.value_info
        kept_fp32 = {v.name for v in typed if v.type.tensor_type.elem_type in _FLOATS}
    except Exception:
        kept_fp32 = set()
    producer = {out: n for n in model.graph.node for out in n.output}
    found = []
    for name in intermediate:
        if name in kept_fp32:
            continue  # the converter left it in fp32
        for label, values in runs:
            peak = float(np.max(np.abs(values[name]))) if values[name].size else 0.0
            if peak > FP16_MAX:
                node = producer.get(name)
                what = f"node '{node.name}' ({node.op_type})" if node is not None and \
                    node.name else (f"a {node.op_type} node" if node is not None else "")
                found.append(f"'{name}'" + (f" from {what}" if what else "")
                             + f" reaches {peak:.4g} on {label} inputs")
                break
    if found:
        raise ConversionRefused(
            f"the fp16 conversion of {where} overflows: {len(found)} intermediate tensor(s) "
            f"pass fp16's largest value {FP16_MAX:g} ({'; '.join(found[:3])}) and would "
            f"become inf; {_FP32_FALLBACK}")


def _compare(where: str, name: str, label: str, want: np.ndarray, have: np.ndarray) -> None:
    if want.dtype.kind != "f":
        return
    finite = np.isfinite(want)
    broken = finite & ~np.isfinite(have)
    if broken.any():
        raise ConversionRefused(
            f"the fp16 conversion of {where} breaks output '{name}': "
            f"{int(broken.sum())} of its {want.size} values become inf or NaN on {label} "
            f"inputs where fp32 gives finite ones; {_FP32_FALLBACK}")
    if not finite.any():
        return
    a, b = want[finite].astype(np.float64), have[finite].astype(np.float64)
    scale = float(np.max(np.abs(a)))
    err = float(np.max(np.abs(a - b)))
    if err > GROSS_ERROR * scale + 1e-3:
        raise ConversionRefused(
            f"the fp16 conversion of {where} changes output '{name}' by up to {err:.3g} on "
            f"{label} inputs, against values up to {scale:.3g} in fp32; {_FP32_FALLBACK}")
