"""The blocking client's own behaviour: busy polling, and its timeout, over real sockets."""

from __future__ import annotations

import resource
import socket
import threading
import time

import numpy as np
import pytest

from appliance import errors
from appliance.client import Client
from appliance.demo.models import sample_inputs


def _voluntary_switches() -> int:
    """This thread's voluntary context switches: one each time it sleeps for the socket."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


@pytest.mark.parametrize("busy_poll_us", [0, 200_000])
def test_busy_polling_takes_answers_without_sleeping(module_server, busy_poll_us):
    inputs = sample_inputs("identity")
    with Client(module_server.socket_path, busy_poll_us=busy_poll_us) as c:
        for _ in range(20):
            c.infer("identity", inputs)
        before = _voluntary_switches()
        for i in range(200):
            y = c.infer("identity", {"x": inputs["x"] + i})["y"]
            assert np.array_equal(y, inputs["x"] + i)
        slept = _voluntary_switches() - before
    if busy_poll_us:
        assert slept < 40, slept  # the 200 ms window catches nearly every answer
    else:
        assert slept >= 150, slept  # blocking: a sleep for (nearly) every answer


def test_busy_polling_still_waits_for_a_slow_answer(module_server):
    """An answer later than the window is still taken, by the blocking receive."""
    image = sample_inputs("cnn")
    with Client(module_server.socket_path, busy_poll_us=1) as c:
        assert c.infer("cnn", image)["probs"].shape == (1, 10)


def test_a_server_that_never_answers_times_out_with_one_clear_error(short_tmp):
    """The timeout is the kernel's (SO_RCVTIMEO), with or without busy polling."""
    path = short_tmp / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(4)
    held = []
    accepting = threading.Thread(target=lambda: held.extend(mute.accept() for _ in range(2)),
                                 daemon=True)
    accepting.start()
    try:
        for busy_poll_us in (0, 1000):
            with Client(path, timeout_s=0.3, busy_poll_us=busy_poll_us) as c:
                t0 = time.monotonic()
                with pytest.raises(errors.Unavailable) as e:
                    c.health()
                waited = time.monotonic() - t0
            assert "no answer from the server within 0.3 s" in str(e.value)
            assert 0.25 <= waited < 5, waited
    finally:
        mute.close()
        for conn, _ in held:
            conn.close()


def test_a_negative_busy_poll_is_refused(module_server):
    with pytest.raises(errors.InvalidArgument, match="busy_poll_us"):
        Client(module_server.socket_path, busy_poll_us=-1)
