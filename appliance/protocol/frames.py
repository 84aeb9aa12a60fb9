"""Wire protocol v1: frames, msgpack maps and tensors (DESIGN section 2, docs/protocol.md).

Knows bytes and maps, nothing of models. Shared by the server and the clients.
"""

from __future__ import annotations

import struct
import threading

import msgpack
import numpy as np

PROTOCOL_VERSION = 1


DEFAULT_MAX_FRAME_BYTES = 64 << 20


HEADER = struct.Struct(">I")


# A bin this large travels as a view of its buffer, both ways: encoded from the array's
# own bytes and written as a part of its own; decoded from a frame as a view of it.
_BIG_BIN = 1 << 16


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
    into buffers this reader owns. ``on_body(body, owned)`` gets each frame. A frame that
    fits the small buffer is a view of it (``owned`` False: decode it before returning);
    a larger one gets a buffer of its own (``owned`` True), filled once, never copied or
    written again here, so what is decoded from it may keep it (``decode_body(borrow=)``).
    """

    SMALL = 256 << 10
    FIRST_READ = 64 << 10

    __slots__ = ("_buf", "_view", "_start", "_end", "_big", "_big_fill", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        # Not zero-filled: the pages the kernel never writes into are never touched, so an
        # idle connection holds what it read, not 256 KiB (a bytearray's zero-fill made a
        # thousand idle connections hold 250 MB).
        self._buf = np.empty(self.SMALL, np.uint8)
        self._view = memoryview(self._buf)  # never resized, so views handed out stay valid
        self._start = 0  # first unparsed byte in _buf
        self._end = 0  # end of the bytes received in _buf
        self._big: memoryview | None = None
        self._big_fill = 0
        self.max_frame_bytes = max_frame_bytes

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return self._big[self._big_fill:]
        if not self._end:
            # Nothing pending: read at most FIRST_READ. The start of a large frame read
            # here is copied into the frame's own buffer once its header is seen; a
            # 256 KiB first read of each image request made that copy 4x longer.
            return self._view[:self.FIRST_READ]
        if self._end == len(self._buf):  # a small frame's tail is at the very end
            pending = self._end - self._start
            self._buf[:pending] = self._buf[self._start:self._end]
            self._start, self._end = 0, pending
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int, on_body) -> None:
        """Account for ``nbytes`` received; call ``on_body(body, owned)`` for each whole
        frame.

        Raises FrameError for a bad length (after the frames before it were handed over).
        """
        if self._big is not None:
            self._big_fill += nbytes
            if self._big_fill == len(self._big):
                body, self._big = self._big, None
                on_body(body, True)
            return
        end = self._end = self._end + nbytes
        buf = self._buf
        view = self._view
        limit = self.max_frame_bytes
        start = self._start
        while end - start >= 4:
            (n,) = HEADER.unpack_from(buf, start)
            if n == 0 or n > limit:
                check_frame_length(n, limit)
            body = start + 4
            if end - body >= n:
                start = self._start = body + n  # first: on_body may raise FrameError
                on_body(view[body:start], False)
                continue
            if 4 + n > len(buf):  # too big for the small buffer: a buffer of its own
                first = view[body:end]
                big = _frame_buffer(n, first)
                big[:end - body] = first
                self._big, self._big_fill = big, end - body
                self._start = self._end = 0
                return
            break
        if start == end:
            self._start = self._end = 0


_ALIGN = 64  # where a large tensor's data is placed in a frame buffer of its own


def _frame_buffer(n: int, first) -> memoryview:
    """The buffer of its own for a large frame of ``n`` bytes, placed so that the data of
    its first large bin, found in ``first`` (the part of the body already received),
    starts on a 64-byte boundary: that tensor is then decoded in place, aligned. Placed
    anywhere, an image's float32 data was 1 to 3 bytes off in most requests, and that
    copy, with the frame's start copied out of the small buffer, was 18% of the event
    loop thread's samples on CNN requests at c=64 (1.3% with both fixed).

    Not zero-filled (the kernel fills it): a bytearray's memset was 4% of the loop's time
    on 600 KB requests."""
    raw = np.empty(n + _ALIGN, np.uint8)
    offset = _big_bin_offset(first) or 0
    start = -(raw.__array_interface__["data"][0] + offset) % _ALIGN
    return memoryview(raw[start:start + n])


def _big_bin_offset(prefix) -> int | None:
    """Where the data of the first bin of ``_BIG_BIN`` bytes or more starts in a msgpack
    stream, read from ``prefix`` alone; None if the prefix ends first, or holds a type
    that ``_borrowing_parse`` leaves to msgpack. Every msgpack value is self-delimiting,
    so the values are skipped in order without building anything."""
    pos = 0
    try:
        for _ in range(512):  # a request's header part is a few dozen values
            b = prefix[pos]
            pos += 1
            if b <= 0x9F or b >= 0xE0 or b in _NO_PAYLOAD:  # ints; map/array heads
                continue
            if b <= 0xBF:  # fixstr
                pos += b & 0x1F
                continue
            fixed = _FIXED.get(b)
            if fixed is not None:
                pos += fixed.size
                continue
            length = _LENGTH.get(b)
            if length is None:
                return None
            (n,) = length.unpack_from(prefix, pos)
            pos += length.size
            if b <= 0xC6:  # bin
                if n >= _BIG_BIN:
                    return pos
                pos += n
            elif b <= 0xDB:  # str; the array and map heads (0xDC..0xDF) have no payload
                pos += n
    except (IndexError, struct.error):
        pass
    return None


_NO_PAYLOAD = frozenset((0xC0, 0xC2, 0xC3))  # nil, false, true


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


_BIN32 = struct.Struct(">BI")


def has_big_tensor(tensors: dict) -> bool:
    """Whether any tensor map's data is large enough to be worth ``encode_frame_parts``."""
    for t in tensors.values():
        if type(t.get("data")) is memoryview:  # no data: a shared memory window
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


def decode_body(body, borrow: bool = False) -> dict:
    """The map one frame holds; FrameError unless the bytes are exactly one msgpack map.

    ``borrow``: ``body`` is a buffer of the frame's own that nothing writes again. Bin
    values of 64 KiB or more then come back as read-only views of it instead of copies
    (``_borrowing_parse``), and the tensors decoded from them keep it alive.
    """
    if borrow:
        message = _borrowing_parse(body)
        if message is not None:
            return message
    try:
        # raw=False, strict_map_key=True: msgpack's defaults since 1.0, not passed (its
        # keyword parsing was an eighth of the call on a small request)
        message = msgpack.unpackb(body)
    except msgpack.ExtraData as exc:
        raise FrameError("frame holds more than one msgpack object; send exactly one map") from exc
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        # msgpack's words say where the bytes went wrong, as a JSON parser's would
        raise FrameError(f"frame is not valid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise FrameError(
            f"frame holds a msgpack {type(message).__name__}, not a map; "
            f"every request is a map with 'op' and 'id'"
        )
    return message


_DEPTH_LIMIT = 32


class _NotPlain(Exception):
    """Something ``_borrowing_parse`` leaves to msgpack."""


def _borrowing_parse(body) -> dict | None:
    """``msgpack.unpackb(body, raw=False, strict_map_key=True)`` for the plain types a
    request holds (maps, arrays, str, bin, ints, floats, bool, nil), with large bins as
    views of ``body``: copying a 600 KB image out of its frame cost the event loop a
    second pass over it (memmove and page faults, about a tenth of its time per CNN
    request at c=64). None for anything else (ext types, bad or extra bytes, a top level
    that is not a map, a key that is not a string), which msgpack then decodes, or
    refuses with its own error."""
    view = memoryview(body).toreadonly().cast("B")
    try:
        obj, pos = _parse(view, 0, 0)
    except (_NotPlain, IndexError, struct.error, UnicodeDecodeError, RecursionError):
        return None
    if pos != len(view) or type(obj) is not dict:
        return None
    return obj


_FIXED = {0xCA: struct.Struct(">f"), 0xCB: struct.Struct(">d"), 0xCC: struct.Struct(">B"),
          0xCD: struct.Struct(">H"), 0xCE: struct.Struct(">I"), 0xCF: struct.Struct(">Q"),
          0xD0: struct.Struct(">b"), 0xD1: struct.Struct(">h"), 0xD2: struct.Struct(">i"),
          0xD3: struct.Struct(">q")}


_LENGTH = {0xC4: struct.Struct(">B"), 0xC5: struct.Struct(">H"), 0xC6: struct.Struct(">I"),
           0xD9: struct.Struct(">B"), 0xDA: struct.Struct(">H"), 0xDB: struct.Struct(">I"),
           0xDC: struct.Struct(">H"), 0xDD: struct.Struct(">I"), 0xDE: struct.Struct(">H"),
           0xDF: struct.Struct(">I")}


def _parse(view: memoryview, pos: int, depth: int):
    """(object, position after it). Raises IndexError/struct.error past the end."""
    b = view[pos]
    pos += 1
    if b <= 0x7F:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if 0xA0 <= b <= 0xBF:
        return _str(view, pos, b & 0x1F)
    if 0x80 <= b <= 0x9F:
        if b <= 0x8F:
            return _map(view, pos, b & 0x0F, depth)
        return _array(view, pos, b & 0x0F, depth)
    if b == 0xC0:
        return None, pos
    if b == 0xC2 or b == 0xC3:
        return b == 0xC3, pos
    fixed = _FIXED.get(b)
    if fixed is not None:
        return fixed.unpack_from(view, pos)[0], pos + fixed.size
    length = _LENGTH.get(b)
    if length is None:  # ext types, and 0xC1 (never used)
        raise _NotPlain
    (n,) = length.unpack_from(view, pos)
    pos += length.size
    if b <= 0xC6:  # bin
        if pos + n > len(view):
            raise IndexError
        data = view[pos:pos + n]
        return (data if n >= _BIG_BIN else data.tobytes()), pos + n
    if b <= 0xDB:
        return _str(view, pos, n)
    if b <= 0xDD:
        return _array(view, pos, n, depth)
    return _map(view, pos, n, depth)


def _str(view: memoryview, pos: int, n: int):
    if pos + n > len(view):
        raise IndexError
    return str(view[pos:pos + n], "utf-8"), pos + n


def _array(view: memoryview, pos: int, n: int, depth: int):
    if depth >= _DEPTH_LIMIT:
        raise _NotPlain
    items = []
    for _ in range(n):
        item, pos = _parse(view, pos, depth + 1)
        items.append(item)
    return items, pos


def _map(view: memoryview, pos: int, n: int, depth: int):
    if depth >= _DEPTH_LIMIT:
        raise _NotPlain
    out = {}
    for _ in range(n):
        key, pos = _parse(view, pos, depth + 1)
        if type(key) is not str and type(key) is not bytes:
            raise _NotPlain  # strict_map_key: msgpack refuses it
        out[key], pos = _parse(view, pos, depth + 1)
    return out, pos


def error_response(request_id: int | None, error) -> dict:
    return {"id": request_id, "ok": False, "error": error.as_wire()}
