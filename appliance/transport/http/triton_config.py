"""What Triton describes of a model version, as maps both v2 transports serve.

The config as Triton's ``GET /v2/models/{m}/config`` serves it: its ModelConfig protobuf
as JSON; clients such as perf_analyzer read ``max_batch_size``, ``input``/``output``
(``dims`` without the batch dim when ``max_batch_size > 0``) and the scheduling sections
from it. The statistics extension's figures and the tensor metadata too. The gRPC
transport parses the same maps into its messages, so the two answer alike. Pure: spec in,
map out.
"""

from __future__ import annotations

from appliance.serving.contract import VersionInfo
from appliance.transport.http.codec import v2_datatype

# The v2 extensions served (ServerMetadata, GET /v2): the same on HTTP and gRPC, as in
# Triton, where the list is the server's
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics",
              "system_shared_memory"]

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


def tensor_metadata(spec) -> dict:
    """An input or output as the model metadata lists it (-1: a dynamic dim)."""
    return {"name": spec.name, "datatype": v2_datatype(spec.dtype), "shape": list(spec.shape)}


def _duration(count: int, seconds: float) -> dict:
    return {"count": count, "ns": int(seconds * 1e9)}


def model_statistics(info: VersionInfo) -> dict:
    """Triton's statistics extension for one version, from the figures the `stats` op
    reports (what outpost does not measure apart is 0)."""
    st = info.stats
    ok = st.request_success
    return {
        "name": info.name, "version": str(info.version),
        "last_inference": 0,
        "inference_count": st.inference_count, "execution_count": st.execution_count,
        "inference_stats": {
            "success": _duration(ok, st.request_s_total),
            "fail": _duration(st.request_failure, 0.0),
            "queue": _duration(ok, st.queue_s_total),
            "compute_input": _duration(ok, 0.0),
            "compute_infer": _duration(ok, st.compute_s_total),
            "compute_output": _duration(ok, 0.0),
            "cache_hit": _duration(0, 0.0),
            "cache_miss": _duration(0, 0.0),
        },
        "batch_stats": [],
    }
