"""`outpost infer MODEL --input name=file.npy`: one request, outputs printed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from appliance.cli.common import add_connect_options
from appliance.errors import InvalidArgument


def register(sub) -> None:
    p = sub.add_parser("infer", help="send one inference request and print the outputs")
    p.add_argument("model")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input tensor from a .npy file (repeat for each input)")
    p.add_argument("--version", type=int, help="pin a version (default: the router picks)")
    p.add_argument("--output", "-o", action="append", metavar="NAME",
                   help="only this output (repeat for several)")
    p.add_argument("--timeout-ms", type=int)
    p.add_argument("--save", type=Path, metavar="DIR",
                   help="also write each output to DIR/NAME.npy")
    p.add_argument("--json", action="store_true", help="print outputs as JSON")
    add_connect_options(p)
    p.set_defaults(func=infer)


def _load_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    inputs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InvalidArgument(f"--input {spec!r} must look like NAME=FILE.npy")
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            raise InvalidArgument(f"--input {name}: can't read {path} as a .npy array: "
                                  f"{exc or type(exc).__name__}") from exc
        if not isinstance(array, np.ndarray):  # an .npz archive holds several
            array.close()
            raise InvalidArgument(f"--input {name}: {path} is an .npz archive, not one "
                                  f"array; save the input with numpy.save as a .npy file")
        inputs[name] = array
    if not inputs:
        raise InvalidArgument("give at least one --input NAME=FILE.npy "
                              "('outpost' metadata shows the model's inputs)")
    return inputs


def infer(args) -> int:
    import os  # noqa: PLC0415

    from appliance.client import Client  # noqa: PLC0415

    inputs = _load_inputs(args.input)
    token = args.token or os.environ.get("OUTPOST_TOKEN")
    with Client(args.socket, tcp=args.tcp, token=token) as client:
        result = client.infer(args.model, inputs, version=args.version, outputs=args.output,
                              timeout_ms=args.timeout_ms)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for name, arr in result.outputs.items():
            np.save(args.save / f"{name}.npy", arr)
    if args.json:
        print(json.dumps({"model": result.model, "version": result.version,
                          "outputs": {n: a.tolist() for n, a in result.outputs.items()}}))
        return 0
    print(f"model {result.model} version {result.version}")
    with np.printoptions(precision=5, suppress=True, threshold=64, edgeitems=4):
        for name, arr in result.outputs.items():
            print(f"{name}: {arr.dtype}{list(arr.shape)}")
            print(arr)
    return 0
