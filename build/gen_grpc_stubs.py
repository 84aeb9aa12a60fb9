"""Generate the gRPC Python modules from outpost's own proto file; they are committed.

    python build/gen_grpc_stubs.py            # into appliance/transport/grpc/
    python build/gen_grpc_stubs.py --out DIR  # elsewhere (the test compares the two)

Runs grpcio-tools' protoc (the version pinned in pyproject's test extra: its output
differs between releases), then fixes two things the generator writes:

- ``import inference_pb2`` in the service module: a top-level import, which fails inside
  the ``appliance.transport.grpc`` package; made package-relative.
- the messages go into a descriptor pool of their own, not protobuf's default one:
  tritonclient registers Triton's own files, with the same message names, in the default
  pool, and a process holding both (a test, a tool) would fail to import the second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "appliance" / "transport" / "grpc"
PROTO_DIR = PACKAGE / "proto"
PROTO = "inference.proto"
MODULES = ("inference_pb2.py", "inference_pb2_grpc.py")

HEADER = ("# ruff: noqa\n"
          "# Made by build/gen_grpc_stubs.py from proto/inference.proto: edit the proto and "
          "run it again.\n")
FIXES = {
    "inference_pb2.py": [(
        "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
        "# A pool of our own: tritonclient puts Triton's files, with these names, in the\n"
        "# default one (build/gen_grpc_stubs.py).\n"
        "POOL = _descriptor_pool.DescriptorPool()\n"
        "DESCRIPTOR = POOL.AddSerializedFile(",
    )],
    "inference_pb2_grpc.py": [(
        "\nimport inference_pb2 as inference__pb2\n",
        "\nfrom . import inference_pb2 as inference__pb2\n",
    )],
}


def generate(out: Path) -> list[Path]:
    """Write the fixed-up modules into ``out``; returns their paths."""
    from grpc_tools import protoc  # noqa: PLC0415 (a build tool, not a run-time dependency)

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as raw:
        include = Path(protoc.__file__).parent / "_proto"  # protobuf's well-known types
        code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
                            f"--python_out={raw}", f"--grpc_python_out={raw}", PROTO])
        if code != 0:
            raise SystemExit(f"protoc failed on {PROTO_DIR / PROTO} (exit {code})")
        written = []
        for name in MODULES:
            text = (Path(raw) / name).read_text()
            for old, new in FIXES[name]:
                if text.count(old) != 1:
                    raise SystemExit(f"{name}: the generator's output changed: expected "
                                     f"{old.strip()!r} once; update build/gen_grpc_stubs.py")
                text = text.replace(old, new)
            path = out / name
            path.write_text(HEADER + text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE,
                        help="folder for the generated modules (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
