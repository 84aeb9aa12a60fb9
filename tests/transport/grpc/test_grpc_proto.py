"""Outpost's own proto file: wire-compatible with Triton's (every message, field, number,
type and method it declares is Triton's, read from the descriptors tritonclient ships), and
the committed Python modules are what build/gen_grpc_stubs.py makes of it now."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc.service_pb2 as triton
from google.protobuf.descriptor import Descriptor, EnumDescriptor

from appliance.transport.grpc import inference_pb2 as ours

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "build" / "gen_grpc_stubs.py"
PACKAGE = ROOT / "appliance" / "transport" / "grpc"


def _theirs(full_name: str):
    """Triton's message or enum of that name (the model config's messages live in a file
    that the service's imports, in the same pool)."""
    pool = triton.DESCRIPTOR.pool
    try:
        return pool.FindMessageTypeByName(full_name)
    except KeyError:
        return pool.FindEnumTypeByName(full_name)


def _all(descriptor):
    """Every message and enum declared in ours, nested ones too."""
    for message in descriptor.message_types_by_name.values():
        yield from _walk(message)
    yield from descriptor.enum_types_by_name.values()


def _walk(message: Descriptor):
    yield message
    for nested in message.nested_types:
        if not nested.GetOptions().map_entry:
            yield from _walk(nested)
    yield from message.enum_types


def _type_of(field) -> tuple:
    kind = field.message_type or field.enum_type
    return (field.type, field.is_repeated, kind.full_name if kind else None,
            field.containing_oneof.name if field.containing_oneof else None)


def test_every_type_is_tritons():
    checked = 0
    for ours_type in _all(ours.DESCRIPTOR):
        theirs = _theirs(ours_type.full_name)
        if isinstance(ours_type, EnumDescriptor):
            assert {v.name: v.number for v in ours_type.values} == \
                   {v.name: v.number for v in theirs.values}, ours_type.full_name
            continue
        for field in ours_type.fields:
            twin = theirs.fields_by_number.get(field.number)
            assert twin is not None, f"{ours_type.full_name}.{field.name}: no such number"
            assert twin.name == field.name, f"{ours_type.full_name}.{field.name}"
            assert _type_of(field) == _type_of(twin), f"{ours_type.full_name}.{field.name}"
            checked += 1
    assert checked > 150


def test_every_method_is_tritons():
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        twin = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name,
                method.client_streaming, method.server_streaming) == \
               (twin.input_type.full_name, twin.output_type.full_name,
                twin.client_streaming, twin.server_streaming), method.name
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics",
            "RepositoryModelLoad", "SystemSharedMemoryRegister"} <= set(
        service.methods_by_name)


def test_the_server_does_not_import_tritonclient():
    code = ("import sys; import appliance.transport.grpc.server; "
            "sys.exit('tritonclient' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None,
                    reason="grpcio-tools is not installed (pyproject's test extra has it)")
def test_the_committed_modules_are_generated_from_the_proto(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    for name in ("inference_pb2.py", "inference_pb2_grpc.py"):
        assert (tmp_path / name).read_text() == (PACKAGE / name).read_text(), (
            f"{name} is stale: run `python build/gen_grpc_stubs.py` (with the grpcio-tools "
            f"version pyproject's test extra pins)")
