"""Tensors on the wire: a map of dtype, shape and data (little-endian bytes, C order), and
the arrays they are decoded into; or, in place of data, a window of a shared memory region
(``shm``: region, offset, nbytes), which the transport reads through its registry."""

from __future__ import annotations

import numpy as np

from appliance.errors import InvalidArgument
from appliance.protocol.frames import _BIG_BIN
from engines.base import NUMPY_DTYPES

# Wire dtype name -> the little-endian NumPy dtype its bytes hold.
DTYPES = {name: dtype.newbyteorder("<") for name, dtype in NUMPY_DTYPES.items()}


_NATIVE_LITTLE = np.little_endian


# dtype -> wire name. ``dtype.name`` costs microseconds; a dict lookup costs nanoseconds.
NAME_OF_DTYPE = {np.dtype(name): name for name in DTYPES}


DTYPE_OF_NAME = NUMPY_DTYPES


# What the wire's little-endian bytes are read as: native dtypes on little-endian hosts.
_READ_DTYPES = DTYPE_OF_NAME if _NATIVE_LITTLE else DTYPES


def encode_tensor(array: np.ndarray) -> dict:
    array = np.asarray(array)
    name = NAME_OF_DTYPE.get(array.dtype)
    if name is None:
        native = array.dtype.newbyteorder("=")
        name = NAME_OF_DTYPE.get(native)
        if name is None:
            raise InvalidArgument(
                f"dtype {array.dtype} can't be sent; use one of {', '.join(DTYPES)}")
        array = array.astype(native)
    if not _NATIVE_LITTLE:  # pragma: no cover - big-endian hosts
        array = array.astype(DTYPES[name])
    if array.nbytes < _BIG_BIN:
        data = array.tobytes()  # C order, whatever the array's layout
    else:  # a view of the array's own bytes: msgpack copies them into the frame once
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        data = memoryview(array.reshape(-1)).cast("B")
    return {"dtype": name, "shape": list(array.shape), "data": data}


def decode_tensor(obj: object, where: str) -> np.ndarray:
    """A tensor map as a read-only array over the frame's bytes (no copy, unless they
    are not aligned for the dtype)."""
    try:
        dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
        wire = _READ_DTYPES[dtype]
    except (TypeError, KeyError):
        raise _tensor_error(obj, where) from None
    if type(shape) is not list or not isinstance(data, (bytes, bytearray, memoryview)):
        raise _tensor_error(obj, where)
    expected = wire.itemsize
    for d in shape:
        if type(d) is not int or d < 0:
            raise _tensor_error(obj, where)
        expected *= d
    if len(data) != expected:
        raise InvalidArgument(
            f"{where}.data holds {len(data)} bytes but shape {shape} of {dtype} needs {expected}"
        )
    array = np.ndarray(shape, wire, data)  # half the cost of frombuffer, then reshape
    if type(data) is not bytes and not array.flags.aligned:
        # A borrowed bin at an odd offset of its frame (msgpack's own bytes are allocated
        # aligned). ONNX Runtime ran the demo CNN 5% slower on float32 input 1 or 3 bytes
        # off; a copy, as msgpack would have made, costs far less.
        array = array.copy()
        array.flags.writeable = False
    if not _NATIVE_LITTLE:  # pragma: no cover - big-endian hosts get native arrays
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def dtype_and_shape(obj: object, where: str) -> tuple[np.dtype, tuple[int, ...]]:
    """A tensor map's dtype and shape, checked, for a tensor whose bytes are elsewhere."""
    try:
        dtype, shape = _READ_DTYPES[obj["dtype"]], obj["shape"]
    except (TypeError, KeyError):
        raise _tensor_error(obj, where) from None
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise _tensor_error(obj, where)
    return dtype, tuple(shape)


def _tensor_error(obj: object, where: str) -> InvalidArgument:
    """What exactly is wrong with a tensor map that failed the quick checks."""
    if not isinstance(obj, dict):
        return InvalidArgument(f"{where} must be a map with dtype, shape and data")
    dtype = obj.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return InvalidArgument(f"{where}.dtype is {dtype!r}; use one of {', '.join(DTYPES)}")
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return InvalidArgument(
            f"{where}.shape must be a list of non-negative integers, got {shape!r}")
    data = obj.get("data")
    return InvalidArgument(f"{where}.data must be msgpack bin, got {type(data).__name__}")
