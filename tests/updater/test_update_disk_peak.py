"""Peak disk during an update: a device never holds more than two copies of the new model
(the one the repository keeps, plus at most one more) at any step, from a full release or
from a delta; and a restart between storing the version and dropping the archive finishes.

The meter is the agent's fault hook: at every fault point (mid-download, download done,
unpacked, stored, mid-prepare, activated, mid-watch) it counts the files under the
device's data dir that hold the whole new model file (the model itself, or the release
archive around it). The engine cache is not counted: a compiled engine stays beside every
version, update or not.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
from pathlib import Path

import pytest

from appliance.cli.update_cmd import device_agent
from appliance.config.load import load_config
from tests.support.updater_support import (
    Fleet,
    active_version,
    journal_notes,
    journal_rows,
    make_device,
    run_outpost,
)
from tests.updater.test_delta_update import _have_zstd, weights_model
from updater.validation import make_release_samples


class CopyMeter:
    """The agent's fault hook: copies of ``model`` under ``data_dir`` at each point."""

    def __init__(self, data_dir: Path, model: Path):
        self.data_dir = data_dir
        self.model = model.read_bytes()
        self.seen: list[tuple[str, int, list[str]]] = []  # (point, copies, which files)

    def __call__(self, point: str) -> None:
        held = [str(p.relative_to(self.data_dir)) for p in sorted(self.data_dir.rglob("*"))
                if p.is_file() and "engines" not in p.relative_to(self.data_dir).parts
                and p.stat().st_size >= len(self.model) and self.model in p.read_bytes()]
        self.seen.append((point, len(held), held))

    @property
    def peak(self) -> int:
        return max(n for _, n, _ in self.seen)


def _one_pass(config: Path, meter: CopyMeter) -> list[str]:
    agent = device_agent(load_config(config))
    agent.fault = meter

    async def run() -> list[str]:
        return [*await agent.recover(), *await agent.check_once()]

    try:
        return asyncio.run(run())
    finally:
        agent.close()
        agent.host.repo.close()


@pytest.fixture
def models(tmp_path):
    return {"v1": weights_model(tmp_path / "v1.onnx"),
            "v2": weights_model(tmp_path / "v2.onnx", head_seed=99)}


def _fleet(directory: Path, models: dict, delta: bool) -> Fleet:
    f = Fleet(directory)
    f.publish("identity", 1, models["v1"])
    with tempfile.TemporaryDirectory() as tmp:
        config, samples = make_release_samples(models["v2"], None, None, Path(tmp))
        f.repo.publish("identity", 2, models["v2"], config, samples,
                       delta_from=(1,) if delta else ())
    f.repo.set_rollout("identity", 2, new=True, fraction=1.0)
    return f.start()


@pytest.mark.parametrize("delta", [False, True], ids=["full", "delta"])
def test_an_update_never_holds_more_than_two_copies_of_the_new_model(
        tmp_path, short_tmp, models, delta):
    if delta and not _have_zstd():
        pytest.skip("deltas need backports.zstd (or Python 3.14)")
    fleet = _fleet(tmp_path / "fleet", models, delta)
    try:
        data = short_tmp / "dev"
        config = make_device(data, fleet, models["v1"])
        meter = CopyMeter(data, models["v2"])
        lines = _one_pass(config, meter)
    finally:
        fleet.stop()
    assert active_version(data) == 2, lines
    assert journal_rows(data)[-1]["outcome"] == "committed", lines
    copies = [s for s in meter.seen if s[1]]
    assert meter.peak <= 2, copies  # three before: the archive, unpacked and stored copies
    points = [p for p, _, _ in meter.seen]
    for point in ("download-mid", "download-done", "stage-mid", "stage-stored",
                  "prepare-mid", "activate-done"):
        assert point in points, points
    # and a copy is really there to be seen: the meter is not blind
    assert max(n for p, n, _ in meter.seen if p == "stage-mid") == 2, copies
    after = {p: held for p, _, held in meter.seen}
    assert after["prepare-mid"] == ["models/identity/2/model.onnx"], copies


def test_a_restart_that_finds_the_archive_gone_downloads_it_again(tmp_path, short_tmp,
                                                                   models):
    fleet = _fleet(tmp_path / "fleet", models, delta=False)
    try:
        data = short_tmp / "dev"
        config = make_device(data, fleet, models["v1"])
        killed = run_outpost("update", "check", "--config", config,
                             env={"OUTPOST_UPDATER_FAULT": "stage-mid"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        archives = list((data / "staging" / "downloads").glob("*.tar"))
        assert len(archives) == 1, archives
        archives[0].unlink()  # whatever took it, nothing unverified is used in its place
        result = run_outpost("update", "check", "--config", config)
    finally:
        fleet.stop()
    assert "Traceback" not in result.stderr, result.stderr
    assert active_version(data) == 2, result.stdout + result.stderr
    assert journal_rows(data)[-1]["outcome"] == "committed"
    notes = journal_notes(data)
    assert any("the verified archive is gone" in n for n in notes), notes
    assert (data / "models" / "identity" / "2" / "model.onnx").read_bytes() == \
        models["v2"].read_bytes()
    assert not list((data / "staging" / "downloads").iterdir())
