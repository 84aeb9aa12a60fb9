"""What an operator meets at the command line: the command list, errors in CLI words,
`info`'s profile line, a progress bar that fits the terminal, a second `serve`."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np

from appliance.cli.progress import BuildProgressBar, MeasureProgress
from appliance.demo.launcher import ServerProcess
from tests.conftest import add_demo_models


def outpost(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_outpost_alone_lists_its_commands():
    r = outpost()
    assert r.returncode == 2
    for command in ("serve", "models", "infer", "info", "install"):
        assert re.search(rf"^\s+{command}\s+\S", r.stderr, re.M), r.stderr
    assert "Traceback" not in r.stderr


def test_a_not_found_from_the_server_names_the_cli_command(server, short_tmp):
    np.save(short_tmp / "x.npy", np.zeros((1, 16), np.float32))
    r = outpost("infer", "nosuch", "-i", f"x={short_tmp / 'x.npy'}", "--socket",
                server.socket_path)
    assert r.returncode == 1
    assert r.stderr.startswith("outpost: NOT_FOUND: model 'nosuch' is not served here")
    assert "'outpost models list' lists what is" in r.stderr and " op " not in r.stderr


def test_info_says_how_the_profile_was_chosen(short_tmp):
    r = outpost("info", "--data-dir", short_tmp)
    line = next(x for x in r.stdout.splitlines() if x.startswith("profile:"))
    assert "(from " not in line
    assert line.startswith("profile:  x86-cpu (no device profile matched, so the CPU one: ")
    r = outpost("info", "--data-dir", short_tmp, "--profile", "x86-cpu")
    line = next(x for x in r.stdout.splitlines() if x.startswith("profile:"))
    assert line == "profile:  x86-cpu (named in the config)"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drawn_lines(text: str) -> list[str]:
    """What each redraw leaves on the line: the text between a carriage return and the
    erase-to-end-of-line that follows it."""
    return [seg.split("\x1b[K")[0] for seg in text.split("\r")[1:]]


def test_progress_bars_fit_an_80_column_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    out = Terminal()
    bar = BuildProgressBar(out)
    bar.phase_start("Building a network with a rather long phase name to see it cut", None, 4)
    for i in range(4):
        bar.phase_start("Tactic selection for a layer with a very long generated name",
                        "Building a network with a rather long phase name to see it cut", 10)
        bar.step_complete("Tactic selection for a layer with a very long generated name", i)
        bar.phase_finish("Tactic selection for a layer with a very long generated name")
        bar.step_complete("Building a network with a rather long phase name to see it cut", i)
    bar.close()
    m = MeasureProgress("a-model-with-a-long-name", out)
    for i in range(5):
        m(i, 5, "2 threads x 1 instance, batch 32, spinning, " + "x" * 60)
    m.close()
    drawn = _drawn_lines(out.getvalue())
    assert len(drawn) > 8
    assert all(len(line) <= 79 for line in drawn), max(map(len, drawn))
    assert all(not line.endswith(" ") for line in drawn)  # no padding to a fixed width
    assert out.getvalue().count("\n") == 2  # one line each, redrawn in place


def test_a_second_server_on_a_taken_socket_stops_before_loading_models(short_tmp, demo_files):
    add_demo_models(short_tmp, demo_files)
    second = short_tmp / "second"
    add_demo_models(second, demo_files)
    with ServerProcess(short_tmp) as first:
        r = outpost("serve", "--data-dir", second, "--socket", first.socket_path,
                    "--log-format", "json", timeout=60)
        assert r.returncode == 2
        assert f"another server is serving on {first.socket_path}" in r.stderr
        assert "model loaded" not in r.stderr and "Traceback" not in r.stderr
