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


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    """The demo models as ONNX files (identity, cnn, mlp)."""
    from appliance.demo import write_demo_models

    return write_demo_models(tmp_path_factory.mktemp("demo-models"))


@pytest.fixture
def short_tmp():
    """A short temporary folder: Unix socket paths must stay under 108 bytes."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="op-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def repo_with_demo(short_tmp, demo_files):
    """A data dir whose repository holds the three demo models."""
    from appliance.repository import Repository

    repo = Repository(short_tmp)
    for name, path in demo_files.items():
        repo.add(name, path)
    repo.close()
    return short_tmp


@pytest.fixture
def server(repo_with_demo):
    """A real `outpost serve` process over the demo models; yields the ServerProcess."""
    from appliance.launcher import ServerProcess

    proc = ServerProcess(repo_with_demo).start()
    yield proc
    code = proc.stop()
    assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"
