"""ModelInferRequest in, the service's InferRequest out; InferResponse in, ModelInferResponse
out. Pure functions of messages, arrays and the shared memory registry.

An input's elements come in one of three ways, as in Triton: ``raw_input_contents`` (its
little-endian bytes, one entry per input in input order, inputs in shared memory skipped),
the typed lists of ``contents`` (one field per datatype family), or a region of system
shared memory named by the input's parameters. Outputs go back as
``raw_output_contents`` (what tritonclient reads by default), or into the region an output
asked for, with an empty raw entry for it: as in Triton, the raw list holds one entry per
output, so clients find an output's bytes by its position. Sizes are checked against the
shape before anything is allocated: a shape that declares gigabytes with a few bytes
behind it is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from math import prod

import numpy as np

from appliance.errors import DeadlineExceeded, InvalidArgument, OutpostError, ResourceExhausted
from appliance.serving.contract import NO_DEADLINE, InferRequest, InferResponse
from appliance.serving.shared_memory import SharedMemoryRegistry
from appliance.transport.grpc import inference_pb2 as pb
from appliance.transport.http.codec import (
    MAX_DATA_DIMS,
    V2_TO_NUMPY,
    V2_UNSERVED,
    v2_datatype_of,
)

# v2 datatype -> the InferTensorContents field that holds its elements. FP16 has none (as
# in Triton): it comes as raw bytes or in shared memory.
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                  "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents"}
# The parameters that put a tensor in shared memory
SHM_REGION, SHM_BYTE_SIZE, SHM_OFFSET = ("shared_memory_region", "shared_memory_byte_size",
                                         "shared_memory_offset")
_DTYPES = {v2: np.dtype(name).newbyteorder("<") for v2, name in V2_TO_NUMPY.items()}

# (region, offset, byte_size): where in shared memory an output is to be written
Window = tuple[str, int, int]


@dataclass(slots=True)
class DecodedRequest:
    """The service's request, and what the answer needs that the service doesn't see."""

    infer: InferRequest
    id: str = ""
    output_regions: dict[str, Window] = field(default_factory=dict)


def parse_version(text: str, key: str = "model_version") -> int | None:
    """A version field: "" is the one the server picks (Triton's rule)."""
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise InvalidArgument(f"{key} {text!r} must be a positive integer (or empty)")
    return int(text)


def decode_request(msg: pb.ModelInferRequest, shm: SharedMemoryRegistry,
                   remaining_s: float | None) -> DecodedRequest:
    """The request of a ModelInferRequest. ``remaining_s``: what is left of the call's
    deadline (None: it has none). What is wrong with its tensors or parameters rides on the
    request as its wire error, raised by the service after the model lookup (an unknown
    model is NOT_FOUND whatever else is wrong); a version that isn't a number, or a
    deadline already past, is raised at once."""
    version = parse_version(msg.model_version)
    if remaining_s is not None and remaining_s <= 0:
        raise DeadlineExceeded("the call's deadline passed before it was served; give it "
                               "more time (the client's timeout)")
    request = InferRequest(msg.model_name, {}, version)
    decoded = DecodedRequest(request, msg.id)
    try:
        request.inputs = _inputs(msg, shm)
        request.outputs, decoded.output_regions = _requested_outputs(msg, shm)
        _apply_parameters(request, msg.parameters, remaining_s)
    except OutpostError as exc:
        request.wire_error = exc.with_traceback(None)  # no cycle through this frame
    return decoded


def encode_response(response: InferResponse, decoded: DecodedRequest,
                    shm: SharedMemoryRegistry, max_bytes: int) -> pb.ModelInferResponse:
    """The answer: each output's bytes in raw_output_contents, or written into the region
    its request named (an empty raw entry then, and the output says where, as in
    Triton: perf_analyzer and tritonclient index the raw list by output position)."""
    regions = decoded.output_regions
    arrays = {name: np.asarray(value) for name, value in response.outputs.items()}
    size = sum(a.nbytes for name, a in arrays.items() if name not in regions)
    if size > max_bytes:
        raise ResourceExhausted(
            f"the outputs take {size} bytes, over grpc.max_message_bytes = {max_bytes}; ask "
            f"for fewer outputs, send smaller batches, or use shared memory for outputs")
    msg = pb.ModelInferResponse(model_name=response.model,
                                model_version=str(response.version), id=decoded.id)
    for name, array in arrays.items():
        out = msg.outputs.add(name=name, datatype=v2_datatype_of(array.dtype),
                              shape=array.shape)
        window = regions.get(name)
        if window is not None:
            region, offset, byte_size = window
            shm.write(region, offset, byte_size, array, f"output '{name}'")
            out.parameters[SHM_REGION].string_param = region
            out.parameters[SHM_BYTE_SIZE].int64_param = array.nbytes
            if offset:
                out.parameters[SHM_OFFSET].int64_param = offset
            msg.raw_output_contents.append(b"")
            continue
        little = (array.astype(array.dtype.newbyteorder("<"))  # the wire's byte order
                  if array.dtype.byteorder == ">" else array)
        msg.raw_output_contents.append(little.tobytes())  # C order, whatever the layout
    return msg


# -- inputs ------------------------------------------------------------------------------------

def _inputs(msg: pb.ModelInferRequest, shm: SharedMemoryRegistry) -> dict[str, np.ndarray]:
    raw = msg.raw_input_contents
    raw_count = len(raw)
    used = 0
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(msg.inputs):
        name = tensor.name
        if not name:
            raise InvalidArgument(f"inputs[{i}].name must be a non-empty string")
        where = f"input '{name}'"
        if name in inputs:
            raise InvalidArgument(f"{where} appears twice in 'inputs'")
        dtype, shape = _dtype_and_shape(tensor.datatype, tensor.shape, where)
        window = _shm_window(tensor.parameters, where)
        has_contents = tensor.HasField("contents")
        if window is not None:
            if has_contents:
                raise InvalidArgument(f"{where} names a shared memory region and carries "
                                      f"contents too; send one of them")
            region, offset, byte_size = window
            inputs[name] = shm.read(region, offset, byte_size, dtype, shape, where)
        elif raw_count:
            if has_contents:
                raise InvalidArgument(f"{where} carries contents while the request uses "
                                      f"raw_input_contents; send every input one way")
            if used == raw_count:
                raise InvalidArgument(
                    f"{where} has no entry in raw_input_contents: it holds {raw_count}, one "
                    f"per input not in shared memory, in input order")
            inputs[name] = _from_raw(raw[used], dtype, shape, tensor.datatype, where)
            used += 1
        else:
            inputs[name] = _from_contents(tensor.contents, dtype, shape, tensor.datatype,
                                          where)
    if used != raw_count:
        raise InvalidArgument(
            f"raw_input_contents holds {raw_count} entries but {used} inputs take one; send "
            f"one per input not in shared memory, in input order")
    return inputs


def _dtype_and_shape(datatype: str, dims, where: str) -> tuple[np.dtype, tuple[int, ...]]:
    if datatype in V2_UNSERVED:
        raise InvalidArgument(f"{where} has datatype {datatype}, which outpost does not "
                              f"serve; use one of {', '.join(V2_TO_NUMPY)}")
    dtype = _DTYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"{where} has datatype {datatype!r}; use one of "
                              f"{', '.join(V2_TO_NUMPY)}")
    shape = tuple(dims)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{where} shape {list(shape)} must hold non-negative integers")
    if len(shape) > MAX_DATA_DIMS:
        raise InvalidArgument(f"{where} shape has {len(shape)} dimensions; a tensor has at "
                              f"most {MAX_DATA_DIMS}")
    return dtype, shape


def _from_raw(data: bytes, dtype: np.dtype, shape: tuple[int, ...], datatype: str,
              where: str) -> np.ndarray:
    expected = prod(shape) * dtype.itemsize  # Python integers: no overflow, no allocation
    if len(data) != expected:
        raise InvalidArgument(
            f"{where} has {len(data)} bytes in raw_input_contents but shape {list(shape)} of "
            f"{datatype} takes {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)  # a view of the bytes: no copy


def _from_contents(contents: pb.InferTensorContents, dtype: np.dtype,
                   shape: tuple[int, ...], datatype: str, where: str) -> np.ndarray:
    count = prod(shape)
    wanted = CONTENTS_FIELD.get(datatype)
    present = [f.name for f, _ in contents.ListFields()]
    stray = [p for p in present if p != wanted]
    if stray:
        home = (f"contents.{wanted}" if wanted else
                "raw_input_contents (it has no typed contents field)")
        raise InvalidArgument(f"{where} is {datatype}: its elements go in {home}, not in "
                              f"contents.{stray[0]}")
    values = getattr(contents, wanted) if wanted else ()
    if len(values) != count:
        if not present and count:
            raise InvalidArgument(f"{where} carries no data: send raw_input_contents, "
                                  f"contents or a shared memory region")
        raise InvalidArgument(f"{where} has {len(values)} elements in contents.{wanted} but "
                              f"shape {list(shape)} holds {count}")
    native = dtype.newbyteorder("=")
    if count == 0:
        return np.empty(shape, dtype=native)
    if dtype.kind in "iu" and dtype.itemsize < 4:  # carried as 32-bit: must fit
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidArgument(f"{where} contents.{wanted} holds a value that does not "
                                  f"fit {datatype}")
        return wide.astype(native).reshape(shape)
    return np.array(values, dtype=native).reshape(shape)


# -- outputs and parameters ------------------------------------------------------------------

def _requested_outputs(msg: pb.ModelInferRequest, shm: SharedMemoryRegistry
                       ) -> tuple[list[str] | None, dict[str, Window]]:
    if not msg.outputs:
        return None, {}
    names: list[str] = []
    regions: dict[str, Window] = {}
    for i, out in enumerate(msg.outputs):
        name = out.name
        if not name:
            raise InvalidArgument(f"outputs[{i}].name must be a non-empty string")
        where = f"output '{name}'"
        if name in names:
            raise InvalidArgument(f"{where} appears twice in 'outputs'")
        if "classification" in out.parameters:
            raise InvalidArgument(f"{where}: the classification extension is not served; "
                                  f"ask for the raw tensor")
        window = _shm_window(out.parameters, where)
        if window is not None:
            shm.check_window(*window, where)  # a bad window costs no inference
            regions[name] = window
        names.append(name)
    return names, regions


def _shm_window(params, where: str) -> Window | None:
    """(region, offset, byte_size) of a tensor in shared memory; None if it is not."""
    if SHM_REGION not in params:
        return None
    region = _value(params[SHM_REGION])
    if not isinstance(region, str) or not region:
        raise InvalidArgument(f"{where} parameters.{SHM_REGION} must be a region's name "
                              f"(string_param)")
    if SHM_BYTE_SIZE not in params:
        raise InvalidArgument(f"{where} names {SHM_REGION} but no {SHM_BYTE_SIZE}")
    byte_size = _integer(params[SHM_BYTE_SIZE], f"{where} parameters.{SHM_BYTE_SIZE}")
    offset = (_integer(params[SHM_OFFSET], f"{where} parameters.{SHM_OFFSET}")
              if SHM_OFFSET in params else 0)
    return region, offset, byte_size


def _apply_parameters(request: InferRequest, params, remaining_s: float | None) -> None:
    """priority, timeout (microseconds) and routing_key, as HTTP's parameters; the call's
    deadline bounds the request too (the earlier of the two holds)."""
    if "sequence_id" in params:
        raise InvalidArgument("parameters.sequence_id: sequence batching is not served; "
                              "send each request on its own")
    if "priority" in params:
        request.priority = _integer(params["priority"], "parameters.priority")
    if "routing_key" in params:
        key = _value(params["routing_key"])
        if not isinstance(key, str):
            raise InvalidArgument("parameters.routing_key must be a string (string_param)")
        request.routing_key = key
    now = time.monotonic()
    deadline = now + remaining_s if remaining_s is not None else None
    if "timeout" in params:
        timeout_us = _integer(params["timeout"], "parameters.timeout")
        if timeout_us:
            deadline = min(now + timeout_us / 1e6, deadline or NO_DEADLINE)
        elif deadline is None:
            deadline = NO_DEADLINE  # 0: no timeout, as on HTTP
    request.deadline = deadline


def _value(param: pb.InferParameter) -> object:
    choice = param.WhichOneof("parameter_choice")
    return getattr(param, choice) if choice else None


def _integer(param: pb.InferParameter, key: str) -> int:
    value = _value(param)
    if type(value) is not int or value < 0:
        raise InvalidArgument(f"{key} must be a non-negative integer (int64_param or "
                              f"uint64_param)")
    return value
