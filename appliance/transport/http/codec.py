"""Open Inference Protocol v2 tensors: JSON and the binary tensor data extension.

Pure functions of bytes and maps; nothing of models or sockets. A request body is a JSON
header, optionally followed by raw tensor bytes: ``Inference-Header-Content-Length`` says
where the JSON ends, and each input whose ``parameters.binary_data_size`` is set takes the
next that many bytes, in input order. Outputs come back the same way when asked for with
``parameters.binary_data`` (per output) or ``parameters.binary_data_output`` (request).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import prod

import numpy as np

from appliance.errors import InvalidArgument
from engines.base import DTYPE_TABLE

HEADER_LENGTH = "Inference-Header-Content-Length"

# v2 datatype <-> the NumPy dtype outpost serves (DESIGN section 2's set).
V2_TO_NUMPY = {v2: name for name, v2 in DTYPE_TABLE}
NUMPY_TO_V2 = {v: k for k, v in V2_TO_NUMPY.items()}
# dtype -> v2 name by hash lookup: ``dtype.name`` is slow enough to show in profiles.
_DTYPE_TO_V2 = {np.dtype(n).newbyteorder(o): v for n, v in NUMPY_TO_V2.items()
                for o in ("<", ">", "=")}
# Known to the protocol but not served here: say so rather than "unknown".
V2_UNSERVED = ("UINT16", "UINT32", "UINT64", "BF16", "BYTES")


def v2_datatype(numpy_name: str) -> str:
    return NUMPY_TO_V2.get(numpy_name, numpy_name.upper())


def v2_datatype_of(dtype: np.dtype) -> str:
    v2 = _DTYPE_TO_V2.get(dtype)
    return v2 if v2 is not None else v2_datatype(dtype.name)


@dataclass
class InferBody:
    """A parsed infer request: arrays by input name, and what the outputs should look like."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: every output
    binary_flags: dict[str, bool] = field(default_factory=dict)  # per-output binary_data
    binary_default: bool = False  # request-level binary_data_output
    parameters: dict = field(default_factory=dict)


def parse_infer_body(body: bytes, header_length: str | None) -> InferBody:
    """The request's JSON header and tensors; InvalidArgument naming the field at fault."""
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            json_len = -1
        if not 0 < json_len <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} is {header_length!r} but the body holds {len(body)} bytes; "
                f"it must give the length of the JSON header at the start of the body")
    else:
        json_len = len(body)
    try:
        header = json.loads(body[:json_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidArgument("the request body must be a JSON object with 'inputs'")
    rid = header.get("id")
    if rid is not None and not isinstance(rid, str):
        raise InvalidArgument("'id' must be a string")
    params = _parameters(header, "request")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    view = memoryview(body)
    offset = json_len
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise InvalidArgument(f"{where} must be an object with name, shape, datatype")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"{where}.name must be a non-empty string")
        where = f"input '{name}'"
        if name in inputs:
            raise InvalidArgument(f"{where} appears twice in 'inputs'")
        dtype, shape = _dtype_and_shape(tensor, where)
        size = _binary_size(tensor, where)
        if size is not None:
            if "data" in tensor:
                raise InvalidArgument(f"{where} has both 'data' and binary_data_size; send one")
            if offset + size > len(body):
                raise InvalidArgument(
                    f"{where} says binary_data_size {size} but only {len(body) - offset} "
                    f"bytes of binary data remain in the body")
            inputs[name] = _from_bytes(view[offset:offset + size], dtype, shape, where)
            offset += size
        else:
            inputs[name] = _from_json(tensor.get("data"), dtype, shape, where)
    if offset != len(body):
        raise InvalidArgument(
            f"the body has {len(body) - offset} bytes after the last input's binary data; "
            f"binary_data_size of the inputs must add up to the binary part")
    outputs, binary = _requested_outputs(header.get("outputs"))
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidArgument("parameters.binary_data_output must be true or false")
    return InferBody(rid, inputs, outputs, binary, binary_default, params)


def _parameters(obj: dict, where: str) -> dict:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where} 'parameters' must be a JSON object")
    return params


def _dtype_and_shape(tensor: dict, where: str) -> tuple[np.dtype, tuple[int, ...]]:
    datatype = tensor.get("datatype")
    if datatype in V2_UNSERVED:
        raise InvalidArgument(
            f"{where} has datatype {datatype}, which outpost does not serve; use one of "
            f"{', '.join(V2_TO_NUMPY)}")
    if datatype not in V2_TO_NUMPY:
        raise InvalidArgument(
            f"{where} has datatype {datatype!r}; use one of {', '.join(V2_TO_NUMPY)}")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidArgument(f"{where} shape must be a list of non-negative integers, "
                              f"got {shape!r}")
    return np.dtype(V2_TO_NUMPY[datatype]).newbyteorder("<"), tuple(shape)


def _binary_size(tensor: dict, where: str) -> int | None:
    size = _parameters(tensor, where).get("binary_data_size")
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise InvalidArgument(f"{where} binary_data_size must be a non-negative integer")
    return size


def _from_bytes(data: memoryview, dtype: np.dtype, shape: tuple[int, ...],
                where: str) -> np.ndarray:
    expected = prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{where} carries {len(data)} bytes of binary data but shape {list(shape)} of "
            f"{v2_datatype(dtype.name)} needs {expected}")
    # A read-only view over the body: no copy.
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_json(data: object, dtype: np.dtype, shape: tuple[int, ...],
               where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidArgument(f"{where} needs 'data' (a JSON list) or binary_data_size")
    flat = _flatten(data, where)
    count = prod(shape)
    if len(flat) != count:
        raise InvalidArgument(
            f"{where} has {len(flat)} elements in 'data' but shape {list(shape)} holds {count}")
    if dtype.kind == "b":
        if not all(isinstance(v, bool) for v in flat):
            raise InvalidArgument(f"{where} is BOOL: 'data' must hold true and false")
    elif any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in flat):
        raise InvalidArgument(f"{where} 'data' must hold numbers only")
    elif dtype.kind in "iu" and not all(isinstance(v, int) for v in flat):
        raise InvalidArgument(
            f"{where} is {v2_datatype(dtype.name)}: 'data' must hold integers")
    try:
        with np.errstate(over="raise"):
            array = np.array(flat, dtype=dtype.newbyteorder("="))
    except (OverflowError, FloatingPointError, ValueError) as exc:
        raise InvalidArgument(
            f"{where} 'data' holds a value that does not fit {v2_datatype(dtype.name)}"
        ) from exc
    return array.reshape(shape)


def _flatten(data: list, where: str) -> list:
    """Row-major elements of a flat or nested JSON list (the spec allows both)."""
    if not any(isinstance(v, list) for v in data):
        return data
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
        if len(stack) > 64:
            raise InvalidArgument(f"{where} 'data' is nested too deeply")
    return out


def _requested_outputs(raw: object) -> tuple[list[str] | None, dict[str, bool]]:
    if raw is None:
        return None, {}
    if not isinstance(raw, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters}")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for i, out in enumerate(raw):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise InvalidArgument(f"outputs[{i}] must be an object with a string 'name'")
        name = out["name"]
        params = _parameters(out, f"outputs[{i}]")
        flag = params.get("binary_data", None)
        if flag is not None and not isinstance(flag, bool):
            raise InvalidArgument(f"output '{name}' parameters.binary_data must be true or "
                                  f"false")
        if "classification" in params:
            raise InvalidArgument(f"output '{name}': the classification extension is not "
                                  f"served; ask for the raw tensor")
        if name in binary or name in names:
            raise InvalidArgument(f"output '{name}' appears twice in 'outputs'")
        names.append(name)
        if flag is not None:
            binary[name] = flag
    return names, binary


def wants_binary(body: InferBody, name: str) -> bool:
    flag = body.binary_flags.get(name)
    return body.binary_default if flag is None else flag


def encode_infer_response(model: str, version: int, body: InferBody,
                          outputs: dict[str, np.ndarray]) -> tuple[list[bytes], int | None]:
    """The response as byte chunks, and the JSON header's length when binary data follows.

    Outputs in JSON carry no ``parameters`` (strict clients refuse parameters without
    binary_data_size); binary ones carry only ``binary_data_size``.
    """
    header: dict = {"model_name": model, "model_version": str(version)}
    if body.id is not None:
        header["id"] = body.id
    tensors = []
    blobs: list[bytes] = []
    for name, value in outputs.items():
        array = np.asarray(value)
        entry: dict = {"name": name, "datatype": v2_datatype_of(array.dtype),
                       "shape": list(array.shape)}
        if wants_binary(body, name):
            little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            blob = little.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        tensors.append(entry)
    header["outputs"] = tensors
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return [head], None
    return [head, *blobs], len(head)
