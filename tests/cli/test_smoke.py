import numpy as np

from appliance.client import Client
from appliance.demo.models import sample_inputs


def test_infer_identity_roundtrip(server):
    x = sample_inputs("identity", batch=3)["x"]
    with Client(server.socket_path) as c:
        r = c.infer("identity", {"x": x})
    assert r.model == "identity" and r.version == 1
    np.testing.assert_array_equal(r["y"], x)
