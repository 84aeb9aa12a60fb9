"""A link that breaks every few tens of KB (a reset, a clean close, a stall past the
timeout) still completes the download in the same pass, resuming with HTTP Range at the
chunk it was in, and is never reported failed; reports made while the fleet can't take
them are kept (bounded, oldest dropped first, counted) and sent once it can."""

from __future__ import annotations

import re
import socket
import sqlite3
import threading
import time

import pytest

from tests.support.updater_support import (
    active_version,
    fleet_offering,
    free_port,
    journal_notes,
    journal_rows,
    make_device,
    run_outpost,
)
from tests.updater.test_delta_update import weights_model
from updater.link_relay import Relay, is_target, reset

CUT_EVERY = 50_000  # body bytes a target answer gets before the link breaks
CHUNK = 4096  # the device's download_chunk_bytes (make_device)
BREAKS = ("reset", "close", "stall")


class FlakyLink(Relay):
    """Each target answer longer than CUT_EVERY is cut there, by the next of BREAKS in
    turn. Records (range start, body bytes sent, how) of each."""

    def __init__(self, upstream: int):
        self.sent: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()
        super().__init__(upstream)

    def deliver(self, head, headers, body, client) -> None:
        if not is_target(head) or len(body) <= CUT_EVERY:
            client.sendall(headers + b"\r\n\r\n" + body)
            client.shutdown(socket.SHUT_WR)
            if is_target(head):
                with self.lock:
                    self.sent.append((_range_start(head), len(body), "whole"))
            return
        with self.lock:
            how = BREAKS[sum(1 for *_, h in self.sent if h != "whole") % len(BREAKS)]
            self.sent.append((_range_start(head), CUT_EVERY, how))
        client.sendall(headers + b"\r\n\r\n" + body[:CUT_EVERY])
        time.sleep(0.2)  # the device reads what was sent before the link breaks
        if how == "reset":
            reset(client)
        elif how == "close":
            client.shutdown(socket.SHUT_WR)
        else:  # stall: the connection stays open and silent past the device's timeout
            time.sleep(2.0)


def _range_start(head: bytes) -> int:
    m = re.search(rb"\r\nRange: bytes=(\d+)-", head)
    return int(m.group(1)) if m else 0


@pytest.fixture
def fleet(tmp_path):
    yield from fleet_offering(tmp_path / "fleet",
                              weights_model(tmp_path / "v2.onnx", head_seed=99))


def _reported_states(fleet) -> list[str]:
    with sqlite3.connect(fleet.dir / "fleet.db") as db:
        return [r[0] for r in db.execute("select state from reports order by rowid")]


def test_a_link_that_keeps_breaking_completes_in_one_pass(fleet, tmp_path, short_tmp):
    link = FlakyLink(fleet.port)
    threading.Thread(target=link.serve_forever, daemon=True).start()
    try:
        data = short_tmp / "dev"
        config = make_device(data, fleet, weights_model(tmp_path / "v1.onnx"),
                             extra="http_timeout_s = 1.0\n")
        text = config.read_text().replace(f'fleet_url = "{fleet.url}"',
                                          f'fleet_url = "{link.url}"')
        config.write_text(text + "")
        result = run_outpost("update", "check", "--config", config)  # one pass
        assert active_version(data) == 2, result.stdout + result.stderr
        assert journal_rows(data)[-1]["outcome"] == "committed"
    finally:
        link.shutdown()
        link.server_close()
    hows = [h for *_, h in link.sent]
    assert {"reset", "close", "stall"} <= set(hows) and hows[-1] == "whole", link.sent
    for (start, sent, _), (next_start, *_) in zip(link.sent, link.sent[1:]):
        cut_at = start + sent
        assert cut_at - CHUNK < next_start <= cut_at, link.sent  # only the chunk in flight
    notes = journal_notes(data)
    assert sum("resuming in this pass" in n for n in notes) == len(link.sent) - 1, notes
    assert any("timed out" in n for n in notes), notes  # the stall
    states = _reported_states(fleet)
    assert "failed" not in states and states[-1] == "committed", states


def test_reports_made_offline_are_kept_bounded_and_sent_later(fleet, tmp_path, short_tmp):
    data = short_tmp / "dev"
    offline = f"http://127.0.0.1:{free_port()}"  # nothing listens: the reports can't go
    config = make_device(data, fleet, weights_model(tmp_path / "v1.onnx"),
                         extra=f'report_url = "{offline}"\nmax_queued_reports = 3\n')
    result = run_outpost("update", "check", "--config", config)
    assert active_version(data) == 2, result.stdout + result.stderr
    with sqlite3.connect(data / "state.db") as db:
        queued = [r[0] for r in db.execute("select body from update_reports order by id")]
        dropped = db.execute("select count from update_reports_dropped").fetchone()[0]
    assert len(queued) == 3 and '"committed"' in queued[-1]  # the newest are kept
    assert dropped == 3  # downloading, downloaded, staged: the oldest, counted
    assert _reported_states(fleet) == []

    config.write_text(config.read_text().replace(offline, fleet.url))  # back online
    run_outpost("update", "check", "--config", config)
    assert _reported_states(fleet) == ["validated", "activated", "committed"]
    with sqlite3.connect(data / "state.db") as db:
        assert db.execute("select count(*) from update_reports").fetchone()[0] == 0
        assert db.execute("select count from update_reports_dropped").fetchone()[0] == 0
