"""Delta updates: a device that holds the base version rebuilds the release from a signed
delta and checks it against the full release's signed length and hash; a delta it can't
use (base not held, base not the file the delta was made from, delta tampered with) falls
back to the full release, said once, with nothing half-written left behind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.demo.models import save_model
from tests.support.updater_support import (
    Fleet,
    active_version,
    journal_notes,
    journal_rows,
    make_device,
    run_outpost,
)
from updater.delta import DeltaError, _zstd
from updater.fleet_repo import delta_path, release_path
from updater.validation import make_release_samples


def _have_zstd() -> bool:
    try:
        _zstd()
    except DeltaError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _have_zstd(), reason="deltas need backports.zstd "
                                "(or Python 3.14); pyproject.toml must list it")

HIDDEN = 2048


def weights_model(path, seed: int = 0, head_seed: int | None = None):
    """y = (x @ w1) @ w2 with 256 KiB of weights; ``head_seed`` retrains only w2."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, HIDDEN)).astype(np.float32) * 0.01
    w2 = np.random.default_rng(head_seed if head_seed is not None else seed + 1
                               ).standard_normal((HIDDEN, 16)).astype(np.float32) * 0.01
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("MatMul", ["h", "w2"], ["y"])], "weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return save_model(graph, path)


@pytest.fixture
def models(tmp_path):
    return {"v1": weights_model(tmp_path / "v1.onnx"),
            "v2": weights_model(tmp_path / "v2.onnx", head_seed=99),
            "other": weights_model(tmp_path / "other.onnx", seed=5)}


@pytest.fixture
def fleet(tmp_path, models):
    f = Fleet(tmp_path / "fleet")
    f.publish("identity", 1, models["v1"])
    with tempfile.TemporaryDirectory() as tmp:
        config, samples = make_release_samples(models["v2"], None, None, Path(tmp))
        f.repo.publish("identity", 2, models["v2"], config, samples, delta_from=(1,))
    f.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    f.start()
    yield f
    f.stop()


def _check(config):
    result = run_outpost("update", "check", "--config", config)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _target(fleet, path):
    return fleet.repo.target_file(path)


def test_a_device_holding_the_base_rebuilds_the_release_from_the_delta(fleet, models,
                                                                       short_tmp):
    delta = _target(fleet, delta_path("identity", 2, 1))
    full = _target(fleet, release_path("identity", 2))
    assert delta.stat().st_size < full.stat().st_size / 2  # only the head changed
    full.rename(full.with_suffix(".away"))  # only the delta can serve this device
    data = short_tmp / "dev"
    config = make_device(data, fleet, models["v1"])
    result = _check(config)
    assert active_version(data) == 2, result.stdout + result.stderr
    assert journal_rows(data)[-1]["outcome"] == "committed"
    notes = journal_notes(data)
    assert any(n.startswith("rebuilt from the delta from 1") for n in notes), notes
    assert (data / "models" / "identity" / "2" / "model.onnx").read_bytes() == \
        models["v2"].read_bytes()
    assert not list((data / "staging" / "downloads").iterdir())  # delta removed


@pytest.mark.parametrize("case", ["base_not_held", "base_differs", "delta_tampered"])
def test_a_delta_that_cannot_be_used_falls_back_to_the_full_release(fleet, models,
                                                                    short_tmp, case):
    data = short_tmp / "dev"
    if case == "delta_tampered":
        delta = _target(fleet, delta_path("identity", 2, 1))
        raw = bytearray(delta.read_bytes())
        raw[-100] ^= 0xFF
        delta.write_bytes(bytes(raw))
    model = models["other"] if case == "base_differs" else models["v1"]
    config = make_device(data, fleet, model, installed=case != "base_not_held")
    _check(config)
    assert active_version(data) == 2
    row = journal_rows(data)[-1]
    assert row["outcome"] == "committed", row
    notes = [n for n in journal_notes(data) if n.startswith(("delta from", "deltas from"))]
    assert len(notes) == 1, journal_notes(data)  # said once
    why = {"base_not_held": "holds none of those versions",
           "base_differs": "is not the file the delta was made from",
           "delta_tampered": "failed TUF verification"}[case]
    assert why in notes[0] and "downloaded the full release" in notes[0], notes
    assert not any(n.startswith("rebuilt from the delta") for n in journal_notes(data))
    assert not list((data / "staging" / "downloads").iterdir())
    assert (data / "models" / "identity" / "2" / "model.onnx").read_bytes() == \
        models["v2"].read_bytes()


def test_publish_delta_from_a_version_the_fleet_lacks_is_one_clear_error(fleet, models):
    result = run_outpost("fleet", "publish", fleet.dir, models["v2"], "--name", "identity",
                         "--version", "3", "--delta-from", "7")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--delta-from 7: the fleet has no earlier release identity 7" in result.stderr
    assert not any(r.version == 3 for r in fleet.repo.releases())  # nothing half-written
    bad = run_outpost("fleet", "publish", fleet.dir, models["v2"], "--name", "identity",
                      "--version", "3", "--delta-from", "x")
    assert bad.returncode == 2 and "must be versions like 6 or 6,5" in bad.stderr
    ok = run_outpost("fleet", "publish", fleet.dir, models["v2"], "--name", "identity",
                     "--version", "3", "--delta-from", "2,1")
    assert ok.returncode == 0, ok.stderr
    assert "delta from 2: zstd-patch" in ok.stdout and "delta from 1:" in ok.stdout
