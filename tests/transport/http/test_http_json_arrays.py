"""Large JSON bodies: simdjson's fast path reads tensors exactly as the orjson path does.

Every body here is over json_arrays.MIN_BYTES (a padding parameter where the tensor is
small). Each is parsed twice, with the fast path and with it off; both must give the same
arrays (dtype, shape, values) or the same one-line error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from appliance.errors import InvalidArgument
from appliance.transport.http import json_arrays
from appliance.transport.http.codec import MAX_DATA_DIMS, parse_infer_body

PAD = "p" * (json_arrays.MIN_BYTES + 10)
RNG = np.random.default_rng(7)


def body(data_json: str, datatype: str = "FP32", shape=None, extra: str = "") -> bytes:
    shape = shape if shape is not None else [len(json.loads(data_json))]
    return (f'{{"inputs":[{{"name":"t","shape":{json.dumps(shape)},"datatype":"{datatype}",'
            f'"data":{data_json}{extra}}}],"parameters":{{"pad":"{PAD}"}}}}').encode()


def nested(shape: tuple[int, ...], values: list) -> list:
    return np.array(values).reshape(shape).tolist()


def both(raw: bytes, monkeypatch) -> tuple[object, object]:
    def run():
        try:
            return parse_infer_body(raw, None).inputs
        except InvalidArgument as exc:
            return exc.message

    fast = run()
    with monkeypatch.context() as m:
        m.setattr(json_arrays, "MIN_BYTES", 1 << 62)
        slow = run()
    return fast, slow


def assert_same(fast, slow) -> None:
    if isinstance(slow, str):
        assert fast == slow
        return
    assert isinstance(fast, dict) and fast.keys() == slow.keys()
    for name in slow:
        assert fast[name].dtype == slow[name].dtype and fast[name].shape == slow[name].shape
        np.testing.assert_array_equal(fast[name], slow[name])


FLOATS = RNG.standard_normal(20_000).astype(np.float32).tolist()
INTS = RNG.integers(-100, 100, 20_000).tolist()

TAKEN = [  # the fast path reads these itself
    ("flat floats", body(json.dumps(FLOATS))),
    ("zero image", body(json.dumps([0] * 30_000))),
    ("nested rows", body(json.dumps(nested((4, 5000), FLOATS)), shape=[4, 5000])),
    ("nested unevenly", body(json.dumps([FLOATS[:10], FLOATS[10:]]), shape=[20_000])),
    ("ints as FP16", body(json.dumps(INTS), "FP16")),
    ("INT32", body(json.dumps(INTS), "INT32")),
    ("INT64 extremes", body(json.dumps([-2**63, 2**63 - 1] * 6000), "INT64")),
    ("UINT8 pixels", body(json.dumps([i % 256 for i in range(70_000)]), "UINT8")),
    ("wrong count", body(json.dumps(FLOATS), shape=[19_999])),
    ("over FP32's range", body(json.dumps([1e39] + FLOATS[1:]))),
    ("over INT8's range", body(json.dumps([200] + INTS[1:]), "INT8")),
    ("negative UINT8", body(json.dumps([-1] + INTS[1:]), "UINT8")),
    ("empty", body("[]", shape=[0])),
]

REFUSED_OR_ORJSON = [  # the fast path steps aside; the orjson path answers
    ("a bool among floats", body(json.dumps([True] + FLOATS[1:]))),
    ("a string", body(json.dumps(["x"] + FLOATS[1:]))),
    ("null", body(json.dumps([None] + FLOATS[1:]))),
    ("a float among INT32", body(json.dumps([1.5] + INTS[1:]), "INT32")),
    ("1.0 as INT32", body(json.dumps([1.0] + INTS[1:]), "INT32")),
    ("past INT64", body(json.dumps([2**63] + INTS[1:]), "INT64")),
    ("NaN", body("[NaN," + json.dumps(FLOATS)[1:], shape=[20_001])),
    ("1e400", body("[1e400," + json.dumps(FLOATS)[1:], shape=[20_001])),
    ("BOOL tensor", body(json.dumps([True, False] * 40_000), "BOOL")),
    ("a repeated key", body(json.dumps(FLOATS), extra=',"data":[1]', shape=[1])),
    ("nested past a tensor's dimensions",
     body("[" * (MAX_DATA_DIMS + 5) + "1" + "]" * (MAX_DATA_DIMS + 5), shape=[1])),
    ("nested past the parser", body("[" * 2000 + "1" + "]" * 2000, shape=[1])),
    ("not JSON", body(json.dumps(FLOATS) + ",,", shape=[20_000])),
    ("no datatype", body(json.dumps(FLOATS)).replace(b'"datatype":"FP32",', b"")),
]


@pytest.mark.parametrize("case, raw", TAKEN, ids=[c for c, _ in TAKEN])
def test_the_fast_path_reads_as_orjson_does(case, raw, monkeypatch):
    assert json_arrays.load_with_arrays(raw, MAX_DATA_DIMS) is not None, case
    assert_same(*both(raw, monkeypatch))


@pytest.mark.parametrize("case, raw", REFUSED_OR_ORJSON, ids=[c for c, _ in REFUSED_OR_ORJSON])
def test_what_the_fast_path_does_not_take_is_parsed_as_before(case, raw, monkeypatch):
    assert json_arrays.load_with_arrays(raw, MAX_DATA_DIMS) is None, case
    fast, slow = both(raw, monkeypatch)
    assert_same(fast, slow)


def test_errors_on_the_fast_path_name_the_input():
    with pytest.raises(InvalidArgument, match="input 't' has 20000 elements in 'data' but "
                                              r"shape \[19999\] holds 19999"):
        parse_infer_body(body(json.dumps(FLOATS), shape=[19_999]), None)
    with pytest.raises(InvalidArgument, match="input 't' 'data' holds a value that does not "
                                              "fit FP32"):
        parse_infer_body(body(json.dumps([1e39] + FLOATS[1:])), None)


def test_small_bodies_stay_with_orjson():
    raw = b'{"inputs":[{"name":"t","shape":[2],"datatype":"FP32","data":[1,2]}]}'
    assert json_arrays.load_with_arrays(raw, MAX_DATA_DIMS) is None
    np.testing.assert_array_equal(parse_infer_body(raw, None).inputs["t"], [1, 2])
