"""Shared fixtures: demo model files built once, and real server processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Child processes (servers, agents) import this checkout, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def _fixed_layout_profiles() -> Path:
    """The shipped CPU profile with a fixed layout (one thread, one instance, no preferred
    batch) and a one-run warm-up, first in the profile search path of every process the
    tests start: measuring each model at the first load of every fresh data dir would
    add seconds to each server start, and the tests of batching need a layout they know.
    The tests of the measured layout (tests/models/test_layout.py) run their servers on
    the shipped profiles."""
    import re
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="op-profiles-"))
    text = (ROOT / "firmware_profiles" / "x86-cpu.toml").read_text()
    text = re.sub(r'^intra_op = .*$', "intra_op = 1\nspinning = false", text, flags=re.M)
    text = re.sub(r'^instances = .*$', "instances = 1\nauto_preferred_batch = false", text,
                  flags=re.M)
    # and one warm-up run at batch one: warming every batch size to steady state adds
    # about a second to each start with the demo CNN (tests/models/test_warmup.py tests it)
    text += "\n[warmup]\nbudget_ms = 0\n"
    (folder / "x86-cpu.toml").write_text(text)
    return folder


FIXED_LAYOUT_PROFILES = _fixed_layout_profiles()
os.environ["OUTPOST_PROFILES_DIR"] = str(FIXED_LAYOUT_PROFILES)


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    """The demo models as ONNX files (identity, cnn, mlp)."""
    from appliance.demo.models import write_demo_models

    return write_demo_models(tmp_path_factory.mktemp("demo-models"))


@pytest.fixture
def short_tmp():
    """A short temporary folder: Unix socket paths must stay under 108 bytes."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="op-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def add_demo_models(data_dir: Path, demo_files: dict[str, Path], configs: dict | None = None):
    """Add the demo models to the repository in ``data_dir``; ``configs``: name -> TOML."""
    from appliance.models.repository import Repository

    repo = Repository(data_dir)
    for name, path in demo_files.items():
        config_path = None
        if configs and name in configs:
            config_path = data_dir / f"{name}.config.toml"
            config_path.write_text(configs[name])
        repo.add(name, path, config_path=config_path)
    repo.close()
    return data_dir


@pytest.fixture
def repo_with_demo(short_tmp, demo_files):
    """A data dir whose repository holds the three demo models."""
    return add_demo_models(short_tmp, demo_files)


def _serve(data_dir: Path, extra_args=None):
    from appliance.demo.launcher import ServerProcess

    proc = ServerProcess(data_dir, extra_args=extra_args).start()
    yield proc
    code = proc.stop()
    assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"


@pytest.fixture
def server(repo_with_demo):
    """A real `outpost serve` process over the demo models; yields the ServerProcess."""
    yield from _serve(repo_with_demo)


@pytest.fixture(scope="module")
def module_server(demo_files):
    """One real server shared by a test module (for tests that leave it as they found it)."""
    import shutil
    import tempfile

    data_dir = Path(tempfile.mkdtemp(prefix="op-"))
    add_demo_models(data_dir, demo_files)
    yield from _serve(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
