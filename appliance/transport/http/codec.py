"""Open Inference Protocol v2 tensors: JSON and the binary tensor data extension.

Pure functions of bytes and maps; nothing of models or sockets. A request body is a JSON
header, optionally followed by raw tensor bytes: ``Inference-Header-Content-Length`` says
where the JSON ends, and each input whose ``parameters.binary_data_size`` is set takes the
next that many bytes, in input order. Outputs come back the same way when asked for with
``parameters.binary_data`` (per output) or ``parameters.binary_data_output`` (request).
"""

from __future__ import annotations

import json
import re
from array import array as array_of
from dataclasses import dataclass, field
from itertools import chain
from math import prod

import numpy as np
import orjson

from appliance.errors import InvalidArgument
from appliance.serving.shared_memory import SharedMemoryRegistry
from appliance.transport.http.json_arrays import TAKEN, load_with_arrays
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
# orjson's nesting limit (arrays and objects together); it refuses deeper documents.
JSON_DEPTH_LIMIT = 1024
# NumPy's dimension limit: a shape's length, and how deep a tensor's 'data' may nest.
MAX_DATA_DIMS = 64
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_NOT_A_NUMBER = re.compile(rb"-?(?:nan|inf(?:inity)?)(?![A-Za-z0-9_])", re.IGNORECASE)


def v2_datatype(numpy_name: str) -> str:
    return NUMPY_TO_V2.get(numpy_name, numpy_name.upper())


def v2_datatype_of(dtype: np.dtype) -> str:
    v2 = _DTYPE_TO_V2.get(dtype)
    return v2 if v2 is not None else v2_datatype(dtype.name)


def loads_json(raw: bytes | memoryview) -> object:
    """A request body's JSON (orjson); InvalidArgument saying what is wrong with it."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(_json_error(raw, exc)) from exc


def _json_error(raw: bytes | memoryview, exc: orjson.JSONDecodeError) -> str:
    pos = exc.pos or 0
    if exc.msg.startswith("depth limit"):
        return (f"the request body is nested too deeply: JSON arrays and objects more than "
                f"{JSON_DEPTH_LIMIT} levels deep (char {pos}) are over the parser's limit; "
                f"send tensor 'data' flat, or nested only as deep as its shape")
    if "infinity when parsed" in exc.msg:
        return (f"the request body holds a number too large for any float (over 1.8e308) "
                f"at char {pos}; send values that fit the tensor's datatype")
    start = pos - 1 if pos > 0 and raw[pos - 1:pos] == b"-" else pos
    token = _NOT_A_NUMBER.match(bytes(raw[start:start + 9]))
    if token:
        return (f"the request body is not valid JSON: {token[0].decode()} at char {start} "
                f"is not a JSON number (JSON has no NaN or Infinity); send such tensors as "
                f"binary data (parameters.binary_data_size)")
    if "UTF-8" in exc.msg and "BOM" not in exc.msg:
        return "the request body is not valid JSON: it is not valid UTF-8 text"
    return f"the request body is not valid JSON: {exc}"


def dumps_json(obj: object) -> bytes:
    """Compact JSON (orjson; NumPy arrays as lists). What orjson can't write (integers over
    64 bits, lone surrogates, unknown types) goes through the stdlib as before."""
    try:
        return orjson.dumps(obj, option=_DUMPS_OPTIONS)
    except orjson.JSONEncodeError:
        return _stdlib_dumps(obj)


def _stdlib_dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_plain).encode()


def _plain(obj: object) -> object:
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


@dataclass
class InferBody:
    """A parsed infer request: arrays by input name, and what the outputs should look like."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: every output
    binary_flags: dict[str, bool] = field(default_factory=dict)  # per-output binary_data
    binary_default: bool = False  # request-level binary_data_output
    parameters: dict = field(default_factory=dict)
    # Outputs to write into shared memory: name -> (region, offset, byte_size)
    output_regions: dict[str, tuple] = field(default_factory=dict)


def parse_infer_body(body: bytes, header_length: str | None,
                     shm: SharedMemoryRegistry | None = None) -> InferBody:
    """The request's JSON header and tensors; InvalidArgument naming the field at fault.
    Tensors in shared memory (``shared_memory_region`` among their parameters) are read
    from, or checked against, the regions ``shm`` holds."""
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
    raw_header = body if json_len == len(body) else memoryview(body)[:json_len]
    loaded = load_with_arrays(raw_header, MAX_DATA_DIMS)  # a large body's numbers, in C
    if loaded is not None:
        header, arrays = loaded
        bools = False  # simdjson took numbers only
    else:
        header, arrays = loads_json(raw_header), {}
        # No true or false anywhere in the header's text: no bool can hide among the
        # numbers of a tensor's data (one search in C, where a look at 150,000 elements
        # took 5 ms).
        text = bytes(raw_header) if isinstance(raw_header, memoryview) else raw_header
        bools = b"true" in text or b"false" in text
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
        window = _shm_window(tensor, where, shm)
        size = _binary_size(tensor, where)
        if window is not None:
            if "data" in tensor or size is not None:
                raise InvalidArgument(f"{where} names a shared memory region and carries "
                                      f"data too; send one of them")
            inputs[name] = shm.read(*window, dtype, shape, where)
        elif size is not None:
            if "data" in tensor:
                raise InvalidArgument(f"{where} has both 'data' and binary_data_size; send one")
            if offset + size > len(body):
                raise InvalidArgument(
                    f"{where} says binary_data_size {size} but only {len(body) - offset} "
                    f"bytes of binary data remain in the body")
            inputs[name] = _from_bytes(view[offset:offset + size], dtype, shape, where)
            offset += size
        elif tensor.get("data") is TAKEN:
            inputs[name] = _from_numbers(arrays[i], dtype, shape, where)
        else:
            inputs[name] = _from_json(tensor.get("data"), dtype, shape, where, bools)
    if offset != len(body):
        raise InvalidArgument(
            f"the body has {len(body) - offset} bytes after the last input's binary data; "
            f"binary_data_size of the inputs must add up to the binary part")
    outputs, binary, regions = _requested_outputs(header.get("outputs"), shm)
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidArgument("parameters.binary_data_output must be true or false")
    return InferBody(rid, inputs, outputs, binary, binary_default, params, regions)


def _shm_window(tensor: dict, where: str, shm: SharedMemoryRegistry | None
                ) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) of a tensor in shared memory; None if it is not."""
    params = _parameters(tensor, where)
    region = params.get("shared_memory_region")
    if region is None:
        return None
    if shm is None:
        raise InvalidArgument(f"{where}: shared memory is not served here")
    if not isinstance(region, str):
        raise InvalidArgument(f"{where} parameters.shared_memory_region must be a string")
    size = params.get("shared_memory_byte_size")
    if size is None:
        raise InvalidArgument(f"{where} names shared_memory_region but no "
                              f"shared_memory_byte_size")
    return region, params.get("shared_memory_offset", 0), size


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
    dtype = np.dtype(V2_TO_NUMPY[datatype]).newbyteorder("<")
    if len(shape) > MAX_DATA_DIMS:
        raise InvalidArgument(f"{where} shape has {len(shape)} dimensions; a tensor has at "
                              f"most {MAX_DATA_DIMS}")
    if prod(d for d in shape if d) * dtype.itemsize >= 1 << 63:
        raise InvalidArgument(f"{where} shape {shape} is too large for any tensor")
    return dtype, tuple(shape)


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
               where: str, bools: bool = True) -> np.ndarray:
    """``data`` (flat, or nested) as an array.

    No Python loop over the elements: they go into an ``array.array`` of doubles (or 64-bit
    integers) in one C pass, which refuses strings, null, objects and lists (and floats, for
    integers) without NumPy guessing a dtype (a string among the numbers would make it
    allocate elements x longest string). Bools pass as 0 and 1: ``_holds_bool`` looks for
    them, when the header's text holds a true or false at all (``bools``). The element
    types are looked at only to word an error.
    """
    if not isinstance(data, list):
        raise InvalidArgument(f"{where} needs 'data' (a JSON list) or binary_data_size")
    count = prod(shape)
    leaves = _nested_leaves(data, where) if list in set(map(type, data[:1])) or (
        len(data) != count) else data
    if len(leaves) != count:  # an error, unless lists nested unevenly hold the rest
        leaves = _flatten_mixed(leaves, where)
    try:
        return _convert(leaves, count, dtype, shape, where, bools)
    except _ListAmongNumbers:  # nested unevenly: element by element, then once more
        return _convert(_flatten_mixed(leaves, where), count, dtype, shape, where, bools)


class _ListAmongNumbers(Exception):
    """A list was found among the elements while they converted."""


def _from_numbers(found: np.ndarray, dtype: np.dtype, shape: tuple[int, ...],
                  where: str) -> np.ndarray:
    """A tensor's 'data' that json_arrays read flat (doubles for float datatypes, 64-bit
    integers for integer ones) as the tensor."""
    count = prod(shape)
    _check_count(found.size, count, shape, where)
    if count == 0:
        return np.empty(shape, dtype=dtype.newbyteorder("="))
    if dtype.kind == "f":
        return _float_array(found, dtype, shape, where, [], False)
    return _fit_integers(found, dtype, shape, where)


def _check_count(found: int, count: int, shape: tuple[int, ...], where: str) -> None:
    if found != count:
        raise InvalidArgument(
            f"{where} has {found} elements in 'data' but shape {list(shape)} holds {count}")


def _convert(leaves: list, count: int, dtype: np.dtype, shape: tuple[int, ...], where: str,
             bools: bool) -> np.ndarray:
    _check_count(len(leaves), count, shape, where)
    native = dtype.newbyteorder("=")
    if count == 0:
        return np.empty(shape, dtype=native)
    v2 = v2_datatype(dtype.name)
    if dtype.kind == "b":
        types = set(map(type, leaves))
        if types != {bool}:
            _refuse_elements(types, where, "is BOOL: 'data' must hold true and false")
        return np.array(leaves, dtype=native).reshape(shape)
    integers = dtype.kind in "iu"
    try:
        found = _as_integers(leaves)
    except OverflowError:  # an integer past INT64
        if integers:
            raise InvalidArgument(f"{where} 'data' holds a value that does not fit {v2}"
                                  ) from None
        found = None  # doubles take it
    if not integers:
        if found is None:
            try:
                found = np.frombuffer(array_of("d", leaves), dtype=np.float64)
            except TypeError:  # a string, null, object or list
                _refuse_elements(set(map(type, leaves)) - {int, float}, where,
                                 "'data' must hold numbers only")
                raise InvalidArgument(f"{where} 'data' must hold numbers only") from None
        return _float_array(found.astype(np.float64, copy=False), dtype, shape, where,
                            leaves, bools)
    if found is None:  # a string, null, object or list; or a float among integers
        types = set(map(type, leaves))
        _refuse_elements(types - {int, float}, where, "'data' must hold numbers only")
        # Integers and floats only: an integer past 64 bits reads as a float (orjson), so
        # one out of range doesn't fit; in range, a float came from a number written as one.
        values = np.array(leaves, dtype=np.float64)
        info = np.iinfo(dtype)
        # -2**63 - 1 rounds to -2**63 as a float: for INT64 that bound counts as outside.
        low = values <= info.min if info.bits == 64 else values < info.min
        if low.any() or (values >= float(info.max + 1)).any():
            raise InvalidArgument(f"{where} 'data' holds a value that does not fit {v2}")
        raise InvalidArgument(f"{where} is {v2}: 'data' must hold integers")
    if bools and _holds_bool(leaves, found):
        raise InvalidArgument(f"{where} 'data' must hold numbers only")
    return _fit_integers(found, dtype, shape, where)


def _fit_integers(found: np.ndarray, dtype: np.dtype, shape: tuple[int, ...],
                  where: str) -> np.ndarray:
    """Integers read from JSON as a tensor of the integer ``dtype``: refused past its
    range."""
    v2 = v2_datatype(dtype.name)
    native = dtype.newbyteorder("=")
    info = np.iinfo(dtype)
    if found.dtype != np.uint8 and info.bits < 64 and (
            found.min() < info.min or found.max() > info.max):
        raise InvalidArgument(f"{where} 'data' holds a value that does not fit {v2}")
    if found.dtype == np.uint8 and info.max < 255 and found.max() > info.max:
        raise InvalidArgument(f"{where} 'data' holds a value that does not fit {v2}")
    return found.astype(native, copy=False).reshape(shape)


def _as_integers(leaves: list) -> np.ndarray | None:
    """The elements as an integer array when every one is a JSON integer (a bool passes
    as 0 or 1: see ``_holds_bool``), else None; OverflowError for one past 64 bits.

    Integers convert faster than doubles: pixel values (0..255, a zero-valued image)
    through bytes() in a third of the time, others to 64-bit ones in 60% of it; each try
    stops at the first element it can't take."""
    try:
        return np.frombuffer(bytes(leaves), dtype=np.uint8)
    except (TypeError, ValueError):
        pass
    try:
        return np.frombuffer(array_of("q", leaves), dtype=np.int64)
    except TypeError:
        return None


def _float_array(found: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], where: str,
                 leaves: list, bools: bool) -> np.ndarray:
    """Doubles read from JSON as a float tensor of ``dtype``: refused past its range."""
    if bools and _holds_bool(leaves, found):
        raise InvalidArgument(f"{where} 'data' must hold numbers only")
    with np.errstate(over="ignore"):
        array = found.astype(dtype.newbyteorder("="), copy=False)
    # JSON has no Infinity (orjson refuses it), so an infinite value is one past the range.
    if array.dtype != found.dtype and not np.isfinite(array).all():
        raise InvalidArgument(f"{where} 'data' holds a value that does not fit "
                              f"{v2_datatype(dtype.name)}")
    return array.reshape(shape)


def _nested_leaves(data: list, where: str) -> list:
    """The elements of ``data``, nested any way, row-major (Triton and the v2 spec take
    any nesting whose element count is the shape's). A level that is all lists is
    flattened in one C pass; a level mixing lists and numbers, element by element."""
    level = data
    for _ in range(MAX_DATA_DIMS):
        if not level or type(level[0]) is not list:
            return level  # a list left among the numbers is found as they convert
        try:
            level = list(chain.from_iterable(level))
        except TypeError:  # a number among the lists
            return _flatten_mixed(level, where)
    raise InvalidArgument(f"{where} 'data' is nested too deeply (over {MAX_DATA_DIMS} "
                          f"levels); send it flat")


def _flatten_mixed(data: list, where: str) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if type(v) is list:
                stack.append(iter(v))
                if len(stack) > MAX_DATA_DIMS:
                    raise InvalidArgument(f"{where} 'data' is nested too deeply (over "
                                          f"{MAX_DATA_DIMS} levels); send it flat")
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _refuse_elements(types: set, where: str, what: str) -> None:
    if list in types:
        raise _ListAmongNumbers
    if types:
        raise InvalidArgument(f"{where} {what}")


def _holds_bool(leaves: list, found: np.ndarray) -> bool:
    """Whether ``leaves``, read as the numbers ``found``, held a true or false.

    A bool reads as 0 or 1, so only elements equal to those are looked at: one by one
    when they are few (an image), by a scan of the element types when they are many.
    """
    suspects = (found == 0) | (found == 1)
    count = int(np.count_nonzero(suspects))
    if count == 0:
        return False
    if count * 16 <= found.size:
        return any(type(leaves[i]) is bool for i in np.flatnonzero(suspects).tolist())
    return bool in set(map(type, leaves))


def _requested_outputs(raw: object, shm: SharedMemoryRegistry | None
                       ) -> tuple[list[str] | None, dict[str, bool], dict[str, tuple]]:
    if raw is None:
        return None, {}, {}
    if not isinstance(raw, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters}")
    names: list[str] = []
    binary: dict[str, bool] = {}
    regions: dict[str, tuple] = {}
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
        window = _shm_window(out, f"output '{name}'", shm)
        if window is not None:
            shm.check_window(*window, f"output '{name}'")
            regions[name] = window
    return names, binary, regions


def wants_binary(body: InferBody, name: str) -> bool:
    flag = body.binary_flags.get(name)
    return body.binary_default if flag is None else flag


def encode_infer_response(model: str, version: int, body: InferBody,
                          outputs: dict[str, np.ndarray],
                          shm: SharedMemoryRegistry | None = None
                          ) -> tuple[list[bytes | memoryview], int | None]:
    """The response as chunks (the JSON header, then a view of each binary output's bytes),
    and the JSON header's length when binary data follows.

    Outputs in JSON carry no ``parameters`` (strict clients refuse parameters without
    binary_data_size); binary ones carry only ``binary_data_size``. The binary chunks are
    views over the output arrays: write (or join) them before the arrays can change.
    """
    header: dict = {"model_name": model, "model_version": str(version)}
    if body.id is not None:
        header["id"] = body.id
    tensors = []
    blobs: list[memoryview] = []
    stdlib = False
    for name, value in outputs.items():
        array = np.asarray(value)
        entry: dict = {"name": name, "datatype": v2_datatype_of(array.dtype),
                       "shape": list(array.shape)}
        window = body.output_regions.get(name)
        if window is not None:
            # Written into the region; the entry carries no data and, as Triton's, no
            # parameters (clients read 'binary_data_size' from any parameters they see)
            region, offset, size = window
            shm.write(region, offset, size, array, f"output '{name}'")
        elif wants_binary(body, name):
            little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            blob = memoryview(little.reshape(-1).view(np.uint8))
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            flat = np.ascontiguousarray(array.reshape(-1),
                                        dtype=array.dtype.newbyteorder("="))
            # orjson writes NaN and infinities as null; the stdlib writes NaN, Infinity
            # (as outpost always has, and as tritonclient reads them).
            if flat.dtype.kind == "f" and not np.isfinite(flat).all():
                stdlib = True
            entry["data"] = flat
        tensors.append(entry)
    header["outputs"] = tensors
    head = _stdlib_dumps(header) if stdlib else dumps_json(header)
    if not blobs:
        return [head], None
    return [head, *blobs], len(head)
