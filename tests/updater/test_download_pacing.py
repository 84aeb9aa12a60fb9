"""A real device against a real fleet server on 127.0.0.1: updater.max_download_bytes_per_s
holds the download to the cap (loopback runs at hundreds of MB/s without it; how close
to the cap it gets is a measured figure, not asserted: a loaded host's fsyncs slow it by
themselves), and updater.download_windows keeps it waiting, not failed, outside its
windows."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest

from tests.support.updater_support import (
    active_version,
    fleet_offering,
    journal_notes,
    journal_rows,
    make_device,
    run_outpost,
)
from tests.updater.test_delta_update import weights_model

CAP = 250_000  # bytes a second; the release is about 276 kB: some 1.1 s


@pytest.fixture
def fleet(tmp_path):
    yield from fleet_offering(tmp_path / "fleet",
                              weights_model(tmp_path / "v2.onnx", head_seed=99))


def test_the_download_is_held_to_the_cap(fleet, tmp_path, short_tmp):
    data = short_tmp / "dev"
    config = make_device(data, fleet, weights_model(tmp_path / "v1.onnx"),
                         extra=f"max_download_bytes_per_s = {CAP}\n")
    # 64 KiB chunks: the fsync of each 4 KiB one, on a loaded host, would slow the
    # download below the cap by itself (the bucket only ever holds it back).
    config.write_text(config.read_text().replace("download_chunk_bytes = 4096",
                                                 "download_chunk_bytes = 65536"))
    result = run_outpost("update", "check", "--config", config)
    assert active_version(data) == 2, result.stdout + result.stderr
    [note] = [n for n in journal_notes(data) if n.startswith("downloaded ")]
    size, rate = map(int, re.match(r"downloaded (\d+) bytes in [\d.]+ s: (\d+) B/s", note
                                   ).groups())
    assert size > CAP  # long enough for the cap to show
    assert rate <= 1.1 * CAP, note  # the bucket starts empty: the average never passes it


def _hhmm(t: datetime) -> str:
    return t.strftime("%H:%M")


def test_outside_the_windows_the_download_waits_and_is_not_failed(fleet, tmp_path,
                                                                  short_tmp):
    now = datetime.now()  # the device's local time, as its agent reads it
    later = f"{_hhmm(now + timedelta(hours=6))}-{_hhmm(now + timedelta(hours=7))}"
    data = short_tmp / "dev"
    config = make_device(data, fleet, weights_model(tmp_path / "v1.onnx"),
                         extra=f'download_windows = "{later}"\n')
    result = run_outpost("update", "check", "--config", config)
    assert result.returncode == 0, result.stderr
    assert f"paused at download (outside the download windows ({later}" in result.stdout
    assert active_version(data) == 1
    assert journal_rows(data)[-1]["step"] == "download"
    assert not list((data / "staging" / "downloads").iterdir())  # not a byte fetched
    # The window is widened (as a config change does): the same update goes on.
    config.write_text(config.read_text().replace(later, "00:00-24:00"))
    result = run_outpost("update", "check", "--config", config)
    assert active_version(data) == 2, result.stdout + result.stderr
    assert journal_rows(data)[-1]["outcome"] == "committed"
