"""Wire protocol v1: frames, msgpack maps and tensors (DESIGN section 2, docs/protocol.md).

Knows bytes and maps, nothing of models. Shared by the server and the clients.
"""

from __future__ import annotations

import struct
import threading

import msgpack
import numpy as np

from appliance.errors import InvalidArgument

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 64 << 20
HEADER = struct.Struct(">I")

# Wire dtype name -> the little-endian NumPy dtype its bytes hold.
DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
    )
}
_NATIVE_LITTLE = np.little_endian
# dtype -> wire name. ``dtype.name`` costs microseconds; a dict lookup costs nanoseconds.
NAME_OF_DTYPE = {np.dtype(name): name for name in DTYPES}
DTYPE_OF_NAME = {name: np.dtype(name) for name in DTYPES}
_INLINE_BYTES = 1 << 16  # smaller tensors are copied out; larger ones go as a view
# What the wire's little-endian bytes are read as: native dtypes on little-endian hosts.
_READ_DTYPES = DTYPE_OF_NAME if _NATIVE_LITTLE else DTYPES


class FrameError(Exception):
    """The byte stream can't be trusted any more: answer once with id nil, then close."""


def check_frame_length(n: int, max_frame_bytes: int) -> None:
    """A frame's length, refused from its header alone: the body is never read."""
    if n == 0:
        raise FrameError("frame length is 0; every frame holds one msgpack map")
    if n > max_frame_bytes:
        raise FrameError(
            f"frame length {n} is over this server's limit of {max_frame_bytes} bytes; "
            f"send smaller requests (the limit is in the hello response)")


class FrameReader:
    """Splits a byte stream into frame bodies. Refuses a bad length before reading the body."""

    __slots__ = ("_buf", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self._buf = bytearray()
        self.max_frame_bytes = max_frame_bytes

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list:
        """The whole frames so far, as bytes-like bodies. With nothing held back (the usual
        case) they are views of ``data`` itself, which must not change afterwards."""
        buf = self._buf
        if buf:
            buf += data
            src = buf
        else:
            src = memoryview(data)
        bodies = []
        pos = 0
        end = len(src)
        while end - pos >= 4:
            (n,) = HEADER.unpack_from(src, pos)
            check_frame_length(n, self.max_frame_bytes)
            if end - pos - 4 < n:
                break
            body = src[pos + 4 : pos + 4 + n]
            bodies.append(bytes(body) if src is buf else body)
            pos += 4 + n
        if src is buf:
            if pos:
                del buf[:pos]
        elif pos < end:
            buf += src[pos:]
        return bodies


class BufferedFrameReader:
    """The same frames, for an asyncio ``BufferedProtocol``: the kernel writes straight
    into buffers this reader owns. A frame that fits the small buffer is handed over as a
    view of it (decode it before returning); a larger one gets a buffer of its own, filled
    once and never copied here.
    """

    SMALL = 256 << 10

    __slots__ = ("_buf", "_start", "_end", "_big", "_big_fill", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self._buf = bytearray(self.SMALL)
        self._start = 0  # first unparsed byte in _buf
        self._end = 0  # end of the bytes received in _buf
        self._big: bytearray | None = None
        self._big_fill = 0
        self.max_frame_bytes = max_frame_bytes

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_fill:]
        if self._end == len(self._buf):  # a small frame's tail is at the very end
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start:self._end]
            self._start, self._end = 0, pending
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int, on_body) -> None:
        """Account for ``nbytes`` received; call ``on_body(body)`` for each whole frame.

        Raises FrameError for a bad length (after the frames before it were handed over).
        """
        if self._big is not None:
            self._big_fill += nbytes
            if self._big_fill == len(self._big):
                body, self._big = self._big, None
                on_body(body)
            return
        self._end += nbytes
        buf = self._buf
        view = memoryview(buf)  # never resized, so views handed out stay valid
        while self._end - self._start >= 4:
            start = self._start
            (n,) = HEADER.unpack_from(buf, start)
            check_frame_length(n, self.max_frame_bytes)
            have = self._end - start - 4
            if have >= n:
                self._start = start + 4 + n
                on_body(view[start + 4:start + 4 + n])
                continue
            if 4 + n > len(buf):  # too big for the small buffer: a buffer of its own
                big = bytearray(n)
                big[:have] = view[start + 4:self._end]
                self._big, self._big_fill = big, have
                self._start = self._end = 0
            break
        if self._start == self._end:
            self._start = self._end = 0


_PACKERS = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's packer. ``msgpack.packb`` makes a new packer, and its buffer, on every
    call: twice the time of packing a small response with one kept."""
    try:
        return _PACKERS.packer
    except AttributeError:
        packer = _PACKERS.packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        return packer


def encode_frame(message: dict) -> bytes:
    body = _packer().pack(message)
    return HEADER.pack(len(body)) + body


_BIG_BIN = 1 << 16
_BIN32 = struct.Struct(">BI")


def has_big_tensor(tensors: dict) -> bool:
    """Whether any tensor map's data is large enough to be worth ``encode_frame_parts``."""
    for t in tensors.values():
        if type(t["data"]) is memoryview:
            return True
    return False


def encode_frame_parts(message: dict) -> list:
    """One frame as a list of buffers to write in order (``writelines``/``sendmsg``).

    The bytes are exactly ``encode_frame``'s, but a large binary value (a tensor's data)
    is not copied into the frame: its bin header goes into the small parts and the
    buffer itself is one of the parts, written by the kernel straight from the array.
    Slower than ``encode_frame`` for small messages: use it when ``has_big_tensor``.
    """
    parts: list = []
    small: list[bytes] = []
    pack = _packer().pack

    def emit(obj) -> None:
        if isinstance(obj, dict):
            small.append(_map_header(len(obj)))
            for k, v in obj.items():
                small.append(pack(k))
                emit(v)
        elif isinstance(obj, (bytes, bytearray, memoryview)) and _nbytes(obj) >= _BIG_BIN:
            small.append(_BIN32.pack(0xC6, _nbytes(obj)))
            parts.append(b"".join(small))
            small.clear()
            parts.append(obj)
        else:
            small.append(pack(obj))

    emit(message)
    if small:
        parts.append(b"".join(small))
    size = sum(_nbytes(p) for p in parts)
    return [HEADER.pack(size), *parts]


def _nbytes(buf) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _map_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x80 | n,))
    if n < 1 << 16:
        return struct.pack(">BH", 0xDE, n)
    return struct.pack(">BI", 0xDF, n)


def decode_body(body: bytes) -> dict:
    """The map one frame holds; FrameError unless the bytes are exactly one msgpack map."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except msgpack.ExtraData as exc:
        raise FrameError("frame holds more than one msgpack object; send exactly one map") from exc
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise FrameError(f"frame is not valid msgpack ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(message, dict):
        raise FrameError(
            f"frame holds a msgpack {type(message).__name__}, not a map; "
            f"every request is a map with 'op' and 'id'"
        )
    return message


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
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if array.nbytes <= _INLINE_BYTES:
        data = array.tobytes()
    else:  # a view of the array's own bytes: msgpack copies them into the frame once
        data = memoryview(array.reshape(-1)).cast("B")
    return {"dtype": name, "shape": list(array.shape), "data": data}


def decode_tensor(obj: object, where: str) -> np.ndarray:
    """A tensor map as a read-only array over the frame's bytes (no copy)."""
    try:
        dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
        wire = _READ_DTYPES[dtype]
    except (TypeError, KeyError):
        raise _tensor_error(obj, where) from None
    if type(shape) is not list or not isinstance(data, (bytes, bytearray)):
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
    array = np.frombuffer(data, dtype=wire).reshape(shape)
    if not _NATIVE_LITTLE:  # pragma: no cover - big-endian hosts get native arrays
        array = array.astype(array.dtype.newbyteorder("="))
    return array


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


def error_response(request_id: int | None, error) -> dict:
    return {"id": request_id, "ok": False, "error": error.as_wire()}
