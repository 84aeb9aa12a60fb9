"""A fleet-side connection that closes cleanly partway through a release (no error, just
the end of the stream, as a proxy or a flaky link does): the device resumes the download
with HTTP Range on its next pass and commits the update; it is neither failed nor
reported as tampered, so a fleet on flaky links does not halt a good rollout."""

from __future__ import annotations

import socket
import threading

import pytest

from appliance.demo.launcher import ServerProcess
from tests.support.updater_support import (
    fleet_offering,
    journal_notes,
    make_device,
    wait_done,
)
from updater.link_relay import Relay, is_target

CUT_AFTER = 4096  # body bytes passed on before the first target download is cut


class CuttingProxy(Relay):
    """The first answer for a target is cut after CUT_AFTER body bytes, its
    Content-Length intact, and the connection closed cleanly (no reset)."""

    def __init__(self, upstream: int):
        self.cuts = 0
        self.lock = threading.Lock()
        super().__init__(upstream)

    def deliver(self, head, headers, body, client) -> None:
        with self.lock:
            cut = is_target(head) and self.cuts == 0
            self.cuts += cut
        client.sendall(headers + b"\r\n\r\n" + (body[:CUT_AFTER] if cut else body))
        client.shutdown(socket.SHUT_WR)


@pytest.fixture
def fleet(tmp_path, demo_files):
    yield from fleet_offering(tmp_path / "fleet", demo_files["identity"])


def test_a_clean_close_mid_download_resumes_instead_of_failing(fleet, short_tmp, demo_files):
    proxy = CuttingProxy(fleet.port)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        data = short_tmp / "dev"
        config = make_device(data, fleet, demo_files["identity"], window_s=0.3)
        config.write_text(config.read_text().replace(fleet.url, proxy.url))
        with ServerProcess(data, extra_args=["--config", str(config)]):
            row = wait_done(data, 2)
        assert proxy.cuts == 1
        assert row["outcome"] == "committed", row
        notes = journal_notes(data)
        assert any("bytes short of its Content-Length" in n for n in notes), notes
        assert f"resuming the download at byte {CUT_AFTER}" in notes, notes
        assert not any("TUF verification" in n for n in notes), notes
    finally:
        proxy.shutdown()
        proxy.server_close()
