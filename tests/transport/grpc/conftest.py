"""A real `outpost serve --grpc` process for the gRPC tests, and the models they need."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from appliance.demo.launcher import ServerProcess
from tests.conftest import add_demo_models
from tests.support.slow_model import slow_model


def pair_model(path: Path) -> Path:
    """Two inputs, two outputs, each passed through: 'a' (INT8) -> 'a_out', 'b' (INT64)
    -> 'b_out', both [batch, 4]. A request can split its tensors between raw bytes,
    typed contents and shared memory, and ask for one output of two."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["a_out"]),
         helper.make_node("Identity", ["b"], ["b_out"])],
        "pair",
        [helper.make_tensor_value_info("a", TensorProto.INT8, ["n", 4]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["n", 4])],
        [helper.make_tensor_value_info("a_out", TensorProto.INT8, ["n", 4]),
         helper.make_tensor_value_info("b_out", TensorProto.INT64, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def start_grpc_server(data_dir: Path, models: dict[str, Path], grpc_config: dict,
                      *, configs: dict[str, str] | None = None, http: bool = False
                      ) -> tuple[ServerProcess, str]:
    """The models in a repository of their own, a config file with [grpc] (and [http] on
    port 0 when asked), the server running; returns it and its gRPC HOST:PORT."""
    data_dir.mkdir(parents=True, exist_ok=True)
    add_demo_models(data_dir, models, configs)
    lines = ["[grpc]", 'address = "127.0.0.1:0"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in grpc_config.items()]
    if http:
        lines += ["[http]", 'address = "127.0.0.1:0"']
    config = data_dir / "outpost.toml"
    config.write_text("\n".join(lines) + "\n")
    proc = ServerProcess(data_dir, extra_args=["--config", str(config)]).start()
    return proc, proc.ready_record()["grpc"]


def served_grpc(models: dict[str, Path], grpc_config: dict, **kwargs):
    """For a fixture to ``yield from``: (process, target) in a folder of its own; stopped
    cleanly afterwards (exit 0, no traceback in its log), and gone."""
    data_dir = Path(tempfile.mkdtemp(prefix="op-"))
    proc, target = start_grpc_server(data_dir, models, grpc_config, **kwargs)
    try:
        yield proc, target
    finally:
        code = proc.stop()
        log = proc.log_path.read_text(errors="replace")
        shutil.rmtree(data_dir, ignore_errors=True)
    assert code == 0, f"server exited with {code}:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="session")
def extra_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("grpc-models")
    return {"slow": slow_model(folder / "slow.onnx"), "pair": pair_model(folder / "pair.onnx")}
