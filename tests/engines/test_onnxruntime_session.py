"""The ONNX Runtime session: the binding's run and the public one give the same answers,
and errors come back as RunError either way."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from appliance.demo.models import sample_inputs
from engines.errors import RunError
from engines.onnxruntime_engine import OnnxRuntimeSession


class PublicOnly:
    """An InferenceSession seen without its binding (as if ORT renamed ``_sess``)."""

    def __init__(self, sess):
        self._inner = sess

    def __getattr__(self, name):
        if name == "_sess":
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_binding_and_public_run_agree(demo_files, model):
    sess = ort.InferenceSession(str(demo_files[model]), providers=["CPUExecutionProvider"])
    fast = OnnxRuntimeSession(sess, 8)
    public = OnnxRuntimeSession(PublicOnly(sess), 8)
    assert fast._binding_run is not None and public._binding_run is None
    feeds = sample_inputs(model, batch=3)
    a, b = fast.run(feeds), public.run(feeds)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    bad = {k: v[..., :1] for k, v in feeds.items()}  # wrong shape: ORT refuses it
    for s in (fast, public):
        with pytest.raises(RunError, match="onnxruntime failed"):
            s.run(bad)
