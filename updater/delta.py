"""Binary deltas of a release: the new release archive rebuilt from a model file the
device already holds.

Two methods; the fleet keeps the smaller:

- ``zstd-patch``: the new archive compressed by zstd with the old model file as a raw
  prefix (what ``zstd --patch-from`` does), window and long-distance matching sized to
  cover both. Good when whole byte runs are unchanged (a retrained head).
- ``xor-planes``: each initializer that kept its name, type and size is replaced by the
  XOR of its bits with the old one's, split into byte planes (all first bytes, then all
  second bytes ...), then the same zstd. When every weight moved a little, the sign,
  exponent and high mantissa bytes mostly XOR to zero and compress; raw bytes don't.

A delta file is ``MAGIC``, one JSON header line (method, the archive's length, the
regions to un-XOR), then the zstd payload. It is a signed TUF target itself, and what it
rebuilds must match the full release's signed length and sha256 before anything uses it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from updater.errors import UpdaterError

MAGIC = b"OUTPOST-DELTA 1\n"
METHODS = ("zstd-patch", "xor-planes")
LEVEL = 9  # higher levels win ~1% more on weights and cost several times the time
MIN_TENSOR_BYTES = 256  # smaller initializers are left to plain zstd
MAX_WINDOW_LOG = 31


class DeltaError(UpdaterError):
    """A delta that can't rebuild its release (bad header, corrupt payload, too long)."""


def _zstd():
    """The zstd module: the standard library's from Python 3.14, the backport before."""
    try:
        from compression import zstd  # noqa: PLC0415
    except ImportError:
        try:
            from backports import zstd  # noqa: PLC0415
        except ImportError as exc:
            raise DeltaError("deltas need zstd: install backports.zstd (pip install "
                             "backports.zstd) or run Python 3.14") from exc
    return zstd


def _window_log(total: int) -> int:
    return min(MAX_WINDOW_LOG, max(20, math.ceil(math.log2(max(total, 2)))))


def _compress(data: bytes, base: bytes) -> bytes:
    zstd = _zstd()
    params = zstd.CompressionParameter
    options = {params.compression_level: LEVEL,
               params.window_log: _window_log(len(base) + len(data)),
               params.enable_long_distance_matching: 1}
    comp = zstd.ZstdCompressor(options=options,
                               zstd_dict=zstd.ZstdDict(base, is_raw=True).as_prefix)
    return comp.compress(data, zstd.ZstdCompressor.FLUSH_FRAME)


def _planes(data: bytes, width: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(-1, width).T.tobytes()


def _unplanes(data: bytes, width: int) -> bytes:
    return np.frombuffer(data, np.uint8).reshape(width, -1).T.tobytes()


def _xor(a: bytes, b: bytes) -> bytes:
    return np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)).tobytes()


def _initializers(model: bytes) -> dict[str, tuple[int, bytes]]:
    """{name: (element width in bytes, raw bytes)} of the initializers stored raw."""
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    proto = onnx.load_model_from_string(model)
    out = {}
    for t in proto.graph.initializer:
        if len(t.raw_data) < MIN_TENSOR_BYTES:
            continue
        try:
            width = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            continue
        if width in (1, 2, 4, 8) and len(t.raw_data) % width == 0:
            out[t.name] = (width, t.raw_data)
    return out


def _regions(archive: bytes, old_model: bytes, new_model: bytes) -> list[list[int]]:
    """[new offset, length, old offset, width] of each initializer kept in shape.

    Offsets are found by searching the raw bytes in order; a hit on an equal run elsewhere
    is still a reversible transform, and the rebuilt archive is hash-checked anyway."""
    old = _initializers(old_model)
    regions, new_at, old_at = [], 0, 0
    for name, (width, raw) in _initializers(new_model).items():
        prev = old.get(name)
        if prev is None or prev[0] != width or len(prev[1]) != len(raw):
            continue
        n = archive.find(raw, new_at)
        o = old_model.find(prev[1], old_at)
        if n < 0 or o < 0:
            continue
        regions.append([n, len(raw), o, width])
        new_at, old_at = n + len(raw), o + len(raw)
    return regions


def make_delta(archive: bytes, old_model: bytes, new_model: bytes, method: str) -> bytes:
    """The delta that rebuilds ``archive`` (holding ``new_model``) from ``old_model``."""
    regions = []
    data = archive
    if method == "xor-planes":
        regions = _regions(archive, old_model, new_model)
        buf = bytearray(archive)
        for n, length, o, width in regions:
            buf[n:n + length] = _planes(_xor(archive[n:n + length],
                                             old_model[o:o + length]), width)
        data = bytes(buf)
    elif method != "zstd-patch":
        raise ValueError(f"delta method {method!r}: one of {', '.join(METHODS)}")
    header = json.dumps({"method": method, "length": len(archive), "regions": regions})
    return MAGIC + header.encode() + b"\n" + _compress(data, old_model)


def best_delta(archive: bytes, old_model: bytes, new_model: bytes) -> tuple[str, bytes, dict]:
    """(method, delta) of the smaller method, and {method: size} of each."""
    made = {m: make_delta(archive, old_model, new_model, m) for m in METHODS}
    method = min(made, key=lambda m: len(made[m]))
    return method, made[method], {m: len(d) for m, d in made.items()}


def apply_delta(delta_path: Path, base_path: Path, out_path: Path, length: int) -> None:
    """Rebuild the archive into the new file ``out_path``; exactly ``length`` bytes or
    DeltaError (the file removed: nothing half-written is left to be taken for whole)."""
    try:
        _apply(Path(delta_path), Path(base_path), Path(out_path), length)
    except DeltaError:
        Path(out_path).unlink(missing_ok=True)
        raise
    except (OSError, ValueError, _zstd().ZstdError) as exc:
        Path(out_path).unlink(missing_ok=True)
        raise DeltaError(f"delta {delta_path} can't be applied: {exc}") from exc


def _apply(delta_path: Path, base_path: Path, out_path: Path, length: int) -> None:
    zstd = _zstd()
    base = base_path.read_bytes()
    with open(delta_path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise DeltaError(f"{delta_path}: not an Outpost delta (bad magic)")
        header = json.loads(f.readline(1 << 24))
        if header.get("length") != length:
            raise DeltaError(f"{delta_path}: rebuilds {header.get('length')} bytes, the "
                             f"signed release has {length}")
        regions = header.get("regions", [])
        for n, size, o, width in regions:
            if (width not in (1, 2, 4, 8) or size % width or n < 0 or o < 0
                    or n + size > length or o + size > len(base)):
                raise DeltaError(f"{delta_path}: region {[n, size, o, width]} out of bounds")
        dec = zstd.ZstdDecompressor(
            zstd_dict=zstd.ZstdDict(base, is_raw=True).as_prefix,
            options={zstd.DecompressionParameter.window_log_max: MAX_WINDOW_LOG})
        written = 0
        with open(out_path, "xb") as out:
            while not dec.eof:
                chunk = f.read(1 << 20)
                if not chunk and dec.needs_input:
                    raise DeltaError(f"{delta_path}: the patch ends before its data does")
                while True:  # bounded output per call: a bomb stops at length + 1
                    part = dec.decompress(chunk, max_length=1 << 20)
                    chunk = b""
                    written += len(part)
                    if written > length:
                        raise DeltaError(f"{delta_path}: expands past the signed "
                                         f"{length} bytes")
                    out.write(part)
                    if dec.eof or dec.needs_input:
                        break
            if written != length:
                raise DeltaError(f"{delta_path}: rebuilt {written} bytes of {length}")
        with open(out_path, "r+b") as out:
            for n, size, o, width in regions:
                out.seek(n)
                planes = out.read(size)
                out.seek(n)
                out.write(_xor(_unplanes(planes, width), base[o:o + size]))
            out.flush()
            os.fsync(out.fileno())
