"""docs/protocol.md's worked frames are exactly what appliance.protocol encodes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from appliance.protocol import FrameReader, decode_body, decode_tensor, encode_frame, encode_tensor

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


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


def test_frame_reader_reassembles_frames_split_anywhere():
    import pytest

    from appliance.protocol import FrameError

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
