"""The v2 tensor codec on its own: JSON and binary bodies in, responses out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appliance.errors import InvalidArgument
from appliance.transport.http.codec import encode_infer_response, parse_infer_body


def body_of(header: dict, *blobs: bytes) -> tuple[bytes, str | None]:
    head = json.dumps(header).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), str(len(head))


@pytest.mark.parametrize("datatype, data, dtype", [
    ("BOOL", [True, False, True, True], np.bool_),
    ("INT8", [-128, 0, 1, 127], np.int8),
    ("UINT8", [0, 1, 2, 255], np.uint8),
    ("INT16", [-2, -1, 0, 300], np.int16),
    ("INT32", [-(2 ** 31), 0, 1, 2 ** 31 - 1], np.int32),
    ("INT64", [-(2 ** 63), 0, 1, 2 ** 63 - 1], np.int64),
    ("FP16", [0.5, -1.0, 2.0, 65504.0], np.float16),
    ("FP32", [0.1, -1.5, 3, 1e30], np.float32),
    ("FP64", [0.1, -1.5, 3, 1e300], np.float64),
])
def test_json_inputs_of_every_dtype(datatype, data, dtype):
    raw, hl = body_of({"inputs": [{"name": "t", "shape": [2, 2], "datatype": datatype,
                                   "data": data}]})
    body = parse_infer_body(raw, hl)
    got = body.inputs["t"]
    assert got.dtype == np.dtype(dtype) and got.shape == (2, 2)
    np.testing.assert_array_equal(got.reshape(-1), np.array(data, dtype=dtype))


@pytest.mark.parametrize("datatype, data, words", [
    ("INT8", [128, 0, 0, 0], "does not fit INT8"),
    ("UINT8", [-1, 0, 0, 0], "does not fit UINT8"),
    ("INT32", [1.5, 0, 0, 0], "integers"),
    ("BOOL", [1, 0, 1, 0], "true and false"),
    ("FP32", [True, 0, 0, 0], "numbers"),
    ("FP32", [None, 0, 0, 0], "numbers"),
])
def test_json_values_that_do_not_fit(datatype, data, words):
    raw, hl = body_of({"inputs": [{"name": "t", "shape": [4], "datatype": datatype,
                                   "data": data}]})
    with pytest.raises(InvalidArgument, match=words):
        parse_infer_body(raw, hl)


def test_binary_inputs_are_views_over_the_body():
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    b = np.array([1.5, 2.5], dtype=np.float32)
    raw, hl = body_of({"inputs": [
        {"name": "a", "shape": [2, 3], "datatype": "INT64",
         "parameters": {"binary_data_size": a.nbytes}},
        {"name": "j", "shape": [1], "datatype": "FP32", "data": [7]},
        {"name": "b", "shape": [2], "datatype": "FP32",
         "parameters": {"binary_data_size": b.nbytes}}]}, a.tobytes(), b.tobytes())
    body = parse_infer_body(raw, hl)
    np.testing.assert_array_equal(body.inputs["a"], a)
    np.testing.assert_array_equal(body.inputs["b"], b)
    assert body.inputs["j"].tolist() == [7.0]
    assert not body.inputs["a"].flags.writeable  # no copy of the request bytes


def test_nested_data_and_duplicates():
    raw, hl = body_of({"inputs": [{"name": "t", "shape": [2, 2], "datatype": "INT32",
                                   "data": [[1, 2], [3, 4]]}]})
    assert parse_infer_body(raw, hl).inputs["t"].tolist() == [[1, 2], [3, 4]]
    raw, hl = body_of({"inputs": [{"name": "t", "shape": [1], "datatype": "INT32",
                                   "data": [1]}] * 2})
    with pytest.raises(InvalidArgument, match="appears twice"):
        parse_infer_body(raw, hl)
    raw, hl = body_of({"inputs": [{"name": "t", "shape": [1], "datatype": "INT32",
                                   "data": [1]}],
                       "outputs": [{"name": "y"}, {"name": "y"}]})
    with pytest.raises(InvalidArgument, match="appears twice"):
        parse_infer_body(raw, hl)


def test_deep_nesting_is_refused():
    data: list = [1]
    for _ in range(100):
        data = [data]
    raw, hl = body_of({"inputs": [{"name": "t", "shape": [1], "datatype": "INT32",
                                   "data": data}]})
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        parse_infer_body(raw, hl)


def _parse_response(chunks: list[bytes], header_len: int | None):
    data = b"".join(chunks)
    if header_len is None:
        return json.loads(data), b""
    return json.loads(data[:header_len]), data[header_len:]


def test_response_mixes_json_and_binary_outputs():
    raw, hl = body_of({"id": "42", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                               "data": [1]}],
                       "outputs": [{"name": "p", "parameters": {"binary_data": True}},
                                   {"name": "q"}]})
    body = parse_infer_body(raw, hl)
    p = np.array([[1, 2]], dtype=np.int32)
    q = np.array([True, False])
    header, blob = _parse_response(*encode_infer_response("m", 3, body, {"p": p, "q": q}))
    assert header == {"model_name": "m", "model_version": "3", "id": "42", "outputs": [
        {"name": "p", "datatype": "INT32", "shape": [1, 2],
         "parameters": {"binary_data_size": 8}},
        {"name": "q", "datatype": "BOOL", "shape": [2], "data": [True, False]}]}
    assert np.frombuffer(blob, "<i4").tolist() == [1, 2]


def test_request_level_binary_default():
    raw, hl = body_of({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                   "data": [1]}],
                       "parameters": {"binary_data_output": True},
                       "outputs": [{"name": "p"},
                                   {"name": "q", "parameters": {"binary_data": False}}]})
    body = parse_infer_body(raw, hl)
    out = {"p": np.zeros(2, np.float32), "q": np.ones(1, np.float32)}
    header, blob = _parse_response(*encode_infer_response("m", 1, body, out))
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert header["outputs"][1] == {"name": "q", "datatype": "FP32", "shape": [1],
                                    "data": [1.0]}
    assert len(blob) == 8


def test_json_only_response_has_no_parameters():
    raw, hl = body_of({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                   "data": [1]}]})
    body = parse_infer_body(raw, hl)
    chunks, header_len = encode_infer_response("m", 1, body, {"y": np.ones((1, 2), "f4")})
    assert header_len is None
    (out,) = json.loads(chunks[0])["outputs"]
    assert "parameters" not in out and out["data"] == [1.0, 1.0]
