"""Busy polling: the loop polls for its window after an answer, never while a worker
thread runs a batch, and sleeps again once requests stop (also in a real server)."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np

from appliance.client import Client
from appliance.demo.launcher import ServerProcess
from appliance.demo.models import sample_inputs
from appliance.observe.stats import VersionStats
from appliance.scheduling.batcher import DynamicBatcher
from appliance.scheduling.instance import ModelInstance
from appliance.scheduling.policy import BatchPolicy
from appliance.scheduling.window import window_for
from appliance.transport.busy_poll import BusyPoller
from tests.scheduling.test_batcher import GatedSession, _request


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CountingPoller(BusyPoller):
    __slots__ = ("polls",)

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.polls = 0

    def _poll(self) -> None:
        self.polls += 1
        super()._poll()


def test_poller_polls_through_its_window_then_stops():
    async def go():
        loop = asyncio.get_running_loop()
        poller = CountingPoller(loop, 30_000, window_for(loop))
        poller.extend()
        await asyncio.sleep(0.01)
        during = poller.polls, poller.active
        await asyncio.sleep(0.1)
        after = poller.polls, poller.active
        await asyncio.sleep(0.05)
        return during, after, poller.polls

    (polls_during, active_during), (polls_after, active_after), polls_later = asyncio.run(go())
    assert active_during and polls_during > 10  # zero-timeout waits, over and over
    assert not active_after
    assert polls_later == polls_after  # asleep: no more polls once the window passed


def test_polling_stops_while_a_batch_runs_on_a_worker_thread():
    async def go():
        loop = asyncio.get_running_loop()
        session = GatedSession()
        session.gate.clear()
        batcher = DynamicBatcher(BatchPolicy(max_batch_size=8), [ModelInstance(session, "t")],
                                 VersionStats())
        batches = window_for(loop)
        answered = asyncio.Event()
        batcher.enqueue(_request(np.ones((1, 4), np.float32),
                                 lambda out, err: answered.set()))
        on_workers_while_running = batches.on_workers
        poller = CountingPoller(loop, 1_000_000, batches)
        poller.extend()
        for _ in range(3):
            await asyncio.sleep(0)
        stopped = not poller.active and poller.polls == 1
        session.gate.set()
        await asyncio.wait_for(answered.wait(), 5)
        await batcher.stop()
        return on_workers_while_running, stopped, batches.on_workers

    on_workers_while_running, stopped, on_workers_after = asyncio.run(go())
    assert on_workers_while_running == 1
    assert stopped  # a worker may need the GIL: the loop goes back to sleeping in epoll
    assert on_workers_after == 0  # counted back, so polling can resume


def test_a_polling_server_answers_and_then_goes_idle(repo_with_demo, tmp_path):
    """A 10 ms window (the most allowed), far longer than the default, so that a poller
    that never stopped would show as a busy CPU."""
    config = tmp_path / "outpost.toml"
    config.write_text("[server]\nbusy_poll_us = 10000\n")
    server = ServerProcess(repo_with_demo, extra_args=["--config", str(config)]).start()
    try:
        inputs = sample_inputs("identity")
        with Client(server.socket_path) as client:
            for _ in range(300):
                out = client.infer("identity", inputs)
                np.testing.assert_array_equal(out["y"], inputs["x"])  # x + 0
            time.sleep(0.2)  # the window after the last answer passes
            before = cpu_seconds(server.proc.pid)
            time.sleep(1.0)
            idle_cpu_s = cpu_seconds(server.proc.pid) - before
            assert client.stats("identity")["models"][0]["request_success"] >= 300
    finally:
        assert server.stop() == 0, server.log_tail()
    assert idle_cpu_s < 0.3  # still polling, it would be about 1 s
