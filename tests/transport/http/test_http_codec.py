"""The v2 tensor codec on its own: JSON and binary bodies in, responses out."""

from __future__ import annotations

import json
import re
import tracemalloc

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


# -- hostile and malformed JSON ------------------------------------------------------------

def _one_input(datatype: str, shape: list, data_json: bytes) -> bytes:
    return (b'{"inputs":[{"name":"t","shape":%s,"datatype":"%s","data":%s}]}'
            % (json.dumps(shape).encode(), datatype.encode(), data_json))


@pytest.mark.parametrize("raw", [
    b"[" * 200_000,
    _one_input("FP32", [1], b"[" * 200_000),
    _one_input("FP32", [1], b"[" * 2000 + b"1" + b"]" * 2000),
])
def test_nesting_past_the_parser_limit_is_invalid_argument(raw):
    with pytest.raises(InvalidArgument, match="nested too deeply") as info:
        parse_infer_body(raw, None)
    assert "1024" in info.value.message and "recursion" not in info.value.message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"nan", b"-inf"])
def test_nan_and_infinity_literals_are_refused(literal):
    with pytest.raises(InvalidArgument, match="not valid JSON") as info:
        parse_infer_body(_one_input("FP32", [2], b"[1.0, %s]" % literal), None)
    assert literal.decode() in info.value.message and "binary" in info.value.message


@pytest.mark.parametrize("number", [b"1e400", b"-1e999", b"1" + b"0" * 400])
def test_numbers_too_large_for_any_float(number):
    with pytest.raises(InvalidArgument, match="too large for any float"):
        parse_infer_body(_one_input("FP64", [1], b"[%s]" % number), None)


@pytest.mark.parametrize("datatype, number", [
    ("FP32", b"1e39"), ("FP32", b"-3.5e38"), ("FP32", b"1" + b"0" * 40),
    ("FP16", b"65520"), ("FP16", b"1e6"),
])
def test_floats_out_of_range(datatype, number):
    with pytest.raises(InvalidArgument, match=f"input 't' 'data' holds a value that does not "
                                              f"fit {datatype}"):
        parse_infer_body(_one_input(datatype, [2], b"[0, %s]" % number), None)


def test_floats_that_round_to_the_largest_finite_value_are_kept():
    body = parse_infer_body(_one_input("FP32", [1], b"[3.40282356e38]"), None)
    assert body.inputs["t"][0] == np.finfo(np.float32).max
    body = parse_infer_body(_one_input("FP16", [1], b"[65519]"), None)
    assert body.inputs["t"][0] == np.finfo(np.float16).max


@pytest.mark.parametrize("datatype, number", [
    ("INT64", 2 ** 63), ("INT64", -(2 ** 63) - 1), ("INT64", 2 ** 64), ("INT64", 10 ** 30),
    ("INT8", 128), ("INT8", 2 ** 64), ("INT8", -(10 ** 30)), ("UINT8", 256),
    ("INT32", 2 ** 31), ("INT16", -(2 ** 15) - 1),
])
def test_huge_integers(datatype, number):
    with pytest.raises(InvalidArgument, match=f"does not fit {datatype}"):
        parse_infer_body(_one_input(datatype, [2], b"[1, %d]" % number), None)


def test_integers_mixed_with_ones_past_int64():
    # NumPy reads [2**63, -1] as floats: still refused as out of range, not accepted.
    with pytest.raises(InvalidArgument, match="does not fit INT64"):
        parse_infer_body(_one_input("INT64", [2], b"[%d, -1]" % 2 ** 63), None)
    with pytest.raises(InvalidArgument, match="must hold integers"):
        parse_infer_body(_one_input("INT64", [2], b"[1, 2.0]"), None)


@pytest.mark.parametrize("shape, data, words", [
    ([2, 2], b"[[1, 2], [3]]", "3 elements in 'data' but shape [2, 2] holds 4"),
    ([3, 2], b"[[1, 2], 3, 4]", "4 elements in 'data' but shape [3, 2] holds 6"),
    ([2, 2, 2], b"[[[1], [2]], [[3], 4]]", "4 elements in 'data' but shape [2, 2, 2]"),
])
def test_nested_data_whose_elements_do_not_fill_the_shape(shape, data, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)) as info:
        parse_infer_body(_one_input("FP32", shape, data), None)
    assert "input 't'" in info.value.message


@pytest.mark.parametrize("shape, data", [
    ([4], b"[[1, 2], [3, 4]]"),
    ([2, 2], b"[[[1, 2]], [[3, 4]]]"),
    ([4], b"[1, [2, 3], 4]"),
    ([2, 2], b"[[1, [2]], [[3], 4]]"),
    ([4], b"[1, [2], 3, 4]"),
])
def test_any_nesting_whose_elements_fill_the_shape_is_taken(shape, data):
    """As Triton and the v2 spec: the elements in row-major order, nested any way."""
    body = parse_infer_body(_one_input("FP32", shape, data), None)
    assert body.inputs["t"].ravel().tolist() == [1, 2, 3, 4]
    assert body.inputs["t"].shape == tuple(shape)


@pytest.mark.parametrize("shape, words", [
    ([1] * 65, "65 dimensions"),
    ([0, 2 ** 62], "too large"),
    ([2 ** 40, 2 ** 40], "too large"),
])
def test_shapes_no_tensor_can_have(shape, words):
    for tensor in ({"data": []}, {"parameters": {"binary_data_size": 0}}):
        raw, hl = body_of({"inputs": [{"name": "t", "shape": shape, "datatype": "FP64",
                                       **tensor}]})
        with pytest.raises(InvalidArgument, match=words):
            parse_infer_body(raw, hl)


def test_a_long_string_in_numeric_data_costs_no_memory():
    """NumPy guessing a dtype would allocate elements x longest string (here 100 MB)."""
    data = ["x" * 5000] + [""] * 5000
    raw, hl = body_of({"inputs": [{"name": "t", "shape": [len(data)], "datatype": "FP32",
                                   "data": data}]})
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument, match="numbers only"):
            parse_infer_body(raw, hl)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20


def test_nested_data_of_the_shape_is_accepted():
    body = parse_infer_body(_one_input("INT8", [2, 1, 2], b"[[[1, 2]], [[3, 4]]]"), None)
    assert body.inputs["t"].tolist() == [[[1, 2]], [[3, 4]]]
    body = parse_infer_body(_one_input("FP32", [2, 0, 3], b"[[], []]"), None)
    assert body.inputs["t"].shape == (2, 0, 3)
    with pytest.raises(InvalidArgument, match="3 elements"):
        parse_infer_body(_one_input("FP32", [2, 0, 3], b"[[], [[1, 2, 3]]]"), None)


@pytest.mark.parametrize("data", [b"[1, 2, 3]", b"[1, 2, 3, 4, 5]", b"[]"])
def test_data_of_the_wrong_length(data):
    n = data.count(b",") + 1 if data != b"[]" else 0
    with pytest.raises(InvalidArgument, match=f"input 't' has {n} elements in 'data' but "
                                              f"shape \\[2, 2\\] holds 4"):
        parse_infer_body(_one_input("FP32", [2, 2], data), None)


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64", "INT32", "INT64", "UINT8"])
@pytest.mark.parametrize("data", [
    b'[1, "2"]', b"[1, null]", b"[1, true]", b"[false, 1.5]", b"[[1], [false]]",
    b'[[1], ["x"]]', b"[1, {}]", b"[true, false]", b'["1", "2"]',
])
def test_non_numbers_inside_numeric_data(datatype, data):
    shape = [2, 1] if data.startswith(b"[[") else [2]
    with pytest.raises(InvalidArgument, match="input 't' 'data' must hold numbers only"):
        parse_infer_body(_one_input(datatype, shape, data), None)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("fill, datatype", [(0.5, "FP32"), (1, "INT8")])
def test_a_bool_hidden_in_large_numeric_data(nested, fill, datatype):
    """One false among many numbers (few zeros and ones: looked up one by one; all ones:
    a scan) is found wherever it sits, flat or nested."""
    values = np.full((8, 32), fill).tolist()
    values[5][17] = False
    data = values if nested else [v for row in values for v in row]
    raw, hl = body_of({"inputs": [{"name": "t", "shape": [8, 32], "datatype": datatype,
                                   "data": data}]})
    with pytest.raises(InvalidArgument, match="numbers only"):
        parse_infer_body(raw, hl)
    values[5][17] = 0
    data = values if nested else [v for row in values for v in row]
    raw, hl = body_of({"inputs": [{"name": "t", "shape": [8, 32], "datatype": datatype,
                                   "data": data}]})
    assert parse_infer_body(raw, hl).inputs["t"][5, 17] == 0


@pytest.mark.parametrize("data", [b"[1, 0]", b"[true, null]", b'[true, "false"]',
                                  b"[true, 0.5]"])
def test_bool_tensors_take_only_true_and_false(data):
    with pytest.raises(InvalidArgument, match="is BOOL: 'data' must hold true and false"):
        parse_infer_body(_one_input("BOOL", [2], data), None)


@pytest.mark.parametrize("raw, words", [
    (b'{"inputs": [}', "not valid JSON"),
    (b'\xff\xfe{"inputs": []}', "not valid UTF-8"),
    (b'{"id": "\\ud800", "inputs": []}', "not valid JSON"),
    (b"", "not valid JSON"),
])
def test_invalid_json_bodies(raw, words):
    with pytest.raises(InvalidArgument, match=words):
        parse_infer_body(raw, None)


@pytest.mark.parametrize("sizes, blob_len, words", [
    ((64,), 60, "input 't0' says binary_data_size 64 but only 60 bytes"),
    ((32, 32), 48, "input 't1' says binary_data_size 32 but only 16 bytes"),
    ((2 ** 62,), 8, "input 't0' says binary_data_size 4611686018427387904 but only 8 bytes"),
    ((16,), 16, "input 't0' carries 16 bytes of binary data but shape [8] of FP32 needs 32"),
])
def test_binary_sizes_overrunning_the_body(sizes, blob_len, words):
    inputs = [{"name": f"t{i}", "shape": [8], "datatype": "FP32",
               "parameters": {"binary_data_size": s}} for i, s in enumerate(sizes)]
    raw, hl = body_of({"inputs": inputs}, b"\0" * blob_len)
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        parse_infer_body(raw, hl)


# -- round trips ---------------------------------------------------------------------------

ROUND_TRIP = [
    ("BOOL", np.array([[True, False, True]])),
    ("INT8", np.array([[-128, 0, 127]], np.int8)),
    ("UINT8", np.array([[0, 128, 255]], np.uint8)),
    ("INT16", np.array([[-32768, 1, 32767]], np.int16)),
    ("INT32", np.array([[-(2 ** 31), 1, 2 ** 31 - 1]], np.int32)),
    ("INT64", np.array([[-(2 ** 63), 1, 2 ** 63 - 1]], np.int64)),
    ("FP16", np.array([[0.1, -65504, 6e-8]], np.float16)),
    ("FP32", np.array([[0.1, -3.4028235e38, 1.4e-45]], np.float32)),
    ("FP64", np.array([[0.1, -1.7976931348623157e308, 5e-324]], np.float64)),
]


@pytest.mark.parametrize("datatype, array", ROUND_TRIP)
@pytest.mark.parametrize("binary", [False, True])
def test_round_trip_of_every_datatype(datatype, array, binary):
    """Request in (JSON or binary), the same tensor back out, read as a client reads it."""
    tensor = {"name": "t", "shape": list(array.shape), "datatype": datatype}
    if binary:
        tensor["parameters"] = {"binary_data_size": array.nbytes}
        raw, hl = body_of({"inputs": [tensor], "outputs": [
            {"name": "t", "parameters": {"binary_data": True}}]}, array.tobytes())
    else:
        tensor["data"] = array.reshape(-1).tolist()
        raw, hl = body_of({"inputs": [tensor]})
    body = parse_infer_body(raw, hl)
    got = body.inputs["t"]
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    header, blob = _parse_response(*encode_infer_response("m", 1, body, {"t": got}))
    (out,) = header["outputs"]
    assert out["datatype"] == datatype and out["shape"] == list(array.shape)
    if binary:
        assert out["parameters"] == {"binary_data_size": array.nbytes}
        back = np.frombuffer(blob, array.dtype.newbyteorder("<")).reshape(array.shape)
    else:
        assert set(out) == {"name", "datatype", "shape", "data"} and not blob
        back = np.array(out["data"], dtype=array.dtype).reshape(array.shape)
    np.testing.assert_array_equal(back, array)


def test_encoding_odd_arrays():
    """Big-endian, non-contiguous and 0-d outputs come out as little-endian, flat data."""
    raw, hl = body_of({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                   "data": [1]}],
                       "outputs": [{"name": "big", "parameters": {"binary_data": True}},
                                   {"name": "big_json"}, {"name": "strided"},
                                   {"name": "scalar"}, {"name": "empty"}]})
    body = parse_infer_body(raw, hl)
    big = np.arange(4, dtype=">i4")
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    outs = {"big": big, "big_json": big, "strided": strided,
            "scalar": np.float64(2.5), "empty": np.zeros((0, 3), np.int16)}
    header, blob = _parse_response(*encode_infer_response("m", 1, body, outs))
    got = {o["name"]: o for o in header["outputs"]}
    assert np.frombuffer(blob, "<i4").tolist() == [0, 1, 2, 3]
    assert got["big_json"]["data"] == [0, 1, 2, 3] and got["big_json"]["datatype"] == "INT32"
    assert got["strided"] == {"name": "strided", "datatype": "FP32", "shape": [3, 2],
                              "data": [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]}
    assert got["scalar"] == {"name": "scalar", "datatype": "FP64", "shape": [],
                             "data": [2.5]}
    assert got["empty"] == {"name": "empty", "datatype": "INT16", "shape": [0, 3],
                            "data": []}


def test_non_finite_outputs_keep_their_values():
    """NaN and infinities come out as the stdlib writes them (tritonclient reads them)."""
    raw, hl = body_of({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                   "data": [1]}]})
    body = parse_infer_body(raw, hl)
    y = np.array([np.nan, -np.inf, 1.5], np.float32)
    (chunk,), _ = encode_infer_response("m", 1, body, {"y": y})
    assert b'"data":[NaN,-Infinity,1.5]' in chunk
