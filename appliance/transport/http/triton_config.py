"""A model version's config as Triton's ``GET /v2/models/{m}/config`` serves it.

Triton answers with its ModelConfig protobuf as JSON; clients such as perf_analyzer read
``max_batch_size``, ``input``/``output`` (``dims`` without the batch dim when
``max_batch_size > 0``) and the scheduling sections from it. Pure: spec in, map out.
"""

from __future__ import annotations

from appliance.serving.contract import VersionInfo
from appliance.transport.http.codec import v2_datatype

PLATFORMS = {"onnxruntime": ("onnxruntime_onnx", "onnxruntime"),
             "tensorrt": ("tensorrt_plan", "tensorrt")}


def platform(engine_kind: str) -> str:
    return PLATFORMS.get(engine_kind, (engine_kind, engine_kind))[0]


def _tensor(spec, batched: bool) -> dict:
    dims = list(spec.shape[1:] if batched else spec.shape)
    return {"name": spec.name, "data_type": f"TYPE_{v2_datatype(spec.dtype)}",
            "format": "FORMAT_NONE", "dims": dims, "is_shape_tensor": False,
            "allow_ragged_batch": False, "optional": False}


def model_config(lv: VersionInfo) -> dict:
    batched = lv.max_batch_size > 0
    db = lv.config.dynamic_batching
    if getattr(lv.config, "ensemble", None) is not None:
        plat = backend = "ensemble"
    else:
        plat, backend = PLATFORMS.get(lv.engine_kind, (lv.engine_kind, lv.engine_kind))
    return {
        "name": lv.name,
        "platform": plat,
        "backend": backend,
        "version_policy": {"specific": {"versions": [lv.version]}},
        "max_batch_size": lv.max_batch_size,
        "input": [_tensor(s, batched) for s in lv.inputs],
        "output": [_tensor(s, batched) for s in lv.outputs],
        "dynamic_batching": {
            # the sizes in effect: config.toml's, or those measured at load
            "preferred_batch_size": list(lv.preferred_batch_sizes),
            "max_queue_delay_microseconds": db.max_queue_delay_us or 0,
            "preserve_ordering": False,
            "priority_levels": db.priority_levels,
            "default_priority_level": db.default_priority_level,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": (db.default_timeout_ms or 0) * 1000,
                "allow_timeout_override": True,
                "max_queue_size": db.max_queue_size or 0,
            },
        },
        "instance_group": [{"name": f"{lv.name}_0", "kind": "KIND_CPU"
                            if lv.engine_kind != "tensorrt" else "KIND_GPU",
                            "count": lv.config.instances or 1}],
        "model_transaction_policy": {"decoupled": False},
        "response_cache": {"enable": False},
    }
