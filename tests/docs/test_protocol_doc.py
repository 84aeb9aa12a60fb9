"""docs/protocol.md's worked frames are exactly what appliance.protocol encodes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from appliance.protocol.frames import FrameReader, decode_body, encode_frame
from appliance.protocol.tensors import decode_tensor, encode_tensor

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "protocol.md"


def _dumps() -> list[bytes]:
    blocks = re.findall(r"```\n(0000 .*?)```", DOC.read_text(), re.S)
    out = []
    for block in blocks:
        hexes = []
        for line in block.strip().splitlines():
            hexes += line[6:54].split()
        out.append(bytes(int(h, 16) for h in hexes))
    return out


def test_worked_frames_match_the_encoder():
    request, response, error = _dumps()
    x = np.array([[1.5, -2.0]], np.float32)
    y = np.array([[2.5, -1.0]], np.float32)
    assert encode_frame({"op": "infer", "id": 7, "model": "add",
                         "inputs": {"x": encode_tensor(x)}}) == request
    assert encode_frame({"id": 7, "ok": True, "model": "add", "version": 1,
                         "outputs": {"y": encode_tensor(y)}}) == response
    assert encode_frame({"id": 8, "ok": False, "error": {
        "code": "NOT_FOUND", "message": "model 'ad' is not served here"}}) == error
    body = FrameReader().feed(request)[0]
    msg = decode_body(body)
    np.testing.assert_array_equal(decode_tensor(msg["inputs"]["x"], "x"), x)


def test_tensors_roundtrip_every_dtype_and_layout():
    for name in ("float32", "float16", "float64", "int8", "uint8", "int16", "int32",
                 "int64", "bool"):
        a = (np.arange(24) % 3).astype(name).reshape(2, 3, 4)
        for arr in (a, a[:, ::2], a.T, a.astype(a.dtype.newbyteorder(">")), a[:0],
                    np.asarray(a[0, 0, 0])):
            t = encode_tensor(arr)
            assert t["dtype"] == name
            back = decode_tensor({**t, "data": bytes(t["data"])}, "t")
            np.testing.assert_array_equal(back, arr)
    big = np.arange(1 << 16, dtype=np.float32)  # over the inline size: sent as a view
    assert isinstance(encode_tensor(big)["data"], memoryview)
    np.testing.assert_array_equal(decode_tensor(
        {**encode_tensor(big), "data": bytes(encode_tensor(big)["data"])}, "t"), big)
    for view in (big.reshape(256, 256).T, big[::2]):  # large and not C-contiguous
        t = encode_tensor(view)
        np.testing.assert_array_equal(decode_tensor({**t, "data": bytes(t["data"])}, "t"),
                                      view)


def test_frame_reader_reassembles_frames_split_anywhere():
    import pytest

    from appliance.protocol.frames import FrameError

    frames = b"".join(encode_frame({"op": "health", "id": i}) for i in range(50))
    for step in (1, 3, 7, 64, len(frames)):
        reader = FrameReader(1024)
        got = []
        for i in range(0, len(frames), step):
            got += reader.feed(frames[i:i + step])
        assert [decode_body(b)["id"] for b in got] == list(range(50))
        assert reader.buffered == 0
    with pytest.raises(FrameError, match="over this server's limit of 1024"):
        FrameReader(1024).feed(b"\x00\x00\x04\x01")
    with pytest.raises(FrameError, match="length is 0"):
        FrameReader(1024).feed(b"\x00\x00\x00\x00")


def _pump(reader, stream: bytes, chunk: int) -> list[dict]:
    """Play the kernel: copy ``stream`` into the reader's buffers ``chunk`` bytes at a time."""
    got: list[dict] = []
    pos = 0
    while pos < len(stream):
        buf = reader.get_buffer(chunk)
        n = min(chunk, len(buf), len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        reader.buffer_updated(n, lambda body, owned: got.append(decode_body(body, owned)))
        pos += n
    return got


def test_buffered_reader_small_and_large_frames_split_anywhere():
    import pytest

    from appliance.protocol.frames import BufferedFrameReader, FrameError

    def big(i):
        """0.4 to 1.2 MB, over the small buffer: each gets a buffer of its own, and the
        tensors decoded from it (views, not copies) must stay intact while later frames
        arrive."""
        return np.arange(100_000 * (1 + i % 3), dtype=np.float32) + i

    msgs = []
    for i in range(30):
        msgs.append({"op": "health", "id": i})
        if i % 7 == 3:
            msgs.append({"op": "infer", "id": 1000 + i, "t": encode_tensor(big(i))})
    stream = b"".join(encode_frame(m) for m in msgs)
    for chunk in (1, 5, 4096, 65536, 300_000, 1 << 20):
        got = _pump(BufferedFrameReader(1 << 24), stream, chunk)
        assert [m["id"] for m in got] == [m["id"] for m in msgs]
        for m in got:
            if "t" in m:
                np.testing.assert_array_equal(decode_tensor(m["t"], "t"), big(m["id"] - 1000))
    reader = BufferedFrameReader(1024)
    with pytest.raises(FrameError, match="limit of 1024"):
        _pump(reader, encode_frame({"op": "health", "id": 1}) + b"\x00\x00\x08\x00", 64)
    seen = []
    with pytest.raises(FrameError, match="length is 0"):
        reader = BufferedFrameReader()
        buf = reader.get_buffer(64)
        data = encode_frame({"op": "health", "id": 5}) + b"\x00\x00\x00\x00"
        buf[:len(data)] = data
        reader.buffer_updated(len(data), lambda body, owned: seen.append(decode_body(body)))
    assert [m["id"] for m in seen] == [5]  # the good frame before the bad one was served


def test_frame_parts_are_the_same_bytes_without_copying_big_tensors():
    from appliance.protocol.frames import encode_frame_parts

    big = np.arange(100_000, dtype=np.float32)
    for msg in ({"op": "health", "id": 1},
                {"op": "infer", "id": 2, "model": "m",
                 "inputs": {"a": encode_tensor(big), "b": encode_tensor(big[:10]),
                            "c": encode_tensor(big.reshape(10, -1) * 2)}},
                {"id": 3, "ok": True, "outputs": {f"o{i}": encode_tensor(big[:i * 5000])
                                                  for i in range(20)}, "n": None,
                 "f": 1.5, "l": [1, "x", b"y"]}):
        parts = encode_frame_parts(msg)
        assert b"".join(bytes(p) for p in parts) == encode_frame(msg)
        if "inputs" in msg:
            assert any(isinstance(p, memoryview) for p in parts)  # written, not copied


def test_the_kept_packer_survives_a_failed_encode_and_threads():
    """encode_frame keeps one msgpack packer per thread: a message that can't be packed
    must leave nothing behind in it, and threads must not share one."""
    import threading

    import msgpack
    import pytest

    with pytest.raises(TypeError):
        encode_frame({"id": 1, "bad": object(), "tail": b"x" * 100})
    ok = {"id": 2, "ok": True}
    assert encode_frame(ok) == len(msgpack.packb(ok)).to_bytes(4, "big") + msgpack.packb(ok)

    wrong = []

    def worker(k: int) -> None:
        for i in range(2000):
            msg = {"id": i, "k": k, "data": bytes([k]) * (i % 97)}
            if decode_body(encode_frame(msg)[4:]) != msg:
                wrong.append(msg)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def _random_value(rng, depth: int):
    """Any plain msgpack value, nested, with every width of int, str, bin and container."""
    kinds = ["int", "neg", "big", "float", "str", "bin", "nil", "bool"]
    if depth < 4:
        kinds += ["list", "map"]
    def pick(values: list):
        return values[rng.integers(len(values))]

    kind = pick(kinds)
    if kind == "int":
        return pick([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
    if kind == "neg":
        return pick([-1, -32, -33, -128, -129, -32768, -32769, -2**31 - 1, -2**63])
    if kind == "big":
        return int(rng.integers(-2**62, 2**62))
    if kind == "float":
        return float(rng.standard_normal())
    if kind == "str":
        return "é" * pick([0, 5, 31, 32, 255, 256, 70_000])
    if kind == "bin":
        return bytes(pick([0, 1, 255, 256, 65535, 65536, 200_000]))
    if kind == "nil":
        return None
    if kind == "bool":
        return bool(rng.integers(2))
    n = pick([0, 1, 15, 16, 17])
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(n)]
    return {f"k{i}": _random_value(rng, depth + 1) for i in range(n)}


def test_borrowing_decode_gives_msgpacks_map_with_large_bins_as_views():
    """decode_body(borrow=True) must equal msgpack's result for every plain value, decoded
    by the short parser itself (not its fallback); bins of 64 KiB or more come back as
    read-only views of the frame, smaller ones as bytes."""
    import msgpack

    from appliance.protocol.frames import _borrowing_parse

    rng = np.random.default_rng(5)
    for i in range(300):
        msg = {"id": 1, "v": _random_value(rng, 0)}
        packed = msgpack.packb(msg, use_bin_type=True, use_single_float=bool(i % 2))
        body = np.frombuffer(packed, np.uint8).copy()
        assert _borrowing_parse(memoryview(body)) == decode_body(packed)  # no fallback

    big = np.arange(50_000, dtype=np.float32)  # 200 KB
    shared = []
    for pad in range(4):  # the tensor's bytes at each offset modulo 4 of the frame
        body = np.frombuffer(encode_frame({"op": "infer", "id": 7, "model": "m" * pad,
                                           "inputs": {"x": encode_tensor(big),
                                                      "s": encode_tensor(big[:4])}})[4:],
                             np.uint8).copy()
        got = decode_body(memoryview(body), borrow=True)
        data = got["inputs"]["x"]["data"]
        assert type(data) is memoryview and data.readonly
        x = decode_tensor(got["inputs"]["x"], "x")
        np.testing.assert_array_equal(x, big)
        assert x.flags.aligned and not x.flags.writeable
        # No copy where the bytes are aligned for float32; a copy where they are not.
        aligned = np.frombuffer(data, np.float32).flags.aligned
        assert np.shares_memory(x, body) == aligned
        shared.append(aligned)
        assert type(got["inputs"]["s"]["data"]) is bytes
    assert shared.count(True) == 1
    plain = decode_body(bytes(body))  # without borrow: msgpack's copies
    assert type(plain["inputs"]["x"]["data"]) is bytes


def test_borrowing_decode_refuses_bad_bytes_exactly_as_msgpack_does():
    import msgpack
    import pytest

    from appliance.protocol.frames import FrameError

    ok = msgpack.packb({"id": 1, "d": b"x" * 70_000}, use_bin_type=True)
    cases = [
        ok[:-1],  # a bin cut short
        ok + b"\x01",  # extra bytes after the map
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({1: 2}),  # a key that is not a string
        msgpack.packb({"e": msgpack.ExtType(1, b"ab")}),  # an ext type
        b"\x81\xa1k\xa2\xff\xfe",  # a str that is not UTF-8
        b"\xc1",  # the never-used byte
        b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion entries
        b"\x81\xa1k" + b"\x91" * 100 + b"\x01",  # deeper than the short parser goes
    ]
    for bad in cases:
        try:
            expected = decode_body(bad)
        except FrameError as exc:
            with pytest.raises(FrameError) as info:
                decode_body(memoryview(bad), borrow=True)
            assert str(info.value) == str(exc)
        else:
            assert decode_body(memoryview(bad), borrow=True) == expected


def test_tensors_at_the_big_bin_threshold_frame_alike_both_ways():
    """Under 64 KiB a tensor is copied into the frame; from 64 KiB it travels as a view
    (a part of its own) and is decoded as a view of its frame: the bytes are the same."""
    from appliance.protocol.frames import _BIG_BIN, encode_frame_parts, has_big_tensor

    for nbytes in (_BIG_BIN - 4, _BIG_BIN, _BIG_BIN + 4):
        arr = np.arange(nbytes // 4, dtype=np.float32)
        msg = {"id": 1, "ok": True, "outputs": {"y": encode_tensor(arr)}}
        big = has_big_tensor(msg["outputs"])
        assert big == (nbytes >= _BIG_BIN)
        frame = encode_frame(msg)
        assert b"".join(bytes(p) for p in encode_frame_parts(msg)) == frame
        body = np.frombuffer(frame[4:], np.uint8).copy()  # a frame buffer of its own
        data = decode_body(memoryview(body), borrow=True)["outputs"]["y"]["data"]
        assert isinstance(data, memoryview) == big
        np.testing.assert_array_equal(decode_tensor(
            {"dtype": "float32", "shape": [nbytes // 4], "data": data}, "y"), arr)


def test_decode_body_takes_str_keys_and_values_and_refuses_other_keys():
    """What decode_body relies on msgpack's defaults for (raw=False, strict_map_key)."""
    import msgpack
    import pytest

    from appliance.protocol.frames import FrameError

    msg = decode_body(msgpack.packb({"op": "health", "id": 3}))
    assert msg == {"op": "health", "id": 3} and type(msg["op"]) is str
    with pytest.raises(FrameError):  # strict_map_key: str (or bytes) keys only
        decode_body(msgpack.packb({1: 2}))


def test_a_large_tensor_is_placed_aligned_in_its_frame_buffer_and_never_copied():
    """Whatever precedes it in the frame, the first large tensor's data lands on a 64-byte
    boundary of the frame's own buffer, and is decoded there without a copy."""
    from appliance.protocol.frames import BufferedFrameReader, _big_bin_offset

    image = np.arange(3 * 224 * 224, dtype=np.float32).reshape(1, 3, 224, 224)
    for pad in range(8):
        msg = {"model": "m" * pad, "inputs": {"image": encode_tensor(image),
                                              "small": encode_tensor(image[0, 0, 0])},
               "op": "infer", "id": pad}
        frame = encode_frame(msg)
        offset = _big_bin_offset(memoryview(frame)[4:200])
        assert frame[4 + offset - 5] == 0xC6  # right after the bin32 header
        assert _big_bin_offset(memoryview(frame)[4:4 + offset - 1]) is None  # cut short
        for chunk in (4096, 1 << 20):
            bodies: list = []
            reader = BufferedFrameReader()
            pos = 0
            while pos < len(frame):
                buf = reader.get_buffer(chunk)
                n = min(chunk, len(buf), len(frame) - pos)
                buf[:n] = frame[pos:pos + n]
                reader.buffer_updated(n, lambda body, owned, into=bodies:
                                      into.append((body, owned)))
                pos += n
            (body, owned), = bodies
            assert owned
            x = decode_tensor(decode_body(body, borrow=True)["inputs"]["image"], "image")
            np.testing.assert_array_equal(x, image)
            assert x.__array_interface__["data"][0] % 64 == 0
            assert np.shares_memory(x, np.frombuffer(body, np.uint8))  # not a copy


def test_big_bin_offset_skips_every_plain_type_and_stops_at_others():
    import msgpack

    from appliance.protocol.frames import _big_bin_offset

    head = {"n": None, "t": True, "f": False, "i": [0, -1, -33, 200, 70000, 1 << 40, -(1 << 40)],
            "x": [1.5, 2.25], "s": "s" * 40, "u": "u" * 300, "b": b"b" * 300,
            "m": {str(k): k for k in range(20)}, "a": list(range(20))}
    for single in (False, True):
        packed = msgpack.packb({**head, "data": b"\x00" * 70_000}, use_bin_type=True,
                               use_single_float=single)
        offset = _big_bin_offset(memoryview(packed))
        assert packed[offset - 5] == 0xC6 and len(packed) - offset == 70_000
    ext = msgpack.packb({"e": msgpack.ExtType(1, b"ab"), "data": b"\x00" * 70_000})
    assert _big_bin_offset(memoryview(ext)) is None
    assert _big_bin_offset(memoryview(msgpack.packb({"small": b"x" * 100}))) is None
